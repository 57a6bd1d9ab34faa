"""Optional compiled CPU kernels (``minivae.engine._kernels``, from minivae/engine/_kernels.c).

The NumPy step's elementwise updates are memory-bound: NumPy makes one pass over the flat
buffers per operation, so Adam plus the sum of k threads' gradient buffers costs 7 + (k - 1)
passes over memory. The compiled kernel makes one. It computes the same formulas, operation for
operation, as the NumPy update in :mod:`minivae.engine.optim` (its twin, which ``tests/test_optim.py``
checks it against), and is used only for NumPy arrays on the CPU.

pip builds the extension when it installs minivae and a C compiler is at hand (setup.py);
without one, minivae installs and runs as before, on the NumPy twins. After editing
engine/_kernels.c, ``pip install -e .`` again rebuilds it. Turn the kernels off with
``MINIVAE_KERNELS=0`` or :func:`set_enabled` (benchmarks compare both).
"""
from __future__ import annotations

import contextlib
import os
import threading

import numpy as np

try:
    from . import _kernels as _c
except ImportError:  # built without a C compiler: the NumPy twins run instead
    _c = None

MAX_GRADS = 64   # gradient buffers one kernel call sums (MAX_GRADS in _kernels.c)

_OFF, _ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on", "")
_enabled = os.environ.get("MINIVAE_KERNELS", "1").strip().lower() not in _OFF


def check_env() -> None:
    """ValueError (one line) unless MINIVAE_KERNELS is unset or one of 1/true/yes/on,
    0/false/no/off: the CLI calls it before any work, so a typo never silently means "on"."""
    value = os.environ.get("MINIVAE_KERNELS", "1").strip().lower()
    if value not in _OFF + _ON:
        raise ValueError(f"MINIVAE_KERNELS must be 1 (use the compiled kernels) or 0 (the NumPy "
                         f"twins; also true/false, yes/no, on/off), got "
                         f"{os.environ['MINIVAE_KERNELS']!r}")


def available() -> bool:
    """Whether the compiled extension was built and imports."""
    return _c is not None


def enabled() -> bool:
    """Whether minivae uses the compiled kernels now (built, and not turned off)."""
    return _c is not None and _enabled


def set_enabled(flag: bool) -> bool:
    """Use the compiled kernels (if built) or not; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


@contextlib.contextmanager
def disabled():
    """The NumPy twins inside the block."""
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)



MAX_SPIN_US = 10_000_000    # 10 s: a worker awake longer than that is a mistake, not a setting


def spin_from_env() -> None:
    """MINIVAE_TEAM_SPIN_US: how long (microseconds) the team's workers stay awake after a job
    (default 10000; 0: they sleep at once, and each job then pays a wake-up, ~50 us here)."""
    value = os.environ.get("MINIVAE_TEAM_SPIN_US", "").strip()
    if _c is None or not value:
        return
    try:
        us = int(value)
        if not 0 <= us <= MAX_SPIN_US:
            raise ValueError
    except ValueError:
        raise ValueError(f"MINIVAE_TEAM_SPIN_US must be a whole number of microseconds from 0 "
                         f"to {MAX_SPIN_US}, got {value!r}") from None
    _c.team_info(us)

_local = threading.local()   # .parts: how many team threads this thread's kernels use


@contextlib.contextmanager
def parts(k: int):
    """Inside the block, this thread's compiled kernels (Adam, the likelihood's, the fused
    bias+ReLU passes) split their work over k threads of the compiled team (the caller and
    k - 1 workers; see the team's note in _kernels.c), each part at least 32768 numbers (8192
    for the likelihood's forward). Each thread writes its own slice, and a bias gradient is
    summed down its columns in row order (its own columns a thread), so the result is the same
    to the bit for any k."""
    previous = getattr(_local, "parts", 1)
    _local.parts = max(1, int(k))
    try:
        yield
    finally:
        _local.parts = previous


def current_parts() -> int:
    """The k of the innermost :func:`parts` block in this thread (1 outside)."""
    return getattr(_local, "parts", 1)


def team_info() -> dict:
    """{'workers': the team's worker threads started in this process, 'spin_us': how long they
    stay awake after a job}; workers 0 without the kernels."""
    return _c.team_info() if _c is not None else {"workers": 0, "spin_us": 0}


def describe() -> str:
    if _c is None:
        return "not built (NumPy twins)"
    return "compiled, in use" if _enabled else "compiled, turned off (MINIVAE_KERNELS=0)"


def adam(gs, p, m, v, b1, c1, b2, c2, step, eps, decay) -> None:
    """One pass over equal-length contiguous float32/float64 arrays (GIL released):

        g = gs[0] + gs[1] + ...   (stored into gs[0])
        m <- b1 m + c1 g;   v <- b2 v + c2 g^2;   p <- decay p - step m / (sqrt(v) + eps)

    except that an m below the smallest normal number is stored as 0 (no subnormal state:
    see the note above DEFINE_ADAM in _kernels.c). Inside :func:`parts` (k) the pass is split
    into k slices run at once by the compiled thread team (at least 32768 numbers a slice);
    every number goes through the same operations, so the result is the same to the bit.
    Raises TypeError / ValueError for buffers of the wrong dtype, layout or length, before
    anything is written.
    """
    gs = _fold_extra_grads(gs, [("p", p), ("m", m), ("v", v)])
    _c.adam(gs, p, m, v, b1, c1, b2, c2, step, eps, decay, current_parts())


def sgd_momentum(gs, p, b, mu, lr) -> None:
    """SGD with momentum after its first step, in one pass (GIL released):

        g = gs[0] + gs[1] + ...   (stored into gs[0])
        b <- mu b + g;   p <- p - lr b

    except that a b below the smallest normal number is stored as 0 (as Adam's m: see the note
    above DEFINE_SGD_MOMENTUM in _kernels.c). Split as :func:`adam` inside :func:`parts`, with
    the same result to the bit. TypeError / ValueError before anything is written."""
    gs = _fold_extra_grads(gs, [("p", p), ("the momentum buffer", b)])
    _c.sgd_momentum(gs, p, b, mu, lr, current_parts())


def _fold_extra_grads(gs, state):
    """More gradient buffers than one kernel call takes (more threads than MAX_GRADS): check
    every buffer first (:func:`_check_buffers`: an error writes nothing), add the extra ones
    into gs[0], and -> the first MAX_GRADS for the kernel. Fewer: gs as given."""
    if len(gs) <= MAX_GRADS:
        return gs
    _check_buffers(gs, state)
    for h in gs[MAX_GRADS:]:
        np.add(gs[0], h, out=gs[0])
    return gs[:MAX_GRADS]


def _check_buffers(gs, state) -> None:
    """What the compiled optimizers check, in Python, for gradient buffers beyond MAX_GRADS,
    which are added into gs[0] before the kernel sees them: every gradient and every
    (name, array) of ``state`` one-dimensional, contiguous, writable, of one float dtype and
    length. TypeError / ValueError naming the array."""
    first = gs[0]
    named = [(f"gradient {i}", g) for i, g in enumerate(gs)] + list(state)
    for name, a in named:
        if (not isinstance(a, np.ndarray) or a.ndim != 1 or not a.flags.c_contiguous
                or a.dtype not in (np.float32, np.float64)):
            raise TypeError(f"{name} must be a one-dimensional, contiguous float32 or float64 "
                            f"array")
        if a.dtype != first.dtype:
            raise TypeError(f"{name} has a different dtype from the gradient")
        if a.shape != first.shape:
            raise ValueError(f"{name} has {a.size} numbers, the gradient {first.size}")
        if not a.flags.writeable:
            raise ValueError(f"{name} is read-only")


def bernoulli_nll_terms(logits, x, t) -> None:
    """t <- (t + (|l| + l) / 2) - x l in one pass, given t = log1p(exp(-|l|)): the per-pixel
    Bernoulli NLL softplus(l) - x l. Flat (n,) views of C-contiguous arrays of one dtype."""
    _c.bernoulli_nll_terms(logits, x, t, current_parts())


def bernoulli_nll_grad(logits, x, e, out, scale: float) -> None:
    """out <- (P (1 - x) - Q x) / (e + 1) * scale in one pass, with e = exp(-|l|) and (P, Q) =
    (1, e) where l >= 0, else (e, 1): (sigmoid(l) - x) * scale without cancellation."""
    _c.bernoulli_nll_grad(logits, x, e, out, scale, current_parts())


def bernoulli_bias_negabs(logits, b, e, rows: int, cols: int) -> None:
    """l[i, j] <- l[i, j] + b[j] and e[i, j] <- -|l[i, j]| in one pass: the decoder's last bias
    and the Bernoulli likelihood's first step. Flat views of C-contiguous (rows, cols) arrays
    of one dtype; b: (cols,)."""
    _c.bernoulli_bias_negabs(logits, b, e, rows, cols, current_parts())


def bernoulli_nll_grad_db(logits, x, e, out, scale: float, db, rows: int, cols: int) -> None:
    """:func:`bernoulli_nll_grad`, and db[j] <- sum_i out[i, j] (rows added in order): the
    decoder's last bias gradient, in the same pass."""
    _c.bernoulli_nll_grad_db(logits, x, e, out, scale, db, rows, cols, current_parts())


_loops = None   # whether NumPy's exp, log1p and add loops were found (None: not asked yet)


def numpy_loops() -> bool:
    """Whether the compiled likelihood pass can call NumPy's own float32/float64 loops for exp,
    log1p and add (found once, through the head of NumPy's ufunc object, and checked against
    what each ufunc says of itself; see the note above numpy_loops in _kernels.c). False where
    the kernels were not built or NumPy's ufunc objects are not as expected."""
    global _loops
    if _loops is None:
        _loops = _c is not None and bool(_c.numpy_loops(np.exp, np.log1p, np.add))
    return _loops


def bernoulli_nll_rows(logits, b, x, e, t, nll, rows: int, cols: int) -> None:
    """The Bernoulli likelihood's forward in one team job, block of rows by block of rows:
    l <- l + b (b None: no bias; else (cols,)), e <- exp(-|l|), t <- softplus(l) - x l and
    nll[i] <- sum_j t[i, j], with NumPy's exp, log1p and add loops, so the numbers are those of
    np.exp, np.log1p and np.sum(t, axis=1). logits, x, e, t: flat views of C-contiguous
    (rows, cols) arrays of one dtype; nll: (rows,). Needs :func:`numpy_loops` True."""
    _c.bernoulli_nll_rows(logits, b, x, e, t, nll, rows, cols, current_parts())


def gaussian_latent(h, eps, z, sigma, var, kl, B: int, L: int) -> None:
    """The VAE's sampler and KL in one call (sampling.sample, losses.kl_normal), on the
    encoder's output h = [mu | logvar]: sigma <- exp(logvar * 0.5), var <- exp(logvar),
    z <- mu + sigma * eps, kl[i] <- 0.5 * sum_j (mu^2 + var - 1 - logvar), with NumPy's exp and
    add loops. Flat views: h (B * 2L,), eps, z, sigma, var (B * L,), kl (B,), one dtype.
    Needs :func:`numpy_loops` True."""
    _c.gaussian_latent(h, eps, z, sigma, var, kl, B, L)


def gaussian_latent_backward(dz, h, sigma, eps, var, s: float, dh, B: int, L: int) -> None:
    """The sampler's and the KL's backward in one pass, into dh (B * 2L,):
    dh[:, :L] = dz + mu * s, dh[:, L:] = dz * sigma * eps * 0.5 + 0.5 * (var - 1) * s, with
    s = beta / n (sampling.sample_backward, losses.kl_normal_backward)."""
    _c.gaussian_latent_backward(dz, h, sigma, eps, var, s, dh, B, L)


def bias_relu(out, b, rows: int, cols: int) -> None:
    """out[i, j] <- max(out[i, j] + b[j], 0) in one pass: a Dense layer's bias and the ReLU
    after it. out: flat (rows * cols,) view of a C-contiguous (rows, cols) array; b: (cols,)."""
    _c.bias_relu(out, b, rows, cols, current_parts())


def relu_grad_bias(src, out, g, db, rows: int, cols: int) -> None:
    """g[i, j] <- src[i, j] * [out[i, j] > 0] and db[j] <- sum_i g[i, j] (rows added in
    order) in one pass: a ReLU's backward and the bias gradient of the Dense below it. src,
    out (the ReLU's output), g: flat views of C-contiguous (rows, cols) arrays (src may be g);
    db: (cols,)."""
    _c.relu_grad_bias(src, out, g, db, rows, cols, current_parts())


def finite_code(a, parts: int | None = None, headroom: int = 0) -> int:
    """0 if the contiguous 1-D float32/float64 array a holds NaN or Inf; 2 if it is finite
    but holds a number within 2^headroom of overflowing (a sum of 2^headroom such arrays
    could overflow); else 1. One pass over the bits, on ``parts`` threads of the team
    (default: :func:`current_parts`)."""
    return _c.finite_code(a, current_parts() if parts is None else parts, headroom)


def all_finite(a, parts: int | None = None) -> bool:
    """Whether every number of the contiguous 1-D float32/float64 array a is finite."""
    return finite_code(a, parts) != 0


def flat(*arrays):
    """The arrays as flat views for a kernel, or None when one is not C-contiguous or they
    differ in dtype (the caller then runs the NumPy twin)."""
    dtype = arrays[0].dtype
    if not all(a.flags.c_contiguous and a.dtype == dtype for a in arrays):
        return None
    return tuple(a.reshape(-1) for a in arrays)
