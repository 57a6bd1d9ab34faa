"""minivae against PyTorch on the same weights and eps: gradients, and 100+ Adam steps, agree
to round-off in float64 (and to float32 round-off in float32)."""
import json
import sys

import numpy as np
import pytest

from minivae import VAE, Adam, Autoencoder
from minivae.cli import main

torch = pytest.importorskip("torch")

from minivae.compare import FrameworkMissing, compare, diff, require, twin  # noqa: E402

LIKELIHOODS = ["bernoulli", "gaussian", "gaussian_learned"]


def batch(rng, B, D, likelihood, dtype="float64"):
    x = (rng.random((B, D)) < 0.3) if likelihood == "bernoulli" else rng.random((B, D))
    return x.astype(dtype)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("cls", [VAE, Autoencoder])
def test_gradients_agree_with_torch_to_roundoff_in_float64(cls, likelihood, rng):
    m = cls(d_in=30, hidden=(16, 12), latent=4, likelihood=likelihood, activation="tanh",
            dtype="float64", seed=3)
    x = batch(rng, 9, 30, likelihood)
    eps = rng.standard_normal((9, 4)) if cls is VAE else None
    c = compare(m, x, eps)
    assert set(c.per_tensor) == {"loss", *m.params.layout.names}
    assert c.max_rel_diff <= 1e-12, c.table()
    assert c.passed


def test_default_vae_agrees_in_float64_and_float32(rng):
    x = batch(rng, 64, 784, "bernoulli")
    eps = rng.standard_normal((64, 20))
    c64 = compare(VAE(dtype="float64", seed=1), x, eps)
    c32 = compare(VAE(dtype="float32", seed=1), x.astype("float32"), eps.astype("float32"))
    assert c64.max_rel_diff <= 1e-12, c64.table()
    assert c32.max_rel_diff <= 1e-5, c32.table()
    assert c32.max_rel_diff > c64.max_rel_diff  # float32 round-off is visible, float64's is not


def test_a_different_eps_is_caught(rng):
    """Non-vacuous: the comparison does see the noise; a twin fed other eps disagrees."""
    m = VAE(d_in=30, hidden=(16,), latent=4, dtype="float64", seed=0)
    x, eps = batch(rng, 8, 30, "bernoulli"), rng.standard_normal((8, 4))
    m.loss_and_grads(m.backend.asarray(x), m.backend.asarray(eps))
    _, g_other = twin(m).loss_and_grads(x, eps + 0.1)
    assert diff(m.params.grad, g_other)["max_rel"] > 1e-3


def test_relative_difference_is_against_the_tensor_scale():
    d = diff(np.array([1e-20, 2.0]), np.array([0.0, 2.0 + 2e-12]))
    assert d["max_abs"] == pytest.approx(2e-12)
    assert d["max_rel"] == pytest.approx(1e-12)  # not 1.0, as |a-b|/|a| at the 1e-20 entry
    assert diff(np.zeros(3), np.zeros(3)) == {"max_abs": 0.0, "max_rel": 0.0}


def test_100_adam_steps_match_torch_optim_adam_step_for_step(rng):
    """Same initial weights, same stream of batches and eps: minivae's Adam and torch.optim.Adam
    give the same loss at every step and the same weights after 120 steps (float64)."""
    steps, B = 120, 32
    m = VAE(d_in=64, hidden=(48,), latent=6, dtype="float64", seed=5)
    tw = twin(m)
    opt = Adam(m.params, lr=3e-3)
    topt = torch.optim.Adam(tw.params, lr=3e-3)
    data = batch(rng, 256, 64, "bernoulli")
    losses = []
    for t in range(steps):
        x = data[(t * B) % 256:(t * B) % 256 + B]
        eps = rng.standard_normal((B, 6))
        r = m.loss_and_grads(m.backend.asarray(x), m.backend.asarray(eps))
        opt.step()
        topt.zero_grad()
        loss_t = tw.loss(tw.tensor(x), tw.tensor(eps))
        loss_t.backward()
        topt.step()
        losses.append((float(r.loss), float(loss_t.detach())))
    losses = np.array(losses)
    assert losses[-1, 0] < losses[0, 0] - 5.0  # it really trained
    np.testing.assert_allclose(losses[:, 0], losses[:, 1], rtol=1e-10, atol=0)
    w_mv, w_t = m.backend.to_host(m.params.data), tw.flat()
    assert diff(w_mv, w_t)["max_rel"] <= 1e-10
    assert diff(w_mv, m.backend.to_host(VAE(d_in=64, hidden=(48,), latent=6, dtype="float64",
                                                seed=5).params.data))["max_rel"] > 1e-2


def test_cli_compare_json_float64(capsys):
    rc = main(["compare", "--against", "torch", "--dtype", "float64", "--json", "--batch", "32"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0
    assert out["against"] == "torch" and out["dtype"] == "float64"
    assert out["max_rel_diff"] <= 1e-10
    assert {"loss", "enc.0.W", "enc.0.b", "enc.2.W", "dec.2.b"} <= set(out["per_tensor"])
    assert out["max_rel_diff"] == max(d["max_rel"] for d in out["per_tensor"].values())


def test_cli_compare_table_on_strict_backend(capsys):
    rc = main(["compare", "--backend", "strict", "--model", "autoencoder", "--likelihood",
               "gaussian", "--hidden", "32,16", "--latent", "3", "--d-in", "20", "--batch", "5",
               "--dtype", "float32"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "enc.0.W" in text and "dec.4.b" in text and "agree" in text


def test_missing_framework_names_the_extra_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(FrameworkMissing, match=r"minivae\[compare\].*torch==2\.13\.0"):
        require("torch")
    assert main(["compare", "--against", "torch"]) == 2
    assert "pip install" in capsys.readouterr().err


def test_missing_jax_names_its_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jax", None)  # import jax -> ImportError
    assert main(["compare", "--against", "jax"]) == 2
    assert "minivae[jax]" in capsys.readouterr().err


def test_jax_twin_agrees_to_float64_round_off():
    """CI installs the jax extra, so this runs there; elsewhere it is skipped, saying why."""
    pytest.importorskip("jax", reason="jax not installed: pip install 'minivae[jax]'")
    for cls, lik in [(VAE, "bernoulli"), (VAE, "gaussian_learned"), (Autoencoder, "gaussian")]:
        m = cls(d_in=30, hidden=(16,), latent=4, likelihood=lik, dtype="float64", seed=3)
        rng = np.random.default_rng(0)
        x = batch(rng, 9, 30, lik)
        eps = rng.standard_normal((9, 4)) if cls is VAE else None
        c = compare(m, x, eps, against="jax")
        assert c.max_rel_diff <= 1e-12, c.table()


def test_cli_compare_against_jax_on_the_default_model(capsys):
    pytest.importorskip("jax", reason="jax not installed: pip install 'minivae[jax]'")
    assert main(["compare", "--against", "jax", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["against"] == "jax" and res["max_rel_diff"] <= 1e-10


def test_step_time_benchmark_prints_its_json_as_the_last_line():
    """benchmarks/step_time.py runs (a few steps) and ends with the documented JSON object."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"
    out = subprocess.run([sys.executable, str(script), "--batch", "16", "--steps", "3",
                          "--block", "0.05", "--settle", "0", "--warmup", "1",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["batch"] == 16 and res["device"] == "cpu"
    for key in ("minivae_ms", "torch_ms", "gemm_floor_ms"):
        assert res[key] > 0
    assert res["ratio_minivae_to_torch"] == pytest.approx(res["minivae_ms"] / res["torch_ms"])


def test_step_time_races_every_compiled_peer_or_says_why_not():
    """--peers: torch fused Adam, torch.compile and JAX jit (value_and_grad + optax.adam, the
    whole step compiled) run beside minivae, or are listed as skipped with the reason; the
    machine record names the versions."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"
    out = subprocess.run([sys.executable, str(script), "--batch", "16", "--steps", "3",
                          "--block", "0.05", "--settle", "0", "--warmup", "1", "--threads", "1",
                          "--peers", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for peer in ("torch_fused_adam", "torch_compile", "jax_jit"):
        ran = peer in res["contenders"]
        assert ran != (peer in res["skipped"]), peer
        if ran:
            assert res[f"{peer}_ms"] > 0
            assert res[f"ratio_minivae_to_{peer}"] == pytest.approx(
                res["minivae_ms"] / res[f"{peer}_ms"])
    for lib in ("torch", "jax", "optax"):
        assert lib in res["machine"]


def test_ab_step_time_runs_two_checkouts_side_by_side():
    """benchmarks/ab_step_time.py against this very checkout: both run, the JSON is the last
    line, and nothing is written without --save."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    results = sorted((root / "benchmarks" / "results").glob("*"))
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "ab_step_time.py"),
                          "--other", str(root), "--batch", "16", "--steps", "3", "--block",
                          "0.05", "--settle", "0", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["this_ms"] > 0 and res["other_ms"] > 0 and res["torch_ms"] > 0
    assert res["ratio_this_to_other"] == pytest.approx(res["this_ms"] / res["other_ms"])
    assert sorted((root / "benchmarks" / "results").glob("*")) == results
    bad = subprocess.run([sys.executable, str(root / "benchmarks" / "ab_step_time.py"),
                          "--other", str(root / "tests")], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "is not a minivae package" in bad.stderr
