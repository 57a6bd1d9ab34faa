"""Categorical latents: the Gumbel-softmax sampler and the categorical KL, the DiscreteVAE, and
the discrete gradient estimators against their exact ground truth (enumeration)."""
import math

import numpy as np
import pytest

from minivae import DiscreteVAE, build_model, losses, sampling, train_step
from minivae import discrete as D
from minivae.gradcheck import check_gradients
from minivae.models import layout_of
from minivae.optim import Adam


# -- the sampler and the KL ---------------------------------------------------------------------
def test_relaxed_samples_lie_in_the_simplex_and_become_the_gumbel_max_sample_as_tau_falls(
        cpu_backend, rng):
    be, xp = cpu_backend, cpu_backend.xp
    logits = be.asarray(rng.standard_normal((50, 3, 4)) * 2)
    g = sampling.gumbel(xp, be.asarray(rng.random((50, 3, 4))))
    for tau in (5.0, 1.0, 0.3):
        y, _ = sampling.gumbel_softmax(xp, logits, g, tau)
        yh = be.to_host(y)
        assert np.all(yh >= 0) and np.allclose(yh.sum(-1), 1.0)
    hard = be.to_host(sampling.straight_through(xp, logits, g, 0.7)[0])
    cold = be.to_host(sampling.gumbel_softmax(xp, logits, g, 1e-5)[0])
    idx = np.argmax(be.to_host(logits) + be.to_host(g), axis=-1)
    np.testing.assert_array_equal(hard, np.eye(4)[idx])           # exactly one-hot, the argmax
    np.testing.assert_allclose(cold, hard, atol=1e-6)


def test_straight_through_backward_is_the_relaxed_one(rng):
    import array_api_compat.numpy as xp

    logits, g = rng.standard_normal((5, 2, 3)), sampling.gumbel(xp, rng.random((5, 2, 3)))
    G = rng.standard_normal((5, 2, 3))
    _, c_st = sampling.straight_through(xp, logits, g, 0.5)
    _, c_gs = sampling.gumbel_softmax(xp, logits, g, 0.5)
    np.testing.assert_array_equal(sampling.gumbel_softmax_backward(xp, G, c_st),
                                  sampling.gumbel_softmax_backward(xp, G, c_gs))


def test_gumbel_max_draws_exact_categorical_samples(rng):
    """argmax(l + g) with g = -log(-log u) is a draw from softmax(l): frequencies of 40,000
    draws within 4.5 standard errors of the probabilities (and a planted bug, g = u, is not)."""
    import array_api_compat.numpy as xp

    logits = np.array([1.5, 0.0, -1.0, 0.7])
    p = np.exp(logits) / np.exp(logits).sum()
    n = 40_000
    u = rng.random((n, 4))
    for noise, ok in ((sampling.gumbel(xp, u), True), (u, False)):
        freq = np.bincount(np.argmax(logits + noise, axis=1), minlength=4) / n
        z = np.abs(freq - p) / np.sqrt(p * (1 - p) / n)
        assert (z.max() < 4.5) == ok, z


def test_gumbel_noise_is_finite_even_at_u_zero():
    import array_api_compat.numpy as xp

    g = sampling.gumbel(xp, np.array([0.0, 0.5, 1 - 2**-53]))
    assert np.all(np.isfinite(g))


def test_categorical_kl_in_closed_form(cpu_backend, rng):
    be, xp = cpu_backend, cpu_backend.xp
    K, C = 3, 5
    kl0, _ = losses.kl_categorical(xp, be.asarray(np.zeros((2, K, C))))
    np.testing.assert_allclose(be.to_host(kl0), 0.0, atol=1e-15)           # q uniform
    peaked = np.full((1, K, C), -800.0)
    peaked[..., 0] = 800.0
    np.testing.assert_allclose(be.to_host(losses.kl_categorical(xp, be.asarray(peaked))[0]),
                               K * math.log(C), rtol=1e-12)                 # q one-hot
    l = rng.standard_normal((4, K, C)) * 3
    q = np.exp(l) / np.exp(l).sum(-1, keepdims=True)
    direct = (q * np.log(q * C)).sum((1, 2))
    np.testing.assert_allclose(be.to_host(losses.kl_categorical(xp, be.asarray(l))[0]), direct,
                               rtol=1e-12)


# -- the model ------------------------------------------------------------------------------------
def _tiny(seed=1, **kw):
    m = DiscreteVAE(d_in=6, hidden=(), latent=2, categories=3, dtype="float64", seed=seed,
                    init="glorot", **kw)
    m.params.set_flat(m.params.data * 3)
    return m


@pytest.fixture
def tiny_x(rng):
    return (rng.random((3, 6)) < 0.5).astype(np.float64)


def test_discrete_vae_config_layout_and_shapes(cpu_backend, rng):
    m = DiscreteVAE(d_in=10, hidden=(7,), latent=4, categories=3, tau=0.5, backend=cpu_backend,
                    dtype="float64", seed=0)
    assert m.latent == 12 and m.variables == 4 and m.categories == 3
    assert layout_of(m.config) == m.params.layout
    m2 = build_model(m.config, backend=cpu_backend, dtype="float64", seed=0)
    assert isinstance(m2, DiscreteVAE) and m2.tau == 0.5 and m2.params.layout == m.params.layout
    x = cpu_backend.asarray((rng.random((5, 10)) < 0.5).astype(np.float64))
    r = m.loss_and_grads(x)
    assert r.elbo.shape == (5,) and math.isfinite(float(r.loss))
    z = m.draw_code(6)
    zh = cpu_backend.to_host(z).reshape(6, 4, 3)
    assert np.all(zh.sum(-1) == 1) and set(np.unique(zh)) <= {0.0, 1.0}
    assert m.sample(3).shape == (3, 10) and m.reconstruct(x).shape == (5, 10)
    assert cpu_backend.to_host(m.code(x)).reshape(5, 4, 3).sum(-1) == pytest.approx(1.0)


def _g(m, B, seed):
    import array_api_compat.numpy as xp

    return sampling.gumbel(xp, np.random.default_rng(seed).random((B, m.latent)))


def test_loss_is_the_value_loss_and_grads_differentiates(tiny_x):
    m = _tiny(tau=0.6)
    g = _g(m, 3, 5)
    r = m.loss_and_grads(tiny_x, g)
    assert float(m.loss(tiny_x, g)) == pytest.approx(float(r.loss), rel=1e-14)
    # the true ELBO uses exact one-hot samples: another number than the relaxed objective
    assert float(-m.elbo(tiny_x, g).mean()) != pytest.approx(float(r.loss), rel=1e-3)


@pytest.mark.parametrize("straight", [False, True])
def test_the_fast_step_on_numpy_equals_the_reference(rng, straight):
    """train_step (DataParallel: rows split over threads) on a DiscreteVAE = the reference pass
    and Adam, to round-off."""
    x = (rng.random((64, 20)) < 0.3).astype(np.float64)
    a = DiscreteVAE(d_in=20, hidden=(16,), latent=3, categories=4, straight_through=straight,
                    dtype="float64", seed=2)
    b = build_model(a.config, dtype="float64", seed=2)
    oa, ob = Adam(a.params, lr=0.01), Adam(b.params, lr=0.01)
    for _ in range(3):
        g = _g(a, 64, int(rng.integers(1000)))
        ra = train_step(a, oa, x, g)
        rb = b.loss_and_grads(x, g)
        ob.step()
        assert float(ra.loss) == pytest.approx(float(rb.loss), rel=1e-12)
        np.testing.assert_allclose(a.params.data, b.params.data, rtol=1e-10, atol=1e-12)


def test_bad_noise_and_settings_are_refused_with_a_clear_message(tiny_x):
    m = _tiny()
    with pytest.raises(ValueError, match="Gumbel noise g has shape"):
        m.loss_and_grads(tiny_x, np.zeros((3, 5)))
    bad = _g(m, 3, 0)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        m.loss_and_grads(tiny_x, bad)
    for tau in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="tau"):
            m.tau = tau
    with pytest.raises(ValueError, match="categories"):
        DiscreteVAE(d_in=6, latent=2, categories=1)
    with pytest.raises(TypeError, match="straight_through"):
        DiscreteVAE(d_in=6, latent=2, categories=3, straight_through="yes")


def test_iwae_bound_is_above_the_elbo_for_categorical_latents(tiny_x):
    from minivae.evaluate import elbo, iwae

    m = _tiny()
    x = np.tile(tiny_x, (20, 1))
    e = -elbo(m, x)["loss"]
    assert iwae(m, x, k=1) == pytest.approx(e, abs=0.5)          # IWAE_1 is an ELBO estimate
    assert iwae(m, x, k=200) > e + 0.05


# -- exact ground truth and the estimators -------------------------------------------------------
def test_the_exact_gradient_passes_a_finite_difference_check(tiny_x):
    m = _tiny()
    loss, _ = D.exact(m, tiny_x)
    analytic = {k: v.copy() for k, v in m.params.grad_views.items()}
    r = check_gradients(lambda: D.exact(m, tiny_x)[0], m.params.views, analytic, name="exact")
    assert r.passed, r.table()
    # and the exact loss is the expectation the sampled ELBO estimates
    draws = np.array([float(np.mean(sum(m.loss_terms(tiny_x)))) for _ in range(4000)])
    assert abs(draws.mean() - loss) < 4.5 * draws.std() / math.sqrt(len(draws))


def test_enumeration_refuses_too_many_configurations():
    m = DiscreteVAE(d_in=6, hidden=(), latent=8, categories=4, dtype="float64")
    with pytest.raises(ValueError, match="4\\^8 = 65,536"):
        D.exact(m, np.zeros((1, 6)))


@pytest.mark.parametrize("estimator", ["reinforce", "reinforce_baseline"])
def test_reinforce_is_unbiased_against_exact_enumeration(tiny_x, estimator):
    """2,000 replicates of S = 4: every encoder coordinate's mean within 4.5 standard errors of
    the exact gradient."""
    m = _tiny()
    _, exact = D.exact(m, tiny_x)
    r = D.bias_and_variance(m, tiny_x, estimator, exact, samples=4, replicates=2000)
    assert r["max_z"] < 4.5, r


def test_a_planted_bug_is_rejected_by_the_same_statistic(tiny_x, monkeypatch):
    """Uniform noise where Gumbel noise belongs (a forgotten -log(-log u)): the samples are no
    longer from q, and the unbiasedness test must say so."""
    m = _tiny()
    _, exact = D.exact(m, tiny_x)
    monkeypatch.setattr(D, "gumbel", lambda xp, u: u)
    r = D.bias_and_variance(m, tiny_x, "reinforce_baseline", exact, samples=4, replicates=2000)
    assert r["max_z"] > 10, r


def test_gumbel_softmax_and_straight_through_are_biased_less_so_as_tau_falls(tiny_x):
    """The measured trade-off: bias grows with tau, variance falls (1,000 replicates, S = 4)."""
    m = _tiny()
    _, exact = D.exact(m, tiny_x)
    for est in ("gumbel_softmax", "straight_through"):
        res = [D.bias_and_variance(m, tiny_x, est, exact, samples=4, replicates=1000, tau=t)
               for t in (0.1, 0.5, 2.0)]
        assert res[1]["max_z"] > 8 and res[2]["max_z"] > 8          # biased, far beyond noise
        assert res[0]["bias"] < res[1]["bias"] < res[2]["bias"]
        assert res[0]["variance"] > res[1]["variance"] > res[2]["variance"]


def test_relaxed_estimator_with_one_sample_is_the_models_own_gradient(tiny_x):
    m = _tiny(tau=0.8)
    g = _g(m, 3, 9)
    m.loss_and_grads(tiny_x, g)
    own = m.params.grad.copy()
    est = D.relaxed(m, tiny_x, g[None], tau=0.8)
    np.testing.assert_allclose(est, own, rtol=1e-13)
    assert m.tau == 0.8 and m.straight_through is False


def test_figures_for_categorical_latents(tmp_path, rng):
    """Samples come from the uniform prior over one-hot codes; no manifold figure (it is a
    grid over a 2-d Gaussian latent space), even with K * C = 2."""
    from minivae.data import Dataset
    from minivae.plots import save_all

    x = rng.random((40, 16)).astype(np.float32)
    ds = Dataset("tiny", x[:30], np.zeros(30, np.int64), x[30:], np.arange(10) % 3,
                 image_shape=(4, 4))
    for K, C in ((3, 4), (1, 2)):
        m = DiscreteVAE(d_in=16, hidden=(8,), latent=K, categories=C, seed=0)
        names = sorted(p.name for p in save_all(m, ds, [], tmp_path / f"{K}x{C}"))
        assert names == ["latent.png", "reconstructions.png", "samples.png"]


# -- training from the trainer and the CLI ------------------------------------------------------
@pytest.fixture(scope="module")
def blobs():
    from minivae.data import Dataset

    r = np.random.default_rng(0)
    y = r.integers(0, 3, 300)
    x = np.clip(r.random((3, 16))[y] + 0.15 * r.standard_normal((300, 16)), 0, 1)
    return Dataset("tiny", x[:240].astype(np.float32), y[:240], x[240:].astype(np.float32),
                   y[240:], image_shape=(4, 4))


def _cfg(tmp_path, **kw):
    from minivae.train import TrainConfig

    base = dict(latent_type="categorical", latent=3, categories=4, hidden=[8], epochs=2,
                batch_size=32, log_every=3, progress=False, figures=False,
                out=str(tmp_path / "run"))
    return TrainConfig(**{**base, **kw})


def test_trainer_anneals_tau_and_resumes_a_discrete_run_bit_for_bit(tmp_path, blobs):
    from minivae.train import Trainer

    full = Trainer(_cfg(tmp_path / "a", epochs=3, tau=2.0, tau_min=0.5, tau_anneal=2),
                   dataset=blobs, log=lambda m: None)
    assert isinstance(full.model, DiscreteVAE) and full.model.categories == 4
    assert full.tau_at(0) == 2.0 and full.tau_at(8) == pytest.approx(1.0)   # halfway: sqrt
    assert full.tau_at(16) == pytest.approx(0.5) and full.tau_at(100) == pytest.approx(0.5)
    full.fit()
    assert [r["tau"] for r in full.history] == pytest.approx(
        [2.0 * 0.25 ** (7 / 16), 2.0 * 0.25 ** (15 / 16), 0.5])
    assert all(math.isfinite(r["test_loss"]) for r in full.history)
    part = Trainer(_cfg(tmp_path / "b", epochs=1, tau=2.0, tau_min=0.5, tau_anneal=2),
                   dataset=blobs, log=lambda m: None)
    part.fit()
    rest = Trainer.resume(tmp_path / "b" / "run", dataset=blobs, log=lambda m: None, epochs=3)
    rest.fit()
    np.testing.assert_array_equal(rest.model.params.data, full.model.params.data)
    assert [r["test_loss"] for r in rest.history] == [r["test_loss"] for r in full.history]


@pytest.mark.parametrize("kw, message", [
    (dict(categories=1), "categories must be a whole number >= 2"),
    (dict(tau=0.0), "tau must be a finite number >= 0.01"),
    (dict(tau=0.005), "tau must be a finite number >= 0.01"),
    (dict(tau_min=float("nan")), "tau_min must be a finite number >= 0.01"),
    (dict(tau=0.5, tau_min=0.8, tau_anneal=1.0), "tau_min \\(0.8\\) is above tau"),
    (dict(latent_type="bernoulli"), "latent_type must be one of gaussian, categorical"),
    (dict(model="autoencoder"), "categorical latents need a VAE"),
    (dict(straight_through="yes"), "straight_through must be true or false"),
])
def test_bad_categorical_settings_name_the_field(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        _cfg(tmp_path, **kw)


def test_a_discrete_vae_trains_from_the_cli_and_evaluates(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    out = tmp_path / "cat"
    p = subprocess.run([sys.executable, "-m", "minivae", "train", "--latent-type", "categorical",
                        "--latent", "6", "--categories", "5", "--hidden", "64", "--tau", "1.5",
                        "--tau-anneal", "2", "--straight-through", "--epochs", "2", "--out",
                        str(out), "--no-progress"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "DiscreteVAE 784-64-(6 x 5 categories)" in p.stdout
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["model"]["kind"] == "discrete_vae" and doc["model"]["straight_through"] is True
    assert doc["epochs"][-1]["tau"] == pytest.approx(1.5 * (1 / 3) ** (141 / 142))  # 71 steps/epoch
    assert sorted(f.name for f in out.glob("*.png")) == ["curves.png", "latent.png",
                                                        "reconstructions.png", "samples.png"]
    e = subprocess.run([sys.executable, "-m", "minivae", "evaluate", str(out), "--k", "20",
                        "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert e.returncode == 0, e.stderr
    res = json.loads(e.stdout.strip().splitlines()[-1])
    assert res["loss"] == pytest.approx(doc["epochs"][-1]["test_loss"], rel=1e-6)
    r = subprocess.run([sys.executable, "-m", "minivae", "train", "--resume", "--out", str(out),
                        "--epochs", "3", "--categories", "4"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--categories 4 differs from this run's 5" in r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--tau", "0.5"], "--tau only applies to categorical latents"),
    (["--categories", "4", "--straight-through"],
     "--categories, --straight-through only apply to categorical latents"),
    (["--latent-type", "categorical", "--tau", "0.001"], "--tau: must be >= 0.01"),
    (["--latent-type", "categorical", "--tau", "0.5", "--tau-min", "2", "--tau-anneal", "1"],
     "tau_min (2) is above tau (0.5)"),
])
def test_categorical_flags_are_refused_where_they_would_mean_nothing(tmp_path, capsys, flags,
                                                                     message):
    from minivae.cli import main

    out = tmp_path / "r"
    with pytest.raises(SystemExit) if "must be >=" in message else _no_exit():
        code = main(["train", "--epochs", "1", "--out", str(out), *flags])
        assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "checkpoint.npz").exists()


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_resuming_a_gaussian_run_with_a_temperature_is_refused(tmp_path, capsys):
    from minivae.cli import main

    out = tmp_path / "g"
    assert main(["train", "--epochs", "1", "--hidden", "8", "--latent", "2", "--out", str(out),
                 "--no-progress", "--no-figures"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2", "--tau", "0.3"]) == 2
    assert "--tau only applies to categorical latents" in capsys.readouterr().err


def test_the_discrete_vae_defaults_to_he_init_for_relu_nets():
    """Chosen by measurement (models.DiscreteVAE): He beat PyTorch's nn.Linear init by ~14 nats
    of test -ELBO on mnist10k; the model's config records the init it used."""
    from minivae import DiscreteVAE

    m = DiscreteVAE(d_in=12, hidden=(10,), latent=2, categories=3)
    assert m.config["init"] == "he"
    assert DiscreteVAE(d_in=12, hidden=(10,), latent=2, categories=3, activation="tanh")\
        .config["init"] is None
    assert DiscreteVAE(d_in=12, hidden=(10,), latent=2, categories=3, init="torch")\
        .config["init"] == "torch"
