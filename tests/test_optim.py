"""Optimizers over the flat buffers: the textbook formulas, torch.optim's numbers, and the
in-place NumPy fast paths equal to their plain array-API twins."""
import numpy as np
import pytest

from minivae.optim import SGD, Adagrad, Adam, make_optimizer
from minivae.params import Layout, Params


def make_params(be, n=50, seed=0, dtype="float64"):
    P = Params(Layout([("w", (n,))]), be, dtype)
    P.set_flat(np.random.default_rng(seed).standard_normal(n))
    return P


def grads_stream(n, steps, seed=1):
    r = np.random.default_rng(seed)
    return [r.standard_normal(n) for _ in range(steps)]


def run(opt_factory, be, steps=20, dtype="float64", step=None):
    P = make_params(be, dtype=dtype)
    opt = opt_factory(P)
    for g in grads_stream(50, steps):
        P.grad[...] = be.asarray(g, dtype=dtype)
        (step or type(opt).step)(opt)
    return be.to_host(P.data)


def test_adam_follows_the_bias_corrected_formula(backend):
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    p = np.random.default_rng(0).standard_normal(50)
    m = v = np.zeros(50)
    for t, g in enumerate(grads_stream(50, 20), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr / (1 - b1**t) * m / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps)
    np.testing.assert_allclose(run(lambda P: Adam(P, lr=lr), backend), p, rtol=1e-13)


@pytest.mark.parametrize("factory", [
    lambda P: Adam(P, lr=1e-2),
    lambda P: Adam(P, lr=1e-2, weight_decay=0.1, decoupled=True),
    lambda P: Adagrad(P, lr=0.1),
    lambda P: SGD(P, lr=0.1),
    lambda P: SGD(P, lr=0.1, momentum=0.9),
], ids=["adam", "adamw", "adagrad", "sgd", "sgd_momentum"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_engine_step_equals_the_reference_over_twenty_steps(factory, dtype, kernel_mode):
    from minivae.backend import get_backend
    from minivae.engine import optimizer_step

    be = get_backend("numpy")
    fast = run(factory, be, dtype=dtype, step=optimizer_step)
    plain = run(factory, be, dtype=dtype)
    np.testing.assert_allclose(fast, plain, rtol=1e-5 if dtype == "float32" else 1e-13)


def test_fast_path_keeps_float32(cpu_backend):
    P = make_params(cpu_backend, dtype="float32")
    opt = Adam(P)
    P.grad[...] = 1.0
    opt.step()
    assert P.data.dtype == cpu_backend.xp.float32 and opt.m.dtype == cpu_backend.xp.float32


torch_cases = [
    ("adam", dict(lr=1e-2), lambda t, ps: t.optim.Adam(ps, lr=1e-2)),
    ("adam_l2", dict(lr=1e-2, weight_decay=0.05), lambda t, ps: t.optim.Adam(ps, lr=1e-2, weight_decay=0.05)),
    ("adamw", dict(lr=1e-2, weight_decay=0.05, decoupled=True), lambda t, ps: t.optim.AdamW(ps, lr=1e-2, weight_decay=0.05)),
    ("sgd_momentum", dict(lr=0.05, momentum=0.9, weight_decay=0.01),
     lambda t, ps: t.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("adagrad", dict(lr=0.1), lambda t, ps: t.optim.Adagrad(ps, lr=0.1)),
]


@pytest.mark.parametrize("name,kw,torch_factory", torch_cases, ids=[c[0] for c in torch_cases])
def test_matches_torch_optim_step_for_step(cpu_backend, name, kw, torch_factory):
    torch = pytest.importorskip("torch")
    cls = {"adam": Adam, "adam_l2": Adam, "adamw": Adam, "sgd_momentum": SGD, "adagrad": Adagrad}[name]
    ours = run(lambda P: cls(P, **kw), cpu_backend, steps=30)
    w = torch.tensor(np.random.default_rng(0).standard_normal(50), dtype=torch.float64, requires_grad=True)
    opt = torch_factory(torch, [w])
    for g in grads_stream(50, 30):
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    np.testing.assert_allclose(ours, w.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_state_dict_round_trip_continues_identically(cpu_backend):
    be = cpu_backend
    gs = grads_stream(50, 10)
    P = make_params(be)
    opt = Adam(P, lr=1e-2)
    for g in gs[:5]:
        P.grad[...] = be.asarray(g)
        opt.step()
    state, data = opt.state_dict(), be.to_host(P.data).copy()
    for g in gs[5:]:
        P.grad[...] = be.asarray(g)
        opt.step()
    Q = make_params(be)
    Q.set_flat(data)
    opt2 = Adam(Q, lr=1e-2)
    opt2.load_state_dict(state)
    for g in gs[5:]:
        Q.grad[...] = be.asarray(g)
        opt2.step()
    assert opt2.t == 10
    np.testing.assert_array_equal(be.to_host(Q.data), be.to_host(P.data))
    with pytest.raises(ValueError, match="holds Adam state, not SGD"):
        SGD(Q).load_state_dict(state)


def _state(opt, **change):
    s = opt.state_dict()
    s["buffers"] = {k: v.copy() for k, v in s["buffers"].items()}
    for k, v in change.items():
        if k in s["buffers"]:
            s["buffers"][k] = v
        else:
            s[k] = v
    return s


@pytest.mark.parametrize("cls", [Adam, Adagrad, SGD])
def test_a_refused_optimizer_state_changes_nothing(cls):
    """load_state_dict checks everything before it writes anything: a valid first buffer and
    a bad second one left the first overwritten; a missing key gave KeyError, t='x' an int()
    message, t=-5 was taken; a negative Adam v / Adagrad s was taken and the next step made
    every parameter NaN."""
    from minivae.backend import get_backend

    P = make_params(get_backend("numpy"))
    opt = cls(P, momentum=0.9) if cls is SGD else cls(P)
    for g in grads_stream(50, 3):
        P.grad[...] = g
        opt.step()
    names, n = opt.state_names, P.data.shape[0]
    first_good_last_bad = {names[0]: np.full(n, 7.0), names[-1]: np.ones(3)}
    cases = [
        (_state(opt, **first_good_last_bad), "has shape"),
        (_state(opt, t="x"), "t must be a whole number >= 0, got 'x'"),
        (_state(opt, t=-5), "t must be a whole number >= 0, got -5"),
        (_state(opt, t=2.0), "t must be a whole number"),
        ({"name": type(opt).__name__, "t": 1}, "must be a dict with 'name', 't' and 'buffers'"),
        ({}, "must be a dict with 'name', 't' and 'buffers'"),
        (None, "got NoneType"),
        (_state(opt, **{names[-1]: np.full(n, np.nan)}), "holds NaN or Inf"),
        (_state(opt, **{names[-1]: np.full(n, 1e300)}), None),    # fine in float64
        (_state(opt, **{names[-1]: np.ones(n, complex)}), "must hold real numbers"),
        (_state(opt, buffers={}), f"buffer {names[0]!r} is missing"),
    ]
    if cls is not SGD:
        second = "v" if cls is Adam else "s"
        cases.append((_state(opt, **{second: -np.ones(n)}), "holds negative numbers"))
    for state, message in cases:
        before = [getattr(opt, k).copy() for k in names] + [opt.t, P.data.copy()]
        if message is None:
            opt.load_state_dict(state)
            continue
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(state)
        after = [getattr(opt, k) for k in names] + [opt.t, P.data]
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)


def test_a_float32_optimizer_refuses_state_it_cannot_hold():
    from minivae.backend import get_backend

    P = make_params(get_backend("numpy"), dtype="float32")
    opt = Adam(P)
    with pytest.raises(ValueError, match="'m' holds numbers too large for float32"):
        opt.load_state_dict(_state(opt, m=np.full(50, 1e300)))


def test_bad_hyperparameters_and_names():
    P = make_params("numpy")
    with pytest.raises(ValueError, match="learning rate must be positive"):
        Adam(P, lr=0)
    with pytest.raises(ValueError, match="betas must be in"):
        Adam(P, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        SGD(P, weight_decay=-1)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        make_optimizer("rmsprop", P)
    assert isinstance(make_optimizer("Adagrad", P), Adagrad)
