"""Each NumPy fast path (in place, `out=`, threads) equals its plain array-API twin.

The fast paths are chosen only when backend.name == "numpy"; the plain code runs on every
other backend (and is what "strict" checks). Here the two are run on the same inputs.
"""
import numpy as np
import pytest

from minivae import VAE, Adam, Autoencoder, get_backend, losses
from minivae.layers import Dense, ReLU, mlp
from minivae.params import Layout, Params

NP = get_backend("numpy")


def test_dense_backward_writes_the_same_gradients_into_the_flat_buffer(rng):
    d = Dense(7, 5, backend=NP)
    P = Params(Layout([("d.W", (7, 5)), ("d.b", (5,))]), NP, "float64")
    P.data[...] = rng.standard_normal(P.data.shape)
    x, G = rng.standard_normal((4, 7)), rng.standard_normal((4, 5))
    _, cache = d.forward(P.group("d"), x)
    dx_plain, g_plain = d.backward(P.group("d"), G, cache)                  # plain: new arrays
    dx_fast, g_fast = d.backward(P.group("d"), G, cache, grads=P.group("d", grad=True))
    assert g_fast["W"] is P.group("d", grad=True)["W"]                        # into the views
    np.testing.assert_allclose(P.grad, np.concatenate([g_plain["W"].ravel(), g_plain["b"]]),
                               rtol=1e-14)
    np.testing.assert_allclose(dx_fast, dx_plain, rtol=1e-14)
    np.testing.assert_allclose(dx_plain, G @ P.group("d")["W"].T, rtol=1e-14)


def test_relu_in_place_twins_equal_the_plain_ones(rng):
    r = ReLU(backend=NP)
    a = rng.standard_normal((6, 9))
    a[0, 0] = 0.0
    out_plain, c_plain = r.forward({}, a)
    work = a.copy()
    out_fast, c_fast = r.forward_({}, work)
    assert out_fast is work                                   # really in place
    np.testing.assert_array_equal(out_fast, out_plain)
    G = rng.standard_normal((6, 9))
    dx_plain, _ = r.backward({}, G, c_plain)
    Gw = G.copy()
    dx_fast, _ = r.backward_({}, Gw, c_fast)
    assert dx_fast is Gw
    np.testing.assert_array_equal(dx_fast, dx_plain)
    assert dx_plain[0, 0] == 0.0                              # the kink takes the 0 branch


def test_sequential_never_writes_to_the_callers_arrays(rng):
    net = mlp([5, 8, 8, 3], "relu", prefix="n", backend=NP)
    P = Params(Layout(net.param_entries()), NP, "float64")
    P.data[...] = rng.standard_normal(P.data.shape)
    x, G = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    x0, G0 = x.copy(), G.copy()
    out, caches = net.forward(P, x)
    net.backward(P, G, caches)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(G, G0)


@pytest.mark.parametrize("logit_scale", [1.0, 60.0])
def test_bernoulli_twins_agree_including_extreme_logits(rng, logit_scale, kernel_mode):
    l = rng.standard_normal((5, 40)) * logit_scale
    l[0, :4] = [0.0, -0.0, 800.0, -800.0]
    x = rng.random((5, 40))
    x[1] = rng.random(40) < 0.5
    nll_p, c_p = losses.bernoulli_nll(NP.xp, l, x)
    nll_f, c_f = losses.bernoulli_nll_numpy(l, x)
    np.testing.assert_allclose(nll_f, nll_p, rtol=1e-14)
    for scale in (0.25, rng.random(5)):
        gp = losses.bernoulli_nll_backward(NP.xp, scale, c_p)
        gf = losses.bernoulli_nll_backward_numpy(scale, c_f)
        np.testing.assert_allclose(gf, gp, rtol=1e-13, atol=1e-300)
    s = np.exp(-np.logaddexp(0.0, -l))                    # sigmoid, overflow-free
    np.testing.assert_allclose(losses.bernoulli_nll_backward_numpy(1.0, c_f), s - x,
                               rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("cls", [VAE, Autoencoder])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian_learned"])
def test_whole_model_numpy_fast_path_equals_the_strict_plain_path(cls, likelihood, rng):
    """The same model on "numpy" (every fast path) and "strict" (none): same loss and grads."""
    kw = dict(d_in=12, hidden=(10, 6), latent=3, likelihood=likelihood, dtype="float64", seed=2)
    fast, plain = cls(backend="numpy", **kw), cls(backend="strict", **kw)
    x = (rng.random((7, 12)) < 0.4).astype(np.float64)
    eps = rng.standard_normal((7, 3)) if cls is VAE else None
    rf = fast.loss_and_grads(x, eps)
    rp = plain.loss_and_grads(plain.backend.asarray(x),
                              None if eps is None else plain.backend.asarray(eps))
    np.testing.assert_allclose(float(rf.loss), float(rp.loss), rtol=1e-14)
    np.testing.assert_allclose(rf.grads, plain.backend.to_host(rp.grads), rtol=1e-12,
                               atol=1e-14)


def test_fast_step_keeps_float32_end_to_end(rng):
    m = VAE(d_in=20, hidden=(16,), latent=4, seed=0)
    opt = Adam(m.params)
    x = (rng.random((8, 20)) < 0.5).astype(np.float32)
    r = m.loss_and_grads(x, m.draw_eps(8))
    opt.step()
    for a in (r.loss, r.elbo, r.grads, m.params.data, opt.m, opt.v):
        assert a.dtype == np.float32
