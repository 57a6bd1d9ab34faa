"""The gradient checker: passes correct gradients, catches planted bugs and says where,
tells kinks from errors, and leaves every tensor exactly as it found it."""
import json

import numpy as np
import pytest

from minivae import VAE, layers, sampling
from minivae.cli import main
from minivae.commands.gradcheck import check_model
from minivae.gradcheck import check_backward_properties, check_gradients, check_layer


def quadratic(be, rng, shape=(3, 4)):
    """f(A) = sum(C * A^2) with gradient 2 C A: a smooth function with a known gradient."""
    A = be.asarray(rng.standard_normal(shape))
    C = be.asarray(rng.standard_normal(shape))
    return A, C, (lambda: float(be.xp.sum(C * A * A))), 2 * C * A


def test_correct_gradient_passes_and_tensor_is_restored_exactly(backend, rng):
    A, C, f, g = quadratic(backend, rng)
    before = backend.to_host(A).copy()
    r = check_gradients(f, {"A": A}, {"A": g})
    assert r.passed and r.checks[0].mode == "exact" and r.checks[0].n_checked == 12
    assert r.checks[0].max_rel_error < 1e-8
    assert np.array_equal(backend.to_host(A), before)


def test_wrong_element_fails_with_its_index_and_both_values(cpu_backend, rng):
    be = cpu_backend
    A, C, f, g = quadratic(be, rng)
    bad = be.to_host(g).copy()
    bad[1, 2] += 0.3
    r = check_gradients(f, {"A": A}, {"A": be.asarray(bad)}, name="quad")
    c = r.checks[0]
    assert not r.passed and c.worst_index == (1, 2)
    assert c.analytic == pytest.approx(bad[1, 2]) and c.numeric == pytest.approx(be.to_host(g)[1, 2], rel=1e-8)
    table = r.table()
    assert "FAIL" in table and "[1,2]" in table and "quad: FAILED (1 of 1 checks)" in table


def test_pass_rule_uses_atol_where_the_derivative_is_near_zero(cpu_backend):
    """f(a) = a^3 at a = 1e-9: derivative 3e-18. A pure relative test would fail on noise."""
    be = cpu_backend
    a = be.asarray(np.array([1e-9]))
    r = check_gradients(lambda: float(a[0]) ** 3, {"a": a}, {"a": be.asarray(np.array([3e-18]))})
    assert r.passed


def test_float32_tensors_use_a_float32_step_and_tolerance(cpu_backend, rng):
    be = cpu_backend
    A = be.asarray(rng.standard_normal((3, 3)).astype(np.float32))
    r = check_gradients(lambda: float(be.xp.sum(A * A)), {"A": A}, {"A": 2 * A})
    c = r.checks[0]
    assert r.passed and c.dtype == "float32" and c.step > 1e-3


def test_five_point_stencil_is_more_accurate(cpu_backend, rng):
    be = cpu_backend
    x = be.asarray(rng.standard_normal(6))
    f = lambda: float(be.xp.sum(be.xp.sin(3 * x)))  # noqa: E731
    g = 3 * be.xp.cos(3 * x)
    e2 = check_gradients(f, {"x": x}, {"x": g}, order=2).checks[0].max_abs_error
    e4 = check_gradients(f, {"x": x}, {"x": g}, order=4).checks[0].max_abs_error
    assert e4 < e2 / 4  # measured: about 8x smaller here


def test_relu_kink_is_reported_as_crossed_not_failed(cpu_backend):
    be = cpu_backend
    x = be.asarray(np.array([[0.0, 1.0, -1.0, 2.0]]))  # x[0, 0] sits on the kink
    r = check_layer(layers.ReLU(backend=be), {}, x, name="ReLU")
    grad = r.checks[0]
    assert r.passed and grad.kinks == 1 and grad.n_checked == 3
    assert "1 kink crossed" in r.table()


def test_a_real_error_at_a_kinked_element_is_still_an_error(cpu_backend):
    """Analytic value matching neither one-sided slope is a bug, kink or not."""
    be = cpu_backend
    x = be.asarray(np.array([0.0, 1.0]))
    f = lambda: float(be.xp.sum(be.xp.maximum(x, 0.0)))  # noqa: E731
    r = check_gradients(f, {"x": x}, {"x": be.asarray(np.array([5.0, 1.0]))})
    assert not r.passed and r.checks[0].worst_index == (0,)


def test_directions_mode_catches_an_error_and_falls_back_to_locate_it(cpu_backend, rng):
    be = cpu_backend
    A, C, f, g = quadratic(be, rng, shape=(30, 40))  # 1200 elements > exact_max
    assert check_gradients(f, {"A": A}, {"A": g}).checks[0].mode.startswith("directions")
    bad = be.to_host(g).copy()
    bad[17, 5] -= 1.0
    c = check_gradients(f, {"A": A}, {"A": be.asarray(bad)}).checks[0]
    assert not c.passed and c.mode == "directions->exact" and c.worst_index == (17, 5)


def test_sparse_mode_touches_every_tensor_biases_included(cpu_backend):
    m = VAE(12, (10,), 3, backend=cpu_backend, dtype="float64", seed=0)
    x = cpu_backend.asarray(np.random.default_rng(0).uniform(size=(4, 12)))
    r = check_model(m, x, mode="sparse")
    assert r.passed, r.table()
    assert [c.name.split(".", 1)[1] for c in r.checks] == m.params.layout.names
    for c in r.checks:
        size = int(np.prod(m.params.layout.shapes[c.name.split(".", 1)[1]]))
        assert c.mode == "sparse" and c.n_checked == min(size, 24)


# -- planted bugs in a real model: the report names the tensor ----------------------------
def model_and_data(be):
    m = VAE(12, (10,), 3, backend=be, dtype="float64", seed=3)
    return m, be.asarray(np.random.default_rng(1).uniform(size=(5, 12)))


def test_planted_bug_sampler_scale_exp_logvar_is_caught(cpu_backend, monkeypatch):
    """backward uses exp(logvar) as the scale where the forward used exp(logvar / 2)."""
    def wrong_backward(dz, cache):
        sigma, eps = cache
        ds = dz * sigma * sigma  # exp(logvar) instead of exp(logvar / 2)
        return dz, ds * eps * 0.5, ds

    m, x = model_and_data(cpu_backend)
    assert check_model(m, x, name="VAE").passed
    monkeypatch.setattr(sampling, "sample_backward", wrong_backward)
    monkeypatch.setattr("minivae.models.sample_backward", wrong_backward)
    r = check_model(m, x, name="VAE")
    failed = {c.name for c in r.failed}
    # the logvar head's weights and bias, and everything upstream of it in the encoder
    assert {"VAE.enc.2.W", "VAE.enc.2.b", "VAE.enc.0.W", "VAE.enc.0.b"} <= failed
    assert not any(n.startswith("VAE.dec") for n in failed)  # decoder gradients are unaffected
    assert "VAE.enc.2.b" in r.table() and "FAIL" in r.table()


def test_planted_bug_missing_bias_gradient_is_caught(cpu_backend, monkeypatch):
    original = layers.Dense.backward

    def no_bias_grad(self, params, dout, cache, grads=None, need_dx=True):
        dx, g = original(self, params, dout, cache, grads=grads, need_dx=need_dx)
        g["b"][...] = 0.0
        return dx, g

    m, x = model_and_data(cpu_backend)
    monkeypatch.setattr(layers.Dense, "backward", no_bias_grad)
    r = check_model(m, x, name="VAE")
    assert {c.name for c in r.failed} == {"VAE.enc.0.b", "VAE.enc.2.b", "VAE.dec.0.b", "VAE.dec.2.b"}
    worst = next(c for c in r.failed if c.name == "VAE.dec.2.b")
    assert worst.analytic == 0.0 and worst.numeric != 0.0 and worst.worst_index is not None


def test_linearity_check_catches_a_backward_that_is_not_linear(cpu_backend, rng):
    be = cpu_backend
    x = be.asarray(rng.standard_normal((2, 3)))
    good = check_backward_properties(lambda G: {"x": 3 * G}, (2, 3), np.float64, [x], "good", rng)
    bad = check_backward_properties(lambda G: {"x": G * G}, (2, 3), np.float64, [x], "bad", rng)
    assert all(c.passed for c in good)
    lin = next(c for c in bad if c.kind == "linearity")
    assert not lin.passed and "relative deviation" in lin.note


def test_repeatability_check_catches_a_backward_that_mutates_its_input(cpu_backend, rng):
    be = cpu_backend
    x = be.asarray(rng.standard_normal((2, 3)))

    def mutating(G):
        x[...] = x * 2.0  # corrupts the cached input
        return {"x": G * x}

    rep = [c for c in check_backward_properties(mutating, (2, 3), np.float64, [x], "m", rng)
           if c.kind == "repeatability"][0]
    assert not rep.passed and "modified input" in rep.note


def test_missing_or_misshapen_analytic_gradients_are_reported(cpu_backend, rng):
    A, C, f, g = quadratic(cpu_backend, rng)
    with pytest.raises(ValueError, match="no analytic gradient given for"):
        check_gradients(f, {"A": A}, {})
    r = check_gradients(f, {"A": A}, {"A": cpu_backend.xp.zeros((2, 2))})
    assert not r.passed and "analytic gradient has shape" in r.checks[0].note


# -- the command ------------------------------------------------------------------------
def test_cli_json_passes_with_every_relative_error_below_1e_7(capsys):
    assert main(["gradcheck", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] is True
    names = {c["name"] for c in out["checks"]}
    for expected in ["Dense.W", "Dense.b", "ReLU.x", "LeakyReLU.x", "Tanh.x", "Sigmoid.x",
                     "Softplus.x", "sample.mu", "sample.logvar", "bernoulli_nll.logits",
                     "gaussian_nll(fixed var).mean", "gaussian_nll(learned var).logvar",
                     "kl_normal.mu", "kl_monte_carlo.z", "VAE.enc.0.W", "VAE.dec.2.b",
                     "Autoencoder.enc.0.W"]:
        assert expected in names
    for c in out["checks"]:
        assert set(c) == {"name", "max_abs_error", "max_rel_error", "passed"}
        assert c["passed"] and c["max_rel_error"] <= 1e-7, c


def test_cli_exits_1_and_names_the_tensor_when_a_backward_is_wrong(capsys, monkeypatch):
    original = layers.Dense.backward

    def no_bias_grad(self, params, dout, cache, grads=None, need_dx=True):
        dx, g = original(self, params, dout, cache, grads=grads, need_dx=need_dx)
        g["b"] = g["b"] * 0.0 if grads is None else g["b"]
        if grads is not None:
            g["b"][...] = 0.0
        return dx, g

    monkeypatch.setattr(layers.Dense, "backward", no_bias_grad)
    assert main(["gradcheck"]) == 1
    out = capsys.readouterr().out
    failing = [line for line in out.splitlines() if "FAIL" in line and not line.startswith("minivae")]
    assert any(line.startswith("Dense.b ") for line in failing)
    assert any(line.startswith("VAE.enc.0.b ") for line in failing)


def test_cli_runs_on_the_strict_backend(capsys):
    assert main(["gradcheck", "--backend", "strict", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True
