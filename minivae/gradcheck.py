"""Finite-difference gradient checking, with reports a person can read.

    report = check_gradients(f, tensors, analytic)
    print(report)            # one row per tensor: worst index, analytic vs numeric there, ...
    assert report.passed

``f()`` returns the scalar (a Python float) computed from the *current* values of the arrays in
``tensors`` (name -> array, any backend); the checker perturbs them in place and restores them
exactly. ``analytic`` holds the gradients to check (name -> array of the same shape).

The numeric side:
- central differences, (f(x + h) - f(x - h)) / 2h, evaluated and differenced in float64
  (Python floats), with the step actually taken (x + h rounded to the tensor's dtype);
- the step h = c * max(1, |x|) with c = cbrt(eps) of the tensor dtype, which balances
  truncation (~h^2) against round-off (~eps/h); ``order=4`` uses the five-point stencil with
  c = eps^(1/5) for another ~3 digits in float64.

The pass rule, per checked item:  |a - n| <= atol + rtol * max(|a|, |n|).
A pure relative error fails falsely where the derivative is near zero, hence atol. By default
atol is the round-off bound of the difference quotient, 32 * eps * max(1, |f(x)|) / h.

Modes (per tensor):
- "exact":      every element, one at a time.
- "directions": k seeded random unit directions v; compare <g, dx> with f(x + dx) - f(x - dx),
                dx = h v. Cheap for big tensors; cannot say *where* an error is.
- "sparse":     a seeded sample of elements (every tensor gets some, biases included).
- "auto":       "exact" for tensors up to ``exact_max`` elements, else "directions".
A failing fast mode falls back to per-element checking (of up to ``locate_max`` elements) to
locate the error.

Kinks (ReLU at 0): where the central difference disagrees with the analytic value but the
analytic value matches one of the one-sided differences and those two disagree, the element
straddles a kink. It is reported as "kink crossed" and excluded from pass/fail, not failed.

Also here: :func:`check_layer` adds two properties any backward pass must have: it is linear
in the upstream gradient, and calling it twice gives identical results without mutating its
inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from array_api_compat import array_namespace

# -- host <-> backend helpers (the checker works on any array library) ----------------------


def _to_host(a) -> np.ndarray:
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        return a.get()
    if hasattr(a, "_array"):  # array_api_strict
        return np.asarray(a._array)
    return np.asarray(a)


def _eps(dtype) -> float:
    name = str(getattr(dtype, "name", dtype))
    return float(np.finfo(np.float32 if "32" in name else np.float64).eps)


def _dtype_name(dtype) -> str:
    name = str(getattr(dtype, "name", dtype))
    return "float32" if "32" in name else ("float64" if "64" in name else name)


def default_rtol(dtype) -> float:
    """rtol by dtype: float64 central differences are good to ~1e-9 relative; float32 to ~1e-3."""
    return 1e-7 if _eps(dtype) < 1e-10 else 1e-2


# -- the report -------------------------------------------------------------------------------


@dataclass
class Check:
    """One row of a report: a tensor's gradient check, or a property check of a backward."""

    name: str
    passed: bool
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0   # max|a - n| over the checked items / max(|a|, |n|) over them
    kind: str = "gradient"       # "gradient" | "linearity" | "repeatability"
    mode: str = ""
    n_checked: int = 0
    worst_index: tuple | None = None
    analytic: float = float("nan")
    numeric: float = float("nan")
    step: float = float("nan")
    dtype: str = ""
    kinks: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["worst_index"] = list(self.worst_index) if self.worst_index is not None else None
        return d


@dataclass
class Report:
    """All checks of one run. ``passed`` iff every check passed. ``str(report)`` is a table."""

    name: str
    checks: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list:
        return [c for c in self.checks if not c.passed]

    def __iadd__(self, other):
        self.checks += other.checks if isinstance(other, Report) else list(other)
        return self

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "checks": [c.to_dict() for c in self.checks]}

    def table(self) -> str:
        head = ("check", "mode", "n", "max abs err", "max rel err", "worst at", "analytic",
                "numeric", "step", "dtype", "result")
        rows = []
        for c in self.checks:
            status = "ok" if c.passed else "FAIL"
            if c.kinks:
                status += f" ({c.kinks} kink{'s' * (c.kinks > 1)} crossed)"
            if c.note:
                status += f"  {c.note}"
            idx = "" if c.worst_index is None else "[" + ",".join(map(str, c.worst_index)) + "]"
            rows.append((c.name, c.mode, str(c.n_checked), f"{c.max_abs_error:.2e}",
                         f"{c.max_rel_error:.2e}", idx, _num(c.analytic), _num(c.numeric),
                         _num(c.step, 1), c.dtype, status))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        line = lambda r: "  ".join(s.ljust(w) for s, w in zip(r, widths)).rstrip()  # noqa: E731
        verdict = "PASSED" if self.passed else f"FAILED ({len(self.failed)} of {len(self.checks)} checks)"
        out = [f"{self.name}: {verdict}", line(head), line(["-" * w for w in widths])]
        return "\n".join(out + [line(r) for r in rows])

    __str__ = table


def _num(v, digits=6) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}e}"


# -- numeric differentiation ----------------------------------------------------------------


class _Probe:
    """Evaluates f with one tensor perturbed, restoring it exactly afterwards."""

    def __init__(self, f, t, order):
        self.f, self.t, self.order = f, t, order
        self.xp = array_namespace(t)
        self.flat = self.xp.reshape(t, (-1,))  # a view: writes go into t
        eps = _eps(t.dtype)
        self.c = eps ** (1.0 / 3.0) if order == 2 else eps ** (1.0 / 5.0)

    def element(self, i, f0):
        """Numeric d f / d t.flat[i] -> (central, forward, backward, step)."""
        flat, f = self.flat, self.f
        x0 = float(flat[i])
        h = self.c * max(1.0, abs(x0))

        def at(k):
            flat[i] = x0 + k * h
            return float(flat[i]) - x0, f()  # the step actually taken, after rounding

        try:
            (sp, fp), (sm, fm) = at(1), at(-1)
            if self.order == 4:
                (sp2, fp2), (sm2, fm2) = at(2), at(-2)
                central = (-fp2 + 8 * fp - 8 * fm + fm2) / (6 * (sp - sm))
            else:
                central = (fp - fm) / (sp - sm)
        finally:
            flat[i] = x0
        return central, (fp - f0) / sp, (f0 - fm) / (-sm), h

    def direction(self, v_host, g_host, f0):
        """Directional check along unit v -> (analytic <g, dx>/2h, numeric (f+ - f-)/2h,
        forward and backward one-sided slopes, h)."""
        xp, t = self.xp, self.t
        t0 = xp.asarray(t, copy=True)
        h = self.c * max(1.0, float(np.max(np.abs(_to_host(t0)))) if t0.size else 1.0)
        v = xp.asarray(np.asarray(v_host * h, dtype=_to_host(t0).dtype))
        try:
            t[...] = t0 + v
            tp, fp = _to_host(t).astype(np.float64), self.f()
            t[...] = t0 - v
            tm, fm = _to_host(t).astype(np.float64), self.f()
        finally:
            t[...] = t0
        dx = tp - tm  # the perturbation actually applied, after rounding
        return (float(np.sum(g_host * dx)) / (2 * h), (fp - fm) / (2 * h),
                (fp - f0) / h, (f0 - fm) / h, h)


def check_gradients(f, tensors: dict, analytic: dict, *, mode: str = "auto", rtol=None,
                    atol=None, order: int = 2, seed: int = 0, n_directions: int = 6,
                    n_samples: int = 24, exact_max: int = 512, locate_max: int = 2048,
                    kink_check: bool = True, name: str = "gradcheck") -> Report:
    """Check ``analytic`` against finite differences of ``f`` for every tensor in ``tensors``.

    Returns a :class:`Report` with one :class:`Check` per tensor. See the module docstring for
    the modes, the step, the pass rule and kink handling. ``rtol=None`` picks by dtype
    (1e-7 float64, 1e-2 float32); ``atol=None`` is the round-off bound of the quotient.
    """
    if mode not in ("auto", "exact", "directions", "sparse"):
        raise ValueError(f"mode must be auto, exact, directions or sparse; got {mode!r}")
    if order not in (2, 4):
        raise ValueError("order must be 2 (central) or 4 (five-point)")
    missing = set(tensors) - set(analytic)
    if missing:
        raise ValueError(f"no analytic gradient given for {sorted(missing)}")
    rng = np.random.default_rng(seed)
    f0 = float(f())
    if not math.isfinite(f0):
        raise ValueError(f"{name}: f(x) = {f0} at the unperturbed point; cannot check gradients")
    report = Report(name)
    for tname, t in tensors.items():
        g = _to_host(analytic[tname]).astype(np.float64)
        if g.shape != tuple(t.shape):
            report.checks.append(Check(f"{tname}", False, note=f"analytic gradient has shape "
                                       f"{g.shape}, tensor has {tuple(t.shape)}"))
            continue
        probe = _Probe(f, t, order)
        tol_r = default_rtol(t.dtype) if rtol is None else rtol
        tol_a = 32 * _eps(t.dtype) * max(1.0, abs(f0)) / probe.c if atol is None else atol
        m = mode if mode != "auto" else ("exact" if t.size <= exact_max else "directions")
        if m == "directions":
            chk = _directional(probe, g, f0, rng, n_directions, tol_r, tol_a)
            if not chk.passed:  # locate the error element by element
                idx = _pick(rng, t.size, locate_max)
                loc = _elementwise(probe, g, f0, idx, tol_r, tol_a, kink_check)
                loc.mode = "directions->exact" + ("" if len(idx) == t.size else f"({len(idx)} sampled)")
                loc.passed = False  # the directional check failed whatever the sample shows
                if not loc.note:
                    loc.note = f"directional check failed: {chk.note}"
                chk = loc
        else:
            idx = np.arange(t.size) if m == "exact" else _pick(rng, t.size, n_samples)
            chk = _elementwise(probe, g, f0, idx, tol_r, tol_a, kink_check)
            chk.mode = m
        chk.name, chk.dtype = tname, _dtype_name(t.dtype)
        report.checks.append(chk)
    return report


def _pick(rng, size, k):
    return np.arange(size) if size <= k else np.sort(rng.choice(size, size=k, replace=False))


def _summarise(a, n, ok, tol_r, tol_a):
    """Errors over the checked items (kinks already removed) -> Check with the worst item."""
    err = np.abs(a - n)
    allowed = tol_a + tol_r * np.maximum(np.abs(a), np.abs(n))
    worst = int(np.argmax(err / allowed))
    scale = float(max(np.max(np.abs(a)), np.max(np.abs(n))))
    rel = float(np.max(err)) / scale if scale > 0 else float(np.max(err) > 0) * math.inf
    return Check("", passed=bool(np.all(ok)), max_abs_error=float(np.max(err)),
                 max_rel_error=rel, n_checked=len(a)), worst


def _elementwise(probe, g, f0, idx, tol_r, tol_a, kink_check) -> Check:
    shape = g.shape
    g = g.reshape(-1)
    a, n, steps, kink = [], [], [], []
    for i in idx:
        central, fwd, bwd, h = probe.element(int(i), f0)
        ai = g[i]
        bad = abs(ai - central) > tol_a + tol_r * max(abs(ai), abs(central))
        # A kink: the one-sided slopes disagree, and the analytic value is one of them.
        loose = lambda u, v: abs(u - v) <= 1e-3 * max(abs(u), abs(v)) + 1e3 * tol_a  # noqa: E731
        is_kink = kink_check and bad and not loose(fwd, bwd) and (loose(ai, fwd) or loose(ai, bwd))
        a.append(ai)
        n.append(central)
        steps.append(h)
        kink.append(is_kink)
    a, n, kink = np.array(a), np.array(n), np.array(kink, dtype=bool)
    keep = ~kink
    if not keep.any():
        return Check("", passed=True, n_checked=0, kinks=int(kink.sum()),
                     note="every checked element straddles a kink")
    ok = np.abs(a - n) <= tol_a + tol_r * np.maximum(np.abs(a), np.abs(n))
    chk, w = _summarise(a[keep], n[keep], ok[keep], tol_r, tol_a)
    j = np.flatnonzero(keep)[w]
    chk.worst_index = tuple(int(k) for k in np.unravel_index(int(idx[j]), shape))
    chk.analytic, chk.numeric, chk.step = float(a[j]), float(n[j]), float(steps[j])
    chk.kinks = int(kink.sum())
    return chk


def _directional(probe, g, f0, rng, k, tol_r, tol_a) -> Check:
    """k random directions; a direction whose one-sided slopes disagree crossed a kink
    (some ReLU input changed sign) and is replaced by a fresh one (at most k times)."""
    a, n, hs, kinks = [], [], [], 0
    while len(a) < k and kinks < k:
        v = rng.standard_normal(g.shape)
        v /= np.linalg.norm(v) or 1.0
        ai, ni, fwd, bwd, h = probe.direction(v, g, f0)
        bad = abs(ai - ni) > tol_a + tol_r * max(abs(ai), abs(ni))
        if bad and abs(fwd - bwd) > 1e-3 * max(abs(fwd), abs(bwd)) + 1e3 * tol_a:
            kinks += 1
            continue
        a.append(ai)
        n.append(ni)
        hs.append(h)
    if not a:
        return Check("", passed=True, kinks=kinks, mode=f"directions({k})",
                     note="every direction crossed a kink")
    a, n = np.array(a), np.array(n)
    ok = np.abs(a - n) <= tol_a + tol_r * np.maximum(np.abs(a), np.abs(n))
    chk, w = _summarise(a, n, ok, tol_r, tol_a)
    chk.mode, chk.worst_index, chk.kinks = f"directions({len(a)})", None, kinks
    chk.analytic, chk.numeric, chk.step = float(a[w]), float(n[w]), float(hs[w])
    if not chk.passed:
        chk.note = f"<g,v> = {a[w]:.6e} but finite difference = {n[w]:.6e}"
    return chk


# -- layers: gradients plus the properties every backward must have -------------------------


def check_layer(layer, params: dict, x, *, seed: int = 0, rtol=None, mode="auto",
                name=None, kink_check=True) -> Report:
    """Gradient-check ``layer`` (forward/backward contract) at input ``x`` and ``params``.

    The scalar is L = sum(G * forward(params, x)) for a fixed random G, so dL/dout = G and the
    analytic gradients are ``backward(params, G, cache)``. Also checks linearity of backward
    in G and repeatability (same result twice, inputs untouched).
    """
    name = name or repr(layer)
    xp = array_namespace(x)
    rng = np.random.default_rng(seed)
    out, cache = layer.forward(params, x)
    G = xp.asarray(np.asarray(rng.standard_normal(tuple(out.shape)), dtype=_to_host(out).dtype))

    def f():
        o, _ = layer.forward(params, x)
        return float(xp.sum(o * G))

    dx, grads = layer.backward(params, G, cache)
    tensors = {"x": x, **params}
    analytic = {"x": dx, **grads}
    report = check_gradients(f, tensors, analytic, mode=mode, rtol=rtol, seed=seed,
                             name=name, kink_check=kink_check)
    for c in report.checks:
        c.name = f"{name}.{c.name}"

    def backward(Gu):
        d, gr = layer.backward(params, Gu, cache)
        return {"x": d, **gr}

    report += check_backward_properties(backward, tuple(out.shape), _to_host(out).dtype,
                                        [x, G, *params.values()], name, rng)
    return report


def check_backward_properties(backward, out_shape, dtype, inputs, name, rng) -> list:
    """Linearity (b(a G1 + c G2) = a b(G1) + c b(G2)) and repeatability (b(G) twice is
    identical, and nothing in ``inputs`` changes). ``backward``: G -> dict of arrays."""
    xp = array_namespace(inputs[0])
    mk = lambda: xp.asarray(np.asarray(rng.standard_normal(out_shape), dtype=dtype))  # noqa: E731
    G1, G2 = mk(), mk()
    alpha, gamma = 0.75, -1.25
    before = [_to_host(t).copy() for t in inputs]
    b1, b2 = backward(G1), backward(G2)
    b12 = backward(G1 * alpha + G2 * gamma)
    b1_again = backward(G1)
    lin_err, lin_rel, rep_err = 0.0, 0.0, 0.0
    for k in b1:
        u = _to_host(b12[k]).astype(np.float64)
        w = alpha * _to_host(b1[k]).astype(np.float64) + gamma * _to_host(b2[k]).astype(np.float64)
        e = float(np.max(np.abs(u - w))) if u.size else 0.0
        s = float(max(np.max(np.abs(u)), np.max(np.abs(w)))) if u.size else 0.0
        lin_err, lin_rel = max(lin_err, e), max(lin_rel, e / s if s else 0.0)
        rep_err = max(rep_err, float(np.max(np.abs(_to_host(b1_again[k]) - _to_host(b1[k]))))
                      if u.size else 0.0)
    mutated = [i for i, (t, t0) in enumerate(zip(inputs, before)) if not np.array_equal(_to_host(t), t0)]
    lin_tol = 64 * _eps(dtype)
    return [
        Check(f"{name}: backward linear in dout", lin_rel <= lin_tol, lin_err, lin_rel,
              kind="linearity", mode="G1, G2", n_checked=len(b1), dtype=_dtype_name(dtype),
              note="" if lin_rel <= lin_tol else f"relative deviation {lin_rel:.2e} > {lin_tol:.1e}"),
        Check(f"{name}: backward repeatable, inputs untouched", rep_err == 0.0 and not mutated,
              rep_err, 0.0, kind="repeatability", mode="twice", n_checked=len(b1),
              dtype=_dtype_name(dtype),
              note=("" if not mutated else f"backward modified input #{mutated}")),
    ]
