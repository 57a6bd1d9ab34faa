"""check_gradients: analytic gradients against Ridders-extrapolated finite differences, with
a verdict that always rests on evidence.

The rules, in the order they are applied:

1. Refuse what cannot be checked (GradcheckError, a ValueError, or TypeError, naming the
   tensor): keys of ``tensors`` and ``analytic`` that differ, shapes that differ, scalars and
   non-arrays, integer/bool/complex/float16 tensors, read-only arrays, tensors sharing memory,
   a non-scalar, complex or non-finite f.
2. Determinism first: f is called three times at the point; values that differ beyond
   round-off raise NondeterministicError (pass the noise, e.g. eps, into f).
3. Each comparison is phi'(0) = <g, u> along one direction u in one tensor (an element, or a
   random direction), numeric side by Ridders' method with an error estimate that includes
   f's measured round-off noise (see :mod:`.numeric`). Pass rule:

       |a - n| <= atol + rtol * max(|a|, |n|) + 3 * err(n)

   and the error must be small enough to mean something: an item whose 3 * err(n) exceeds a
   quarter of the tensor's largest gradient is *unresolved*, which is a failure.
4. A failing element is excluded as a *kink* only if its one-sided slopes differ and the
   analytic value equals one of them; it is a *discontinuity* if f jumps by an amount that
   does not shrink with the step (a failure unless ``allow_discontinuities``).
5. A failing direction is never excluded: its support is bisected (group testing) until the
   wrong elements are found and checked one by one, so "worst at" is always an element shown
   wrong. A direction whose halves all pass was a finite-step artefact (a kink crossed by the
   joint step) and the halves are the evidence.
6. No verdict without evidence: a tensor passes only if at least one comparison counted and
   none failed; a tensor whose every item was excluded, or that is empty, fails and says why.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .numeric import (FLOAT_DTYPES, GradcheckError, Line, MultiLine, Tensor, call_scalar,
                      check_deterministic, noise_level, refuse_overlaps, ridders, to_host)
from .report import Check, Report

# Per dtype: first relative step, most Ridders rows, the step for the noise probe, default
# rtol, and the tolerance for "the analytic value is one of the one-sided slopes".
SETTINGS = {
    np.float64: dict(t0=2.0 ** -12, rows=8, tau=2.0 ** -20, rtol=1e-7, kink_rtol=1e-4,
                     resolve=1e-2, retry=2.0 ** -10),
    np.float32: dict(t0=2.0 ** -8, rows=8, tau=2.0 ** -10, rtol=1e-2, kink_rtol=1e-2,
                     resolve=0.25, retry=2.0 ** -4),
}
# resolve: an item is unresolved when 3 * err exceeds this share of the tensor's scale.
# retry: a comparison that is not clean, or only coarsely resolved, is done again from a
# first step this many times smaller (data far from 0, x = 1e5 + noise, varies on a scale far
# below |x|), and the better-resolved of the two counts.
MODES = ("auto", "exact", "directions", "sparse")
# A failing direction that bisection pins on no element: at most this many of the elements
# whose sign its first step crosses are checked one by one before it is compared again
# without them (more, and it fails as an error spread thinly, as before).
MAX_CROSSED = 64
BAD = ("fail", "discontinuity", "unresolved")


def default_rtol(dtype) -> float:
    """rtol by dtype: 1e-7 for float64, 1e-2 for float32 (plus the measured noise term)."""
    name = str(getattr(dtype, "name", dtype))
    return SETTINGS[FLOAT_DTYPES.get(name, np.float64)]["rtol"]


@dataclass
class Item:
    """One comparison: analytic a against numeric n +- err, along u (element or direction)."""

    a: float
    n: float
    err: float
    step: float
    status: str            # ok | fail | kink | discontinuity | unresolved | mismatch
    index: int | None      # flat index of the element; None for a direction
    unit: float = 1.0      # divide a and n by this to get d f / d x_i (the element's u_i)
    note: str = ""
    size: float = 0.0      # for a direction: |g * u|_2, the size <g, u> has before cancelling
    side: int = 0          # for a kink: +1 if the analytic value is the right slope, -1 left
    clean: bool = True     # every step finite on both sides, the three estimates agreeing
    sides: tuple = ((math.nan, math.inf), (math.nan, math.inf))   # one-sided (value, error)
    noisy: bool = True     # the error is f's round-off at the step, not the steps' own spread
    near_kink: bool = False  # an element with a kink within the usual steps (resolved closer)
    moved: bool = True     # f changed at the step the estimate was taken at
    flat: bool = False     # f changed at none of the steps


def check_gradients(f, tensors: dict, analytic: dict, *, mode: str = "auto", rtol=None,
                    atol: float = 0.0, seed: int = 0, n_directions: int = 6,
                    n_samples: int = 24, exact_max: int = 512, locate_max: int = 5,
                    kink_check: bool = True, allow_discontinuities: bool = False,
                    max_comparisons: int = 4000, name: str = "gradcheck") -> Report:
    """Check ``analytic`` against finite differences of ``f`` for every tensor in ``tensors``.

    f:         callable with no arguments returning a real scalar (Python float or 0-d array)
               computed from the *current* values of the arrays in ``tensors``; the checker
               writes steps into those arrays in place and restores them bit for bit.
    tensors:   name -> float32/float64 array (NumPy, CuPy or array-api-strict; any strides).
    analytic:  name -> gradient of f with respect to that tensor, same keys, same shapes.
    mode:      "exact" (every element), "sparse" (``n_samples`` seeded elements per tensor
               plus one bisected direction through the whole tensor),
               "directions" (``n_directions`` seeded random directions; a failing one is
               bisected to the wrong elements), or "auto" (exact up to ``exact_max``
               elements, else directions).
    rtol:      None picks by dtype (1e-7 float64, 1e-2 float32); atol: absolute slack
               (default 0: f's measured round-off noise already sets the floor).
    locate_max: stop bisecting a failing tensor after this many wrong elements are named.

    Returns a :class:`Report` (one :class:`Check` per tensor). Raises GradcheckError
    (ValueError) or TypeError when the inputs cannot be checked, NondeterministicError when f
    is not deterministic. See the module docstring for the rules.
    """
    if not callable(f):
        raise TypeError(f"f must be a callable with no arguments returning a scalar; got "
                        f"{type(f).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    for pname, v, lo in (("n_directions", n_directions, 1), ("n_samples", n_samples, 1),
                         ("exact_max", exact_max, 0), ("locate_max", locate_max, 1),
                         ("max_comparisons", max_comparisons, 1)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{pname} must be an integer >= {lo}; got {v!r}")
    for pname, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and not (isinstance(v, (int, float, np.floating)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{pname} must be a finite number >= 0; got {v!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    if not hasattr(tensors, "items") or not hasattr(analytic, "keys"):
        raise TypeError("tensors and analytic must be dicts: name -> array")
    if set(tensors) != set(analytic):
        missing, extra = sorted(set(tensors) - set(analytic)), sorted(set(analytic) - set(tensors))
        parts = ([f"no analytic gradient given for {missing}"] if missing else []) + \
                ([f"analytic gradients for tensors that are not checked: {extra}"] if extra else [])
        raise GradcheckError("; ".join(parts) + " (the keys of tensors and analytic must match)")
    Ts = [Tensor(k, t) for k, t in tensors.items()]
    gs = {}
    for T in Ts:
        if not hasattr(analytic[T.name], "shape"):
            raise GradcheckError(f"analytic gradient for {T.name!r} is a "
                                 f"{type(analytic[T.name]).__name__}, not an array")
        try:
            g = to_host(analytic[T.name])
        except (TypeError, ValueError, RuntimeError) as e:
            raise GradcheckError(f"analytic gradient for {T.name!r} could not be read as an "
                                 f"array ({type(e).__name__}: {e}); pass a NumPy/CuPy array") from None
        if tuple(g.shape) != T.shape:
            raise GradcheckError(f"analytic gradient for {T.name!r} has shape {tuple(g.shape)}, "
                                 f"the tensor has {T.shape}")
        if g.dtype.kind not in "fiu":
            raise GradcheckError(f"analytic gradient for {T.name!r} has dtype {g.dtype}; "
                                 f"expected real numbers")
        gs[T.name] = g.astype(np.float64).reshape(-1)
    refuse_overlaps(Ts)
    eps_f = max((T.eps for T in Ts), default=float(np.finfo(np.float64).eps))
    f0, spread = check_deterministic(f, eps=eps_f)
    rng = np.random.default_rng(seed)
    report = Report(name)
    kinked = []
    for T in Ts:
        t_start = time.perf_counter()
        chk, tc = _check_tensor(f, f0, spread, T, gs[T.name], mode, rtol, atol, rng,
                                n_directions, n_samples, exact_max, locate_max, kink_check,
                                allow_discontinuities, max_comparisons)
        chk.name = T.name
        chk.dtype = np.dtype(T.dtype).name
        report.checks.append(chk)
        chk.seconds = time.perf_counter() - t_start
        if tc is not None and tc.kinks:
            kinked.append(tc)
    if len(kinked) >= 2:
        report.checks.append(_joint_kinks_across(kinked, rng))
    f_end = call_scalar(f)
    if not abs(f_end - f0) <= 64 * eps_f * max(abs(f0), 1e-300):
        raise GradcheckError(f"f changed during the check: {f0!r} before, {f_end!r} "
                             f"after, with every tensor restored bit for bit; f keeps state "
                             f"between calls")
    return report


def assert_gradients(f, tensors: dict, analytic: dict, **kwargs) -> Report:
    """:func:`check_gradients`, for tests: raises AssertionError carrying the report's table
    when any check fails; returns the report otherwise."""
    report = check_gradients(f, tensors, analytic, **kwargs)
    if not report.passed:
        raise AssertionError("gradient check failed\n" + report.table())
    return report


# -- one tensor ------------------------------------------------------------------------------


class _Tensorcheck:
    """Comparisons for one tensor: its line search settings, noise level and counters."""

    def __init__(self, f, f0, spread, T, g, rtol, atol, kink_check, allow_disc):
        self.f, self.f0, self.T, self.g = f, f0, T, g
        s = SETTINGS[T.dtype]
        self.t0, self.rows, self.kink_rtol = s["t0"], s["rows"], s["kink_rtol"]
        self.resolve, self.retry = s["resolve"], s["retry"]
        self.rtol = s["rtol"] if rtol is None else rtol
        self.atol, self.kink_check, self.allow_disc = atol, kink_check, allow_disc
        self.evals, self.comparisons, self.kinks = 0, 0, {}
        self.gmax = float(np.max(np.abs(g))) if g.size else 0.0
        # f's round-off noise along a random direction of this tensor, floored by the spread
        # of repeated calls and by half an ulp of f.
        self.sigma = max(spread / 2, 0.5 * T.eps * abs(f0))
        if T.size:
            v = np.random.default_rng(12345).standard_normal(T.size)
            size = np.where(T.x0 != 0, np.abs(T.x0), T.scale)   # tiny steps never cross 0
            line = Line(f, T, np.arange(T.size), size * v / np.max(np.abs(v)), g)
            # the smaller of two probes: curvature shrinks with the step, noise does not
            # Probes at several tiny steps; a probe below f's resolution says nothing (a
            # float32 f behind float64 tensors), curvature inflates the larger ones (data far
            # from 0): the smallest usable estimate counts.
            probes = [noise_level(line, f0, s["tau"] * 2.0 ** k) for k in (-8, 0, 8, 16)]
            probes = [p for p in probes if math.isfinite(p)]
            self.sigma = max(self.sigma, min(probes) if probes else 0.0)
            self.evals += line.evals

    def compare(self, idx, u, element: bool, t0: float | None = None) -> Item:
        """One comparison along u, done again from a smaller first step when the first is
        not clean or only coarsely resolved; the better-resolved result counts. An element
        found on a kink whose retry is not resolved is compared from smaller steps still,
        and counts there only off the kink (:meth:`_off_kink`)."""
        t0 = t0 or self.t0
        it = self._compare(idx, u, element, t0)
        coarse = 3 * it.err > 100 * self.rtol * max(abs(it.a), abs(it.n), it.size)
        if it.status == "ok" and it.clean and not coarse:
            return it
        again = self._compare(idx, u, element, t0 * self.retry)
        better = math.isfinite(again.n) and (not math.isfinite(it.n) or again.err < it.err) \
            and (again.clean or not it.clean) and not self._below_resolution(again, it)
        if better and it.status == "ok" and it.clean:
            # a refinement of a clean first estimate must agree with it: smaller steps can
            # fall below f's resolution (a float32 f behind float64 tensors) and read 0
            better = abs(again.n - it.n) <= 3 * (it.err + again.err)
        best = again if better else it
        if element and it.status == "kink" and not (best.clean and self._resolved(best)):
            # A kink within the steps need not be at x: a hinge 1e-9 beside its kink at 1 is
            # smooth at x, and only the slope of x's own side is right. Steps smaller still
            # (down to 2^-42 of x's scale in float64) stop crossing it: a clean, resolved
            # result there is evidence either way. A kink at x itself is crossed by every
            # step and stands.
            t = t0 * self.retry
            for _ in range(2):
                t *= self.retry
                deeper = self._compare(idx, u, element, t)
                if deeper.status in ("ok", "fail") and deeper.clean and \
                        self._resolved(deeper) and self._off_kink(deeper, it):
                    deeper.near_kink = True
                    return deeper
        return best

    @staticmethod
    def _off_kink(it, kink) -> bool:
        """Whether the steps of ``it`` no longer cross the kink found by ``kink``: its two
        one-sided slopes agree, errors included, to within a quarter of the gap between the
        kink's. Steps that still cross it (x 1e-12 from a kink whose slopes differ by 0.5%)
        read the two slopes' mean, consistently and to about 1e-3: not evidence."""
        (kp, _), (km, _) = kink.sides
        gap = abs(kp - km)
        return math.isfinite(gap) and _Tensorcheck._sides_agree(it, 0.5 * gap)

    @staticmethod
    def _below_resolution(fine, coarse) -> bool:
        """Whether the estimate ``fine``, from smaller steps than ``coarse``, is no evidence:
        f did not change at the step it was taken at, where the larger steps saw f slope on
        both sides. Then those steps are below f's resolution ((1e6 + x) - 1e6 at steps
        under 1.2e-10 reads a slope of 0 with a tiny error bar), or f has a dead zone
        narrower than the larger steps: the two cannot be told apart. Where the larger
        steps saw one flat side (ReLU's, x just left of 0), f not changing is evidence."""
        (fp, ep), (fm, em) = coarse.sides
        sloped = fp * fm > 0 and abs(fp) > 3 * ep and abs(fm) > 3 * em
        return sloped and not fine.moved

    @staticmethod
    def _sides_agree(it, gap) -> bool:
        """Whether the two one-sided slopes of ``it`` agree, errors included, to within half
        of ``gap``: no kink within its steps could account for a disagreement that large."""
        (fp, ep), (fm, em) = it.sides
        return all(math.isfinite(v) for v in (fp, ep, fm, em)) and \
            abs(fp - fm) + 3 * (ep + em) < 0.5 * gap

    def _coarse_direction(self, it) -> bool:
        """A direction that passed but is too coarse to count (it would be "unresolved"),
        and not because of f's noise: it crossed kinks of elements closer to them than its
        steps (ReLU inputs 1e-10 from 0). Bisected like a failing one, its elements are then
        checked one by one, with steps under |x| where they sit beside 0."""
        ref = max(abs(it.a), abs(it.n), it.size)
        return it.index is None and it.status == "ok" and not it.noisy and ref > 0 and \
            3 * it.err > max(self.resolve * ref, self.atol)

    def _coarse(self, it) -> bool:
        """An element that passed, but whose numeric side is too noisy to judge (it will be
        "unresolved"). A kink is not one: its error bar is wide because of the kink."""
        return it.index is not None and it.status == "ok" and not self._resolved(it)

    def _resolved(self, it) -> bool:
        """An element's numeric side is known to within ``resolve`` of the tensor's largest
        gradient element (or to atol)."""
        return 3 * it.err / abs(it.unit) <= max(self.resolve * self.gmax, self.atol)

    def _compare(self, idx, u, element: bool, t0: float) -> Item:
        self.comparisons += 1
        line = Line(self.f, self.T, idx, u, self.g)
        a = line.a
        # A direction through N elements sums N terms: checked to rtol / sqrt(N), an error of
        # rtol in one element stays visible in the sum.
        rtol = self.rtol if element else self.rtol / math.sqrt(max(len(idx), 1))
        target = lambda v: 0.1 * (self.atol + rtol * max(abs(a), abs(v)))  # noqa: E731
        est = ridders(line, self.f0, t0, self.rows, self.sigma, target, self.rtol)
        n, err = est.value, est.error
        unit = float(u[0]) if element else 1.0
        step = est.t * (float(np.max(np.abs(u))) if len(u) else 0.0)
        item = Item(a, n, err, step, "ok", int(idx[0]) if element else None, unit,
                    size=0.0 if element else float(np.linalg.norm(line.gi * line.u)))
        item.clean = est.consistent and not est.one_sided and not est.shrunk
        item.sides = (est.fwd, est.bwd)       # the one-sided slopes: (value, error) each
        # whether f changed at the step the estimate was taken at, and at any step: see
        # _below_resolution
        item.flat = all(v == self.f0 for t, v in est.phi.items() if t != 0)
        item.moved = est.phi.get(est.t, self.f0) != self.f0 or \
            est.phi.get(-est.t, self.f0) != self.f0
        # the noise term of the best step (_Tableau: 2 sigma / t): an error well above it
        # comes from the steps themselves (a kink they cross), which smaller pieces can fix
        item.noisy = not (est.t > 0) or err <= 4 * 2.0 * self.sigma / est.t
        if est.one_sided:
            item.note = f"{est.one_sided} differences only: f is not finite on the other side"
        if not math.isfinite(a):
            item.status = "fail"
            item.note = "the analytic gradient is not finite"
        elif not math.isfinite(n):
            item.status = "fail"
            item.note = "f is not finite at any step near x"
        elif a == 0 and bool(np.any((line.gi != 0) & (line.u != 0) & (line.gi * line.u == 0))):
            # g times the step underflows (x ~ 1e-170): a = 0 and f does not move, so any
            # analytic value would "agree"; that is no evidence
            item.status = "unresolved"
            item.note = ("the analytic gradient times the step underflows to 0 (x or g too "
                         "close to the smallest number): nothing to compare; rescale x or f")
        else:
            differs = abs(a - n) > self.atol + rtol * max(abs(a), abs(n)) + 3 * err
            wrong = differs or not est.consistent
            if wrong:   # a direction that merely mixed in a kink is bisected, not failed
                item.status = "fail" if element or (differs and est.consistent) else "mismatch"
            if element and (wrong or 3 * err > self.resolve * max(abs(a), abs(n))):
                self._classify(item, line, est, wrong)
        self.evals += line.evals
        return item

    def _classify(self, item, line, est, wrong):
        """A failing or unresolved element: a discontinuity, a kink (excluded, only if the
        element failed and the analytic value is one of the one-sided slopes), or left as a
        failure."""
        phi, f0, s = est.phi, self.f0, self.sigma
        ts = sorted((t for t in phi if t > 0 and math.isfinite(phi[t]) and
                     math.isfinite(phi.get(-t, math.nan))), reverse=True)
        while len(ts) < 3:                      # need three steps on each side
            t = ts[-1] / 2 if ts else self.t0
            phi[t], phi[-t] = line(t)[0], line(-t)[0]
            if not (math.isfinite(phi[t]) and math.isfinite(phi[-t])):
                return
            ts.append(t)
        t1, t3 = ts[-3], ts[-1]
        for sgn, side in ((1, "x + h"), (-1, "x - h")):
            j1, j3 = abs(phi[sgn * t1] - f0), abs(phi[sgn * t3] - f0)
            if j3 > 0.5 * j1 and j3 > 100 * s + 10 * abs(item.a) * t3:
                item.status = "discontinuity"
                item.note = (f"f jumps by {phi[sgn * t3] - f0:.3g} between x and {side}, and the "
                             f"jump does not shrink with h (down to h = {t3 * item.unit:.1e})")
                return
        if not (self.kink_check and wrong):
            return
        # A kink at or near x: the analytic value is one of the one-sided slopes (resolved
        # to 10%), and the other side tells a different story (a different slope, or one
        # too blurred by the kink to resolve). Both sides agreeing with each other but not
        # with the analytic value is a wrong gradient, however close.
        a, sides = item.a, (est.fwd, est.bwd)
        if not all(math.isfinite(q) for q, _ in sides):
            return
        tol = lambda q, e: self.atol + self.kink_rtol * max(abs(a), abs(q)) + 3 * e  # noqa: E731
        big = max(abs(a), abs(sides[0][0]), abs(sides[1][0]))
        resolved = [3 * e <= 0.1 * big for _, e in sides]
        match = [r and abs(a - q) <= tol(q, e) for (q, e), r in zip(sides, resolved)]
        (fp, ep), (fm, em) = sides
        differ = abs(fp - fm) > 3 * (ep + em) + self.kink_rtol * max(abs(fp), abs(fm))
        # The other side too blurred to resolve stands for a kink only where the central
        # estimate is itself inconsistent: a smooth f whose central difference is consistent
        # and disagrees is a wrong gradient (1/y at 1e-3, 3% wrong, was excused in float32)
        blurred = [not r and not est.consistent for r in resolved]
        for k in (0, 1):
            other = 1 - k
            if match[k] and (differ or blurred[other]):
                item.status, item.side = "kink", 1 if k == 0 else -1
                item.note = (f"kink: one-sided slopes {fp / item.unit:.6g} and "
                             f"{fm / item.unit:.6g}, analytic matches the "
                             f"{'right' if k == 0 else 'left'} one")
                return
        if not est.consistent:
            item.note = (f"central {item.n / item.unit:.6g}, one-sided {fp / item.unit:.6g} and "
                         f"{fm / item.unit:.6g}: the analytic value matches none")

    def element(self, i) -> Item:
        """One element, steps scaled to max(|x_i|, floor). An element smaller than the floor
        may have had its sign crossed by the step (log(x) near 0, |x| at 1e-12): if that check
        is not clean, it is done again with steps scaled to |x_i| itself, which never cross 0,
        and that result counts, or, if even that cannot resolve it, the element fails as
        unresolved rather than be excused as a kink."""
        x, s = abs(self.T.x0[i]), self.T.scale[i]
        it = self.compare(np.array([i]), np.array([s]), True)
        if not (0 < x < s) or (it.status == "ok" and it.clean and not self._coarse(it)):
            return it
        proven = it.status == "fail" and it.clean and self._resolved(it) and \
            self._sides_agree(it, abs(it.a - it.n))
        again = self.compare(np.array([i]), np.array([x]), True, t0=0.5)   # |step| <= x/2
        if self._below_resolution(again, it):
            again.status, again.n, again.err = "unresolved", math.nan, math.inf
        if proven and not math.isfinite(again.n):
            if again.flat:             # a dead zone or round-off: nothing proves which
                it.status = "unresolved"
                it.note = (f"the first steps give f's slope {it.n / s:.6g}, but f does not "
                           f"change at any step under |x| = {x:.2g}: a dead zone narrower "
                           f"than the first steps, or f's round-off?")
            return it
        if proven and not (abs(again.n / x - it.n / s) > 3 * (again.err / x + it.err / s)):
            # a mismatch the first steps proved (no kink within them: both one-sided slopes
            # agree far better than the analytic value does) stands unless the steps under
            # |x| resolve a different slope (tanh(1e9 x) / 1e9 at x = 1e-10: a feature
            # finer than the first steps); merely coarser, they must not overrule it (a 1e-2
            # error at x = 1e-10 of a smooth f passed that way). Where they are too coarse
            # to rule out the analytic value either, a finer feature could explain the
            # mismatch: that is no proof, and the element is unresolved.
            if math.isfinite(again.n) and abs(again.n - again.a) <= 3 * again.err:
                it.status = "unresolved"
                it.note = (f"the first steps give f's slope {it.n / s:.6g}, but steps under "
                           f"|x| = {x:.2g} give {again.n / x:.6g} +- {3 * again.err / x:.2g}"
                           f", which cannot tell it from the analytic {it.a / s:.6g}: a "
                           f"feature of f finer than the first steps?")
            return it
        e = 3 * again.err / x
        if math.isfinite(again.n) and e <= max(self.resolve * self.gmax, self.atol):
            again.note = (again.note + "; " if again.note else "") + \
                f"checked with steps under |x| = {x:.2g}"
            again.near_kink = True
            return again
        if it.status == "ok":
            # a clean but coarse pass that smaller steps do not improve on: as found, to be
            # judged against the whole tensor (a tensor whose gradient is 0 everywhere has no
            # scale to be coarse against; it passed and still does)
            return it
        it.status = "unresolved"
        it.note = (f"x = {self.T.x0[i]:.3g} is closer to 0 than the step: large steps cross 0 "
                   f"({it.note or it.status}), steps under |x| resolve only +-{e:.2g}")
        return it

    def locate(self, idx, u, locate_max, budget) -> tuple[list, bool]:
        """Bisect a failing direction's support (depth first) down to single elements.
        Returns the items found and whether the search finished within the budget."""
        items, stack = [], [(idx, u)]
        while stack:
            bad = sum(it.status in BAD for it in items)
            if bad >= locate_max:
                return items, True
            # elements f's noise leaves too coarse to judge stop the search, too, unfinished
            # (the direction then fails): it would otherwise visit every element of a tensor
            # whose directions are resolved and its elements are not (float32; 1001
            # comparisons, 85 s)
            if bad + sum(self._coarse(it) for it in items) >= locate_max:
                return items, False
            if self.comparisons >= budget:
                return items, False
            I, U = stack.pop()
            h = len(I) // 2
            for J, V in ((I[h:], U[h:]), (I[:h], U[:h])):
                if len(J) == 1:
                    items.append(self.element(int(J[0])))
                else:
                    it = self.compare(J, V, False)
                    if it.status == "ok" and not self._coarse_direction(it):
                        items.append(it)
                    else:
                        stack.append((J, V))
        return items, True


def _check_tensor(f, f0, spread, T, g, mode, rtol, atol, rng, n_directions, n_samples,
                  exact_max, locate_max, kink_check, allow_disc, max_comparisons) -> Check:
    if T.size == 0:
        return Check("", False, mode=mode, note="empty tensor: nothing to compare, so no "
                     "evidence either way; leave it out"), None
    tc = _Tensorcheck(f, f0, spread, T, g, rtol, atol, kink_check, allow_disc)
    tc.locate_max = locate_max
    m = mode if mode != "auto" else ("exact" if T.size <= exact_max else "directions")
    items = []
    # sparse: a sample of elements, plus one direction through the whole tensor (bisected
    # if it fails), so a wrong element outside the sample is still caught.
    n_dir = 1 if m == "sparse" else n_directions
    located = False
    if m == "directions" or (m == "sparse" and T.size > n_samples):
        for _ in range(n_dir):
            v = rng.standard_normal(T.size)
            u = T.scale * v / np.max(np.abs(v))
            known = [x.index for x in items if x.index is not None and x.status != "ok"]
            u[known] = 0.0          # look past the elements already named (wrong or kinks)
            if not np.any(u):       # every element is named: a zero direction is no evidence
                break
            it = tc.compare(np.arange(T.size), u, False)
            if it.status == "ok" and not tc._coarse_direction(it):
                items.append(it)
                continue
            located = True
            found, finished = tc.locate(np.arange(T.size), u, locate_max, max_comparisons)
            items += found
            if it.status == "ok":
                # a coarse pass: explained where its pieces were all checked; if the search
                # stopped first, it stands (as "unresolved")
                if not finished:
                    items.append(it)
                continue
            # the elements whose sign the direction's first step could cross (0 < |x| <
            # t0 |u|): a kink at 0, as ReLU's, within the step
            crossed = {int(i) for i in np.flatnonzero((T.x0 != 0) &
                                                      (np.abs(T.x0) < tc.t0 * np.abs(u)))}
            if finished and it.status == "fail" and not any(x.status in BAD for x in found):
                # a proven mismatch that bisection did not pin on an element: those elements
                # are checked one by one (at most MAX_CROSSED)
                seen = {x.index for x in found if x.index is not None}
                cand = sorted(crossed - seen)
                if len(cand) <= MAX_CROSSED:
                    extra = [tc.element(i) for i in cand]
                    found += extra
                    items += extra
            shown = [x for x in found if x.status == "ok" and x.index is not None and
                     (x.near_kink or x.index in crossed)]
            near = [x.index for x in shown]
            # their own checks must bound their share of <g, u> well below the mismatch:
            # else an error within their (coarser) resolution could be what the direction
            # proved (a 1e-5 error behind f = (1e8 + x) - 1e8 passed that way)
            hidden = sum(3 * x.err / abs(x.unit) * abs(u[x.index]) for x in shown)
            if near and it.status == "fail" and not hidden < 0.5 * abs(it.a - it.n):
                near = []
            if finished and near and not any(x.status in BAD for x in found):
                # the direction crossed kinks beside some of its elements (ReLU inputs 1e-10
                # from 0), each shown right on its own: the mismatch is theirs if the
                # direction without them agrees; if it still does not, the error is
                # elsewhere, spread thinly, and fails below
                u[near] = 0.0
                if np.any(u):
                    again = tc.compare(np.arange(T.size), u, False)
                    if again.status == "ok":
                        items.append(again)
                        continue
                    it = again
            if not any(x.status in BAD for x in found):
                if it.status == "fail":    # a proven mismatch that no single element explains
                    it.note = (f"<g,u> = {it.a:.6e} but the finite difference is {it.n:.6e} "
                               f"+- {it.err:.1e}; bisection found no single wrong element (the "
                               f"error is spread thinly over many)")
                    items.append(it)
                elif not finished:
                    it.status = "fail"
                    it.note = (f"a direction disagrees (<g,u> = {it.a:.6e}, finite difference "
                               f"{it.n:.6e}) and bisection stopped before finding the element "
                               f"(it ran out of its {max_comparisons} comparisons, or met "
                               f"{locate_max} elements too noisy to judge)")
                    items.append(it)
            if sum(x.status in BAD for x in items) >= locate_max:
                break
    if m == "directions":
        m = f"directions({n_directions})"
    else:
        if m == "exact" or T.size <= n_samples:
            idx = np.arange(T.size)
        else:
            idx = np.sort(rng.choice(T.size, size=n_samples, replace=False))
        if m == "sparse":
            m = f"sparse({len(idx)})" + ("+directions(1)" if T.size > n_samples else "")
        done = {x.index for x in items if x.index is not None}
        items += [tc.element(int(i)) for i in idx if int(i) not in done]
    m += "->located" if located else ""
    items += _joint_kinks(tc, items, rng)
    tc.kinks = {it.index: it.side for it in items if it.status == "kink" and it.side}
    return _summarise(items, T, tc, m, allow_disc), tc


def _kink_line(tc, kinks, rng) -> Line:
    """The direction that moves every kink element toward its matched side."""
    idx = np.array(sorted(kinks))
    side = np.array([kinks[i] for i in idx], dtype=np.float64)
    v = np.abs(rng.standard_normal(len(idx))) + 0.5
    return Line(tc.f, tc.T, idx, tc.T.scale[idx] * side * v / np.max(v), tc.g)


def _kinks_add_up(line, tcs):
    """Kinks excused one by one must also add up. Move every kink element at once toward the
    side whose slope its analytic value matched: if f is separable there (ReLU inputs on 0),
    f's one-sided slope along that direction is the sum of the analytic terms; if it is not
    (a gradient sent to every tied element of a max, or to both inputs of max(x, y)), it is
    not, and that is a failure. -> (ok, analytic sum, f's slope, its error, step)."""
    ref = tcs[0]
    est = ridders(line, ref.f0, ref.t0, ref.rows, max(tc.sigma for tc in tcs), lambda _: 0.0,
                  ref.rtol)
    q, e = est.fwd
    a = line.a
    tol = max(tc.kink_rtol for tc in tcs)
    ok = math.isfinite(q) and abs(a - q) <= ref.atol + tol * max(abs(a), abs(q)) + 3 * e
    return ok, a, q, e, est.t


def _joint_kinks(tc, items, rng) -> list:
    """The joint kink test within one tensor: [] or one failing Item."""
    kinks = {it.index: it.side for it in items if it.status == "kink" and it.side}
    if len(kinks) < 2:
        return []
    line = _kink_line(tc, kinks, rng)
    ok, a, q, e, t = _kinks_add_up(line, [tc])
    tc.evals += line.evals
    if ok:
        return []
    idx = line.idx
    where = ", ".join(str([int(k) for k in np.unravel_index(int(i), tc.T.shape)]) for i in idx[:4])
    where += ", ..." if len(idx) > 4 else ""
    return [Item(a, q, e, t, "fail", None, 1.0, size=abs(a),
                 note=(f"the {len(idx)} kinks at {where} do not add up: moved together toward "
                       f"the sides their analytic values match, f's slope is {q:.6g}, the "
                       f"analytic values sum to {a:.6g}"))]


def _joint_kinks_across(tcs, rng) -> Check:
    """The joint kink test over several tensors at once (a tie between max(x, y)'s two
    inputs is a kink in each; sending the gradient to both passes each tensor alone)."""
    line = MultiLine([_kink_line(tc, tc.kinks, rng) for tc in tcs])
    ok, a, q, e, t = _kinks_add_up(line, tcs)
    names = ", ".join(f"{tc.T.name} ({len(tc.kinks)})" for tc in tcs)
    return Check("kinks across " + ", ".join(tc.T.name for tc in tcs), ok,
                 abs(a - q) if math.isfinite(q) else math.inf, mode="joint", n_checked=1,
                 analytic=a, numeric=q, step=t, evaluations=line.evals,
                 dtype=np.dtype(tcs[0].T.dtype).name,
                 note="" if ok else (f"the kinks in {names} do not add up: moved together "
                                     f"toward the sides their analytic values match, f's slope "
                                     f"is {q:.6g}, the analytic values sum to {a:.6g}"))


def _summarise(items, T, tc, mode, allow_disc) -> Check:
    notes = []
    # Evidence must resolve something. An element is measured against the tensor's largest
    # gradient element (analytic or numeric), a direction against the size of its terms.
    scale = max([float(np.max(np.abs(tc.g)))] +
                [abs(it.n / it.unit) for it in items if it.index is not None and math.isfinite(it.n)])
    res = []
    for it in items:
        e = 3 * it.err / abs(it.unit)
        ref = scale if it.index is not None else max(abs(it.a), abs(it.n), it.size)
        if it.status == "ok" and ref > 0:
            res.append(e / ref)
            if e > max(tc.resolve * ref, tc.atol):
                it.status = "unresolved"
                it.note = (f"numeric derivative only known to +-{e:.2g} (against {ref:.2g})"
                           + ("; check in float64" if T.dtype != np.float64 else
                              f"; f's round-off noise is {tc.sigma / abs(tc.f0):.0e} of f: is it "
                              f"computed in float32?" if tc.f0 and tc.sigma > 1e-10 * abs(tc.f0)
                              else ""))
        if it.status == "discontinuity" and allow_disc:
            it.status = "kink"
    ok = [it for it in items if it.status == "ok"]
    bad = [it for it in items if it.status in ("fail", "discontinuity", "unresolved")]
    kinks = sum(it.status == "kink" for it in items)
    chk = Check("", passed=bool(ok) and not bad, mode=mode, n_checked=len(ok) + len(bad),
                kinks=kinks, n_failed=len(bad),
                n_unresolved=sum(it.status == "unresolved" for it in bad), evaluations=tc.evals)
    compared = ok + bad
    if compared:
        err = np.array([abs(it.a - it.n) / abs(it.unit) for it in compared])
        big = np.array([max(abs(it.a), abs(it.n)) / abs(it.unit) for it in compared])
        chk.max_abs_error = float(np.max(err))
        chk.max_rel_error = float(np.max(err)) / float(np.max(big)) if np.max(big) > 0 else \
            (math.inf if np.max(err) > 0 else 0.0)
        ok_res = [r for r in res if r <= tc.resolve]
        chk.resolution = float(max(ok_res)) if ok_res else math.nan
    pool = [it for it in bad if it.index is not None] or bad or ok
    if pool:
        def badness(it):   # a failure: its error; a pass: its error against its tolerance
            if not (math.isfinite(it.n) and math.isfinite(it.a)):
                return math.inf
            if it in bad:
                return abs(it.a - it.n) / abs(it.unit)
            tol = tc.atol + tc.rtol * max(abs(it.a), abs(it.n)) + 3 * it.err
            return abs(it.a - it.n) / tol if tol > 0 else math.inf
        w = max(pool, key=badness)
        chk.analytic, chk.numeric = w.a / w.unit, w.n / w.unit
        chk.step = w.step
        if w.index is not None:
            chk.worst_index = tuple(int(k) for k in np.unravel_index(w.index, T.shape))
        if w in bad and w.note:
            notes.append(w.note)
    if not compared:
        notes.append(f"no evidence: all {kinks} compared items sit on kinks" if kinks else
                     "no evidence: nothing could be compared")
    if len(bad) >= 2:
        stopped = "located" in mode and len(bad) >= tc.locate_max
        unres = sum(it.status == "unresolved" for it in bad)
        what = "wrong items" if not unres else \
            ("unresolved items" if unres == len(bad) else f"failed items ({unres} unresolved)")
        notes.append(f"{'at least ' if stopped else ''}{len(bad)} {what}"
                     + (f" (bisection stops once locate_max={tc.locate_max} are found)"
                        if stopped else ""))
    chk.note = "; ".join(notes)
    return chk
