"""Layers: forward/backward pairs that pass the gradient checker on every backend."""
import math

import numpy as np
import pytest

from minivae import layers
from minivae.gradcheck import check_layer
from minivae.params import Layout, Params


def f64(be, a):
    return be.asarray(np.asarray(a, dtype=np.float64))


def away_from_zero(rng, shape):
    """Inputs at least 0.1 from 0, so a ReLU kink is never straddled by the finite difference."""
    x = rng.standard_normal(shape)
    return np.sign(x) * (0.1 + np.abs(x))


def test_dense_forward_is_x_W_plus_b(backend, rng):
    d = layers.Dense(3, 2, backend=backend)
    W, b, x = rng.standard_normal((3, 2)), rng.standard_normal(2), rng.standard_normal((4, 3))
    out, _ = d.forward({"W": f64(backend, W), "b": f64(backend, b)}, f64(backend, x))
    assert tuple(out.shape) == (4, 2)
    np.testing.assert_allclose(backend.to_host(out), x @ W + b, rtol=1e-12)


def test_dense_passes_gradcheck_linearity_and_repeatability(backend, rng):
    d = layers.Dense(5, 4, backend=backend)
    P = {"W": f64(backend, rng.standard_normal((5, 4))), "b": f64(backend, rng.standard_normal(4))}
    report = check_layer(d, P, f64(backend, rng.standard_normal((3, 5))), name="Dense")
    assert report.passed, report.table()
    assert {c.name for c in report.checks} >= {"Dense.x", "Dense.W", "Dense.b"}
    assert all(c.max_rel_error <= 1e-7 for c in report.checks if c.kind == "gradient")


@pytest.mark.parametrize("name", sorted(layers.ACTIVATIONS))
def test_every_activation_passes_gradcheck(backend, rng, name):
    act = layers.make_activation(name, backend)
    report = check_layer(act, {}, f64(backend, 3 * away_from_zero(rng, (4, 6))), name=name)
    assert report.passed, report.table()
    assert report.checks[0].n_checked == 24


def test_activation_values(cpu_backend):
    be = cpu_backend
    x = np.array([[-50.0, -1.0, 0.0, 1.0, 50.0]])
    expect = {
        "relu": np.maximum(x, 0),
        "leaky_relu": np.where(x > 0, x, 0.01 * x),
        "tanh": np.tanh(x),
        "sigmoid": 1 / (1 + np.exp(-x)),
        "softplus": np.log1p(np.exp(x)),
    }
    for name, want in expect.items():
        out, _ = layers.make_activation(name, be).forward({}, f64(be, x))
        np.testing.assert_allclose(be.to_host(out), want, rtol=1e-12, err_msg=name)


def test_stable_sigmoid_and_softplus_at_extreme_inputs(cpu_backend):
    be = cpu_backend
    x = f64(be, [[-1000.0, 1000.0]])
    s = be.to_host(layers.sigmoid(be.xp, x))
    sp = be.to_host(layers.softplus(be.xp, x))
    assert np.all(np.isfinite(s)) and np.all(np.isfinite(sp))
    np.testing.assert_array_equal(s, [[0.0, 1.0]])
    np.testing.assert_array_equal(sp, [[0.0, 1000.0]])


def test_backward_returns_new_gradients_and_writes_nothing(cpu_backend, rng):
    be = cpu_backend
    d = layers.Dense(3, 2, backend=be)
    P = Params(Layout([("d.W", (3, 2)), ("d.b", (2,))]), be, "float64")
    P.set_flat(rng.standard_normal(8))
    x, G = f64(be, rng.standard_normal((4, 3))), f64(be, rng.standard_normal((4, 2)))
    data0 = be.to_host(P.data).copy()
    _, cache = d.forward(P.group("d"), x)
    dx, grads = d.backward(P.group("d"), G, cache)
    assert set(grads) == {"W", "b"}
    np.testing.assert_allclose(be.to_host(grads["W"]), be.to_host(x).T @ be.to_host(G), rtol=1e-12)
    np.testing.assert_allclose(be.to_host(grads["b"]), be.to_host(G).sum(0), rtol=1e-12)
    np.testing.assert_allclose(be.to_host(dx), be.to_host(G) @ data0[:6].reshape(3, 2).T,
                               rtol=1e-12)
    assert not np.any(be.to_host(P.grad))                      # nothing written anywhere
    np.testing.assert_array_equal(be.to_host(P.data), data0)
    P.write_grads({f"d.{k}": v for k, v in grads.items()})     # what the model does with them
    np.testing.assert_allclose(be.to_host(P.grad)[6:], be.to_host(G).sum(0), rtol=1e-12)


def test_initialisations_have_the_stated_scale():
    be = layers.Dense(1, 1).backend
    rng = be.rng(0)
    for init, expected_std in [("he", math.sqrt(2 / 400)),
                               ("glorot", math.sqrt(6 / 800) / math.sqrt(3)),
                               ("torch", 1 / math.sqrt(400) / math.sqrt(3))]:
        P = {"W": np.zeros((400, 400)), "b": np.ones(400)}
        layers.Dense(400, 400, init=init).init(P, rng)
        assert abs(P["W"].std() / expected_std - 1) < 0.02, init
        assert (P["b"] == 0).all() == (init != "torch"), init
    with pytest.raises(ValueError, match="init must be one of"):
        layers.Dense(2, 2, init="xavier")


def test_mlp_builder_names_and_shapes():
    net = layers.mlp([784, 400, 40], "relu", prefix="enc")
    assert net.names == ["enc.0", "enc.1", "enc.2"]
    assert [type(l).__name__ for l in net.layers] == ["Dense", "ReLU", "Dense"]
    assert net.param_entries() == [("enc.0.W", (784, 400)), ("enc.0.b", (400,)),
                                   ("enc.2.W", (400, 40)), ("enc.2.b", (40,))]
    linear = layers.mlp([5, 3, 2], None)
    assert [type(l).__name__ for l in linear.layers] == ["Dense", "Dense"]
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        layers.mlp([2, 2, 2], "gelu")
