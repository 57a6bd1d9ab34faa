"""The optional compiled kernels (minivae/engine/_kernels.c): the same numbers as their NumPy twins,
clear errors that change nothing, and minivae working the same without them."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from minivae import losses
from minivae.engine import kernels
from minivae.engine import numpy_twins as nt
from minivae.engine.optim import adam_update
from minivae.optim import Adam
from minivae.params import Layout, Params

PX = losses.Bernoulli(np, 1)      # the twins read nothing from it

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason="minivae.engine._kernels was not built (no C compiler)")

HYPER = dict(b1=0.9, c1=0.1, b2=0.999, c2=1e-3, step=3e-3, eps=1e-7, decay=1.0)


def adam_numpy(gs, p, m, v, b1, c1, b2, c2, step, eps, decay):
    """The formulas of kernels.adam, written out in NumPy (each operation rounded once)."""
    g = gs[0]
    for h in gs[1:]:
        g += h
    dt = p.dtype.type
    m[...] = dt(b1) * m + dt(c1) * g
    v[...] = dt(b2) * v + dt(c2) * (g * g)
    p[...] = dt(decay) * p - dt(step) * (m / (np.sqrt(v) + dt(eps)))


def buffers(rng, n, k, dtype):
    gs = tuple(rng.standard_normal(n).astype(dtype) for _ in range(k))
    p, m = (rng.standard_normal(n).astype(dtype) for _ in range(2))
    v = np.abs(rng.standard_normal(n)).astype(dtype)
    return gs, p, m, v


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [1, 7, 2048, 5000])     # below, at and across the kernel's block
@pytest.mark.parametrize("decay", [1.0, 0.999])
def test_compiled_adam_is_the_formula_to_the_last_bit(rng, dtype, k, n, decay):
    gs, p, m, v = buffers(rng, n, k, dtype)
    want = [a.copy() for a in (*gs, p, m, v)]
    adam_numpy(want[:k], *want[k:], **{**HYPER, "decay": decay})
    kernels.adam(gs, p, m, v, *{**HYPER, "decay": decay}.values())
    # gs[0] holds the summed gradient; the others are read only
    for got, exp in zip((*gs, p, m, v), want):
        np.testing.assert_array_equal(got, exp)


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_adam_keeps_no_subnormal_first_moment(rng, dtype):
    """A parameter whose gradient falls to exactly zero (a dead ReLU unit) sees its first
    moment decay by b1 a step, into the subnormal range after a few hundred steps, where x86
    arithmetic runs ~100x slower (measured: the 784-400-20 step went from 1.8 to 4.5 ms after
    800 steps at batch 32). The kernel writes 0 for an m below the smallest normal number; its
    twin keeps the subnormal. v stays exact, also where a tiny live gradient makes it
    subnormal with m normal (there the update is not negligible, with a small eps above all)."""
    tiny = np.finfo(dtype).tiny
    n = 4096
    gs, p, m, v = buffers(rng, n, 1, dtype)
    m[:] = tiny * rng.uniform(1.0, 2.0, n)        # about to underflow
    m[::2] *= -1
    v[:] = np.abs(v) + 1e-3
    g = np.zeros(n, dtype)
    g[:8] = gs[0][:8]                             # a few live units, the rest dead
    g[8:16] = np.sqrt(tiny) * 0.25                # live but tiny: v goes subnormal, m does not
    m[8:16], v[8:16] = 0, 0
    p_ref, m_ref, v_ref = p.copy(), m.copy(), v.copy()
    hyper = {**HYPER, "eps": float(np.sqrt(tiny)) * 1e-3}     # a user's small eps
    for _ in range(3):
        adam_numpy((g.copy(),), p_ref, m_ref, v_ref, **hyper)
        kernels.adam((g.copy(),), p, m, v, *hyper.values())
    sub = lambda a: np.count_nonzero((a != 0) & (np.abs(a) < tiny))
    assert sub(m_ref) > 0 and sub(v_ref[8:16]) == 8   # the formula alone leaves subnormals
    assert sub(m) == 0
    normal = np.abs(m_ref) >= tiny
    np.testing.assert_array_equal(m[normal], m_ref[normal])
    np.testing.assert_array_equal(m[~normal], 0)
    np.testing.assert_array_equal(v, v_ref)           # v exact, subnormals included
    np.testing.assert_array_equal(p[8:16], p_ref[8:16])   # where the update is large
    np.testing.assert_allclose(p, p_ref, rtol=0, atol=1e-30)


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("bad", [None, "nan first", "inf last", "nan in the second part",
                                 "-inf in the third part"])
def test_checked_adam_is_the_gradient_check_then_adam(rng, dtype, parts, bad):
    """adam_checked (the training step's check and update in one team job): where the
    gradient is finite, Adam's numbers to the bit and True; where any part of it holds NaN or
    Inf, False and not one number written, whichever part found it."""
    n = 3 * 2**15 + 37                # three parts of at least MIN_PART numbers
    (g,), p, m, v = buffers(rng, n, 1, dtype)
    where = {"nan first": (0, np.nan), "inf last": (n - 1, np.inf),
             "nan in the second part": (n // 2, np.nan),
             "-inf in the third part": (n - 100, -np.inf)}.get(bad)
    if where:
        g[where[0]] = where[1]
    before = [a.copy() for a in (g, p, m, v)]
    want = [a.copy() for a in (g, p, m, v)]
    kernels.adam((want[0],), *want[1:], *HYPER.values())
    applied = kernels._c.adam_checked(g, p, m, v, *HYPER.values(), parts)
    assert applied is (where is None)
    for got, exp, was in zip((g, p, m, v), want, before):
        np.testing.assert_array_equal(got, was if where else exp)


@needs_kernels
def test_compiled_adam_on_two_threads_equals_one_call(rng):
    """The GIL is released inside; threads updating disjoint slices do not disturb each other."""
    n = 300_000
    gs, p, m, v = buffers(rng, n, 2, np.float32)
    one = [a.copy() for a in (*gs, p, m, v)]
    kernels.adam(one[:2], *one[2:], *HYPER.values())
    halves = [slice(0, n // 2), slice(n // 2, n)]
    threads = [threading.Thread(target=kernels.adam,
                                args=(tuple(g[s] for g in gs), p[s], m[s], v[s], *HYPER.values()))
               for s in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, exp in zip((*gs, p, m, v), one):
        np.testing.assert_array_equal(got, exp)


@needs_kernels
@pytest.mark.parametrize("case, error, message", [
    ("int_arrays", TypeError, "float32 or float64"),
    ("mixed_dtypes", TypeError, "different dtype"),
    ("short_m", ValueError, "m has 9 numbers, the gradient 10"),
    ("strided_p", (ValueError, BufferError), "contiguous"),
    ("read_only_v", (ValueError, BufferError), "read-only|not writable"),
    ("two_dimensional", TypeError, "one-dimensional"),
    ("no_gradients", ValueError, "1 to 64"),
])
def test_bad_buffers_raise_and_change_nothing(rng, case, error, message):
    gs, p, m, v = buffers(rng, 10, 2, np.float64)
    if case == "int_arrays":
        gs = tuple(g.astype(np.int64) for g in gs)
    elif case == "mixed_dtypes":
        m = m.astype(np.float32)
    elif case == "short_m":
        m = m[:9]
    elif case == "strided_p":
        p = np.repeat(p, 2)[::2]
    elif case == "read_only_v":
        v.flags.writeable = False
    elif case == "two_dimensional":
        p = p.reshape(2, 5)
    elif case == "no_gradients":
        gs = ()
    before = [a.copy() for a in (*gs, p, m, v)]
    with pytest.raises(error, match=message):
        kernels.adam(gs, p, m, v, *HYPER.values())
    for a, b in zip((*gs, p, m, v), before):
        np.testing.assert_array_equal(a, b)


def adam_run(steps=8, n=70_000):
    """Params after `steps` Adam steps (long enough to be split over threads)."""
    P = Params(Layout([("w", (n,))]), "numpy", "float32")
    r = np.random.default_rng(3)
    P.data[...] = r.standard_normal(n)
    opt = Adam(P, lr=1e-2, weight_decay=0.01, decoupled=True)
    for _ in range(steps):
        P.grad[...] = r.standard_normal(n)
        opt.start_step()
        adam_update(opt, 0, n, (P.grad,))            # the engine's update
    return P.data.copy()


@needs_kernels
def test_adam_with_and_without_the_compiled_kernel_agree():
    """In float32 the twins differ only where OpenBLAS's axpby rounds a * x + b * y otherwise."""
    compiled = adam_run()
    with kernels.disabled():
        twin = adam_run()
    np.testing.assert_allclose(compiled, twin, rtol=2e-6, atol=1e-7)


def test_without_the_extension_minivae_runs_its_numpy_twins(monkeypatch):
    reference = adam_run()
    monkeypatch.setattr(kernels, "_c", None)          # as installed without a C compiler
    assert not kernels.available() and not kernels.enabled()
    assert "not built" in kernels.describe()
    np.testing.assert_allclose(adam_run(), reference, rtol=2e-6, atol=1e-7)


def test_the_environment_variable_turns_the_kernels_off():
    code = "from minivae.engine import kernels; print(kernels.enabled(), kernels.describe())"
    env = {**os.environ, "MINIVAE_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("False")
    if kernels.available():
        assert "turned off" in out


def bernoulli_case(rng, dtype, shape=(6, 300)):
    l = (rng.standard_normal(shape) * 8).astype(dtype)
    l[0, :4] = [0.0, -0.0, 90.0, -90.0]                 # both signs of 0, exp(-|l|) underflow
    x = rng.random(shape).astype(dtype)
    x[1] = rng.random(shape[1]) < 0.5                     # binary rows, as MNIST
    return l, x


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_bernoulli_nll_and_gradient_are_the_numpy_twins_to_the_last_bit(rng, dtype):
    l, x = bernoulli_case(rng, dtype)
    nll_c, cache_c = nt.bernoulli_nll(PX, l, x)
    grad_c = nt.bernoulli_nll_backward(PX, 1 / 128, cache_c)
    with kernels.disabled():
        nll_n, cache_n = nt.bernoulli_nll(PX, l, x)
        grad_n = nt.bernoulli_nll_backward(PX, 1 / 128, cache_n)
    assert nll_c.dtype == grad_c.dtype == dtype
    np.testing.assert_array_equal(nll_c, nll_n)
    np.testing.assert_array_equal(grad_c, grad_n)


def test_bernoulli_on_arrays_a_kernel_cannot_take_runs_the_twin(rng):
    """A strided x (a column slice), or a per-example scale, go to the NumPy twin: same values."""
    l, x_wide = bernoulli_case(rng, np.float64, shape=(6, 600))
    x = x_wide[:, ::2]
    l = np.ascontiguousarray(l[:, :300])
    assert not x.flags.c_contiguous and kernels.flat(l, x) is None
    nll, cache = nt.bernoulli_nll(PX, l, x)
    scale = rng.random(6)
    grad = nt.bernoulli_nll_backward(PX, scale, cache)
    with kernels.disabled():
        nll_n, cache_n = nt.bernoulli_nll(PX, l, x)
        np.testing.assert_array_equal(grad, nt.bernoulli_nll_backward(PX, scale, cache_n))
    np.testing.assert_array_equal(nll, nll_n)
    np.testing.assert_array_equal(x, x_wide[:, ::2])       # the data are never written


@needs_kernels
def test_bernoulli_kernels_never_write_the_logits_or_data(rng):
    l, x = bernoulli_case(rng, np.float32)
    l.flags.writeable = x.flags.writeable = False         # read-only inputs are accepted
    nll, cache = nt.bernoulli_nll(PX, l, x)
    nt.bernoulli_nll_backward(PX, 0.5, cache)
    assert np.isfinite(nll).all()


@needs_kernels
def test_more_gradient_buffers_than_one_call_takes_are_all_summed(rng):
    k = kernels.MAX_GRADS + 6                              # set_num_threads(70) on a big batch
    gs, p, m, v = buffers(rng, 50, k, np.float64)
    want = [a.copy() for a in (*gs, p, m, v)]
    adam_numpy(want[:k], *want[k:], **HYPER)
    kernels.adam(gs, p, m, v, *HYPER.values())
    for got, exp in zip((gs[0], p, m, v), (want[0], *want[k:])):
        np.testing.assert_allclose(got, exp, rtol=1e-13, atol=1e-15)


# -- a Dense layer's bias and the ReLU after it, in one pass ------------------------------------
def _activations(rng, dtype, rows=9, cols=13):
    out = rng.standard_normal((rows, cols)).astype(dtype)
    out[0, :4] = [np.nan, np.inf, -np.inf, -0.0]
    b = rng.standard_normal(cols).astype(dtype)
    b[5] = -out[1, 5]                                      # out + b == 0 exactly: the kink
    return out, b


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_relu_is_the_bias_then_the_relu_to_the_last_bit(rng, dtype):
    out, b = _activations(rng, dtype)
    want = np.maximum(out + b, 0.0)                        # Dense.forward, then ReLU.forward
    kernels.bias_relu(out.reshape(-1), b, *out.shape)
    np.testing.assert_array_equal(out, want)               # NaN where the reference has NaN


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [True, False])
def test_relu_grad_bias_is_the_mask_then_the_bias_gradient_to_the_last_bit(rng, dtype, in_place):
    pre, b = _activations(rng, dtype)
    out = np.maximum(pre + b, 0.0)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dout[2, :2] = [np.inf, np.nan]
    want = dout * (out > 0.0).astype(dtype)                # ReLU.backward
    want_db = np.sum(want, axis=0)                         # Dense.backward's db
    g = dout if in_place else np.full_like(dout, 7.0)
    db = np.full(out.shape[1], 3.0, dtype)
    kernels.relu_grad_bias(dout.reshape(-1), out.reshape(-1), g.reshape(-1), db, *out.shape)
    np.testing.assert_array_equal(g, want)
    np.testing.assert_array_equal(db, want_db)


@needs_kernels
@pytest.mark.parametrize("call, error, message", [
    (lambda o, b, g, db: kernels.bias_relu(o, b[:-1], 9, 13), ValueError, "b has 12 numbers, not 13"),
    (lambda o, b, g, db: kernels.bias_relu(o, b, 9, 12), ValueError, "not rows x cols"),
    # rows x cols overflowing to the buffer's length must not pass the check (it once did)
    (lambda o, b, g, db: kernels.bias_relu(o[:8], b[:4], 2**60 + 2, 4), ValueError,
     "not rows x cols"),
    (lambda o, b, g, db: kernels.relu_grad_bias(o[:8], o[:8], g[:8], db[:4], 2**60 + 2, 4),
     ValueError, "not rows x cols"),
    (lambda o, b, g, db: kernels.bernoulli_bias_negabs(o[:8], b[:4], g[:8], 2**60 + 2, 4),
     ValueError, "not rows x cols"),
    (lambda o, b, g, db: kernels.bernoulli_nll_grad_db(o[:8], o[:8], o[:8], g[:8], 1.0, db[:4],
                                                       2**60 + 2, 4), ValueError,
     "not rows x cols"),
    (lambda o, b, g, db: kernels.bias_relu(o[:8], b[:8], 2**59 + 2, 8), ValueError,
     "not rows x cols"),
    (lambda o, b, g, db: kernels.bias_relu(o, b.astype(np.float32), 9, 13), TypeError,
     "different dtype"),
    (lambda o, b, g, db: kernels.relu_grad_bias(o, o, g, db[:-1], 9, 13), ValueError,
     "db has 12 numbers"),
    (lambda o, b, g, db: kernels.relu_grad_bias(o, o[:-1], g, db, 9, 13), ValueError,
     "numbers"),
    (lambda o, b, g, db: kernels.relu_grad_bias(o, o, g, db, -1, 13), ValueError, ">= 0"),
])
def test_bad_bias_relu_buffers_raise_and_change_nothing(rng, call, error, message):
    out, b = _activations(rng, np.float64)
    o, g, db = out.reshape(-1), np.zeros(out.size), np.zeros(13)
    before = [a.copy() for a in (o, b, g, db)]
    with pytest.raises(error, match=message):
        call(o, b, g, db)
    for a, was in zip((o, b, g, db), before):
        np.testing.assert_array_equal(a, was)


@needs_kernels
def test_the_fused_passes_change_no_number_of_a_training_step(rng):
    """The VAE step with the fused Dense+ReLU passes and with the layer-by-layer twins:
    the same loss, gradients and trained parameters, to the last bit (float32)."""
    from minivae import VAE, DataParallel

    x = (rng.random((24, 50)) < 0.3).astype(np.float32)
    eps = rng.standard_normal((24, 4)).astype(np.float32)
    runs = []
    for fuse in (True, False):
        m = VAE(d_in=50, hidden=(32, 16), latent=4, seed=1)
        opt, dp = Adam(m.params), DataParallel(m, threads=1)
        previous, nt.FUSE = nt.FUSE, fuse
        try:
            losses_ = [float(dp.train_step(opt, x, eps).loss) for _ in range(3)]
        finally:
            nt.FUSE = previous
        runs.append((losses_, m.params.grad.copy(), m.params.data.copy()))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    np.testing.assert_array_equal(runs[0][2], runs[1][2])


# -- the decoder's last bias, folded into the Bernoulli likelihood ------------------------------
@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_likelihood_with_the_last_bias_is_the_bias_then_the_likelihood_to_the_last_bit(
        rng, dtype):
    logits, x = bernoulli_case(rng, dtype, shape=(7, 300))
    b = (rng.standard_normal(300) * 3).astype(dtype)
    want_l = logits + b                                # Dense.forward's bias, then Bernoulli.nll
    want_nll, (_, _, want_e) = nt.bernoulli_nll(PX, want_l.copy(), x)
    got_l = logits.copy()
    got_nll, (l_c, x_c, got_e) = nt.bernoulli_nll_bias(got_l, b, x)
    np.testing.assert_array_equal(got_l, want_l)
    np.testing.assert_array_equal(got_e, want_e)
    np.testing.assert_array_equal(got_nll, want_nll)
    assert l_c is got_l and x_c is x
    scale = 1.0 / 7
    want_g = nt.bernoulli_nll_backward(PX, scale, (want_l, x, want_e))
    db = np.full(300, 5.0, dtype)
    got_g = nt.bernoulli_nll_grad_bias((got_l, x, got_e), scale, db)
    np.testing.assert_array_equal(got_g, want_g)
    np.testing.assert_array_equal(db, np.sum(want_g, axis=0))   # Dense.backward's db


@needs_kernels
def test_the_likelihood_with_the_last_bias_refuses_what_the_kernels_cannot_take(rng):
    logits, x = bernoulli_case(rng, np.float64)
    b = rng.standard_normal(logits.shape[1])
    before = logits.copy()
    assert nt.bernoulli_nll_bias(logits, b, x.astype(np.float32)) is None      # mixed dtypes
    assert nt.bernoulli_nll_bias(logits, b, np.asfortranarray(x)) is None      # not C order
    np.testing.assert_array_equal(logits, before)                              # nothing written
    with pytest.raises(ValueError, match="b has 299 numbers, not 300"):
        kernels.bernoulli_bias_negabs(logits.reshape(-1), b[:-1], np.empty(logits.size),
                                      *logits.shape)
    with pytest.raises(ValueError, match="db has 299 numbers"):
        kernels.bernoulli_nll_grad_db(logits.reshape(-1), x.reshape(-1), np.ones(logits.size),
                                      np.empty(logits.size), 1.0, np.empty(299), *logits.shape)
    np.testing.assert_array_equal(logits, before)


@needs_kernels
def test_more_gradient_buffers_than_one_call_takes_are_checked_before_anything_is_written(rng):
    gs = [np.ones(4, np.float32) for _ in range(kernels.MAX_GRADS + 2)]
    p, m, v = np.zeros(5, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="p has 5 numbers, the gradient 4"):
        kernels.adam(gs, p, m, v, *HYPER.values())
    gs[-1] = np.ones(4)                                      # float64 among float32
    with pytest.raises(TypeError, match="different dtype"):
        kernels.adam(gs, p[:4], m, v, *HYPER.values())
    for g in gs:
        np.testing.assert_array_equal(g, 1.0)                # gs[0] not summed into


# -- the likelihood's forward in one team job, with NumPy's own exp, log1p and add loops --------
needs_loops = pytest.mark.skipif(not kernels.numpy_loops(),
                                 reason="NumPy's exp/log1p/add loops were not found here")


@needs_kernels
@needs_loops
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (6, 300), (128, 784), (33, 2049),
                                   (2, 5000), (40, 2048), (0, 784)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_likelihood_in_one_team_job_is_numpys_exp_log1p_and_sum_to_the_last_bit(
        rng, dtype, shape, bias):
    """Blocks of rows, cut over 1-4 parts: the same l + b, e, and per-example sums as NumPy's
    np.exp, np.log1p and np.sum(t, axis=1) in the kernels-off twin, for values that reach
    exp's underflow, both zeros, infinities and NaN."""
    logits, x = bernoulli_case(rng, dtype, shape=shape) if shape[0] >= 2 and shape[1] >= 4 else (
        (rng.standard_normal(shape) * 8).astype(dtype), rng.random(shape).astype(dtype))
    if shape[0] >= 3 and shape[1] >= 4:
        logits[2, :4] = [np.inf, -np.inf, np.nan, 1e-38]
    b = (rng.standard_normal(shape[1]) * 3).astype(dtype) if bias else None
    with kernels.disabled():
        want_l = logits + b if bias else logits.copy()
        want_nll, (_, _, want_e) = nt.bernoulli_nll(PX, want_l.copy(), x)
    for parts in (1, 2, 3, 4):
        got_l = logits.copy()
        with kernels.parts(parts):
            got = nt._nll_rows(got_l, b, x)
        assert got is not None                             # the team job ran
        got_nll, (l_c, x_c, got_e) = got
        assert got_nll.dtype == dtype and got_nll.shape == (shape[0],)
        np.testing.assert_array_equal(got_l, want_l, err_msg=f"{parts} parts")
        np.testing.assert_array_equal(got_e, want_e, err_msg=f"{parts} parts")
        np.testing.assert_array_equal(got_nll, want_nll, err_msg=f"{parts} parts")
        assert l_c is got_l and x_c is x


@needs_kernels
@needs_loops
def test_the_likelihood_runs_the_numpy_calls_where_the_loops_are_not_found(rng, monkeypatch):
    """Without NumPy's loops (another NumPy's ufunc layout), the twin calls np.exp, np.log1p
    and np.sum as before: the same numbers. numpy_loops refuses ufuncs that are not exp,
    log1p and add, and keeps the loops it found."""
    logits, x = bernoulli_case(rng, np.float32, shape=(128, 784))
    with_loops = nt.bernoulli_nll(PX, logits.copy(), x)
    monkeypatch.setattr(kernels, "_loops", False)
    assert nt._nll_rows(logits.copy(), None, x) is None
    without = nt.bernoulli_nll(PX, logits.copy(), x)
    np.testing.assert_array_equal(with_loops[0], without[0])
    np.testing.assert_array_equal(with_loops[1][2], without[1][2])
    from minivae.engine import _kernels
    assert _kernels.numpy_loops(np.exp, np.exp, np.add) is False
    assert _kernels.numpy_loops(np.log1p, np.exp, np.add) is False
    assert _kernels.numpy_loops(1, 2, 3) is False
    monkeypatch.setattr(kernels, "_loops", None)
    assert kernels.numpy_loops()                           # still found


@needs_kernels
@needs_loops
def test_bad_likelihood_buffers_raise_and_change_nothing(rng):
    logits, x = bernoulli_case(rng, np.float64, shape=(8, 300))
    e, t, nll, b = np.zeros(2400), np.zeros(2400), np.zeros(8), np.ones(300)
    before = [a.copy() for a in (logits, e, t, nll)]
    calls = [
        (lambda: kernels.bernoulli_nll_rows(logits.reshape(-1), b, x.reshape(-1), e, t,
                                            nll[:-1], 8, 300), ValueError, "nll has 7 numbers"),
        (lambda: kernels.bernoulli_nll_rows(logits.reshape(-1), b[:-1], x.reshape(-1), e, t,
                                            nll, 8, 300), ValueError, "b has 299 numbers"),
        (lambda: kernels.bernoulli_nll_rows(logits.reshape(-1), b, x.reshape(-1), e, t, nll,
                                            2**60 + 8, 300), ValueError, "not rows x cols"),
        (lambda: kernels.bernoulli_nll_rows(logits.reshape(-1), b, x.reshape(-1)[:-1], e, t,
                                            nll, 8, 300), ValueError, "x has 2399 numbers"),
        (lambda: kernels.bernoulli_nll_rows(logits.reshape(-1), b.astype(np.float32),
                                            x.reshape(-1), e, t, nll, 8, 300), TypeError,
         "different dtype"),
        (lambda: kernels.bernoulli_nll_rows(logits.reshape(-1), b, x.reshape(-1), e, t, nll,
                                            -1, 300), ValueError, ">= 0"),
    ]
    for call, error, message in calls:
        with pytest.raises(error, match=message):
            call()
        for a, was in zip((logits, e, t, nll), before):
            np.testing.assert_array_equal(a, was)
    ro = logits.copy()
    ro.flags.writeable = False                             # no bias: the logits are only read
    kernels.bernoulli_nll_rows(ro.reshape(-1), None, x.reshape(-1), e, t, nll, 8, 300)
    with pytest.raises((BufferError, ValueError, TypeError)):
        kernels.bernoulli_nll_rows(ro.reshape(-1), b, x.reshape(-1), e, t, nll, 8, 300)


# -- the Gaussian latent: the sampler and the KL in one call each way -------------------------
def latent_case(rng, dtype, B, L):
    h = (rng.standard_normal((B, 2 * L)) * 3).astype(dtype)
    if B >= 2 and L >= 4:
        h[0, L:L + 4] = [80.0, -80.0, 0.0, -0.0]          # exp overflow / underflow, both zeros
        h[1, :4] = [np.inf, -np.inf, np.nan, 1e-30]
        h[1, L:L + 3] = [np.inf, -np.inf, np.nan]
    eps = rng.standard_normal((B, L)).astype(dtype)
    return h, eps


@needs_kernels
@needs_loops
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B, L", [(0, 20), (1, 1), (5, 7), (128, 20), (3, 8), (4, 9), (2, 300)])
@pytest.mark.parametrize("s", [1 / 128, 0.37, 0.0])
def test_the_latent_in_one_call_is_the_sampler_and_the_kl_to_the_last_bit(rng, dtype, B, L, s):
    from minivae.sampling import sample, sample_backward
    h, eps = latent_case(rng, dtype, B, L)
    dz = rng.standard_normal((B, L)).astype(dtype)
    with np.errstate(all="ignore"):
        mu, logvar = h[:, :L], h[:, L:]
        z_w, (sigma_w, _) = sample(np, mu, logvar, eps)
        kl_w, (_, var_w) = losses.kl_normal(np, mu, logvar)
        dmu, dlogvar, _ = sample_backward(dz, (sigma_w, eps))
        kmu, klogvar = losses.kl_normal_backward(np, s, (mu, var_w))
        dh_w = np.concatenate([dmu + kmu, dlogvar + klogvar], axis=1)
    got = nt.gaussian_latent(h, eps, L, s)
    assert got is not None
    z, kl, cache = got
    assert z.dtype == kl.dtype == dtype and z.shape == (B, L) and kl.shape == (B,)
    np.testing.assert_array_equal(z, z_w)
    np.testing.assert_array_equal(kl, kl_w)
    np.testing.assert_array_equal(cache[2], sigma_w)
    np.testing.assert_array_equal(cache[3], var_w)
    dh = np.full((B, 2 * L), 7.0, dtype)
    nt.gaussian_latent_backward(dz, cache, s, dh)
    np.testing.assert_array_equal(dh, dh_w)
    nt.gaussian_latent_backward(np.asfortranarray(dz), cache, s, dh)    # any layout of dz
    np.testing.assert_array_equal(dh, dh_w)


@needs_kernels
@needs_loops
def test_the_latent_call_declines_what_would_change_a_number(rng):
    """A strided eps, mixed dtypes, a NumPy float64 scale with float32 arrays (it would
    promote), or a wrong shape: None, and the reference runs (and raises its own error)."""
    h, eps = latent_case(rng, np.float32, 6, 5)
    wide = rng.standard_normal((6, 10)).astype(np.float32)
    assert nt.gaussian_latent(h, wide[:, ::2], 5, 0.5) is None
    assert nt.gaussian_latent(h, eps.astype(np.float64), 5, 0.5) is None
    assert nt.gaussian_latent(h, eps, 5, np.float64(0.5)) is None
    assert nt.gaussian_latent(h, eps[:, :4], 5, 0.5) is None
    assert nt.gaussian_latent(h[:, :8], eps, 5, 0.5) is None
    with pytest.raises(TypeError, match="different dtype"):
        nt.gaussian_latent_backward(eps.astype(np.float64), nt.gaussian_latent(h, eps, 5, 0.5)[2],
                                    0.5, np.empty((6, 10), np.float32))
    from minivae import VAE
    m = VAE(d_in=12, hidden=(8,), latent=5, seed=0)
    x = (rng.random((6, 12)) < 0.5).astype(np.float32)
    with pytest.raises(ValueError, match="eps has shape"):
        nt.vae_forward_backward(m, m.params, x, eps[:, :4])


@needs_kernels
@needs_loops
def test_bad_latent_buffers_raise_and_change_nothing(rng):
    from minivae.engine import _kernels as K
    h, eps = latent_case(rng, np.float64, 4, 3)
    z, sg, var, kl = np.zeros(12), np.zeros(12), np.zeros(12), np.zeros(4)
    before = [a.copy() for a in (z, sg, var, kl)]
    for args, error, message in [
        ((h.reshape(-1), eps.reshape(-1), z, sg, var, kl[:-1], 4, 3), ValueError, "kl has 3"),
        ((h.reshape(-1)[:-1], eps.reshape(-1), z, sg, var, kl, 4, 3), ValueError, "h has 23"),
        ((h.reshape(-1), eps.reshape(-1), z, sg, var, kl, 4, -3), ValueError, ">= 0"),
        ((h.reshape(-1), eps.reshape(-1), z, sg, var, kl, 2**61, 2**2), ValueError, "a size"),
        ((h.reshape(-1), eps.reshape(-1).astype(np.float32), z, sg, var, kl, 4, 3), TypeError,
         "different dtype"),
    ]:
        with pytest.raises(error, match=message):
            K.gaussian_latent(*args)
        for a, was in zip((z, sg, var, kl), before):
            np.testing.assert_array_equal(a, was)
    with pytest.raises(ValueError, match="dh has 23"):
        K.gaussian_latent_backward(z, h.reshape(-1), sg, eps.reshape(-1), var, 0.5,
                                   np.zeros(23), 4, 3)


@needs_kernels
@needs_loops
@pytest.mark.parametrize("threads", [1, 2])
def test_the_compiled_likelihood_and_latent_change_no_number_of_training(rng, monkeypatch, threads):
    """Three steps of the default-shaped VAE with NumPy's loops in the compiled passes and with
    the NumPy calls (the loops 'not found'): the same losses, gradients and parameters."""
    from minivae import VAE, DataParallel
    x = (rng.random((64, 784)) < 0.3).astype(np.float32)
    eps = rng.standard_normal((64, 20)).astype(np.float32)
    runs = []
    for loops in (None, False):
        monkeypatch.setattr(kernels, "_loops", loops)
        m = VAE(d_in=784, hidden=(64,), latent=20, seed=3)
        opt, dp = Adam(m.params), DataParallel(m, threads=threads)
        losses_ = [float(dp.train_step(opt, x, eps).loss) for _ in range(3)]
        runs.append((losses_, m.params.grad.copy(), m.params.data.copy(), kernels._loops))
    assert runs[0][3] is True and runs[1][3] is False      # the first run used the loops
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    np.testing.assert_array_equal(runs[0][2], runs[1][2])


# -- SGD with momentum: one compiled pass, no subnormal buffer ---------------------------------
@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 2048, 5000, 70000])
def test_compiled_sgd_momentum_is_the_formula_to_the_last_bit(rng, dtype, k, n):
    gs, p, b, _ = buffers(rng, n, k, dtype)
    want_g = gs[0].copy()
    for h in gs[1:]:
        want_g += h
    want_b = 0.9 * b + want_g                         # SGD.update, each operation rounded once
    want_p = p - 0.01 * want_b
    for parts in (1, 2, 3):
        g2, p2, b2 = [g.copy() for g in gs], p.copy(), b.copy()
        with kernels.parts(parts):
            kernels.sgd_momentum(tuple(g2), p2, b2, 0.9, 0.01)
        np.testing.assert_array_equal(g2[0], want_g)
        np.testing.assert_array_equal(b2, want_b)
        np.testing.assert_array_equal(p2, want_p)


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_sgd_momentum_keeps_no_subnormal_buffer(rng, dtype):
    """A dead unit's buffer (gradient exactly 0) decays by mu a step: it reaches 0, never a
    subnormal, and the parameter moves by what the exact formula gives up to lr x tiny."""
    tiny = np.finfo(dtype).tiny
    p = rng.standard_normal(64).astype(dtype)
    b = np.full(64, tiny * 4, dtype)
    b[:32] *= -1
    p0 = p.copy()
    for _ in range(30):
        kernels.sgd_momentum((np.zeros(64, dtype),), p, b, 0.9, 0.01)
        assert not np.any((b != 0) & (np.abs(b) < tiny))
    assert np.all(b == 0)
    assert np.max(np.abs(p - p0)) <= 0.01 * tiny * 4 * 10 + np.max(np.abs(p0)) * np.finfo(dtype).eps


@needs_kernels
def test_sgd_momentum_twin_uses_the_kernel_and_tracks_the_reference(rng):
    """SGD(momentum) through DataParallel, with the compiled pass and with the NumPy twin
    (OpenBLAS's axpby, which may fuse a multiply-add): the same training to round-off."""
    from minivae import VAE, DataParallel, SGD
    x = (rng.random((40, 30)) < 0.4).astype(np.float32)
    eps = rng.standard_normal((40, 3)).astype(np.float32)
    runs = []
    for on in (True, False):
        m = VAE(d_in=30, hidden=(16,), latent=3, seed=4)
        opt, dp = SGD(m.params, lr=0.05, momentum=0.9), DataParallel(m, threads=1)
        previous = kernels.set_enabled(on)
        try:
            for _ in range(4):
                dp.train_step(opt, x, eps)
        finally:
            kernels.set_enabled(previous)
        runs.append((m.params.data.copy(), opt.buf.copy()))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-7)
    assert not np.array_equal(runs[0][1], np.zeros_like(runs[0][1]))


@needs_kernels
def test_bad_sgd_buffers_raise_and_change_nothing(rng):
    gs, p, b, _ = buffers(rng, 10, 1, np.float64)
    before = [a.copy() for a in (gs[0], p, b)]
    for args, error, message in [
        ((gs, p, b[:-1], 0.9, 0.1), ValueError, "momentum buffer has 9 numbers"),
        ((gs, p.astype(np.float32), b, 0.9, 0.1), TypeError, "different dtype"),
        (((), p, b, 0.9, 0.1), ValueError, "1 to 64"),
    ]:
        with pytest.raises(error, match=message):
            kernels.sgd_momentum(*args)
        for a, was in zip((gs[0], p, b), before):
            np.testing.assert_array_equal(a, was)


# -- found by the new-user attack ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("on", [True, False])
def test_the_likelihood_at_infinite_logits_is_the_references(rng, dtype, on):
    """l = -inf with x > 0 is +inf nats, as the reference's max(l, 0) + log1p(e) - x l; the
    branch-free (|l| + l) / 2 once gave inf - inf = NaN there (kernels on and off)."""
    l = np.zeros((3, 6), dtype)
    l[:, :3] = -np.inf
    l[:, 3:] = np.inf
    x = np.tile(np.array([0.0, 0.5, 1.0], dtype), (3, 2))
    want, _ = losses.bernoulli_nll(np, l, x)
    previous = kernels.set_enabled(on)
    try:
        with np.errstate(all="ignore"):
            got, _ = nt.bernoulli_nll(PX, l.copy(), x)
            row = nt.bernoulli_nll(PX, l[:1, 1:2].copy(), x[:1, 1:2])[0]
    finally:
        kernels.set_enabled(previous)
    np.testing.assert_array_equal(got, want)
    assert row[0] == np.inf                                # -inf logit, x = 0.5


@pytest.mark.parametrize("rows", [0, 3, 40])
def test_the_likelihood_with_no_pixels_is_zero_and_never_crashes(rows):
    """(B, 0) logits: each example's NLL is 0, as np.sum over nothing (a division by the
    column count once killed the process)."""
    l = np.zeros((rows, 0), np.float32)
    nll, _ = nt.bernoulli_nll(PX, l, l.copy())
    np.testing.assert_array_equal(nll, np.zeros(rows, np.float32))
    if kernels.available() and kernels.numpy_loops():
        z = np.zeros(0, np.float32)
        out = np.full(rows, 7.0, np.float32)
        kernels.bernoulli_nll_rows(z, None, z, z, z, out, rows, 0)
        np.testing.assert_array_equal(out, np.zeros(rows, np.float32))


@needs_kernels
@pytest.mark.parametrize("which", ["adam", "sgd"])
def test_a_read_only_gradient_beyond_the_kernels_limit_writes_nothing(rng, which):
    """More gradient buffers than one call takes are added in Python first: every one is
    checked (writable too) before anything is written, and errors name the buffer."""
    gs = [np.ones(10) for _ in range(kernels.MAX_GRADS + 1)]
    gs[1].flags.writeable = False
    p, m, v = np.zeros(10), np.zeros(10), np.ones(10)
    call = ((lambda g, b: kernels.adam(g, p, m, b, **HYPER)) if which == "adam"
            else (lambda g, b: kernels.sgd_momentum(g, p, b, 0.9, 0.1)))
    with pytest.raises(ValueError, match="gradient 1 is read-only"):
        call(tuple(gs), v)
    np.testing.assert_array_equal(gs[0], np.ones(10))
    np.testing.assert_array_equal(p, np.zeros(10))
    name = "v" if which == "adam" else "the momentum buffer"
    with pytest.raises(ValueError, match=f"{name} has 9 numbers"):
        call(tuple(np.ones(10) for _ in range(kernels.MAX_GRADS + 1)), np.ones(9))


@pytest.mark.parametrize("value, ok", [("banana", False), ("2", False), ("OFF", True),
                                       ("yes", True)])
def test_a_mistyped_kernels_switch_is_one_line_before_any_work(tmp_path, value, ok):
    env = {**os.environ, "MINIVAE_KERNELS": value}
    if ok:
        out = subprocess.run([sys.executable, "-m", "minivae", "info"], capture_output=True,
                             text=True, env=env, timeout=120)
        assert out.returncode == 0 and "MINIVAE_KERNELS must" not in out.stderr
        return
    out = subprocess.run([sys.executable, "-m", "minivae", "train", "--epochs", "1", "--out",
                          str(tmp_path / "run")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"minivae train: error: MINIVAE_KERNELS must be 1 (use the compiled kernels) or 0 (the "
        f"NumPy twins; also true/false, yes/no, on/off), got {value!r}"]
    assert not (tmp_path / "run").exists()


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_finds_every_nan_and_inf_wherever_it_is(dtype):
    """kernels.all_finite against np.isfinite(a).all(): NaN, +Inf, -Inf at the first, the
    last and middle positions (both sides of every part's edge), the largest finite numbers
    and subnormals (finite), on 1-4 parts and on lengths around the part size."""
    from minivae.engine import kernels

    rng = np.random.default_rng(0)
    info = np.finfo(dtype)
    for n in (1, 15, 16, 17, 1 << 15, (1 << 16) + 5, 200_003):
        a = rng.standard_normal(n).astype(dtype)
        for parts in (1, 2, 3, 4):
            assert kernels.all_finite(a, parts)
            for where in {0, n - 1, n // 2, n // 3, min(n - 1, 16), min(n - 1, (1 << 15))}:
                for bad in (np.nan, np.inf, -np.inf, info.max, -info.max, info.tiny / 4):
                    b = a.copy()
                    b[where] = bad
                    assert kernels.all_finite(b, parts) == bool(np.isfinite(b).all()), \
                        (n, parts, where, bad)


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_code_flags_numbers_a_sum_of_2_to_the_headroom_could_overflow(dtype):
    """finite_code: 0 for NaN/Inf anywhere; 2 for a finite number with |x| >= 2^(emax + 1 -
    headroom) (a sum of 2^headroom arrays could then overflow); 1 otherwise."""
    from minivae.engine import kernels

    top = np.finfo(dtype).maxexp                       # 128 or 1024: 2^top overflows
    a = np.ones(100_003, dtype=dtype)
    for parts in (1, 2, 3):
        assert kernels.finite_code(a, parts, 0) == 1
        b = a.copy()
        b[77_777] = np.finfo(dtype).max
        assert kernels.finite_code(b, parts, 0) == 1       # headroom 0: finite is enough
        for h in (1, 2, 6):
            edge = np.ldexp(dtype(1), top - h)              # 2^(top - h)
            for v, want in ((edge, 2), (-edge, 2), (np.nextafter(edge, dtype(0)), 1)):
                b = a.copy()
                b[77_777] = v
                assert kernels.finite_code(b, parts, h) == want, (h, parts, v)
            b[-1] = np.inf
            assert kernels.finite_code(b, parts, h) == 0
    # the guarantee: 2^h numbers just below 2^(top - h), added, stay finite
    for h in (1, 2, 6):
        v = np.nextafter(np.ldexp(dtype(1), top - h), dtype(0))
        assert kernels.finite_code(np.full(4, v), 1, h) == 1
        total = dtype(0)
        for _ in range(2 ** h):
            total = dtype(total + v)
        assert np.isfinite(total)
