"""The reparametrized sampler z = mu + exp(logvar/2) * eps, and its gradient."""
import numpy as np
import pytest

from minivae.gradcheck import check_gradients
from minivae.sampling import sample, sample_backward


def test_sample_standard_deviation_is_exp_half_logvar(backend):
    """Statistical pin: the sample std must be exp(logvar/2) (a common bug uses exp(logvar))."""
    xp = backend.xp
    n = 200_000
    logvar = np.array([-2.0, 0.0, 1.5])
    mu = np.array([0.5, -1.0, 3.0])
    eps = backend.rng(0).normal((n, 3), "float64")
    z, _ = sample(xp, backend.asarray(np.tile(mu, (n, 1))),
                  backend.asarray(np.tile(logvar, (n, 1))), eps)
    z = backend.to_host(z)
    std_expected = np.exp(logvar / 2)
    # the std of a sample std is about std / sqrt(2n): 0.16% here; allow 1%
    np.testing.assert_allclose(z.std(axis=0), std_expected, rtol=0.01)
    assert np.all(np.abs(z.mean(axis=0) - mu) <= 5 * std_expected / np.sqrt(n))
    assert not np.allclose(z.std(axis=0)[[0, 2]], np.exp(logvar)[[0, 2]], rtol=0.1)


def test_sampler_gradients_pass_gradcheck(backend, rng):
    xp = backend.xp
    mu, logvar, eps = (backend.asarray(rng.standard_normal((4, 3))) for _ in range(3))
    G = backend.asarray(rng.standard_normal((4, 3)))
    dmu, dlogvar, deps = sample_backward(G, sample(xp, mu, logvar, eps)[1])

    def f():
        return float(xp.sum(sample(xp, mu, logvar, eps)[0] * G))

    r = check_gradients(f, {"mu": mu, "logvar": logvar, "eps": eps},
                        {"mu": dmu, "logvar": dlogvar, "eps": deps}, name="sample")
    assert r.passed, r.table()


def test_sampler_gradient_formulas(cpu_backend, rng):
    be = cpu_backend
    mu, logvar, eps, G = (rng.standard_normal((2, 3)) for _ in range(4))
    out = sample_backward(be.asarray(G), sample(be.xp, *(be.asarray(a) for a in (mu, logvar, eps)))[1])
    dmu, dlogvar, deps = (be.to_host(o) for o in out)
    sigma = np.exp(logvar / 2)
    np.testing.assert_allclose(dmu, G)
    np.testing.assert_allclose(dlogvar, G * eps * sigma / 2, rtol=1e-12)
    np.testing.assert_allclose(deps, G * sigma, rtol=1e-12)


def test_eps_of_the_wrong_shape_is_rejected(cpu_backend):
    xp = cpu_backend.xp
    with pytest.raises(ValueError, match=r"eps has shape \(4, 3\) but mu has shape \(5, 3\)"):
        sample(xp, xp.zeros((5, 3)), xp.zeros((5, 3)), xp.zeros((4, 3)))
