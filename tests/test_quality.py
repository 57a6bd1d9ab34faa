"""CI's short version of benchmarks/quality.py (issue 18): the benchmark runs, minivae's loss
tracks the PyTorch example's within a stated tolerance, and the two IWAE estimators are the same
estimator (checked on one set of weights, so a wrong constant or term in either would show)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402
from pytorch_example_vae import example_model, pytorch_iwae  # noqa: E402

from minivae.data import load_dataset  # noqa: E402
from minivae.evaluate import elbo, iwae  # noqa: E402
from minivae.train import TrainConfig, Trainer  # noqa: E402


ROOT = BENCH.parent
RESULTS = BENCH / "results"


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_quick_benchmark_runs_and_minivae_tracks_the_pytorch_example(capsys, tmp_path):
    """--quick: mnist10k, 3,000 / 500 images, 3 epochs, seeds 0 and 1, minivae's default init
    and init="torch". Tolerance QUICK_TOLERANCE_NATS (4 nats, about two standard deviations of a
    two-seed mean this early in training): minivae's default is no worse than the example by
    more than that, and the like-for-like init="torch" is within it on either side, for -ELBO
    and -IWAE_100 alike. Each run's -IWAE_100 lies below its -ELBO (a tighter bound)."""
    import minivae

    before = _snapshot(RESULTS)
    threads = (minivae.get_num_threads(), torch.get_num_threads())
    doc = quality.main(["--quick"])
    assert _snapshot(RESULTS) == before            # nothing written without --save
    assert (minivae.get_num_threads(), torch.get_num_threads()) == threads   # restored
    assert doc["config"]["threads"] == 1 and doc["machine"]["minivae_threads"] == 1
    tol = quality.QUICK_TOLERANCE_NATS
    d = doc["datasets"]["mnist10k"]
    assert (d["n_train"], d["n_test"]) == (3000, 500)
    default = f"minivae:{quality.default_init()}"
    assert set(d["summary"]) == {default, "minivae:torch", quality.TORCH}
    for model, runs in d["runs"].items():
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert len(r["test_loss"]) == 3 and all(math.isfinite(v) for v in r["test_loss"])
            assert 0 < r["nll_100"] < r["elbo_loss"] < 300, (model, r)
    s = d["summary"]
    for key in ("elbo_loss", "nll_100"):
        ref = s[quality.TORCH][key]["mean"]
        assert s[default][key]["mean"] <= ref + tol, (key, s)
        assert abs(s["minivae:torch"][key]["mean"] - ref) <= tol, (key, s)
    out = capsys.readouterr().out
    assert "-ELBO minus the PyTorch example's" in out and "(default)" in out
    table = quality.markdown(doc).splitlines()
    assert len(table) == 2 + len(d["summary"])
    assert f"| mnist10k | {default} **(default)** |" in "\n".join(table)
    quality.figure(doc, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_quality_table_is_the_committed_results():
    """The README's Quality table is quality.markdown() of benchmarks/results/quality.json, row
    for row (the default marked as the code has it), and that file holds every seed of every
    model it summarizes, minivae's default init among them, at 10 epochs, batch 128, k = 100."""
    import json

    doc = json.loads((RESULTS / "quality.json").read_text())
    readme = (ROOT / "README.md").read_text()
    for row in quality.markdown(doc).splitlines():
        assert row in readme, row
    assert f"minivae:{quality.default_init()}" in doc["datasets"]["fashion-mnist"]["runs"]
    assert (doc["config"]["epochs"], doc["config"]["batch"], doc["config"]["k"]) == (10, 128, 100)
    assert len(doc["config"]["seeds"]) >= 3
    for name in ("mnist10k", "fashion-mnist"):
        d = doc["datasets"][name]
        for model, runs in d["runs"].items():
            assert [r["seed"] for r in runs] == doc["config"]["seeds"], (name, model)
            assert d["summary"][model]["elbo_loss"]["mean"] == pytest.approx(
                float(np.mean([r["elbo_loss"] for r in runs])))


def _torch_copy(model):
    """The PyTorch example's VAE holding minivae ``model``'s weights (W is (in, out) in minivae,
    (out, in) in nn.Linear; the encoder's last layer is mu | logvar)."""
    VAE, loss_function = example_model()
    net = VAE()
    g = {name: {k: np.asarray(v) for k, v in model.params.group(name).items()}
         for name in ("enc.0", "enc.2", "dec.0", "dec.2")}
    L = model.latent
    pairs = [(net.fc1, g["enc.0"]["W"], g["enc.0"]["b"]),
             (net.fc21, g["enc.2"]["W"][:, :L], g["enc.2"]["b"][:L]),
             (net.fc22, g["enc.2"]["W"][:, L:], g["enc.2"]["b"][L:]),
             (net.fc3, g["dec.0"]["W"], g["dec.0"]["b"]),
             (net.fc4, g["dec.2"]["W"], g["dec.2"]["b"])]
    with torch.no_grad():
        for lin, W, b in pairs:
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(W.T)))
            lin.bias.copy_(torch.from_numpy(np.ascontiguousarray(b)))
    return net, loss_function


def test_pytorch_iwae_is_minivaes_estimator_on_the_same_weights(tmp_path):
    """One trained minivae model, copied into the example's nn.Module: the example's -ELBO and
    pytorch_iwae's -IWAE_100 agree with minivae.evaluate's on 1,000 test digits within Monte
    Carlo noise (1.0 and 0.3 nats; the two draw different eps; measured differences up to
    0.4 and 0.12). Dropping the -log k term would
    move IWAE by 4.6 nats, a missing log p(z) or log q(z|x) by tens."""
    ds = load_dataset("mnist10k")
    t = Trainer(TrainConfig(epochs=1, seed=3, out=str(tmp_path / "run"), progress=False,
                            figures=False), dataset=ds, log=lambda m: None)
    t.fit()
    x = ds.x_test
    net, loss_function = _torch_copy(t.model)
    with torch.no_grad():
        torch.manual_seed(0)
        recon, mu, logvar = net(torch.from_numpy(x))
        torch_elbo = float(loss_function(recon, torch.from_numpy(x), mu, logvar)) / len(x)
    mv_elbo = elbo(t.model, x)["loss"]
    assert abs(torch_elbo - mv_elbo) < 1.0, (torch_elbo, mv_elbo)
    mv = -iwae(t.model, x, k=100, rng=t.model.backend.rng(1))
    th = -pytorch_iwae(net, x, k=100, seed=1)
    assert abs(mv - th) < 0.3, (mv, th)
    assert mv < mv_elbo - 2.0      # the bound is tighter than the ELBO, by more than the noise


def test_full_mnist_runs_when_its_files_are_there_and_is_skipped_with_the_reason_otherwise(
        tmp_path, capsys):
    """The same code path as the full table, on four small IDX files standing in for MNIST
    (300 / 100 random images): both models train and are evaluated; an empty directory gives a
    row saying why nothing ran."""
    from minivae.data import write_idx

    rng = np.random.default_rng(0)
    d = tmp_path / "mnist"
    d.mkdir()
    for stem, n in (("train", 300), ("t10k", 100)):
        write_idx(d / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), np.uint8))
        write_idx(d / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, np.uint8))
    args = ["--data", "mnist", "--seeds", "0", "--epochs", "1", "--k", "5", "--threads", "1",
            "--inits", "torch"]
    doc = quality.main([*args, "--mnist-dir", str(d)])
    m = doc["datasets"]["mnist"]
    assert (m["n_train"], m["n_test"], m["source"]) == (300, 100, str(d))
    assert set(m["runs"]) == {"minivae:torch", quality.TORCH}
    assert all(0 < r["nll_5"] <= r["elbo_loss"] + 1.0 for runs in m["runs"].values() for r in runs)
    (tmp_path / "empty").mkdir()
    doc = quality.main([*args, "--mnist-dir", str(tmp_path / "empty")])
    assert "not on this machine" in doc["datasets"]["mnist"]["skipped"]
    assert "| mnist | not run: " in quality.markdown(doc)
    assert "mnist          skipped:" in capsys.readouterr().out
