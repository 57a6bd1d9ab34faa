"""The step plan (minivae/engine/plan.py): the generic NumPy pass's numbers to the last bit, on
every shape it takes; nothing it returns is overwritten by the next step; and wherever it does
not apply it writes nothing and the generic pass runs."""
import threading

import numpy as np
import pytest

from minivae import Adam, Autoencoder, DataParallel, VAE
from minivae.engine import kernels, plan
from minivae.engine import numpy_twins as nt

needs_plan = pytest.mark.skipif(not (kernels.available() and kernels.numpy_loops()),
                                reason="the step plan needs the compiled kernels and NumPy's loops")


def _data(rng, B, D, L, dtype):
    x = (rng.random((B, D)) < 0.3).astype(dtype)
    x[0, : D // 3] = rng.random(D // 3)            # grey levels too, not only 0 and 1
    eps = rng.standard_normal((B, L)).astype(dtype)
    return x, eps


def _train(cls, kw, xs, epss, threads, use_plan, steps=3, compiled=True):
    """steps of DataParallel.train_step -> (per-step loss, recon, kl arrays, grad, params,
    Adam's m and v, whether a plan was kept for the model's Params or a replica, and whether
    one ran as one compiled call)."""
    m = cls(**kw)
    opt, dp = Adam(m.params, lr=3e-3), DataParallel(m, threads=threads)
    previous, plan.ENABLED = plan.ENABLED, use_plan
    was_compiled, plan.COMPILED = plan.COMPILED, compiled
    try:
        rows = []
        for i in range(steps):
            eps = epss[i % len(epss)] if m.has_prior else None
            r = dp.train_step(opt, xs[i % len(xs)], eps)
            rows.append((float(r.loss), float(r.recon), float(r.kl)))
        fb = dp.loss_and_grads(xs[0], epss[0] if m.has_prior else None)
        per_row = nt.vae_forward_backward if m.has_prior else nt.autoencoder_forward_backward
        terms = per_row(m, m.params, xs[0], epss[0] if m.has_prior else None)
        kept = [p for P in [m.params, *dp._replicas] for p in plan._plans.get(P, {}).values()]
    finally:
        plan.ENABLED, plan.COMPILED = previous, was_compiled
    return dict(rows=rows, fb=(float(fb.loss), fb.grads.copy()),
                terms=[a.copy() for a in terms], grad=m.params.grad.copy(),
                data=m.params.data.copy(), m=opt.m.copy(), v=opt.v.copy(), used=bool(kept),
                compiled=any(p._program not in (None, plan._UNBUILT) for p in kept))


def _same(a, b):
    assert a["rows"] == b["rows"]
    assert a["fb"][0] == b["fb"][0]
    np.testing.assert_array_equal(a["fb"][1], b["fb"][1])
    for u, w in zip(a["terms"], b["terms"]):
        np.testing.assert_array_equal(u, w)
    for k in ("grad", "data", "m", "v"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@needs_plan
@pytest.mark.parametrize("cls", [VAE, Autoencoder])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hidden", [(24,), (32, 16), ()])
@pytest.mark.parametrize("B,threads", [(1, 1), (7, 2), (32, 1), (33, 2), (64, 2), (600, 2)])
@pytest.mark.parametrize("compiled", [True, False])
def test_the_plan_gives_the_generic_pass_numbers_to_the_last_bit(rng, cls, dtype, hidden, B,
                                                                 threads, compiled):
    """Training with the plan and without: the same per-step losses, per-row terms, gradient,
    parameters and Adam state, to the bit, with the plan run as one compiled call
    (Plan.compiled) and call by call from Python (Plan.run_python). Batch 1..33 float32
    covers input_grad's transposed form (few rows, long inner dimension: D = 300); 600 rows
    on 2 threads the row blocks, each with its own plan. At batch 1 NumPy's matmul takes
    gemv, not gemm, so the compiled call steps aside there."""
    D, L = 300, 4
    kw = dict(d_in=D, hidden=hidden, latent=L, dtype=dtype, seed=3)
    xs, epss = zip(*[_data(rng, B, D, L, np.dtype(dtype)) for _ in range(2)])
    on = _train(cls, kw, xs, epss, threads, True, compiled=compiled)
    off = _train(cls, kw, xs, epss, threads, False)
    assert on["used"] and not off["used"]
    assert on["compiled"] == (compiled and B > 1)
    _same(on, off)


@needs_plan
def test_the_plan_on_the_default_model_at_batch_128(rng):
    """The README's model and batch (784-400-20, float32, 128 rows, 2 threads), through
    minivae.train_step as the trainer calls it: the same numbers to the bit."""
    xs, epss = zip(*[_data(rng, 128, 784, 20, np.float32) for _ in range(2)])
    on = _train(VAE, dict(seed=0), xs, epss, 2, True, steps=4)
    off = _train(VAE, dict(seed=0), xs, epss, 2, False, steps=4)
    python = _train(VAE, dict(seed=0), xs, epss, 2, True, steps=4, compiled=False)
    assert on["used"] and on["compiled"] and python["used"] and not python["compiled"]
    _same(on, off)
    _same(python, off)


@needs_plan
@pytest.mark.parametrize("cls, hidden, latent", [(Autoencoder, (16,), 1), (VAE, (1,), 3),
                                                 (VAE, (16,), 1)])
def test_a_product_numpy_would_not_send_to_gemm_leaves_the_plan_to_python(rng, cls, hidden,
                                                                        latent):
    """A layer 1 wide (an autoencoder's code, a hidden unit, a VAE's z) makes one of the
    products one that NumPy's matmul does not give to gemm (a matrix times a vector, an outer
    product): the compiled call, which calls gemm only, is not made, and the plan runs from
    Python, with the same numbers."""
    D = 40
    kw = dict(d_in=D, hidden=hidden, latent=latent, seed=5)
    xs, epss = zip(*[_data(rng, 8, D, latent, np.dtype(np.float32)) for _ in range(2)])
    on = _train(cls, kw, xs, epss, 2, True)
    off = _train(cls, kw, xs, epss, 2, False)
    assert on["used"] and not on["compiled"]
    _same(on, off)


@needs_plan
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_unaligned_x_gives_the_generic_pass_numbers(rng, dtype):
    """x C-contiguous but not aligned to its item size (a buffer at an odd byte offset; found
    by a helper's attack): NumPy's matmul copies such an operand before it calls gemm, and
    x.T @ G then goes to gemm untransposed, so the compiled call, which would hand gemm the raw
    pointer, is not made: the same numbers as the generic pass, to the bit."""
    D, B, L = 300, 33, 4
    x0, eps = _data(rng, B, D, L, np.dtype(dtype))
    size = np.dtype(dtype).itemsize
    x = np.frombuffer(bytearray(B * D * size + 1), dtype=dtype, offset=1, count=B * D)
    x = x.reshape(B, D)
    x[...] = x0
    assert x.flags.c_contiguous and not x.flags.aligned
    kw = dict(d_in=D, hidden=(24,), latent=L, dtype=dtype, seed=1)
    on = _train(VAE, kw, [x], [eps], 1, True)
    off = _train(VAE, kw, [x], [eps], 1, False)
    assert on["used"]
    _same(on, off)


@needs_plan
def test_what_a_step_returns_is_not_overwritten_by_the_next(rng):
    m = VAE(d_in=40, hidden=(16,), latent=3, seed=0)
    (x1, e1), (x2, e2) = _data(rng, 9, 40, 3, np.float32), _data(rng, 9, 40, 3, np.float32)
    first = nt.vae_forward_backward(m, m.params, x1, e1)
    kept = [a.copy() for a in first]
    assert plan._plans.get(m.params)
    second = nt.vae_forward_backward(m, m.params, x2, e2)
    for a, was, b in zip(first, kept, second):
        np.testing.assert_array_equal(a, was)
        assert not np.shares_memory(a, b)


def _generic_and_planned(m, x, eps, **kw):
    previous, plan.ENABLED = plan.ENABLED, False
    try:
        want = nt.vae_forward_backward(m, m.params, x, eps, **kw)
        want_grad = m.params.grad.copy()
    finally:
        plan.ENABLED = previous
    got = nt.vae_forward_backward(m, m.params, x, eps, **kw)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(m.params.grad, want_grad)


@needs_plan
@pytest.mark.parametrize("case", ["fortran x", "fortran eps", "eps float64", "3-d eps",
                                  "gaussian", "tanh", "x float64", "batch size n",
                                  "kernels off", "busy"])
def test_where_no_plan_applies_the_generic_pass_runs_and_nothing_is_kept(rng, case):
    kw = dict(d_in=30, hidden=(12,), latent=2, seed=1)
    if case == "gaussian":
        kw["likelihood"] = "gaussian_learned"
    if case == "tanh":
        kw["activation"] = "tanh"
    m = VAE(**kw)
    x, eps = _data(rng, 6, 30, 2, np.float32)
    if case == "fortran x":
        x = np.asfortranarray(x)
    elif case == "fortran eps":
        eps = np.asfortranarray(eps)
    elif case == "eps float64":
        eps = eps.astype(np.float64)
    elif case == "x float64":
        x = x.astype(np.float64)
    if case == "3-d eps":
        got = plan.forward_backward(m, m.params, x, eps[None], 6, nt.SMALL_ROWS, nt.LONG_INNER)
        assert got is None
        return
    if case == "batch size n":          # a row block of a bigger batch: planned, n honoured
        _generic_and_planned(m, x, eps, batch_size=50)
        assert plan._plans.get(m.params)
        return
    if case == "kernels off":
        with kernels.disabled():
            assert plan.forward_backward(m, m.params, x, eps, 6, nt.SMALL_ROWS,
                                         nt.LONG_INNER) is None
        assert not plan._plans.get(m.params)
        return
    if case == "busy":                  # another thread holds this plan: the generic pass runs
        nt.vae_forward_backward(m, m.params, x, eps)
        (held,) = plan._plans[m.params].values()
        with held.lock:
            assert plan.forward_backward(m, m.params, x, eps, 6, nt.SMALL_ROWS,
                                         nt.LONG_INNER) is None
            _generic_and_planned(m, x, eps)
        return
    before = m.params.grad.copy()
    assert plan.forward_backward(m, m.params, x, eps, 6, nt.SMALL_ROWS, nt.LONG_INNER) is None
    np.testing.assert_array_equal(m.params.grad, before)     # nothing written
    if case in ("gaussian", "tanh", "x float64"):
        assert not plan._plans.get(m.params)
    _generic_and_planned(m, x, eps)


@needs_plan
def test_plans_are_bounded_in_number_and_size(rng, monkeypatch):
    m = VAE(d_in=30, hidden=(12,), latent=2, seed=1)
    for B in (5, 6, 7, 8):
        x, eps = _data(rng, B, 30, 2, np.float32)
        _generic_and_planned(m, x, eps)
    assert [k[1][0] for k in plan._plans[m.params]] == [7, 8]      # MAX_PLANS, newest kept
    monkeypatch.setattr(plan, "MAX_BYTES", 10_000)
    x, eps = _data(rng, 40, 30, 2, np.float32)
    _generic_and_planned(m, x, eps)
    assert all(k[1][0] != 40 for k in plan._plans[m.params])


@needs_plan
def test_threads_sharing_a_params_each_get_the_right_numbers(rng):
    """Two threads running the pass on one model's Params at once (one plan, one lock):
    whichever finds the plan busy takes the generic pass; both get exactly the per-row
    losses of a pass alone (the gradient buffer they share is not compared)."""
    m = VAE(d_in=60, hidden=(20,), latent=3, seed=2)
    cases = [_data(rng, 16, 60, 3, np.float32) for _ in range(2)]
    want = []
    for x, eps in cases:
        want.append([a.copy() for a in nt.vae_forward_backward(m, m.params, x, eps)])
    m2 = VAE(d_in=60, hidden=(20,), latent=3, seed=2)
    got, errors = [None, None], []

    def work(j):
        try:
            for _ in range(200):
                x, eps = cases[j]
                got[j] = [a.copy() for a in nt.vae_forward_backward(m2, m2.params, x, eps)]
                for a, b in zip(got[j], want[j]):
                    np.testing.assert_array_equal(a, b)
        except BaseException as e:     # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(j,)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@needs_plan
def test_a_plan_goes_with_its_model(rng):
    """A plan keeps its model only weakly: the model, its Params and the plan's buffers are
    freed together (the table is keyed by the Params, which the model holds)."""
    import gc
    import weakref

    m = VAE(d_in=30, hidden=(12,), latent=2, seed=1)
    x, eps = _data(rng, 6, 30, 2, np.float32)
    nt.vae_forward_backward(m, m.params, x, eps)
    assert plan._plans.get(m.params)
    gone = weakref.ref(m.params)
    n_before = len(plan._plans)
    del m
    gc.collect()
    assert gone() is None and len(plan._plans) == n_before - 1


@needs_plan
@pytest.mark.parametrize("how", ["train_step", "row blocks"])
def test_a_model_stepped_through_the_engine_is_freed_with_its_plans(rng, how):
    """minivae.train_step keeps a DataParallel per model (weakly keyed by the model): it must
    hold the model weakly too, or every model ever stepped lives on, with its plans (up to
    2 x 32 MiB). And a row-block step's jobs must not stay with the thread team's workers."""
    import gc
    import weakref

    m = VAE(d_in=60, hidden=(20,), latent=3, seed=2)
    x, eps = _data(rng, 600, 60, 3, np.float32)
    if how == "train_step":
        opt = Adam(m.params)
        minivae_train_step(m, opt, x, eps)
        del opt
    else:
        dp = DataParallel(m, threads=2)
        dp.loss_and_grads(x, eps)
        assert any(plan._plans.get(P) for P in dp._replicas)
        del dp
    gone, n_before = weakref.ref(m), len(plan._plans)
    assert plan._plans.get(m.params)
    del m
    gc.collect()
    assert gone() is None
    assert len(plan._plans) < n_before


def minivae_train_step(m, opt, x, eps):
    import minivae
    return minivae.train_step(m, opt, x, eps)


@needs_plan
def test_an_eps_no_plan_can_take_makes_no_plan_and_evicts_none(rng):
    m = VAE(d_in=30, hidden=(12,), latent=2, seed=1)
    for B in (8, 9):
        x, eps = _data(rng, B, 30, 2, np.float32)
        _generic_and_planned(m, x, eps)
    kept = list(plan._plans[m.params])
    x, eps = _data(rng, 10, 30, 2, np.float32)
    for bad in (np.asfortranarray(eps), eps.astype(np.float64), eps[None]):
        assert plan.forward_backward(m, m.params, x, bad, 10, nt.SMALL_ROWS,
                                     nt.LONG_INNER) is None
    assert plan.forward_backward(m, m.params, x, eps, np.int64(10), nt.SMALL_ROWS,
                                 nt.LONG_INNER) is None          # beta / n not a float
    assert list(plan._plans[m.params]) == kept


@needs_plan
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
# JAX, imported by other tests in this process, warns at every fork that a multithreaded
# process may deadlock; the child here only runs NumPy and minivae, and exits
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_a_forked_child_does_not_inherit_a_held_plan(rng):
    """A plan in use by a thread of the parent when it forks: the child starts with no plans,
    so the lock that thread held cannot keep the child on the generic pass for good."""
    import os

    m = VAE(d_in=30, hidden=(12,), latent=2, seed=1)
    x, eps = _data(rng, 6, 30, 2, np.float32)
    nt.vae_forward_backward(m, m.params, x, eps)
    (held,) = plan._plans[m.params].values()
    with held.lock:
        pid = os.fork()
        if pid == 0:                  # the child: report through the exit code only
            ok = False
            try:
                ok = not plan._plans.get(m.params)
                nt.vae_forward_backward(m, m.params, x, eps)
                (fresh,) = plan._plans[m.params].values()
                ok = ok and fresh is not held and not fresh.lock.locked()
            finally:
                os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@needs_plan
@pytest.mark.parametrize("change", ["likelihood", "layer", "beta"])
def test_a_plan_follows_a_model_changed_after_it_was_made(rng, change):
    """The model's likelihood and layers are public attributes a user may replace between
    steps: the next step must be that of the model as it now is (the generic pass's), never
    the plan's memory of it (a helper found the Bernoulli loss still used after
    ``model.px = gaussian``)."""
    from minivae import losses
    from minivae.layers import ReLU, Tanh

    m = VAE(d_in=30, hidden=(12,), latent=2, seed=1)
    x, eps = _data(rng, 6, 30, 2, np.float32)
    _generic_and_planned(m, x, eps)
    if change == "likelihood":
        m.px = losses.make_likelihood("gaussian", m.xp, 30, 1.0)
    elif change == "layer":      # the decoder's ReLU swapped for a tanh
        i = next(i for i, layer in enumerate(m.decoder.layers) if type(layer) is ReLU)
        m.decoder.layers[i] = Tanh(backend=m.backend)
    else:
        m.beta = 0.25
    _generic_and_planned(m, x, eps)
