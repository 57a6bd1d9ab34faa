"""The GPU half: CuPy against NumPy on the same weights and noise, the fused kernels against
their references on the device, float64 gradient checks on the device, no device-to-host
transfer inside a training step, and checkpoints moving between CuPy and NumPy.

Every test here needs CuPy and a working CUDA GPU and is skipped with the reason elsewhere
(benchmarks/gpu/run.sh runs them when a GPU is lent). The kernels' arithmetic is also
checked without a GPU, in tests/test_cupy_kernels.py.
"""
import math

import numpy as np
import pytest

from minivae.backend import BackendUnavailable, get_backend


@pytest.fixture(scope="module")
def gpu():
    try:
        return get_backend("cupy")
    except BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def npb():
    return get_backend("numpy")


def _pair(kind, likelihood, dtype, gpu, npb, d=64, hidden=(32,), latent=4):
    from minivae import build_model

    cfg = {"kind": kind, "d_in": d, "hidden": list(hidden), "latent": latent,
           "likelihood": likelihood}
    cpu = build_model(cfg, backend=npb, dtype=dtype, seed=3)
    dev = build_model(cfg, backend=gpu, dtype=dtype, seed=3)
    dev.params.set_flat(gpu.asarray(cpu.params.data))          # the same weights
    return cpu, dev


def _data(likelihood, n, d, rng):
    x = rng.random((n, d))
    return (x < 0.3).astype(np.float64) if likelihood == "bernoulli" else x


@pytest.mark.parametrize("kind, likelihood", [("vae", "bernoulli"), ("vae", "gaussian"),
                                              ("vae", "gaussian_learned"),
                                              ("autoencoder", "bernoulli")])
@pytest.mark.parametrize("path", ["reference", "engine"])
def test_cupy_agrees_with_numpy_on_the_same_weights_and_eps_float32(gpu, npb, kind, likelihood,
                                                                    path):
    """float32, the same weights, data and eps: loss and every gradient agree to float32
    round-off, through the reference pass and through the engine's step (fused kernels)."""
    from minivae.engine import DataParallel

    rng = np.random.default_rng(0)
    cpu, dev = _pair(kind, likelihood, "float32", gpu, npb)
    x = _data(likelihood, 48, 64, rng).astype(np.float32)
    eps = rng.standard_normal((48, 4)).astype(np.float32) if kind == "vae" else None
    run = (lambda m, xx, ee: m.loss_and_grads(xx, ee)) if path == "reference" else \
        (lambda m, xx, ee: DataParallel(m).loss_and_grads(xx, ee))
    r_cpu = run(cpu, x, eps)
    r_dev = run(dev, gpu.asarray(x), None if eps is None else gpu.asarray(eps))
    assert float(r_dev.loss) == pytest.approx(float(r_cpu.loss), rel=2e-5)
    g_cpu, g_dev = np.asarray(r_cpu.grads), gpu.to_host(r_dev.grads)
    assert g_dev.dtype == np.float32
    scale = np.abs(g_cpu).max()
    np.testing.assert_allclose(g_dev, g_cpu, rtol=1e-3, atol=2e-5 * scale)


def test_gradient_checks_pass_on_the_gpu_in_float64(gpu):
    from minivae.gradcheck import run_all

    report = run_all("cupy", seed=0)
    assert report.passed, report.table()
    assert len(report.checks) >= 20


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 3e-6)])
def test_fused_sampler_and_kl_on_the_gpu_equal_the_reference(gpu, dtype, tol):
    from minivae.engine import cupy_twins

    rng = np.random.default_rng(1)
    h = gpu.asarray(rng.standard_normal((37, 10)) * 2, dtype=dtype)
    eps = gpu.asarray(rng.standard_normal((37, 5)), dtype=dtype)
    dz = gpu.asarray(rng.standard_normal((37, 5)), dtype=dtype)
    mu, logvar = h[:, :5], h[:, 5:]
    fused = cupy_twins.sample_kl_fused(gpu.xp, mu, logvar, eps, dz, 0.7)
    ref = cupy_twins.sample_kl_reference(gpu.xp, mu, logvar, eps, dz, 0.7)
    for a, b in zip(fused, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(gpu.to_host(a), gpu.to_host(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 3e-6)])
def test_fused_bernoulli_on_the_gpu_equals_the_reference_at_any_logit(gpu, dtype, tol):
    from minivae import losses
    from minivae.engine import cupy_twins

    rng = np.random.default_rng(2)
    logits = rng.standard_normal((6, 50)) * 30
    logits[0, :4] = [0.0, -0.0, 800.0, -800.0]
    x = rng.random((6, 50))
    x[1] = x[1] < 0.5
    px = losses.Bernoulli(gpu.xp, 50)
    lo, xx = gpu.asarray(logits, dtype=dtype), gpu.asarray(x, dtype=dtype)
    nll_f, cache_f = cupy_twins.bernoulli_nll(px, lo, xx)
    nll_r, cache_r = px.nll(lo, xx)
    np.testing.assert_allclose(gpu.to_host(nll_f), gpu.to_host(nll_r), rtol=tol)
    for dout in (0.25, gpu.asarray(rng.random(6), dtype=dtype)):
        np.testing.assert_allclose(gpu.to_host(cupy_twins.bernoulli_nll_backward(px, dout, cache_f)),
                                   gpu.to_host(px.nll_backward(dout, cache_r)), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 2e-6)])
def test_fused_adam_on_the_gpu_equals_the_reference_update(gpu, dtype, tol):
    from minivae.optim import Adam
    from minivae.params import Layout, Params

    rng = np.random.default_rng(4)
    from minivae.engine import cupy_twins

    for kw in ({}, {"weight_decay": 0.1, "decoupled": True}):
        P1, P2 = (Params(Layout([("w", (1000,)), ("b", (7,))]), gpu, dtype) for _ in range(2))
        start = rng.standard_normal(1007)
        P1.set_flat(start)
        P2.set_flat(start)
        o1, o2 = Adam(P1, lr=0.01, **kw), Adam(P2, lr=0.01, **kw)
        for _ in range(4):
            g = gpu.asarray(rng.standard_normal(1007), dtype=dtype)
            for o, update in ((o1, cupy_twins.adam_update), (o2, Adam.update)):
                o.start_step()
                update(o, 0, 1007, (g.copy(),))
        for a, b in ((P1.data, P2.data), (o1.m, o2.m), (o1.v, o2.v)):
            np.testing.assert_allclose(gpu.to_host(a), gpu.to_host(b), rtol=tol, atol=tol)


def test_a_training_step_on_the_gpu_never_synchronizes_with_the_host(gpu, tmp_path, monkeypatch):
    """No device-to-host transfer inside a step (each would stall the host on the GPU's
    queue): every step of a short run is made under cupyx.allow_synchronize(False), which
    raises on any synchronizing transfer; the loop's own read-backs (two sums per log
    interval) are counted through Backend.to_host and float(). tests/test_train.py checks the
    same loop transfer by transfer on the strict backend."""
    import cupyx

    if not hasattr(cupyx, "allow_synchronize"):
        pytest.skip("this CuPy has no cupyx.allow_synchronize (deprecated since CuPy 10); the "
                    "strict-backend transfer count in tests/test_train.py still applies")
    from minivae import train as train_mod
    from minivae.data import Dataset
    from minivae.train import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    x = rng.random((200, 16)).astype(np.float32)
    ds = Dataset("tiny", x[:160], np.zeros(160, np.int64), x[160:], np.zeros(40, np.int64),
                 image_shape=(4, 4))
    step = train_mod.train_step
    steps = {"n": 0}

    def guarded(*a, **k):
        with cupyx.allow_synchronize(False):
            r = step(*a, **k)
        steps["n"] += 1
        return r

    monkeypatch.setattr(train_mod, "train_step", guarded)
    t = Trainer(TrainConfig(hidden=[8], latent=2, epochs=1, batch_size=8, log_every=5,
                            backend="cupy", binarize="dynamic", warmup_epochs=1.0,
                            progress=False, figures=False, out=str(tmp_path / "run")),
                dataset=ds, log=lambda m: None)
    assert t.fit() == "done" and steps["n"] == 20
    assert math.isfinite(t.history[-1]["train_loss"])


@pytest.mark.parametrize("first, then", [("cupy", "numpy"), ("numpy", "cupy")])
def test_a_checkpoint_moves_between_cupy_and_numpy(gpu, tmp_path, first, then):
    """Train an epoch on one backend, resume on the other: the weights and optimizer state
    arrive exactly, training continues and the metrics stay finite."""
    from minivae.data import Dataset
    from minivae.train import TrainConfig, Trainer, load_checkpoint

    rng = np.random.default_rng(0)
    x = rng.random((200, 16)).astype(np.float32)
    ds = Dataset("tiny", x[:160], np.zeros(160, np.int64), x[160:], np.zeros(40, np.int64),
                 image_shape=(4, 4))
    out = tmp_path / "run"
    t = Trainer(TrainConfig(hidden=[8], latent=2, epochs=1, batch_size=16, backend=first,
                            progress=False, figures=False, out=str(out)),
                dataset=ds, log=lambda m: None)
    assert t.fit() == "done"
    arrays, _ = load_checkpoint(out)
    r = Trainer.resume(out, dataset=ds, log=lambda m: None, epochs=2, backend=then)
    assert r.backend.name == then
    np.testing.assert_array_equal(r.backend.to_host(r.model.params.data), arrays["params"])
    np.testing.assert_array_equal(r.backend.to_host(r.opt.m), arrays["opt.m"])
    assert r.fit() == "done" and len(r.history) == 2
    assert all(math.isfinite(row["test_loss"]) for row in r.history)
