"""Optimizers over a model's flat parameter and gradient buffers (the reference maths).

Each update is a few whole-buffer operations, written to match ``torch.optim`` formula for
formula so runs can be compared step for step.

    opt = Adam(model.params, lr=1e-3)
    model.loss_and_grads(x)
    opt.step()                   # = opt.start_step(); opt.update(0, n, (params.grad,))

A step is two public calls, so that a data-parallel step can share the update out:
:meth:`Optimizer.start_step` counts the step (the optimizer keeps its own count ``t``), and
:meth:`Optimizer.update` applies that step's update to any slice [lo, hi) of the flat buffers,
given the gradient there as a sum of partial gradients (one per thread or process).
:class:`minivae.DataParallel` calls it once per thread, with the in-place NumPy twins of
:mod:`minivae.engine.optim` (tied to these by tests); this module imports none of that.

Weight decay is L2 added to the gradient (g <- g + wd * p), as torch's SGD/Adam/Adagrad do;
``Adam(decoupled=True)`` is AdamW (p <- p - lr * wd * p, then the Adam step; Loshchilov &
Hutter 2019).
"""
from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod

from .backend import Picklable, all_finite, real_values

NONNEGATIVE = "it is a sum of squared gradients, never below 0"   # Adam's v, Adagrad's s


def _finite(value, name, low=None, low_ok=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (value == low and not low_ok)):
        bound = f">= {low:g}" if low_ok else ("positive" if low == 0 else f"> {low:g}")
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return float(value)


def sum_into_first(gs):
    """gs[0] <- gs[0] + gs[1] + ... (in place, left to right); -> gs[0]."""
    g = gs[0]
    for h in gs[1:]:
        g += h
    return g


def check_finite_grad(params) -> None:
    """Raise FloatingPointError naming the tensors whose gradient holds a NaN or an infinity
    (one min and one max over the flat gradient when all is well: NaN propagates through
    both, and an infinity is one of them)."""
    xp, g = params.backend.xp, params.grad
    if all_finite(xp, g):
        return
    bad = [n for n in params.layout.names
           if not bool(xp.all(xp.isfinite(g[params.layout.slice(n)])))]
    raise FloatingPointError(f"the gradient of {', '.join(bad)} holds NaN or Inf: no step "
                             f"taken, the parameters and the optimizer's state are unchanged")


def _read_only(a) -> bool:
    """A NumPy array with flags.writeable False (CuPy's flags have no writeable: never)."""
    try:
        return not a.flags.writeable
    except AttributeError:
        return False


def read_only_buffers(P, data: bool = True, grad: bool = True) -> list:
    """What of a Params' flat buffers and per-tensor views (data and/or grad) is read-only,
    in words."""
    bufs = ([("the parameters (params.data)", P.data, P.views)] if data else []) + \
        ([("the gradient (params.grad)", P.grad, P.grad_views)] if grad else [])
    bad = []
    for what, flat, views in bufs:
        if _read_only(flat):
            bad.append(f"{what} is read-only")
        bad += [f"{what[:-1]}: {n}) is read-only" for n, v in views.items() if _read_only(v)]
    return bad


def check_buffers(opt, grad: bool = True) -> None:
    """Raise ValueError, before anything is counted or written, when the step could not write
    what it must: the parameters (``params.data`` and its per-tensor ``views``), with
    ``grad=True`` the gradient (``params.grad`` and its ``grad_views``, which a training step's
    pass writes), or one of the optimizer's own buffers (``state_names``), is read-only (a
    NumPy array with ``flags.writeable`` False); or such a buffer has been replaced by one of
    another shape, dtype or layout than the parameters'. Otherwise the update would fail
    half-way, with its step already counted. One line naming every such buffer."""
    P = opt.params
    bad = read_only_buffers(P, data=True, grad=grad)
    for n in opt.state_names:
        a = getattr(opt, n, None)
        if _read_only(a):
            bad.append(f"the optimizer's {n} is read-only")
        elif not (type(a) is type(P.data) and a.shape == P.data.shape and
                  a.dtype == P.data.dtype and             # (array-api-strict has no flags)
                  getattr(getattr(a, "flags", None), "c_contiguous", True)):
            bad.append(f"the optimizer's {n} is not a contiguous {P.data.dtype} array of shape "
                       f"{tuple(P.data.shape)} (got {type(a).__name__} "
                       f"{getattr(a, 'dtype', '')} {tuple(getattr(a, 'shape', ()))})")
    if bad:
        raise ValueError(f"{'; '.join(bad)}: no step taken, nothing changed")


class Optimizer(Picklable, ABC):
    """Base: binds to ``params`` (a model's Params: ``data`` (n,), ``grad`` (n,)).

    ``state_names``: the optimizer's own flat buffers, each (n,) in the parameters' layout.
    Raises ValueError for a learning rate or weight decay that is not a finite number > 0
    (>= 0 for the decay).
    """

    state_names: tuple[str, ...] = ()
    nonnegative_state: tuple[str, ...] = ()     # buffers that can never hold a number < 0

    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        if not (hasattr(params, "data") and hasattr(params, "grad") and hasattr(params, "layout")):
            hint = (": pass model.params" if hasattr(params, "params") else
                    " (model.params: the flat parameter and gradient buffers)")
            raise TypeError(f"{type(self).__name__} needs a model's Params, got "
                            f"{type(params).__name__}{hint}")
        self.params = params
        self.xp = params.backend.xp
        self.lr = _finite(lr, "learning rate", 0.0, low_ok=False)
        self.weight_decay = _finite(weight_decay, "weight_decay", 0.0)
        self.t = 0  # steps taken

    def _zeros(self):
        return self.xp.zeros(self.params.data.shape, dtype=self.params.dtype)

    def step(self) -> None:
        """Apply one update using ``params.grad``; leaves ``params.grad`` unchanged.

        Raises FloatingPointError, changing nothing (parameters, optimizer state, step count),
        when the gradient holds a NaN or an infinity: the update would write it into the
        parameters (and into Adam's moments, for good). The message names the tensors.
        Raises ValueError, also changing nothing, when a buffer it writes is read-only, or a
        state buffer is not one it can write (:func:`check_buffers`)."""
        check_finite_grad(self.params)
        check_buffers(self, grad=False)
        self.start_step()
        self.update(0, self.params.data.shape[0], (self.params.grad,))

    def start_step(self) -> int:
        """Count a new step; -> its number t (1 for the first). Call once per step, before
        :meth:`update`."""
        self.t += 1
        return self.t

    @abstractmethod
    def update(self, lo: int, hi: int, grads: tuple) -> None:
        """Apply the update of step ``t`` to elements [lo, hi) of the flat buffers.

        grads: one or more arrays of shape (hi - lo,) whose sum is the gradient there (the
        partial gradients of k threads or ranks); the sum is stored into ``grads[0]``.
        Each optimizer writes its own, its formula top to bottom.
        """

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        b = self.params.backend
        return {"name": type(self).__name__, "t": self.t, "hyper": self.hyper(),
                "buffers": {n: b.to_host(getattr(self, n)).copy() for n in self.state_names}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned. Everything is checked before anything is
        written, so a refused state changes nothing: ValueError naming the problem for another
        optimizer's state, a missing key or buffer, a step count that is not a whole number
        >= 0, a buffer of the wrong shape, a non-real dtype, NaN/Inf, numbers the parameters'
        dtype cannot hold, or a negative second moment (Adam's v, Adagrad's s: sqrt of it is
        NaN, and every parameter after one step)."""
        if not isinstance(state, dict) or not {"name", "t", "buffers"} <= set(state):
            raise ValueError(f"an optimizer state must be a dict with 'name', 't' and 'buffers' "
                             f"(what state_dict() returns), got "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        if not isinstance(state["name"], str) or state["name"] != type(self).__name__:
            raise ValueError(f"checkpoint holds {state['name']} state, not {type(self).__name__}")
        t = state["t"]
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise ValueError(f"optimizer step count t must be a whole number >= 0, got {t!r}")
        buffers = state["buffers"]
        if not isinstance(buffers, dict):
            raise ValueError(f"optimizer buffers must be a dict of arrays, got "
                             f"{type(buffers).__name__}")
        b, shape = self.params.backend, tuple(self.params.data.shape)
        host = {}
        for n in self.state_names:
            if n not in buffers:
                raise ValueError(f"optimizer buffer {n!r} is missing")
            buf = buffers[n]
            if tuple(getattr(buf, "shape", ())) != shape:
                raise ValueError(f"optimizer buffer {n!r} has shape "
                                 f"{tuple(getattr(buf, 'shape', ()))}, expected {shape}")
            host[n] = real_values(b, buf, self.params.dtype, f"optimizer buffer {n!r}",
                                  nonnegative=NONNEGATIVE if n in self.nonnegative_state else None)
        for n, buf in host.items():
            getattr(self, n)[...] = buf
        self.t = int(t)

    def hyper(self) -> dict:
        return {"lr": self.lr, "weight_decay": self.weight_decay}


class SGD(Optimizer):
    """SGD with (heavy-ball) momentum, torch's form:  b <- mu b + g;  p <- p - lr b."""

    def __init__(self, params, lr=0.01, momentum=0.0, weight_decay=0.0):
        super().__init__(params, lr, weight_decay)
        self.momentum = _finite(momentum, "momentum", 0.0)
        self.buf = self._zeros()
        self.state_names = ("buf",)

    def hyper(self):
        return {**super().hyper(), "momentum": self.momentum}

    def update(self, lo, hi, grads):
        g = sum_into_first(grads)
        p, buf = self.params.data[lo:hi], self.buf[lo:hi]
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            # torch initialises the buffer with the first gradient: b_1 = g_1
            buf[...] = g if self.t == 1 else self.momentum * buf + g
            g = buf
        p -= self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015), bias-corrected exactly as torch.optim.Adam:

        m <- b1 m + (1 - b1) g            v <- b2 v + (1 - b2) g^2
        p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    nonnegative_state = ("v",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled=False):
        super().__init__(params, lr, weight_decay)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (b1, b2), got {betas!r}")
        self.b1, self.b2 = (_finite(b, "each of betas") for b in betas)
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.eps = _finite(eps, "eps", 0.0, low_ok=False)      # 0 would give 0/0 where g = 0
        if not isinstance(decoupled, bool):
            raise TypeError(f"decoupled must be True or False, got {decoupled!r}")
        self.decoupled = decoupled
        self.m, self.v = self._zeros(), self._zeros()
        self.state_names = ("m", "v")

    def hyper(self):
        return {**super().hyper(), "betas": [self.b1, self.b2], "eps": self.eps,
                "decoupled": self.decoupled}

    def coefficients(self):
        """(step size lr / (1 - b1^t), 1 / sqrt(1 - b2^t)) for the current step t."""
        return self.lr / (1.0 - self.b1 ** self.t), 1.0 / math.sqrt(1.0 - self.b2 ** self.t)

    def update(self, lo, hi, grads):
        xp = self.xp
        g = sum_into_first(grads)
        p, m, v = self.params.data[lo:hi], self.m[lo:hi], self.v[lo:hi]
        if self.weight_decay:
            if self.decoupled:
                p *= 1.0 - self.lr * self.weight_decay
            else:
                g = g + self.weight_decay * p
        step_size, inv_sqrt_bc2 = self.coefficients()
        m[...] = self.b1 * m + (1.0 - self.b1) * g
        v[...] = self.b2 * v + (1.0 - self.b2) * (g * g)
        p -= step_size * m / (xp.sqrt(v) * inv_sqrt_bc2 + self.eps)


class Adagrad(Optimizer):
    """Adagrad (Duchi et al. 2011; the optimizer of the original VAE paper), torch's form:

        s <- s + g^2;    p <- p - lr * g / (sqrt(s) + eps)
    """

    nonnegative_state = ("s",)

    def __init__(self, params, lr=1e-2, eps=1e-10, weight_decay=0.0,
                 initial_accumulator_value=0.0):
        super().__init__(params, lr, weight_decay)
        self.eps = _finite(eps, "eps", 0.0, low_ok=False)      # 0 would give 0/0 where g = 0
        self.s = self._zeros()
        init = _finite(initial_accumulator_value, "initial_accumulator_value", 0.0)
        if init:
            self.s += init
        self.state_names = ("s",)

    def hyper(self):
        return {**super().hyper(), "eps": self.eps}

    def update(self, lo, hi, grads):
        g = sum_into_first(grads)
        p, s = self.params.data[lo:hi], self.s[lo:hi]
        if self.weight_decay:
            g = g + self.weight_decay * p
        s[...] = s + g * g
        p -= self.lr * g / (self.xp.sqrt(s) + self.eps)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adagrad": Adagrad}


def make_optimizer(name: str, params, **kw) -> Optimizer:
    """The optimizer called ``name`` (sgd | adam | adagrad, any case) over ``params``."""
    try:
        if not isinstance(name, str):
            raise KeyError(name)
        cls = OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None
    return cls(params, **kw)
