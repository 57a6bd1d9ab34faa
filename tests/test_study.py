"""The study toolkit: `minivae study estimators` and the four examples in examples/.

Each example runs as a learner runs it (a fresh interpreter, `python examples/<name>.py OUT
--quick`), must write its figures, and reports its numbers in OUT/metrics.json, which the
tests read. Subprocesses get OPENBLAS_NUM_THREADS=1 unless the caller set it: these are small
matrices, and when 2 cores are shared with other test processes OpenBLAS's spinning threads
make a run many times slower, not faster.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minivae import linear_gaussian as lg
from minivae import study

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1"),
       "MPLBACKEND": "Agg"}


def run_example(name, out, *args):
    # a hang guard, not a speed test: latent_holes takes ~15 s alone, 97 s was seen on a
    # host shared with two other jobs
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), str(out), *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout, json.loads((out / "metrics.json").read_text())


def assert_png(path):
    assert path.exists(), f"{path.name} was not written"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000, f"{path.name} is suspiciously small"


# -- minivae study estimators ---------------------------------------------------------------

def test_study_estimators_json_reports_every_estimator_and_the_variance_gap(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minivae", "study", "estimators", "--quick",
                           "--json", "--out", str(tmp_path)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    for key in ("pathwise", "score", "score_baseline", "analytic_kl", "mc_kl"):
        v = res[key]["mean_variance"]
        assert np.isfinite(v) and v > 0, key
    assert res["pathwise"]["mean_variance"] == res["pathwise"]["init"]
    # the headline: REINFORCE is far noisier than the reparametrization, the baseline in between
    assert res["score"]["mean_variance"] > 10 * res["pathwise"]["mean_variance"]
    assert res["pathwise"]["mean_variance"] < res["score_baseline"]["mean_variance"] \
        < res["score"]["mean_variance"]
    assert res["ratio_score_over_pathwise"]["init"] == pytest.approx(
        res["score"]["init"] / res["pathwise"]["init"])
    assert_png(tmp_path / "estimator_variance.png")
    # study II: the delta-method control variate, the measure-valued estimator and their cost
    for key in ("score_delta", "measure_valued"):
        assert np.isfinite(res[key]["init"]) and res[key]["init"] > 0, key
    cost = res["cost_decoder_evaluations"]
    assert cost["pathwise"] == 1 and cost["measure-valued"] == 1 + 4 * 20
    # ... and discrete latents against the exact gradient
    d = res["discrete"]
    for stage in ("init", "trained"):
        rows = d["rows"][stage]
        assert {"REINFORCE", "REINFORCE + LOO baseline", "Gumbel-softmax, tau 0.1",
                "straight-through, tau 3"} <= set(rows)
        for label, r in rows.items():
            assert all(np.isfinite(r[k]) and r[k] >= 0 for k in ("bias", "noise", "variance")), \
                label
    assert np.isfinite(d["exact_loss"]["init"])
    assert_png(tmp_path / "discrete_bias_variance.png")


def test_study_refuses_a_batch_larger_than_the_test_set():
    proc = subprocess.run([sys.executable, "-m", "minivae", "study", "estimators", "--batch",
                           "5000"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "argument --batch: must be <= 1000, got 5000" in proc.stderr


def test_study_rejects_one_sample_for_the_table():
    proc = subprocess.run([sys.executable, "-m", "minivae", "study", "estimators", "--samples",
                           "1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "argument --samples: must be >= 2, got 1" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--replicates", "1"], "argument --replicates: must be >= 2, got 1"),
    (["--steps", "-1"], "argument --steps: must be >= 0, got -1"),
    (["--batch", "x"], "argument --batch: expected a whole number, got 'x'"),
    (["--quick", "--out", "FILE"], "--out FILE is a file, not a directory"),
    (["--quick", "--out", ""], "--out must name a directory, got ''"),
])
def test_study_refuses_bad_flags_before_any_work(tmp_path, args, message):
    """Each flag named in one line, before the minutes of measuring (an --out that is a file
    used to be found only when the figures were written, at the end)."""
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    args = [str(afile) if a == "FILE" else a for a in args]
    message = message.replace("FILE", str(afile))
    proc = subprocess.run([sys.executable, "-m", "minivae", "study", "estimators", *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
    assert afile.read_text() == "keep me"


def test_measured_variance_falls_as_one_over_S():
    """Independent samples: Var(mean of S) = Var(one) / S, for pathwise and score alike."""
    model = lg.make_model(d_in=5, latent=3, seed=0)
    x = np.random.default_rng(1).normal(size=(4, 5))
    for estimator in ("pathwise", "score"):
        v1 = study.encoder_variance(model, x, estimator, samples=1, replicates=800)
        v4 = study.encoder_variance(model, x, estimator, samples=4, replicates=800)
        assert v1 / v4 == pytest.approx(4.0, rel=0.2), estimator


# -- the examples -------------------------------------------------------------------------

def test_pca_example_linear_autoencoder_finds_the_principal_subspace(tmp_path):
    out, m = run_example("pca_linear_autoencoder", tmp_path, "--quick")
    angles = np.array(m["principal_angles_deg"])
    assert angles.shape == (10,)
    assert angles.max() < 5.0, f"principal angles to the PCA subspace: {angles.round(1)}"
    # the same statistic for a random 10-dim subspace: nearly orthogonal (so < 5 deg means something)
    assert min(m["random_subspace_angles_deg"]) > 60.0
    # subspace yes, basis no: single decoder rows are mixtures of components
    assert np.median(m["row_to_nearest_eigenvector_deg"]) > 20.0
    assert m["ae_squared_error"] == pytest.approx(m["pca_squared_error"], rel=0.05)
    assert_png(tmp_path / "pca_angles.png")
    assert_png(tmp_path / "pca_basis.png")


def test_bottleneck_example_runs_and_the_full_width_linear_code_copies_noise(tmp_path):
    out, m = run_example("bottleneck", tmp_path, "--quick")
    err = m["squared_error_per_pixel"]
    assert set(err) == {f"{k} L={L}" for k in ("linear", "relu") for L in (2, 32, 196)}
    # the identity trap: at L = input size the linear AE reconstructs noise almost perfectly,
    # at L = 2 it cannot (it maps noise to something digit-like)
    assert err["linear L=196"]["noise"] < 0.2 * err["linear L=2"]["noise"]
    assert err["linear L=196"]["digits"] < err["linear L=32"]["digits"] < err["linear L=2"]["digits"]
    assert_png(tmp_path / "bottleneck.png")


def test_latent_holes_example_runs_and_measures_holes(tmp_path):
    out, m = run_example("latent_holes", tmp_path, "--quick")
    for k in ("ae_hole_fraction", "vae_hole_fraction"):
        assert 0.0 <= m[k] <= 1.0
    assert m["ae_tau"] > 0 and m["vae_tau"] > 0
    # the claim, measured: prior samples land in holes far more often for the plain AE
    # (about 60% vs 30% after 800 steps; 1% would mean no holes at all)
    assert m["vae_hole_fraction"] < 0.75 * m["ae_hole_fraction"]
    assert m["ae_hole_fraction"] > 0.2
    assert "in holes" in out
    assert_png(tmp_path / "latent_holes.png")


def test_backprop_through_sampling_example_passes_its_finite_difference_check(tmp_path):
    out, m = run_example("backprop_through_sampling", tmp_path, "--quick")
    assert m["gradcheck"]["passed"]
    names = {c["name"] for c in m["gradcheck"]["checks"]}
    assert {"logits", "z", "mu", "logvar", "enc.0.W"} <= names
    assert "dL/dmu      = dL/dz        + mu" in out
    assert_png(tmp_path / "backprop_through_sampling.png")


def test_a_value_given_with_quick_wins_over_quick(tmp_path):
    """--quick sets --batch 8, --replicates 5, --steps 20 unless given: an explicit value is
    used and reported (it was silently cut down to --quick's)."""
    proc = subprocess.run([sys.executable, "-m", "minivae", "study", "estimators", "--quick",
                           "--json", "--no-figure", "--replicates", "6", "--steps", "0"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    setup = json.loads(proc.stdout)["setup"]
    assert (setup["batch"], setup["replicates"], setup["train_steps"]) == (8, 6, 0)
