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
    # He init: random weights that start far from the data, so 150 steps must lower the loss by
    # a nat (from torch's smaller init the loss starts near the entropy of these random bits)
    m = VAE(12, (16,), 2, backend=backend, dtype="float32", seed=0, init="he")
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
    with pytest.raises(ValueError, match="latent must be >= 1, got 0"):
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


# -- one validation path: every entry point gives the same clear error -------------------------
def _entry_points():
    """name -> fn(model, x) for every public way data gets into a model."""
    import minivae
    from minivae import estimators, evaluate

    return {
        "loss_and_grads": lambda m, x: m.loss_and_grads(x),
        "train_step": lambda m, x: minivae.train_step(m, Adam(m.params), x),
        "DataParallel": lambda m, x: minivae.DataParallel(m).loss_and_grads(x),
        "encode": lambda m, x: m.encode(x),
        "code": lambda m, x: m.code(x),
        "reconstruct": lambda m, x: m.reconstruct(x),
        "elbo": lambda m, x: m.elbo(x),
        "loss_terms": lambda m, x: m.loss_terms(x),
        "pathwise": lambda m, x: estimators.pathwise(m, x),
        "score_function": lambda m, x: estimators.score_function(m, x, samples=2, baseline=True),
        "evaluate.elbo": lambda m, x: evaluate.elbo(m, x),
        "evaluate.iwae": lambda m, x: evaluate.iwae(m, x, k=3),
        "evaluate": lambda m, x: evaluate.evaluate(m, x, k=2),
    }


ENTRY = list(_entry_points())
IMAGES = np.random.default_rng(5).integers(0, 256, size=(4, 12))


def _bad(kind, be):
    x = IMAGES / 255.0
    if kind == "uint8":
        return be.asarray(IMAGES.astype(np.uint8)), TypeError, "dtype .*uint8.*scaled to \\[0, 1\\]"
    if kind == "x255":
        return be.asarray(x * 255.0), ValueError, r"outside \[0, 1\]"
    if kind == "nan_pixel":
        x = x.copy()
        x[1, 4] = np.nan
        return be.asarray(x), ValueError, "contains NaN or Inf"
    if kind == "wrong_width":
        return be.asarray(x[:, :10]), ValueError, r"shape \(4, 10\); expected \(batch, 12\)"
    raise AssertionError(kind)


@pytest.mark.parametrize("entry", ENTRY)
@pytest.mark.parametrize("kind", ["uint8", "x255", "nan_pixel", "wrong_width"])
def test_every_entry_point_refuses_bad_data_the_same_way(cpu_backend, entry, kind):
    m = VAE(12, (8,), 3, backend=cpu_backend, dtype="float64", seed=1)
    x, error, message = _bad(kind, cpu_backend)
    p0 = cpu_backend.to_host(m.params.data).copy()
    with pytest.raises(error, match=message):
        _entry_points()[entry](m, x)
    np.testing.assert_array_equal(cpu_backend.to_host(m.params.data), p0)   # nothing changed


@pytest.mark.parametrize("entry", [e for e in ENTRY if not e.startswith("evaluate")])
def test_on_strict_a_numpy_array_is_refused_with_the_conversion_hint(entry):
    """(evaluation converts host arrays on purpose: it takes a data set from disk)"""
    m = VAE(12, (8,), 3, backend="strict", dtype="float64", seed=1)
    with pytest.raises(TypeError, match=r"numpy.ndarray.*backend 'strict'.*model.backend.asarray"):
        _entry_points()[entry](m, IMAGES / 255.0)


@pytest.mark.parametrize("method", ["decode", "decode_logits"])
def test_decoding_validates_its_codes(cpu_backend, method):
    m = VAE(12, (8,), 3, backend=cpu_backend, dtype="float64", seed=1)
    fn = getattr(m, method)
    z = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"z has shape \(2, 4\); expected \(batch, 3\)"):
        fn(cpu_backend.asarray(np.zeros((2, 4))))
    z[0, 1] = np.nan
    with pytest.raises(ValueError, match="z contains NaN or Inf"):
        fn(cpu_backend.asarray(z))
    with pytest.raises(TypeError, match="z has dtype .*int"):
        fn(cpu_backend.asarray(np.zeros((2, 3), dtype=np.int32)))
    with pytest.raises(TypeError, match="z has dtype .*float32 but the model uses .*float64"):
        fn(cpu_backend.asarray(np.zeros((2, 3), dtype=np.float32)))
    if cpu_backend.name != "numpy":
        with pytest.raises(TypeError, match="model.backend.asarray"):
            fn(np.zeros((2, 3)))
    assert fn(cpu_backend.asarray(np.zeros((2, 3)))).shape == (2, 12)


@pytest.mark.parametrize("n, error, message", [
    (2.7, TypeError, "n must be a whole number, got 2.7"),
    (-1, ValueError, "n must be >= 1, got -1"),
    (0, ValueError, "n must be >= 1, got 0"),
    (True, TypeError, "n must be a whole number"),
    ("3", TypeError, "n must be a whole number"),
])
def test_sample_takes_a_whole_number_of_examples(n, error, message):
    m = VAE(12, (8,), 3, dtype="float64")
    with pytest.raises(error, match=message):
        m.sample(n)
    assert m.sample(np.int64(3)).shape == (3, 12)


@pytest.mark.parametrize("where", ["loss_and_grads", "train_step", "elbo", "pathwise"])
def test_eps_with_nan_is_refused(cpu_backend, where):
    import minivae
    from minivae import estimators

    m = VAE(12, (8,), 3, backend=cpu_backend, dtype="float64", seed=1)
    x = data(cpu_backend, B=4)
    eps = np.zeros((4, 3))
    eps[2, 1] = np.nan
    call = {"loss_and_grads": lambda: m.loss_and_grads(x, cpu_backend.asarray(eps)),
            "train_step": lambda: minivae.train_step(m, Adam(m.params), x,
                                                     cpu_backend.asarray(eps)),
            "elbo": lambda: m.elbo(x, cpu_backend.asarray(eps)),
            "pathwise": lambda: estimators.pathwise(m, x, cpu_backend.asarray(eps[None]))}
    with pytest.raises(ValueError, match="eps contains NaN or Inf"):
        call[where]()


@pytest.mark.parametrize("kw, message", [
    (dict(beta=-1), "beta must be a finite number >= 0, got -1"),
    (dict(beta=float("nan")), "beta must be a finite number >= 0, got nan"),
    (dict(beta=float("inf")), "beta must be a finite number >= 0"),
    (dict(x_sigma=0), "x_sigma must be a positive finite number, got 0"),
    (dict(x_sigma=-2.0, likelihood="gaussian"), "x_sigma must be a positive finite number"),
    (dict(x_sigma=float("nan")), "x_sigma must be a positive finite number"),
    (dict(hidden=(400, 0)), "each hidden size must be >= 1, got 0"),
    (dict(d_in=7.5), "d_in must be a whole number"),
    (dict(init="kaiming"), "init must be one of he, glorot, torch"),
])
def test_constructor_refuses_numbers_and_names_that_mean_nothing(kw, message):
    with pytest.raises((ValueError, TypeError), match=message):
        VAE(**kw)


def test_setting_beta_later_is_validated_too():
    m = VAE(12, (8,), 3)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        m.beta = float("nan")
    assert m.beta == 1.0
    m.beta = 0.25
    assert m.beta == 0.25


def test_behaviour_not_names_tells_the_models_apart():
    vae, ae = VAE(12, (8,), 3, dtype="float64"), Autoencoder(12, (8,), 3, dtype="float64")
    assert vae.has_prior and not ae.has_prior
    x = data(vae.backend, B=4)
    assert vae.code(x).shape == ae.code(x).shape == (4, 3)
    np.testing.assert_array_equal(vae.code(x), vae.encode(x)[0])     # the mean of q(z|x)
    assert vae.draw_code(5).shape == (5, 3)
    with pytest.raises(TypeError, match="no prior"):
        ae.draw_code(5)


# -- a fresh user's attack, each case a test ----------------------------------------------------
def _small_vae(**kw):
    return VAE(12, (8,), 3, **kw)


def test_dtype_messages_name_the_dtype_and_how_to_convert():
    m = _small_vae()                                            # float32
    x64 = np.random.default_rng(0).random((5, 12))
    with pytest.raises(TypeError, match=r"x has dtype float64 but the model uses float32: "
                                        r"convert it with model.backend.asarray\(x, "
                                        r"dtype=model.dtype\)"):
        m.loss_and_grads(x64)
    m.loss_and_grads(m.backend.asarray(x64, dtype=m.dtype))    # the advice works
    with pytest.raises(TypeError, match=r"expected floating data \(float32\)\. Integer"):
        m.encode(np.zeros((2, 12), dtype=np.uint8))
    with pytest.raises(TypeError, match=r"x is a builtins.list.*asarray\(x, dtype=model.dtype\)"):
        m.loss_and_grads(x64.tolist())


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_numpy_matrix_is_refused_not_multiplied_elementwise():
    m = _small_vae(dtype="float64")
    state = m.rng.get_state()
    with pytest.raises(TypeError, match="x is a numpy.matrix"):
        m.loss_and_grads(np.matrix(np.random.default_rng(0).random((5, 12))))
    with pytest.raises(TypeError, match="x is a numpy.matrix"):
        m.code(np.matrix(np.zeros((5, 12))))
    assert m.rng.get_state() == state                           # no eps drawn


def test_a_masked_array_is_refused_not_used_without_its_mask():
    m = _small_vae(dtype="float64")
    x = np.random.default_rng(0).random((5, 12))
    with pytest.raises(TypeError, match="x is a numpy.ma.MaskedArray"):
        m.loss_and_grads(np.ma.masked_array(x, mask=x > 0.5))


@pytest.mark.parametrize("kw, error, message", [
    (dict(seed=-1), ValueError, "seed must be >= 0, got -1"),
    (dict(seed=1.5), TypeError, "seed must be a whole number"),
    (dict(hidden=None), TypeError, "hidden must be a sequence of layer widths"),
    (dict(hidden=8.5), TypeError, "hidden must be a sequence of layer widths"),
    (dict(likelihood=["bernoulli"]), ValueError, "likelihood must be one of"),
    (dict(activation=["relu"]), ValueError, "activation must be one of"),
    (dict(backend=["numpy"]), ValueError, "unknown backend"),
    (dict(beta=True), ValueError, "beta must be a finite number >= 0"),
    (dict(x_sigma=1e-200, likelihood="gaussian"), ValueError, "too small for float32"),
    (dict(x_sigma=1e-30, likelihood="gaussian"), ValueError, "the Gaussian loss.*would overflow"),
])
def test_constructor_arguments_of_the_wrong_type_get_named_errors(kw, error, message):
    with pytest.raises(error, match=message):
        VAE(12, **{"hidden": (8,), "latent": 3, **kw})


def test_x_sigma_may_be_any_real_number_type():
    for s in (np.float32(0.5), np.float64(0.5), 1):
        for cls in (VAE, Autoencoder):
            m = cls(12, (8,), 3, likelihood="gaussian", x_sigma=s)
            assert np.isfinite(float(m.loss(m.backend.asarray(np.zeros((2, 12), np.float32)))))


def test_the_estimators_validate_eps_and_samples_before_drawing():
    from minivae import estimators as est

    m = _small_vae(dtype="float64")
    x = data(m.backend, B=4)
    state = m.rng.get_state()
    with pytest.raises(TypeError, match="eps is a builtins.list"):
        est.score_function(m, x, eps=[[0.0]], baseline=True)
    with pytest.raises(ValueError, match="at least S = 2"):
        est.score_function(m, x, samples=1, baseline=True)
    for bad, error in ((2.7, TypeError), ("3", TypeError), (True, TypeError), (None, TypeError),
                       (0, ValueError)):
        with pytest.raises(error, match=r"samples \(S\) must be"):
            est.pathwise(m, x, samples=bad)
    assert m.rng.get_state() == state                           # nothing drawn on a refusal


def test_evaluation_validates_its_counts_and_rng():
    from minivae import evaluate as ev

    m = _small_vae(dtype="float64")
    x = data(m.backend, B=6)
    for kw, error, message in [
        (dict(batch_size=-1), ValueError, "batch_size must be >= 1"),
        (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
        (dict(batch_size=2.5), TypeError, "batch_size must be a whole number"),
        (dict(rng=np.random.default_rng(0)), TypeError, "rng must be a minivae RNG"),
        (dict(rng=42), TypeError, "rng must be a minivae RNG"),
    ]:
        with pytest.raises(error, match=message):
            ev.elbo(m, x, **kw)
    for k, error in ((2.7, TypeError), ("5", TypeError), (True, TypeError), (None, TypeError),
                     (0, ValueError)):
        with pytest.raises(error, match="k must be"):
            ev.iwae(m, x, k=k)
    with pytest.raises(TypeError, match="k must be a whole number"):
        ev.evaluate(m, x, k=2.7)
    ae = Autoencoder(12, (8,), 3, dtype="float64")
    with pytest.raises(ValueError, match="needs a VAE.*pass k=0"):
        ev.evaluate(ae, x, k=5)
    assert set(ev.evaluate(ae, x)) == {"loss", "recon", "kl"}


def test_an_autoencoder_says_it_has_no_prior_or_elbo():
    ae = Autoencoder(12, (8,), 3, dtype="float64")
    with pytest.raises(TypeError, match="no prior to sample from"):
        ae.sample(3)
    with pytest.raises(TypeError, match="no ELBO"):
        ae.elbo(data(ae.backend))


def test_optimizer_and_step_misuse_get_named_errors():
    import minivae

    m, other = _small_vae(), _small_vae()
    with pytest.raises(TypeError, match="Adam needs a model's Params, got VAE: pass model.params"):
        Adam(m)
    with pytest.raises(TypeError, match="Adam needs a model's Params, got ndarray"):
        Adam(m.params.data)
    with pytest.raises(ValueError, match="betas must be a pair"):
        Adam(m.params, betas=0.9)
    with pytest.raises(ValueError, match="betas must be a pair"):
        Adam(m.params, betas=(0.9,))
    with pytest.raises(ValueError, match="eps must be positive"):
        Adam(m.params, eps=0)
    from minivae import Adagrad
    with pytest.raises(ValueError, match="eps must be positive"):
        Adagrad(m.params, eps=0.0)
    x = m.backend.asarray(np.zeros((4, 12), np.float32))
    with pytest.raises(TypeError, match="expected a minivae optimizer"):
        minivae.train_step(m, None, x)
    with pytest.raises(TypeError, match="first argument must be a minivae VAE"):
        minivae.train_step(Adam(m.params), m, x)
    p0 = other.params.data.copy()
    with pytest.raises(ValueError, match="another model's parameters"):
        minivae.DataParallel(m).optimizer_step(Adam(other.params))
    np.testing.assert_array_equal(other.params.data, p0)
    with pytest.raises(ValueError, match="threads must be a whole number"):
        minivae.DataParallel(m, threads=True)


def test_second_attack_leftovers_are_named():
    import minivae
    from minivae import make_optimizer

    with pytest.raises(ValueError, match="too small for float32: the Gaussian loss"):
        VAE(12, (8,), 3, likelihood="gaussian", x_sigma=1e-19)
    VAE(12, (8,), 3, likelihood="bernoulli", x_sigma=1e-19)        # unused by a Bernoulli: fine
    m = VAE(12, (8,), 3, likelihood="gaussian", x_sigma=1e-14)      # accepted: a finite loss
    x = m.backend.asarray(np.random.default_rng(0).random((5, 12)), dtype=m.dtype)
    assert np.isfinite(float(m.loss(x)))
    with pytest.raises(ValueError, match="unknown optimizer None"):
        make_optimizer(None, m.params)
    with pytest.raises(TypeError, match="needs a model's config dict"):
        minivae.build_model(None)
    with pytest.raises(TypeError, match="comm must be a Communicator"):
        minivae.DataParallel(m, comm=3)
    with pytest.raises(ValueError, match="whole number from 1 to 1024"):
        minivae.set_num_threads(True)
    minivae.set_num_threads(np.int64(1))
    minivae.set_num_threads(None)
    with pytest.raises(TypeError, match="decoupled must be True or False"):
        Adam(m.params, decoupled="yes")
    with pytest.raises(TypeError, match="sample_z must be True or False"):
        m.reconstruct(x, sample_z="yes")


# -- copies: copy.deepcopy and pickle ------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "strict"])
@pytest.mark.parametrize("kind", ["VAE", "Autoencoder", "DiscreteVAE"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_model_and_its_optimizer_copy_whole_and_train_on_alike(rng, backend, kind, how):
    """copy.deepcopy and pickle of a model with its optimizer (e.g. to keep the best model):
    they used to raise "cannot pickle 'module' object" (the array namespace). The copy owns
    its buffers (its named views alias its own flat buffer, not the original's), keeps the
    optimizer's link to its parameters, and from there trains to the same numbers as the
    original, noise stream included."""
    import copy
    import pickle

    import minivae

    m = getattr(minivae, kind)(d_in=20, hidden=(8,), latent=3, backend=backend, seed=4)
    opt = minivae.Adam(m.params, lr=0.01)
    x = m.backend.asarray((rng.random((6, 20)) < 0.4).astype(np.float32))
    m.loss_and_grads(x)
    opt.step()
    if how == "deepcopy":
        m2, opt2 = copy.deepcopy((m, opt))
    else:   # every protocol (array_api_strict's arrays themselves need protocol 2 or more)
        for protocol in range(0 if backend == "numpy" else 2, pickle.HIGHEST_PROTOCOL):
            pickle.loads(pickle.dumps((m, opt), protocol=protocol))
        m2, opt2 = pickle.loads(pickle.dumps((m, opt), protocol=pickle.HIGHEST_PROTOCOL))
    assert opt2.params is m2.params and m2.backend is m.backend
    host = m.backend.to_host
    for P, Q in ((m.params, m2.params),):
        assert not np.shares_memory(host(P.data), host(Q.data))
        Q.views[Q.layout.names[0]][...] = 0.0        # a view of the copy writes into the copy
        assert float(m.backend.xp.sum(m.backend.xp.abs(Q.data[: Q.layout.size]))) != \
            float(m.backend.xp.sum(m.backend.xp.abs(P.data)))
        Q.set_flat(host(P.data))
    for model, o in ((m, opt), (m2, opt2)):
        for _ in range(2):
            model.loss_and_grads(x)
            o.step()
    np.testing.assert_array_equal(host(m2.params.data), host(m.params.data))
    np.testing.assert_array_equal(host(opt2.m), host(opt.m))
