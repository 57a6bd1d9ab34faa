"""The Python API, used as a library, refuses bad input with one clear error and changes
nothing: what a new user's attack on it found (each case failed, or silently gave a wrong
number, before its fix)."""
from __future__ import annotations

import numpy as np
import pytest

import minivae
from minivae import VAE, Adam, DiscreteVAE, layers
from minivae.engine.data_parallel import NonFiniteStep, SingleProcess
from minivae.train import TrainConfig

X12 = np.random.default_rng(0).random((4, 12)).astype(np.float32)


def _models():
    return [VAE(12, (8,), 3), DiscreteVAE(d_in=12, hidden=(8,), latent=2, categories=3)]


@pytest.mark.parametrize("model", _models(), ids=["VAE", "DiscreteVAE"])
@pytest.mark.parametrize("call, error, message", [
    (lambda m: m.loss_terms(X12, rng=np.random.default_rng()), TypeError,
     "rng must be a minivae RNG on the model's backend .* got Generator"),
    (lambda m: m.draw_code(2, rng=np.random.default_rng()), TypeError, "got Generator"),
    (lambda m: m.loss_terms(X12, rng=42), TypeError, "got int"),
    (lambda m: m.draw_code(2, rng=VAE(12, (8,), 3, backend="strict").rng), TypeError,
     "rng must be a minivae RNG on the model's backend"),
    (lambda m: m.importance_log_weights(X12, -1, m.rng), ValueError, "k must be >= 1, got -1"),
    (lambda m: m.importance_log_weights(X12, 0, m.rng), ValueError, "k must be >= 1, got 0"),
    (lambda m: m.importance_log_weights(X12, 2.5, m.rng), TypeError, "k must be a whole number"),
    (lambda m: m.importance_log_weights(X12[0], 2, m.rng), ValueError, "x has shape"),
    (lambda m: m.importance_log_weights(X12 * 255, 2, m.rng), ValueError, "outside .0, 1."),
    (lambda m: m.sample(10 ** 12), ValueError, "n = 1,000,000,000,000 needs .* GiB"),
    (lambda m: m.draw_code(0), ValueError, "n must be >= 1, got 0"),
])
def test_model_entry_points_name_the_bad_argument(model, call, error, message):
    before = model.rng.get_state()
    with pytest.raises(error, match=message):
        call(model)
    assert model.rng.get_state() == before


def test_the_checked_entry_points_still_give_their_numbers():
    m = VAE(12, (8,), 3)
    a = m.importance_log_weights(X12, 3, m.backend.rng(1))
    b = m.importance_log_weights(X12, 3, m.backend.rng(1), check=False)
    assert a.shape == (3, 4) and np.array_equal(a, b)
    assert m.draw_code(5, rng=m.backend.rng(2)).shape == (5, 3)


@pytest.mark.parametrize("dtype, low", [("float32", 1.1e-19), ("float64", 1.5e-154)])
def test_a_gumbel_temperature_that_overflows_the_dtype_is_refused(dtype, low):
    """tau = 1e-40 in float32 made every loss NaN: (l + g) / tau overflows."""
    m = DiscreteVAE(d_in=12, hidden=(8,), latent=2, categories=3, tau=2 * low, dtype=dtype)
    assert np.isfinite(float(m.loss_and_grads(X12.astype(dtype)).loss))
    for bad in (low / 2, 1e-320 if dtype == "float64" else 1e-40):
        with pytest.raises(ValueError, match=f"tau must be >= {low:.2g} in {dtype}"):
            DiscreteVAE(d_in=12, hidden=(8,), latent=2, categories=3, tau=bad, dtype=dtype)
        with pytest.raises(ValueError, match="tau must be >="):
            m.tau = bad
    assert m.tau == 2 * low                         # a refused value changes nothing


@pytest.mark.parametrize("values, message", [
    (lambda n: np.full(n, np.nan), "holds NaN or Inf"),
    (lambda n: np.full(n, 1e300), "too large for float32"),
    (lambda n: np.ones(n, complex), "must hold real numbers, got dtype complex128"),
    (lambda n: np.array(["a"] * n), "must hold real numbers"),
    (lambda n: np.ones(3), r"has shape \(3,\), expected"),
])
def test_set_flat_refuses_what_the_parameters_cannot_hold(values, message):
    m = VAE(12, (8,), 3)
    before = m.params.data.copy()
    with pytest.raises(ValueError, match=message):
        m.params.set_flat(values(before.size))
    np.testing.assert_array_equal(m.params.data, before)
    m.params.set_flat([0.5] * before.size)          # a list of numbers is fine
    assert np.all(m.params.data == 0.5)


@pytest.mark.parametrize("state", [{}, None, {"layout": 3, "data": 1}])
def test_params_load_state_dict_refuses_a_non_state(state):
    with pytest.raises(ValueError, match="parameter state"):
        VAE(12, (8,), 3).params.load_state_dict(state)


@pytest.mark.parametrize("make, error, message", [
    (lambda: layers.Dense(2.7, 3), TypeError, "d_in must be a whole number, got 2.7"),
    (lambda: layers.Dense(True, 3), TypeError, "d_in must be a whole number"),
    (lambda: layers.Dense(-2, 3), ValueError, "d_in must be >= 1, got -2"),
    (lambda: layers.Dense(2, 0), ValueError, "d_out must be >= 1, got 0"),
    (lambda: layers.mlp([12.9, 4]), TypeError, "each layer size must be a whole number"),
    (lambda: TrainConfig(hidden=[400.7]), ValueError, "hidden must be a list of layer widths"),
    (lambda: TrainConfig(hidden=[True]), ValueError, "hidden must be a list of layer widths"),
    (lambda: TrainConfig(hidden="400"), ValueError, "hidden must be a list of layer widths"),
    (lambda: TrainConfig(dtype="float16"), ValueError, "dtype must be float32 or float64"),
    (lambda: TrainConfig(out=None), ValueError, "out must be a directory path"),
])
def test_sizes_and_settings_are_not_truncated_or_taken_later(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_a_refused_step_leaves_the_noise_stream_where_it_was():
    """A NaN loss (a Gaussian likelihood at x = 1e20) is refused; the retry must draw the same
    eps, so the model's RNG is rewound too."""
    for step in (lambda m, o, x: minivae.train_step(m, o, x),
                 lambda m, o, x: minivae.DataParallel(m).train_step(o, x)):
        m = VAE(12, (8,), 3, likelihood="gaussian")
        opt = Adam(m.params)
        before = m.rng.get_state()
        with pytest.raises(NonFiniteStep, match="noise stream unchanged"):
            step(m, opt, np.full((5, 12), 1e20, np.float32))
        assert m.rng.get_state() == before and opt.t == 0


@pytest.mark.parametrize("rows", [(0, 3), (3, 1), (0, 7), (-1, 6)])
def test_one_process_must_take_the_whole_batch(rows):
    """A communicator whose rows() do not cover the batch gave a wrong loss silently (half of
    it for (0, n // 2), 0.0 for (3, 1))."""
    class Odd(SingleProcess):
        def rows(self, n):
            return rows

    m = VAE(12, (8,), 3)
    before = m.rng.get_state()
    with pytest.raises(ValueError, match=r"comm.rows\(6\) gave"):
        minivae.DataParallel(m, comm=Odd()).loss_and_grads(
            np.random.default_rng(0).random((6, 12)).astype(np.float32))
    with pytest.raises(ValueError, match=r"comm.rows\(6\) gave"):
        minivae.DataParallel(m, comm=Odd()).train_step(
            Adam(m.params), np.random.default_rng(0).random((6, 12)).astype(np.float32))
    assert m.rng.get_state() == before                    # no noise drawn for a refused call


@pytest.mark.parametrize("x, message", [(np.array(0.5), r"x has shape \(\); expected"),
                                        (np.full(12, 0.5), r"x has shape \(12,\)"),
                                        (np.zeros((0, 12)), "x is an empty batch")])
def test_check_model_checks_x_before_it_draws_the_noise(x, message):
    """A 0-d x raised IndexError; a 1-D x was refused only after eps had been drawn."""
    from minivae.gradcheck import check_model

    m = VAE(12, (8,), 3, dtype="float64")
    before = m.rng.get_state()
    with pytest.raises(ValueError, match=message):
        check_model(m, x)
    assert m.rng.get_state() == before


def test_float32_wrong_gradients_are_never_passed_by_a_looser_step_or_a_kink_excuse():
    """Two ways a float32 check passed a wrong gradient, found by a new user's attack:
    a first step floored by f's noise (tried, and reverted: it moved wrong gradients into the
    0.1-0.25 resolution band, where a 25% error passed), and a smooth f whose central
    difference was consistent and disagreed, excused as a "kink" because the other one-sided
    slope was too noisy (1/y at 1e-3: 19 of 20 seeds passed a 3% error; tanh(50 x): 10%)."""
    from minivae.gradcheck import check_gradients

    x = (np.random.default_rng(0).uniform(-1, 1, 12) * 0.3).astype(np.float32)
    x[0] = 0.6
    g = np.cos(x.astype(np.float64))
    g[0] *= 1.25
    rep = check_gradients(lambda: np.float32(1500) + np.sum(np.sin(x)), {"x": x},
                          {"x": g.astype(np.float32)})
    assert not rep.passed, rep.table()
    t = np.array([-0.0491, 0.5, 1.0, 1.5], dtype=np.float32)
    gt = 50 / np.cosh(50 * t.astype(np.float64)) ** 2
    gt[0] *= 1.1
    assert not check_gradients(lambda: np.sum(np.tanh(50 * t)), {"x": t},
                               {"x": gt.astype(np.float32)}).passed
    for seed in range(20):
        r = np.random.default_rng(seed)
        y = np.array([1e-3, *r.uniform(0.5, 1.5, 3)], dtype=np.float32)
        gy = -1 / y.astype(np.float64) ** 2
        assert check_gradients(lambda: np.sum(1 / y), {"y": y},
                               {"y": gy.astype(np.float32)}).passed, seed      # correct: pass
        gy[0] *= 1.03
        rep = check_gradients(lambda: np.sum(1 / y), {"y": y}, {"y": gy.astype(np.float32)})
        assert not rep.passed, (seed, rep.table())


def test_the_study_toolkit_names_bad_arguments():
    from minivae import discrete, evaluate, study

    m = VAE(12, (8,), 3)
    with pytest.raises(ValueError, match="the rows given do not make one"):
        evaluate.elbo(m, [[0.5] * 12, [0.5] * 11])               # NumPy's inhomogeneous-shape
    with pytest.raises(TypeError, match="x_train must be a .N, D. host array, got list"):
        study.train(m, X12.tolist(), steps=1, batch=2)           # AttributeError before
    with pytest.raises(TypeError, match="replicates must be a whole number, got 2.5"):
        study.encoder_variance(m, X12, "pathwise", replicates=2.5)
    d = DiscreteVAE(d_in=12, hidden=(8,), latent=2, categories=3, dtype="float64")
    with pytest.raises(ValueError, match="exact_grad must be the flat"):
        discrete.bias_and_variance(d, X12.astype(np.float64), "reinforce", np.ones(5))


def test_a_numpy_dtype_in_the_training_config_is_its_name():
    """TrainConfig(dtype=np.dtype("float64")) trained an epoch, then failed to write its
    checkpoint (a dtype object is not JSON): it is now stored as its name."""
    assert TrainConfig(dtype=np.dtype("float64")).dtype == "float64"
    assert TrainConfig(dtype=np.dtype("float64")).to_json()["dtype"] == "float64"
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        TrainConfig(dtype=np.dtype("float16"))


def test_sample_counts_the_widest_layer():
    with pytest.raises(ValueError, match="n = 1,000,000 needs"):
        VAE(2, (200000,), 2).sample(10 ** 6)
    with pytest.raises(ValueError, match="mlp needs a list"):
        layers.mlp(None)
