"""The VAE and the Autoencoder: loss parts, end-to-end gradients, training on every backend,
and clear errors for bad input."""
import numpy as np
import pytest

from minivae import VAE, Adam, Autoencoder, build_model
from minivae.gradcheck import check_model


def data(be, B=5, D=12, seed=0, dtype=np.float64):
    return be.asarray(np.random.default_rng(seed).uniform(size=(B, D)).astype(dtype))


def test_defaults_are_the_classic_setup():
    m = VAE()
    assert (m.d_in, m.latent, m.likelihood, m.beta) == (784, 20, "bernoulli", 1.0)
    assert m.params.layout.shapes == {
        "enc.0.W": (784, 400), "enc.0.b": (400,), "enc.2.W": (400, 40), "enc.2.b": (40,),
        "dec.0.W": (20, 400), "dec.0.b": (400,), "dec.2.W": (400, 784), "dec.2.b": (784,),
    }
    assert m.n_params() == 784 * 400 + 400 + 400 * 40 + 40 + 20 * 400 + 400 + 400 * 784 + 784
    assert m.params.dtype == m.xp.float32


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian_learned"])
def test_vae_gradients_pass_gradcheck_through_the_sampler(backend, likelihood):
    m = VAE(12, (10,), 3, likelihood=likelihood, beta=0.7, backend=backend, dtype="float64", seed=1)
    report = check_model(m, data(backend), name=f"VAE[{likelihood}]")
    assert report.passed, report.table()
    assert len(report.checks) == len(m.params.layout.names)
    assert max(c.max_rel_error for c in report.checks) <= 1e-7


def test_autoencoder_gradients_pass_gradcheck(backend):
    m = Autoencoder(12, (9,), 4, activation="tanh", backend=backend, dtype="float64", seed=2)
    report = check_model(m, data(backend), name="AE")
    assert report.passed, report.table()


def test_loss_is_mean_of_recon_plus_beta_kl_and_elbo_is_per_example(cpu_backend):
    be = cpu_backend
    m = VAE(12, (8,), 3, beta=0.5, backend=be, dtype="float64")
    x = data(be)
    eps = m.draw_eps(5)
    r = m.loss_and_grads(x, eps)
    assert tuple(r.elbo.shape) == (5,)
    assert float(r.loss) == pytest.approx(float(r.recon) + 0.5 * float(r.kl), rel=1e-12)
    assert float(be.xp.mean(r.elbo)) == pytest.approx(-(float(r.recon) + float(r.kl)), rel=1e-12)
    assert float(r.kl) > 0
    np.testing.assert_allclose(be.to_host(m.elbo(x, eps)), be.to_host(r.elbo), rtol=1e-12)
    assert r.grads is m.params.grad


def test_fixed_eps_makes_the_loss_deterministic_and_fresh_eps_does_not(cpu_backend):
    m = VAE(12, (8,), 3, backend=cpu_backend, dtype="float64")
    x = data(cpu_backend)
    eps = m.draw_eps(5)
    a, b = float(m.loss_and_grads(x, eps).loss), float(m.loss_and_grads(x, eps).loss)
    c = float(m.loss_and_grads(x).loss)
    assert a == b and a != c


def test_one_training_step_runs_on_strict_with_no_numpy_leaks():
    """forward, backward, Adam update on array-api-strict: any NumPy call would raise."""
    m = VAE(backend="strict", seed=0)
    opt = Adam(m.params, lr=1e-3)
    x = data(m.backend, B=16, D=784, dtype=np.float32)
    before = m.backend.to_host(m.params.data).copy()
    r = m.loss_and_grads(x)
    opt.step()
    assert np.isfinite(float(r.loss))
    assert not np.array_equal(m.backend.to_host(m.params.data), before)


def test_training_lowers_the_loss(backend):
    m = VAE(12, (16,), 2, backend=backend, dtype="float32", seed=0)
    x = data(backend, B=64, dtype=np.float32)
    x = backend.xp.astype(x > 0.5, backend.xp.float32)  # binary data
    opt = Adam(m.params, lr=1e-2)
    eps = m.draw_eps(64)
    first = float(m.loss_and_grads(x, eps).loss)
    for _ in range(150):
        m.loss_and_grads(x)
        opt.step()
    assert float(m.loss_and_grads(x, eps).loss) < first - 1.0


def test_numpy_and_strict_give_identical_results():
    xs = np.random.default_rng(3).uniform(size=(6, 12))
    out = []
    for be in ("numpy", "strict"):
        m = VAE(12, (8,), 3, backend=be, dtype="float64", seed=4)
        r = m.loss_and_grads(m.backend.asarray(xs))
        out.append((float(r.loss), m.backend.to_host(m.params.grad)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-14)
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-12, atol=1e-15)


def test_encode_decode_reconstruct_sample_shapes_and_ranges(cpu_backend):
    be = cpu_backend
    m = VAE(12, (8,), 3, backend=be, dtype="float64")
    x = data(be)
    mu, logvar = m.encode(x)
    assert tuple(mu.shape) == tuple(logvar.shape) == (5, 3)
    for out in (m.decode(mu), m.reconstruct(x), m.reconstruct(x, sample_z=True), m.sample(7)):
        h = be.to_host(out)
        assert h.shape[1] == 12 and np.all((h >= 0) & (h <= 1))
    assert be.to_host(m.sample(7)).shape == (7, 12)
    ae = Autoencoder(12, (8,), 3, backend=be, dtype="float64")
    assert tuple(ae.encode(x).shape) == (5, 3) and tuple(ae.reconstruct(x).shape) == (5, 12)


def test_build_model_rebuilds_the_architecture_from_config():
    m = VAE(12, (8, 6), 3, activation="tanh", likelihood="gaussian", beta=2.0, seed=0)
    m2 = build_model(m.config, seed=1)
    assert isinstance(m2, VAE) and m2.params.layout == m.params.layout and m2.beta == 2.0
    ae = Autoencoder(12, (8,), 3)
    assert isinstance(build_model(ae.config), Autoencoder)


# -- bad input: a clear error naming the problem ------------------------------------------
@pytest.fixture
def small(cpu_backend):
    return VAE(12, (8,), 3, backend=cpu_backend, dtype="float64")


def test_wrong_input_width(small):
    with pytest.raises(ValueError, match=r"x has shape \(5, 10\); expected \(batch, 12\)"):
        small.loss_and_grads(data(small.backend, D=10))


def test_integer_data(small):
    x = small.backend.asarray(np.zeros((5, 12), dtype=np.int64))
    with pytest.raises(TypeError, match="x has dtype .*int64.*expected floating data"):
        small.loss_and_grads(x)


def test_float32_data_for_a_float64_model(small):
    with pytest.raises(TypeError, match="x has dtype .*float32 but the model uses .*float64"):
        small.loss_and_grads(data(small.backend, dtype=np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_data(small, bad):
    x = np.random.default_rng(0).uniform(size=(5, 12))
    x[2, 3] = bad
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        small.loss_and_grads(small.backend.asarray(x))


def test_bernoulli_data_outside_unit_interval(small):
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        small.loss_and_grads(small.backend.asarray(np.full((2, 12), 255.0)))


def test_mismatched_eps_batch_and_dtype(small):
    x = data(small.backend)
    with pytest.raises(ValueError, match=r"eps has shape \(4, 3\) but the batch needs \(5, 3\)"):
        small.loss_and_grads(x, small.draw_eps(4))
    with pytest.raises(TypeError, match="eps has dtype"):
        small.loss_and_grads(x, small.backend.asarray(np.zeros((5, 3), dtype=np.float32)))


def test_host_array_given_to_a_strict_model():
    m = VAE(12, (8,), 3, backend="strict", dtype="float64")
    with pytest.raises(TypeError, match=r"x is a numpy.ndarray.*backend 'strict'.*asarray"):
        m.loss_and_grads(np.zeros((2, 12)))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="likelihood must be one of"):
        VAE(likelihood="poisson")
    with pytest.raises(ValueError, match="layer sizes must be positive"):
        VAE(latent=0)
    with pytest.raises(ValueError, match="an Autoencoder draws no noise"):
        ae = Autoencoder(12, (8,), 3, dtype="float64")
        ae.loss_and_grads(data(ae.backend), eps=np.zeros((5, 3)))


def test_bad_input_leaves_parameters_and_gradients_untouched(small):
    x = data(small.backend)
    small.loss_and_grads(x)
    p0, g0 = (small.backend.to_host(a).copy() for a in (small.params.data, small.params.grad))
    xb = small.backend.to_host(x).copy()
    xb[0, 0] = np.nan
    with pytest.raises(ValueError):
        small.loss_and_grads(small.backend.asarray(xb))
    assert np.array_equal(small.backend.to_host(small.params.data), p0)
    assert np.array_equal(small.backend.to_host(small.params.grad), g0)
