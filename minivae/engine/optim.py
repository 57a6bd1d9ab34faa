"""NumPy twins of the optimizers' ``update(lo, hi, grads)``: the same formulas with every
operation in place (no per-step allocation), as few passes over memory as possible
(``blas.axpby`` fuses y <- a x + b y), and for Adam one compiled pass that also sums the
threads' partial gradients (:mod:`.kernels`). Where a twin has no fast form (L2 weight decay,
SGD momentum's first step) it runs the reference. ``tests/test_engine.py`` checks each against
its reference; ``tests/test_kernels.py`` the compiled Adam against the NumPy form here.

They read the optimizer's public state (hyperparameters, ``t``, its buffers) and never count
steps: the optimizer does (``start_step``).
"""
from __future__ import annotations

import weakref

import numpy as np

from ..backend import get_backend
from ..optim import SGD, Adagrad, Adam, sum_into_first
from ..params import Layout, Params
from . import kernels
from .blas import axpby
from .registry import twin_of

NP = get_backend("numpy")
_scratch: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _tmp(opt, lo, hi):
    """A scratch buffer like the flat parameters, one per optimizer, reused every step."""
    buf = _scratch.get(opt)
    if buf is None or buf.shape != opt.params.data.shape or buf.dtype != opt.params.data.dtype:
        buf = _scratch[opt] = np.empty_like(opt.params.data)
    return buf[lo:hi]


# -- the case the registry test runs: 3 steps, each over two slices with two partial grads --------
def _case(factories):
    def case(impl, be, rng):
        out = []
        for make in factories:
            P = Params(Layout([("w", (11,)), ("b", (6,))]), be, "float64")
            P.set_flat(rng.standard_normal(17))
            opt = make(P)
            for _ in range(3):
                opt.start_step()
                for lo, hi in ((0, 9), (9, 17)):
                    g1 = be.asarray(rng.standard_normal(hi - lo))
                    g2 = be.asarray(rng.standard_normal(hi - lo))
                    impl(opt, lo, hi, (g1, g2))
            out += [be.to_host(P.data)] + [be.to_host(getattr(opt, n)) for n in opt.state_names]
        return out
    return case


@twin_of(SGD.update, exact=False, case=_case([
    lambda P: SGD(P, lr=0.1), lambda P: SGD(P, lr=0.1, momentum=0.9),
    lambda P: SGD(P, lr=0.1, momentum=0.9, weight_decay=0.01)]))
def sgd_update(opt, lo, hi, grads):
    if opt.weight_decay or (opt.momentum and opt.t == 1):
        return SGD.update(opt, lo, hi, grads)
    p = opt.params.data[lo:hi]
    if opt.momentum and kernels.enabled():
        # one compiled pass; a buffer below the smallest normal number is stored as 0
        kernels.sgd_momentum(tuple(grads), p, opt.buf[lo:hi], opt.momentum, opt.lr)
        return
    g = sum_into_first(grads)
    if opt.momentum:
        buf = opt.buf[lo:hi]
        axpby(1.0, g, opt.momentum, buf)               # b = mu b + g
        axpby(-opt.lr, buf, 1.0, p)                    # p = p - lr b
    else:
        axpby(-opt.lr, g, 1.0, p)                      # p = p - lr g


@twin_of(Adam.update, exact=False, case=_case([
    lambda P: Adam(P, lr=0.01), lambda P: Adam(P, lr=0.01, weight_decay=0.1, decoupled=True),
    lambda P: Adam(P, lr=0.01, weight_decay=0.1)]))
def adam_update(opt, lo, hi, grads):
    """One compiled pass where the kernels were built (the gradient sum included), else the
    seven NumPy passes of :func:`adam_update_numpy`."""
    if opt.weight_decay and not opt.decoupled:
        return Adam.update(opt, lo, hi, grads)
    step_size, inv_sqrt_bc2 = opt.coefficients()
    p, m, v = opt.params.data[lo:hi], opt.m[lo:hi], opt.v[lo:hi]
    if kernels.enabled():
        decay = 1.0 - opt.lr * opt.weight_decay if opt.weight_decay else 1.0
        kernels.adam(tuple(grads), p, m, v, opt.b1, 1.0 - opt.b1, opt.b2, 1.0 - opt.b2,
                     step_size / inv_sqrt_bc2, opt.eps / inv_sqrt_bc2, decay)
        return
    adam_update_numpy(opt, grads, p, m, v, _tmp(opt, lo, hi), step_size, inv_sqrt_bc2)


def checked_step(opt, parts: int):
    """The training step's gradient check and the optimizer's whole update in one compiled
    call, where it has one (Adam without L2 weight decay, the kernels built): each of ``parts``
    team threads checks its slice of ``params.grad`` for NaN and Inf, all wait for all, and
    each then updates the slice it checked, still in its cache (``_kernels.adam_checked``).
    The same numbers as ``kernels.finite_code`` then :func:`adam_update` over [0, n).
    -> True: the step was counted and applied; False: the gradient holds NaN or Inf and
    nothing changed (the step count included); None: no such call here (do both apart)."""
    if not (type(opt) is Adam and kernels.enabled() and (opt.decoupled or not opt.weight_decay)
            and type(opt.params.grad) is np.ndarray):
        return None
    t = opt.start_step()
    step_size, inv_sqrt_bc2 = opt.coefficients()
    decay = 1.0 - opt.lr * opt.weight_decay if opt.weight_decay else 1.0
    try:
        applied = kernels._c.adam_checked(
            opt.params.grad, opt.params.data, opt.m, opt.v, opt.b1, 1.0 - opt.b1, opt.b2,
            1.0 - opt.b2, step_size / inv_sqrt_bc2, opt.eps / inv_sqrt_bc2, decay, parts)
    except (TypeError, ValueError, BufferError):    # an argument refused: nothing written
        opt.t = t - 1                 # (not on a KeyboardInterrupt, which can arrive just
        raise                         # after the update was applied)
    if not applied:
        opt.t = t - 1
    return applied


def adam_update_numpy(opt, grads, p, m, v, tmp, step_size, inv_sqrt_bc2):
    """The twin of the compiled kernel: seven passes over memory (one per line) after the
    gradient sum; the naive in-place form takes twelve."""
    g = sum_into_first(grads)
    if opt.weight_decay:
        p *= 1.0 - opt.lr * opt.weight_decay
    axpby(1.0 - opt.b1, g, opt.b1, m)                  # m = b1 m + (1 - b1) g
    np.multiply(g, g, out=tmp)
    axpby(1.0 - opt.b2, tmp, opt.b2, v)                # v = b2 v + (1 - b2) g^2
    # p -= step_size m / (sqrt(v) inv_sqrt_bc2 + eps), with the constants folded:
    #    = (step_size / inv_sqrt_bc2) m / (sqrt(v) + eps / inv_sqrt_bc2)
    np.sqrt(v, out=tmp)
    tmp += opt.eps / inv_sqrt_bc2
    np.divide(m, tmp, out=tmp)
    axpby(-step_size / inv_sqrt_bc2, tmp, 1.0, p)


@twin_of(Adagrad.update, exact=False, case=_case([
    lambda P: Adagrad(P, lr=0.05), lambda P: Adagrad(P, lr=0.05, weight_decay=0.1)]))
def adagrad_update(opt, lo, hi, grads):
    if opt.weight_decay:
        return Adagrad.update(opt, lo, hi, grads)
    g = sum_into_first(grads)
    p, s, tmp = opt.params.data[lo:hi], opt.s[lo:hi], _tmp(opt, lo, hi)
    np.multiply(g, g, out=tmp)
    s += tmp                                           # s = s + g^2
    np.sqrt(s, out=tmp)
    tmp += opt.eps
    np.divide(g, tmp, out=tmp)
    axpby(-opt.lr, tmp, 1.0, p)                        # p = p - lr g / (sqrt(s) + eps)
