"""Optimizers over a model's flat parameter and gradient buffers.

Each update is a few whole-buffer operations, written to match ``torch.optim`` formula for
formula so runs can be compared step for step. Each has a plain array-API version
(``_step_plain``, any backend) and, for NumPy, an in-place twin (``_sliced_update``) that
allocates nothing per step, makes as few passes over memory as it can (``blas.axpby`` fuses
y <- a x + b y), and runs on slices of the buffers in parallel threads
(``parallel.in_slices``). Adam's has a third form, one compiled pass (:mod:`minivae.kernels`),
used when it was built. ``tests/test_optim.py`` checks that they agree. ``fast=False`` forces
the plain one.

Weight decay is L2 added to the gradient (g <- g + wd * p), as torch's SGD/Adam/Adagrad do;
``Adam(decoupled=True)`` is AdamW (p <- p - lr * wd * p, then the Adam step).
"""
from __future__ import annotations

import math

import numpy as np

from . import kernels
from .blas import axpby
from .parallel import in_slices


class Optimizer:
    """Base: binds to ``model.params`` (``data``: (n,), ``grad``: (n,))."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, fast: bool = True):
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.params = params
        self.xp = params.backend.xp
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.t = 0  # steps taken
        self.fast = fast and params.backend.name == "numpy"
        self._state_names: tuple[str, ...] = ()

    def _zeros(self):
        return self.xp.zeros(self.params.data.shape, dtype=self.params.dtype)

    def step(self) -> None:
        """Apply one update using ``params.grad``; leaves ``params.grad`` unchanged."""
        self.t += 1
        update = self._sliced_update() if self.fast else None
        if update is None:
            self._step_plain(self.params.data, self.params.grad)
        else:
            fn, arrays, args = update
            in_slices(_one_gradient(fn), (self.params.grad, *arrays), *args)

    def _sliced_update(self):
        """The NumPy fast path of the step just counted in ``t``, as ``(fn, arrays, args)``:
        ``fn(gs, *slices_of(arrays), *args)`` updates any contiguous slice of the flat buffers,
        so threads can share the work (``parallel.in_slices``, ``minivae.train_step``). ``gs``
        is a tuple of that slice of k gradient buffers (k threads' parts of one batch): the
        gradient is their sum, which fn first stores into ``gs[0]`` (params.grad's slice).
        None where only the plain step applies."""
        return None

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        b = self.params.backend
        return {"name": type(self).__name__, "t": self.t, "hyper": self.hyper(),
                "buffers": {n: b.to_host(getattr(self, n)).copy() for n in self._state_names}}

    def load_state_dict(self, state: dict) -> None:
        if state["name"] != type(self).__name__:
            raise ValueError(f"checkpoint holds {state['name']} state, not {type(self).__name__}")
        b = self.params.backend
        for n in self._state_names:
            buf = state["buffers"][n]
            if tuple(buf.shape) != tuple(self.params.data.shape):
                raise ValueError(f"optimizer buffer {n!r} has shape {buf.shape}, expected "
                                 f"{tuple(self.params.data.shape)}")
            getattr(self, n)[...] = b.asarray(buf, dtype=self.params.dtype)
        self.t = int(state["t"])

    def hyper(self) -> dict:
        return {"lr": self.lr, "weight_decay": self.weight_decay}


class SGD(Optimizer):
    """SGD with (heavy-ball) momentum, torch's form:  b <- mu b + g;  p <- p - lr b."""

    def __init__(self, params, lr=0.01, momentum=0.0, weight_decay=0.0, fast=True):
        super().__init__(params, lr, weight_decay, fast)
        self.momentum = float(momentum)
        self.buf = self._zeros()
        self._state_names = ("buf",)

    def hyper(self):
        return {**super().hyper(), "momentum": self.momentum}

    def _step_plain(self, p, g):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            # torch initialises the buffer with the first gradient: b_1 = g_1
            self.buf[...] = g if self.t == 1 else self.momentum * self.buf + g
            g = self.buf
        p -= self.lr * g

    def _sliced_update(self):
        if self.weight_decay or (self.momentum and self.t == 1):
            return None
        if self.momentum:
            return self._update_numpy_momentum, (self.params.data, self.buf), ()
        return self._update_numpy, (self.params.data,), ()

    def _update_numpy(self, gs, p):
        g = sum_into_first(gs)
        axpby(-self.lr, g, 1.0, p)                     # p = p - lr g

    def _update_numpy_momentum(self, gs, p, buf):
        g = sum_into_first(gs)
        axpby(1.0, g, self.momentum, buf)              # b = mu b + g
        axpby(-self.lr, buf, 1.0, p)                   # p = p - lr b


class Adam(Optimizer):
    """Adam (Kingma & Ba), bias-corrected exactly as torch.optim.Adam:

        m <- b1 m + (1 - b1) g            v <- b2 v + (1 - b2) g^2
        p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled=False, fast=True):
        super().__init__(params, lr, weight_decay, fast)
        self.b1, self.b2 = (float(b) for b in betas)
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.eps, self.decoupled = float(eps), bool(decoupled)
        self.m, self.v = self._zeros(), self._zeros()
        self._state_names = ("m", "v")
        self._tmp = np.empty_like(params.data) if self.fast else None  # scratch, reused

    def hyper(self):
        return {**super().hyper(), "betas": [self.b1, self.b2], "eps": self.eps,
                "decoupled": self.decoupled}

    def _coefficients(self):
        """(step size lr / (1 - b1^t), 1 / sqrt(1 - b2^t))."""
        return self.lr / (1.0 - self.b1 ** self.t), 1.0 / math.sqrt(1.0 - self.b2 ** self.t)

    def _step_plain(self, p, g):
        xp = self.xp
        if self.weight_decay:
            if self.decoupled:
                p *= 1.0 - self.lr * self.weight_decay
            else:
                g = g + self.weight_decay * p
        step_size, inv_sqrt_bc2 = self._coefficients()
        self.m[...] = self.b1 * self.m + (1.0 - self.b1) * g
        self.v[...] = self.b2 * self.v + (1.0 - self.b2) * (g * g)
        p -= step_size * self.m / (xp.sqrt(self.v) * inv_sqrt_bc2 + self.eps)

    def _sliced_update(self):
        """The same update with every operation in place (no per-step allocation): one
        compiled pass where minivae._kernels was built, else seven NumPy passes."""
        if self.weight_decay and not self.decoupled:
            return None
        P = self.params
        step_size, inv_sqrt_bc2 = self._coefficients()
        if kernels.enabled():
            decay = 1.0 - self.lr * self.weight_decay if self.weight_decay else 1.0
            return (kernels.adam, (P.data, self.m, self.v),
                    (self.b1, 1.0 - self.b1, self.b2, 1.0 - self.b2,
                     step_size / inv_sqrt_bc2, self.eps / inv_sqrt_bc2, decay))
        return self._update_numpy, (P.data, self.m, self.v, self._tmp), (step_size, inv_sqrt_bc2)

    def _update_numpy(self, gs, p, m, v, tmp, step_size, inv_sqrt_bc2):
        """The twin of the compiled kernel: seven passes over memory (one per line) after the
        gradient sum; the naive in-place form takes twelve."""
        g = sum_into_first(gs)
        if self.weight_decay:
            p *= 1.0 - self.lr * self.weight_decay
        axpby(1.0 - self.b1, g, self.b1, m)            # m = b1 m + (1 - b1) g
        np.multiply(g, g, out=tmp)
        axpby(1.0 - self.b2, tmp, self.b2, v)          # v = b2 v + (1 - b2) g^2
        # p -= step_size m / (sqrt(v) inv_sqrt_bc2 + eps), with the constants folded:
        #    = (step_size / inv_sqrt_bc2) m / (sqrt(v) + eps / inv_sqrt_bc2)
        np.sqrt(v, out=tmp)
        tmp += self.eps / inv_sqrt_bc2
        np.divide(m, tmp, out=tmp)
        axpby(-step_size / inv_sqrt_bc2, tmp, 1.0, p)


class Adagrad(Optimizer):
    """Adagrad (Duchi et al.; the optimizer of the original VAE paper), torch's form:

        s <- s + g^2;    p <- p - lr * g / (sqrt(s) + eps)
    """

    def __init__(self, params, lr=1e-2, eps=1e-10, weight_decay=0.0,
                 initial_accumulator_value=0.0, fast=True):
        super().__init__(params, lr, weight_decay, fast)
        self.eps = float(eps)
        self.s = self._zeros()
        if initial_accumulator_value:
            self.s += float(initial_accumulator_value)
        self._state_names = ("s",)
        self._tmp = np.empty_like(params.data) if self.fast else None  # scratch, reused

    def hyper(self):
        return {**super().hyper(), "eps": self.eps}

    def _step_plain(self, p, g):
        if self.weight_decay:
            g = g + self.weight_decay * p
        self.s[...] = self.s + g * g
        p -= self.lr * g / (self.xp.sqrt(self.s) + self.eps)

    def _sliced_update(self):
        if self.weight_decay:
            return None
        return self._update_numpy, (self.params.data, self.s, self._tmp), ()

    def _update_numpy(self, gs, p, s, tmp):
        g = sum_into_first(gs)
        np.multiply(g, g, out=tmp)
        s += tmp                                       # s = s + g^2
        np.sqrt(s, out=tmp)
        tmp += self.eps
        np.divide(g, tmp, out=tmp)
        axpby(-self.lr, tmp, 1.0, p)                   # p = p - lr g / (sqrt(s) + eps)


def sum_into_first(gs):
    """gs[0] <- gs[0] + gs[1] + ... (in place, left to right); -> gs[0]."""
    g = gs[0]
    for h in gs[1:]:
        g += h
    return g


def _one_gradient(fn):
    """A sliced update taking one gradient array, for ``in_slices``."""
    return lambda g, *rest: fn((g,), *rest)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adagrad": Adagrad}


def make_optimizer(name: str, params, **kw) -> Optimizer:
    try:
        cls = OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None
    return cls(params, **kw)
