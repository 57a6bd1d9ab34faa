"""Likelihoods and KL terms: values against the textbook formulas, gradients against the checker."""
import math

import numpy as np
import pytest

from minivae import losses
from minivae.gradcheck import check_gradients


def dev(be, a):
    return be.asarray(np.asarray(a, dtype=np.float64))


def check_piece(be, forward, backward, tensors, B, rng):
    w = dev(be, rng.standard_normal(B) + 0.5)

    def f():
        return float(be.xp.sum(forward() * w))

    report = check_gradients(f, tensors, backward(w), name="piece")
    assert report.passed, report.table()
    assert all(c.max_rel_error <= 1e-7 for c in report.checks)


def test_bernoulli_nll_equals_binary_cross_entropy(cpu_backend, rng):
    be = cpu_backend
    l, x = rng.standard_normal((3, 5)) * 3, rng.uniform(size=(3, 5))
    p = 1 / (1 + np.exp(-l))
    want = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(1)
    got, _ = losses.bernoulli_nll(be.xp, dev(be, l), dev(be, x))
    np.testing.assert_allclose(be.to_host(got), want, rtol=1e-12)


def test_bernoulli_nll_is_exact_for_huge_logits(cpu_backend):
    """log(sigmoid(l)) overflows to -inf for l = -800; the logits form must not."""
    be = cpu_backend
    l = dev(be, [[-800.0, 800.0, -40.0, 40.0]])
    x = dev(be, [[1.0, 0.0, 0.0, 1.0]])
    nll, cache = losses.bernoulli_nll(be.xp, l, x)
    # softplus(-800) + 800 = 800; softplus(800) = 800; tiny terms exp(-40)
    np.testing.assert_allclose(be.to_host(nll), [1600.0 + 2 * math.log1p(math.exp(-40))], rtol=1e-15)
    g = be.to_host(losses.bernoulli_nll_backward(be.xp, 1.0, cache))
    np.testing.assert_allclose(g, [[-1.0, 1.0, math.exp(-40), -math.exp(-40)]], rtol=1e-12)


def test_bernoulli_gradient(backend, rng):
    xp = backend.xp
    l, x = dev(backend, rng.standard_normal((4, 6)) * 5), dev(backend, rng.uniform(size=(4, 6)))
    check_piece(backend, lambda: losses.bernoulli_nll(xp, l, x)[0],
                lambda w: {"l": losses.bernoulli_nll_backward(xp, w, losses.bernoulli_nll(xp, l, x)[1])},
                {"l": l}, 4, rng)


def test_gaussian_nll_is_the_normal_log_density(cpu_backend, rng):
    be = cpu_backend
    m, x, lv = rng.standard_normal((2, 3)), rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    var = np.exp(lv)
    want = (0.5 * (x - m) ** 2 / var + 0.5 * np.log(2 * np.pi * var)).sum(1)
    got, _ = losses.gaussian_nll(be.xp, dev(be, m), dev(be, x), dev(be, lv))
    np.testing.assert_allclose(be.to_host(got), want, rtol=1e-12)
    fixed, _ = losses.gaussian_nll(be.xp, dev(be, m), dev(be, x), 0.7)
    want_fixed = (0.5 * (x - m) ** 2 / np.exp(0.7) + 0.5 * np.log(2 * np.pi * np.exp(0.7))).sum(1)
    np.testing.assert_allclose(be.to_host(fixed), want_fixed, rtol=1e-12)


def test_gaussian_gradients_fixed_and_learned_variance(backend, rng):
    xp = backend.xp
    m, x, lv = (dev(backend, rng.standard_normal((4, 5))) for _ in range(3))
    check_piece(backend, lambda: losses.gaussian_nll(xp, m, x, 0.3)[0],
                lambda w: {"m": losses.gaussian_nll_backward(xp, w, losses.gaussian_nll(xp, m, x, 0.3)[1])[0]},
                {"m": m}, 4, rng)
    assert losses.gaussian_nll_backward(xp, 1.0, losses.gaussian_nll(xp, m, x, 0.3)[1])[1] is None
    check_piece(backend, lambda: losses.gaussian_nll(xp, m, x, lv)[0],
                lambda w: dict(zip("ml", losses.gaussian_nll_backward(xp, w, losses.gaussian_nll(xp, m, x, lv)[1]))),
                {"m": m, "l": lv}, 4, rng)


def test_kl_closed_form_and_its_gradient_formulas(backend, rng):
    xp = backend.xp
    mu, lv = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    kl, cache = losses.kl_normal(xp, dev(backend, mu), dev(backend, lv))
    np.testing.assert_allclose(backend.to_host(kl), 0.5 * (mu**2 + np.exp(lv) - 1 - lv).sum(1), rtol=1e-12)
    dmu, dlv = losses.kl_normal_backward(xp, 1.0, cache)
    np.testing.assert_allclose(backend.to_host(dmu), mu)
    np.testing.assert_allclose(backend.to_host(dlv), (np.exp(lv) - 1) / 2, rtol=1e-12)
    zero, _ = losses.kl_normal(xp, dev(backend, np.zeros((1, 4))), dev(backend, np.zeros((1, 4))))
    assert float(zero[0]) == 0.0  # q = p


def test_kl_gradients_pass_gradcheck(backend, rng):
    xp = backend.xp
    mu, lv, z = (dev(backend, rng.standard_normal((4, 3))) for _ in range(3))
    check_piece(backend, lambda: losses.kl_normal(xp, mu, lv)[0],
                lambda w: dict(zip(("mu", "lv"), losses.kl_normal_backward(xp, w, losses.kl_normal(xp, mu, lv)[1]))),
                {"mu": mu, "lv": lv}, 4, rng)
    check_piece(backend, lambda: losses.kl_monte_carlo(xp, z, mu, lv)[0],
                lambda w: dict(zip(("z", "mu", "lv"),
                                   losses.kl_monte_carlo_backward(xp, w, losses.kl_monte_carlo(xp, z, mu, lv)[1]))),
                {"z": z, "mu": mu, "lv": lv}, 4, rng)


def test_monte_carlo_kl_is_an_unbiased_estimate_of_the_analytic_kl(cpu_backend, rng):
    be, xp = cpu_backend, cpu_backend.xp
    n = 100_000
    mu, lv = np.array([[0.5, -1.0]]), np.array([[-0.5, 0.8]])
    eps = rng.standard_normal((n, 2))
    z = mu + np.exp(lv / 2) * eps
    mc, _ = losses.kl_monte_carlo(xp, dev(be, z), dev(be, np.repeat(mu, n, 0)), dev(be, np.repeat(lv, n, 0)))
    mc = be.to_host(mc)
    exact = float(losses.kl_normal(xp, dev(be, mu), dev(be, lv))[0][0])
    assert abs(mc.mean() - exact) < 4 * mc.std() / np.sqrt(n)


@pytest.mark.parametrize("scale", [0.25, "array"])
def test_backward_scale_may_be_a_float_or_per_example(cpu_backend, rng, scale):
    be, xp = cpu_backend, cpu_backend.xp
    mu, lv = dev(be, rng.standard_normal((3, 2))), dev(be, rng.standard_normal((3, 2)))
    s = 0.25 if scale == 0.25 else dev(be, [1.0, 2.0, 3.0])
    dmu, _ = losses.kl_normal_backward(xp, s, losses.kl_normal(xp, mu, lv)[1])
    s_host = np.full((3, 1), 0.25) if scale == 0.25 else np.array([[1.0], [2.0], [3.0]])
    np.testing.assert_allclose(be.to_host(dmu), be.to_host(mu) * s_host)
