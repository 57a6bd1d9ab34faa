"""The examples and benchmarks keep their word: arguments parsed, --quick short, results written
only when asked, and matrix products on one BLAS thread, as in training.

Scripts run as a user runs them (a fresh interpreter, working directory a temporary one, so any
stray directory they create is seen). Subprocesses get OPENBLAS_NUM_THREADS=1 unless the caller
set it: on 2 shared cores OpenBLAS's spinning threads make a short run many times slower.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from minivae import linear_gaussian as lg
from minivae import study
from minivae.engine import blas

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1"),
       "MPLBACKEND": "Agg"}
RESULTS = ROOT / "benchmarks" / "results"

# example -> (files its --quick run writes in its run directory, metrics.json files in it)
TRAINING_EXAMPLES = {
    "train_mnist": (["reconstructions.png", "samples.png", "latent.png", "curves.png"],
                    ["metrics.json"]),
    "ae_vs_vae": (["ae_vs_vae.png"], ["autoencoder/metrics.json", "vae/metrics.json"]),
    "latent2d_manifold": (["latent.png", "manifold.png"], ["metrics.json"]),
}


def _run(args, cwd, timeout=60):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    return proc


def _snapshot(directory: Path) -> dict:
    """{name: (size, mtime_ns)} of every file under ``directory``."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


# -- the three training examples ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TRAINING_EXAMPLES))
def test_quick_runs_one_short_epoch_into_the_examples_own_directory(tmp_path, name):
    """The reported command, `python examples/<name>.py --quick`: no directory named --quick,
    the run in runs/examples/<name>, 1 epoch on 2,000 training digits."""
    proc = _run([ROOT / "examples" / f"{name}.py", "--quick"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (tmp_path / "--quick").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]
    out = tmp_path / "runs" / "examples" / name
    assert [p.name for p in (tmp_path / "runs" / "examples").iterdir()] == [name]
    pngs, metrics = TRAINING_EXAMPLES[name]
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    for m in metrics:
        doc = json.loads((out / m).read_text())
        assert len(doc["epochs"]) == 1 and doc["config"]["epochs"] == 1, m
        assert doc["dataset"]["n_train"] == 2000, m


def test_an_output_directory_may_come_before_or_after_quick(tmp_path):
    proc = _run([ROOT / "examples" / "latent2d_manifold.py", "--quick", tmp_path / "mine"],
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert (tmp_path / "mine" / "manifold.png").exists()


def test_an_unknown_option_is_refused_before_anything_is_written(tmp_path):
    proc = _run([ROOT / "examples" / "train_mnist.py", "--quik"], cwd=tmp_path)
    assert proc.returncode == 2 and "unrecognized arguments: --quik" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# -- one BLAS thread, as in training ---------------------------------------------------------------
needs_pinnable_blas = pytest.mark.skipif(not blas.pinnable(),
                                         reason="NumPy's BLAS is not an OpenBLAS minivae can pin")


@pytest.fixture
def two_blas_threads():
    """OpenBLAS on 2 threads for the test, so that a block on 1 thread is visible."""
    before = blas.set_threads(2)
    yield
    blas.set_threads(before)


def _threads():
    return blas.describe()["threads"]


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.py"))


def test_every_example_is_covered_here():
    assert set(EXAMPLES) == {"ae_vs_vae", "backprop_through_sampling", "bottleneck",
                             "check_your_own_layer", "latent2d_manifold", "latent_holes",
                             "pca_linear_autoencoder", "train_mnist"}


@needs_pinnable_blas
@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_does_its_work_on_one_blas_thread(name, tmp_path, monkeypatch, two_blas_threads):
    """main() with the work replaced by a spy that records the BLAS thread count it runs under."""
    mod = _load_example(name)
    seen = []
    ok = types.SimpleNamespace(passed=True)
    if name == "check_your_own_layer":
        monkeypatch.setattr(mod, "check_layer", lambda *a, **k: seen.append(_threads()) or
                            types.SimpleNamespace(passed=len(seen) == 1))
        argv = None
    else:
        monkeypatch.setattr(mod, "run", lambda *a, **k: seen.append(_threads()) or {"report": ok})
        argv = [str(tmp_path), "--quick"]
    assert (mod.main(argv) if argv is not None else mod.main()) == 0
    assert seen and set(seen) == {1}, seen
    assert _threads() == 2, "the BLAS thread count was not restored"


@needs_pinnable_blas
def test_the_study_measures_and_trains_on_one_blas_thread(monkeypatch, two_blas_threads):
    seen = []
    estimate = study.est.estimate
    monkeypatch.setattr(study.est, "estimate",
                        lambda *a, **k: seen.append(_threads()) or estimate(*a, **k))
    model = lg.make_model(d_in=5, latent=3, seed=0)
    x = np.random.default_rng(1).normal(size=(4, 5))
    study.measure(model, x, samples=2, sweep=(1, 2), replicates=2)
    assert seen and set(seen) == {1}
    assert _threads() == 2


# -- benchmarks write results only when asked --------------------------------------------------------
BENCH_SMALL = {
    "step_time": ["--batch", "16", "--steps", "3", "--block", "0.05", "--settle", "0",
                  "--warmup", "1", "--json"],
    "sweep": ["--batches", "32", "--hidden", "16", "--steps", "2", "--rounds", "1",
              "--block", "0.05", "--settle", "0"],
    "memory_import": ["--steps", "1", "--repeats", "1"],
    "pytorch_example_vae": ["--seeds", "0", "--epochs", "1"],
    "profile_step": ["--batches", "16", "--steps", "3"],
    "profile_step --threads 2": ["--batches", "16", "--steps", "3", "--threads", "2"],
    "split_modes": ["--batches", "8", "--runs", "1", "--steps", "2"],
    "peers": ["--runs", "1", "--batches", "16", "--steps", "2", "--threads", "1"],
}


def test_no_benchmark_writes_anything_unless_asked(tmp_path):
    pytest.importorskip("torch", reason="the benchmarks compare against torch")
    before = _snapshot(RESULTS)
    for name, args in BENCH_SMALL.items():
        proc = _run([ROOT / "benchmarks" / f"{name.split()[0]}.py", *args], cwd=tmp_path,
                    timeout=120)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
        assert "# wrote" not in proc.stdout, name
        assert list(tmp_path.iterdir()) == [], f"{name} wrote {list(tmp_path.iterdir())}"
        assert _snapshot(RESULTS) == before, f"{name} wrote into benchmarks/results"


def test_save_writes_where_asked(tmp_path):
    pytest.importorskip("torch", reason="the benchmarks compare against torch")
    before = _snapshot(RESULTS)
    # step_time.py --save, with the results directory pointed at tmp_path
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import _machine; "
            "_machine.RESULTS = Path(sys.argv[2]); import step_time; "
            "sys.exit(step_time.main(sys.argv[3:]))")
    proc = _run(["-c", code, ROOT / "benchmarks", tmp_path / "results",
                 *BENCH_SMALL["step_time"], "--save"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "results" / "step_time_cpu_b16.json").read_text())
    assert res["batch"] == 16 and res["minivae_ms"] > 0
    from minivae.engine import kernels

    if kernels.available():     # the products then one Adam pass: the floor plus that pass
        assert res["adam_pass_ms"] > 0
        assert res["products_and_adam_floor_ms"] == pytest.approx(
            res["gemm_floor_ms"] + res["adam_pass_ms"])
        assert res["ratio_products_and_adam_floor_to_gemm_floor"] > 1
        assert res["ratio_torch_to_gemm_floor"] == pytest.approx(
            res["torch_ms"] / res["gemm_floor_ms"])
    else:
        assert res["adam_pass_ms"] is None and "products_and_adam_floor_ms" not in res
    # sweep.py --out STEM: both files at that stem
    proc = _run([ROOT / "benchmarks" / "sweep.py", *BENCH_SMALL["sweep"], "--out", tmp_path / "s"],
                cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "s.json").read_text())["points"][0]["batch"] == 32
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _snapshot(RESULTS) == before


@pytest.mark.parametrize("script, args, message", [
    ("profile_step", ["--batches", "0"], "must be >= 1"),
    ("profile_step", ["--batches", "32,x"], "whole numbers separated by commas"),
    ("profile_step", ["--steps", "0"], "must be >= 1"),
    ("profile_step", ["--threads", "0"], "must be >= 1"),
    ("profile_step", ["--threads", "2", "--batches", "512"], "would be split over threads"),
    ("split_modes", ["--batches", "1"], "at least --threads"),
    ("split_modes", ["--runs", "0"], "must be"),
])
def test_bad_benchmark_arguments_get_one_line_and_no_traceback(tmp_path, script, args, message):
    proc = _run([ROOT / "benchmarks" / f"{script}.py", *args], cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []
