"""The numeric side of the checker: perturb a tensor where f reads it, measure f's round-off
noise, and estimate a derivative with Ridders' extrapolation and an error bar.

Every comparison the checker makes is one derivative of a function of one real variable,

    phi(t) = f(x + t u)            phi'(0) = <grad f(x), u>

along a direction u in one tensor: u = s_i e_i for one element (``exact``/``sparse``), or a
random direction (``directions``). ``s_i`` is the element's own size |x_i|, floored at a tenth
of the tensor's root-mean-square (1 for an all-zero tensor), so t is a *relative* step: a step
fits each element's size, and with t < 1 an element at least that large never changes sign, so
a step never crosses a kink or a domain edge at 0 that x itself has not reached (log(p), ReLU
inputs). An element smaller than the floor whose check does not come out clean is checked
again with steps scaled to its own size (see ``core``).

phi'(0) comes from central differences D(t) = (phi(t) - phi(-t)) / 2t at t0, t0/2, t0/4, ...,
extrapolated to t = 0 with Ridders' method (C. J. F. Ridders, "Accurate computation of F'(x)
and F'(x)F''(x)", Adv. Eng. Software 4(2), 1982; Numerical Recipes, 3rd ed., section 5.7,
``dfridr``; numdifftools does the same). The Richardson tableau removes the t^2, t^4, ... terms
of the truncation error one column at a time, and the differences between neighbouring entries
give an error estimate. To that estimate the checker adds the round-off noise of f measured at
the point (J. J. More and S. M. Wild, "Estimating computational noise", SIAM J. Sci. Comput.
33(3), 2011: the scaled k-th differences of f along a tiny step), divided by the step: so a
float32 f is judged by the noise it really has, not by a constant.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import backend_of

FLOAT_DTYPES = {"float32": np.float32, "float64": np.float64}
CON = 2.0     # Ridders: each row halves the step
SAFE = 2.0    # ... and stops when the new diagonal is SAFE times worse than the best error


class GradcheckError(ValueError):
    """The check cannot be run as asked: the message names the tensor or says what f did."""


class NondeterministicError(GradcheckError):
    """f returned different values at the same point: finite differences would measure noise."""


# -- the tensors: perturb them in the memory f reads, or refuse ---------------------------


def dtype_name(t) -> str:
    """"float64", "int32", ... for an array of any backend ("" for a Python number)."""
    d = getattr(t, "dtype", None)
    if d is None:
        return ""
    return str(getattr(d, "name", None) or d).rsplit(".", 1)[-1]


def to_host(a) -> np.ndarray:
    """Any backend's array -> NumPy array on the host (the backend's own ``to_host``)."""
    be = backend_of(a)
    return np.asarray(a) if be is None else be.to_host(a)


class Tensor:
    """One tensor of f's inputs, written in place where f reads it (views, transposes,
    Fortran order and 0-d arrays included) and restored bit for bit afterwards.

    Raises TypeError for a Python or NumPy scalar (it cannot be changed in place, so f would
    never see the step), a non-array, or a dtype other than float32/float64 (integers, bool,
    complex, float16); ValueError for a read-only array.
    """

    def __init__(self, name: str, t):
        self.name = name
        if isinstance(t, (np.generic, int, float, complex, bool)):
            raise TypeError(
                f"tensor {name!r} is a {type(t).__name__} scalar: a scalar cannot be changed in "
                f"place, so f would never see the step; pass a 0-d array that f reads "
                f"(x = np.array(3.0), and f uses x[()])")
        if isinstance(t, np.ndarray) and type(t) is not np.ndarray:
            raise TypeError(f"tensor {name!r} is a {type(t).__module__}.{type(t).__name__} (an "
                            f"ndarray subclass, whose indexing and masks the checker cannot "
                            f"honour); pass a plain array that f reads")
        be = backend_of(t)
        if be is None:
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a NumPy, CuPy or "
                            f"array-api-strict array")
        dt = dtype_name(t)
        if dt not in FLOAT_DTYPES:
            if dt == "float16":
                why = ("has about 3 significant digits, too few for finite differences: check "
                       "in float64 (x.astype(np.float64))")
            elif dt.startswith("float"):
                why = "is not supported: the checker works in float32 and float64"
            else:
                why = ("is not a real floating-point type: finite differences need a "
                       "continuous input; check a float64 copy that f reads")
            raise TypeError(f"tensor {name!r} has dtype {dt}, which {why}")
        self.backend = be
        self.host = be.host_memory(t)      # the NumPy memory f reads; None on a GPU
        self.mem = t if self.host is None else self.host
        if self.host is not None and not self.mem.flags.writeable:
            raise ValueError(f"tensor {name!r} is read-only: the checker must write the step "
                             f"into the memory f reads")
        if self.host is not None and _overlaps_itself(self.mem):
            raise ValueError(f"tensor {name!r} is a view whose elements share memory (a zero or "
                             f"overlapping stride): a step in one element moves others; pass a "
                             f"copy that f reads")
        self.shape = tuple(int(n) for n in t.shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.dtype = FLOAT_DTYPES[dt]
        self.eps = float(np.finfo(self.dtype).eps)
        self.orig = np.array(to_host(self.mem), dtype=self.dtype, copy=True)   # C order
        # A flat view of the same memory where one exists (C-contiguous layouts), else None:
        # then writes go through multi-indices, which reach any strides.
        self.flat = None
        if self.host is not None and self.shape != ():
            flat = self.mem.reshape(-1)
            if flat.size and np.shares_memory(flat, self.mem):
                self.flat = flat
        self.x0 = self.orig.reshape(-1).astype(np.float64)
        if not np.all(np.isfinite(self.x0)):
            bad = int(np.flatnonzero(~np.isfinite(self.x0))[0])
            where = [int(k) for k in np.unravel_index(bad, self.shape)]
            raise GradcheckError(f"tensor {name!r} holds a non-finite value at {where}: "
                                 f"{self.x0[bad]}")
        ax = np.abs(self.x0)
        big = float(np.max(ax)) if self.size else 0.0
        rms = big * float(np.sqrt(np.mean((ax / big) ** 2))) if big > 0 else 0.0
        self.scale = np.maximum(ax, 0.1 * rms if rms > 0 else 1.0)

    def write(self, idx, values) -> np.ndarray:
        """Set the elements ``idx`` (flat, C order) to ``values`` rounded to the dtype; return
        the values actually stored, as float64."""
        v = np.asarray(values, dtype=np.float64).astype(self.dtype)
        if self.flat is not None:
            self.flat[idx] = v
        elif self.shape == () or len(idx) == self.size:
            full = self.orig.copy().reshape(-1)
            full[idx] = v
            self.mem[...] = self._dev(full.reshape(self.shape))
        else:
            ix = np.unravel_index(idx, self.shape)
            if self.host is None:
                ix = tuple(self._dev(i) for i in ix)
            self.mem[ix] = self._dev(v)
        return v.astype(np.float64)

    def restore(self, idx=None) -> None:
        if idx is None or self.shape == () or len(idx) == self.size:
            self.mem[...] = self._dev(self.orig)
        else:
            self.write(idx, self.x0[idx])

    def _dev(self, a):
        return a if self.host is not None else self.backend.asarray(a)

    def host_memory(self):
        """The NumPy array whose memory f reads (None on a GPU)."""
        return self.host


def _overlaps_itself(a: np.ndarray) -> bool:
    """True if two elements of ``a`` share memory (only strided views can)."""
    if a.size < 2 or a.flags.c_contiguous or a.flags.f_contiguous:
        return False
    if any(st == 0 and n > 1 for st, n in zip(a.strides, a.shape)):
        return True
    offs = np.zeros((), dtype=np.int64)
    for n, st in zip(a.shape, a.strides):
        offs = offs[..., None] + np.arange(n, dtype=np.int64) * st
    return np.unique(offs).size < a.size


def refuse_overlaps(tensors) -> None:
    """Two tensors that share memory would each move the other: the check is meaningless."""
    host = [(t.name, t.host_memory()) for t in tensors if t.host_memory() is not None]
    for i, (na, a) in enumerate(host):
        for nb, b in host[i + 1:]:
            if np.may_share_memory(a, b) and np.shares_memory(a, b, max_work=10**6):
                raise GradcheckError(f"tensors {na!r} and {nb!r} share memory: a step in one "
                                     f"moves the other; pass each parameter once")


# -- f: one real number, the same every time ------------------------------------------------


def call_scalar(f) -> float:
    """f() as a Python float; GradcheckError if it is not a real scalar."""
    v = f()
    shape = getattr(v, "shape", None)
    if shape is not None and tuple(shape) != ():
        raise GradcheckError(
            f"f must return a scalar; it returned an array of shape {tuple(shape)}. Check a "
            f"scalar of it, e.g. sum(G * out) for a fixed random G (check_layer does this)")
    if isinstance(v, (complex, np.complexfloating)) or "complex" in dtype_name(v):
        raise GradcheckError("f must return a real scalar; it returned a complex number")
    if isinstance(v, (str, bytes, bool, np.bool_)) or dtype_name(v) == "bool":
        raise GradcheckError(f"f must return a real scalar; it returned a {type(v).__name__}")
    try:
        return float(v)
    except (TypeError, ValueError) as e:
        raise GradcheckError(f"f must return a real scalar; it returned {type(v).__name__} "
                             f"({e})") from None


def check_deterministic(f, n: int = 3, eps: float = 2.2e-16) -> tuple[float, float]:
    """Evaluate f ``n`` times at the same point -> (value, spread). Raises
    NondeterministicError if the values differ beyond round-off, GradcheckError if f is not a
    finite real scalar."""
    vals = [call_scalar(f) for _ in range(n)]
    f0 = vals[0]
    if not all(math.isfinite(v) for v in vals):
        raise GradcheckError(f"f is not finite at the point to check: {vals[0]}; gradients "
                             f"of a non-finite value cannot be checked")
    spread = max(vals) - min(vals)
    if spread > 64 * eps * max(abs(f0), 1e-300):
        shown = ", ".join(f"{v!r}" for v in vals)
        raise NondeterministicError(
            f"f is not deterministic: {n} calls at the same point returned {shown}. Finite "
            f"differences need the same f on every call: hold its randomness fixed (for a VAE "
            f"pass eps=..., e.g. model.loss_and_grads(x, eps); or reseed the generator inside f)")
    return f0, spread


class Line:
    """phi(t) = f(x + t u) for one tensor; u is nonzero only on the flat indices ``idx``.

    ``self.a`` = <g, u> is the analytic derivative phi'(0). Each call returns phi(t) and the
    rounding correction <g, d - t u>, where d is the step actually stored after rounding x + t u
    to the tensor's dtype (first order in the rounding: exact enough in float32 and float64).
    """

    def __init__(self, f, tensor: Tensor, idx, u, g):
        self.f, self.T, self.idx = f, tensor, np.asarray(idx, dtype=np.int64)
        self.u = np.asarray(u, dtype=np.float64)
        self.gi = g[self.idx]
        self.x0 = tensor.x0[self.idx]
        with np.errstate(all="ignore"):
            self.a = float(np.dot(self.gi, self.u))
        self.evals = 0

    def __call__(self, t: float) -> tuple[float, float]:
        try:
            stored = self.T.write(self.idx, self.x0 + t * self.u)
            self.evals += 1
            with np.errstate(all="ignore"):   # a step outside f's domain is handled, not warned
                v = call_scalar(self.f)
        finally:
            self.T.restore(self.idx)
        with np.errstate(all="ignore"):
            return v, float(np.dot(self.gi, (stored - self.x0) - t * self.u))


class MultiLine:
    """phi(t) = f(x + t u) with u spread over several tensors: a list of Lines moved at once
    (the joint test of kinks in different tensors). Same interface as :class:`Line`."""

    def __init__(self, lines):
        self.lines = lines
        self.a = float(sum(ln.a for ln in lines))
        self.evals = 0

    def __call__(self, t: float) -> tuple[float, float]:
        corr, done = 0.0, []
        try:
            for ln in self.lines:
                stored = ln.T.write(ln.idx, ln.x0 + t * ln.u)
                done.append(ln)
                with np.errstate(all="ignore"):
                    corr += float(np.dot(ln.gi, (stored - ln.x0) - t * ln.u))
            self.evals += 1
            with np.errstate(all="ignore"):
                v = call_scalar(self.lines[0].f)
        finally:
            for ln in done:
                ln.T.restore(ln.idx)
        return v, corr


def noise_level(line: Line, f0: float, tau: float) -> float:
    """Standard deviation of f's round-off noise along the line (More & Wild 2011): the k-th
    differences of phi at t = tau, 2 tau, ..., 7 tau (tau tiny) vanish for a smooth function
    and not for noise; sigma_k^2 = (k!)^2/(2k)! * mean((Delta^k phi)^2), median over k = 3..6.
    Done on each side of t = 0 separately (a kink at x itself would read as noise), and the
    smaller side is kept. NaN when neither side is usable (f not finite, or the steps too
    small for f to change: a float32 f behind float64 tensors)."""
    sides = []
    for sgn in (1, -1):
        vals = [line(sgn * k * tau)[0] for k in range(1, 8)]
        if not all(math.isfinite(v) for v in vals) or len(set(vals)) < len(vals):
            continue    # not finite, or a step near f's resolution: this side says nothing
        d, sig = np.array(vals), []
        for k in range(1, 7):
            d = np.diff(d)
            gamma = math.factorial(k) ** 2 / math.factorial(2 * k)
            big = float(np.max(np.abs(d)))
            rms = big * math.sqrt(float(np.mean((d / big) ** 2))) if big > 0 else 0.0
            sig.append(math.sqrt(gamma) * rms)
        if np.median(sig[2:]) > 0:
            sides.append(float(np.median(sig[2:])))
    return min(sides) if sides else math.nan


class _Tableau:
    """Richardson/Ridders tableau for a difference quotient with error terms in t^p, t^2p, ...
    (p = 2 for central, p = 1 for one-sided quotients), best entry kept with its error."""

    def __init__(self, p: int, sigma: float, noise_factor: float):
        self.fac0 = CON ** p
        self.sigma, self.nf = sigma, noise_factor
        self.rows, self.value, self.error, self.t = [], math.nan, math.inf, math.nan
        self.worse = False

    def add(self, d: float, t: float) -> None:
        row, fac = [d], self.fac0
        prev = self.rows[-1] if self.rows else None
        noise = self.nf * self.sigma / t
        if prev is None and not math.isfinite(self.value):
            self.value, self.t = d, t
        for j in range(1, len(self.rows) + 1):
            row.append((row[j - 1] * fac - prev[j - 1]) / (fac - 1))
            fac *= self.fac0
            err = max(abs(row[j] - row[j - 1]), abs(row[j] - prev[j - 1]), noise)
            if err <= self.error:
                self.value, self.error, self.t = row[j], err, t
        self.rows.append(row)
        # Numerical Recipes' stopping rule: the new diagonal is much worse than the best.
        self.worse = prev is not None and len(self.rows) > 2 and \
            abs(row[-1] - prev[-1]) >= SAFE * self.error


class Estimate:
    """phi'(0) three ways from the same evaluations: central (``value`` +- ``error``, the
    error at least the central-vs-one-sided disagreement beyond their own errors),
    forward and backward (``fwd``, ``bwd``: (value, error)); each error is the tableau's
    estimate plus the noise term c sigma / t of its finest step. ``consistent`` says whether
    the three agree: a kink within the step range (not at x) makes them disagree."""

    def __init__(self):
        self.value, self.error, self.t = math.nan, math.inf, math.nan
        self.fwd = self.bwd = (math.nan, math.inf)
        self.consistent = True
        self.phi = {}          # t -> phi(t) for every t tried (+ and -)
        self.one_sided = ""    # "" | "forward" | "backward"
        self.shrunk = 0        # steps dropped because f was not finite there
        self.restarts = 0      # tableaux dropped because they mixed in a kink


def _agree(c, ec, o, eo, rtol) -> bool:
    return abs(c - o) <= 3 * (ec + eo) + rtol * max(abs(c), abs(o))


def ridders(line: Line, f0: float, t0: float, rows: int, sigma: float, target,
            rtol: float = 0.0) -> Estimate:
    """phi'(0) from differences at t0, t0/2, ... (at most ``rows`` rows), extrapolated by
    Ridders' method, centrally and one-sidedly. Stops once the central error is below
    ``target(value)`` and the three estimates agree. While they disagree (a kink crossed by
    the larger steps, not at x itself) the largest step is dropped and the tableaux rebuilt
    from the rest. A step where f is not finite is dropped (at most 12 times); if only one
    side stays finite, the one-sided estimate from that side is used and said so."""
    est = Estimate()
    est.phi[0.0] = f0
    kept = []                                   # (t, central, forward, backward) quotients

    def build(rows_):
        cen, fw, bw = _Tableau(2, sigma, 2.0), _Tableau(1, sigma, 2.0), _Tableau(1, sigma, 2.0)
        for t_, c_, p_, m_ in rows_:
            cen.add(c_, t_)
            fw.add(p_, t_)
            bw.add(m_, t_)
        ok = (_agree(cen.value, cen.error, fw.value, fw.error, rtol) and
              _agree(cen.value, cen.error, bw.value, bw.error, rtol))
        return cen, fw, bw, ok

    one = {1: [], -1: []}                       # one-sided rows, for the non-finite fallback
    cen = fw = bw = None
    consistent, t, tries, used = True, t0, 0, 0
    while used < rows and tries < rows + 12:
        tries += 1
        (p, cp), (m, cm) = line(t), line(-t)
        est.phi[t], est.phi[-t] = p, m
        if math.isfinite(p):
            one[1].append((t, (p - f0 - cp) / t))
        if math.isfinite(m):
            one[-1].append((t, (f0 - m + cm) / t))
        if not (math.isfinite(p) and math.isfinite(m)):
            est.shrunk += 1
            t /= CON
            continue
        used += 1
        kept.append((t, ((p - m) - (cp - cm)) / (2 * t), (p - f0 - cp) / t, (f0 - m + cm) / t))
        cen, fw, bw, consistent = build(kept)
        while not consistent and len(kept) > 2:
            kept.pop(0)
            est.restarts += 1
            cen, fw, bw, consistent = build(kept)
        if consistent and (cen.error <= target(cen.value) or cen.worse):
            break
        t /= CON
    if cen is not None:
        # The three estimates come from the same evaluations: where they disagree by more
        # than their own errors (a kink within the steps, hidden in the noise) the central
        # value is no better known than that disagreement.
        spread = max([abs(cen.value - q.value) - q.error for q in (fw, bw)
                      if math.isfinite(q.value) and math.isfinite(q.error)] + [0.0])
        est.value, est.error, est.t = cen.value, max(cen.error, spread), cen.t
        est.fwd, est.bwd = (fw.value, fw.error), (bw.value, bw.error)
        est.consistent = consistent
    if len(kept) < 2:
        for s, name in ((1, "forward"), (-1, "backward")):
            if len(one[s]) >= 2 and not math.isfinite(est.error):
                tab = _Tableau(1, sigma, 2.0)
                for t_, q in one[s]:
                    tab.add(q, t_)
                est.one_sided = name
                est.value, est.error, est.t = tab.value, tab.error, tab.t
                est.consistent = True
    return est
