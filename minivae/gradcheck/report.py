"""What a gradient check reports: one :class:`Check` per tensor (or per backward property),
gathered in a :class:`Report` whose ``str()`` is a table a person can read."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Check:
    """One row of a report: a tensor's gradient check, or a property check of a backward.

    name, passed      the tensor (or property) and the verdict
    mode              how it was checked: "exact", "sparse(k)", "directions(k)" (+ "->located")
    n_checked         comparisons that counted as evidence (kinks and unresolved items excluded);
                      a gradient check with n_checked == 0 never passes
    max_abs_error     max |a - n| over the comparisons (analytic a, numeric n)
    max_rel_error     max |a - n| / max(|a|, |n|) over the same comparisons (tensor scale)
    worst_index       the element shown wrong (or, when all pass, the one closest to failing);
                      None for a direction
    analytic, numeric the two values there (d f / d x at that element, or along the direction)
    step              the step h actually used there, in units of x
    resolution        the error the numeric side could resolve, relative to the tensor's
                      largest gradient: a passing float32 check says how closely it looked
    kinks             elements excluded because x sits on a kink and the analytic value is
                      one of the two one-sided slopes (plus allowed discontinuities)
    n_failed          wrong items found (with bisection: at least this many)
    n_unresolved      of those, the items failed only because f's noise left the numeric
                      side too coarse to judge them (no claim that the gradient is wrong:
                      check in float64, or pass atol)
    evaluations       calls of f spent on this row; seconds: its wall time
    """

    name: str
    passed: bool
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
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
    resolution: float = float("nan")
    n_failed: int = 0
    n_unresolved: int = 0
    evaluations: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["worst_index"] = list(self.worst_index) if self.worst_index is not None else None
        return d


@dataclass
class Report:
    """All checks of one run. ``passed`` iff there is at least one check and every check
    passed. ``str(report)`` is a table; ``report.to_dict()`` is JSON-ready."""

    name: str
    checks: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failed(self) -> list:
        return [c for c in self.checks if not c.passed]

    def __iadd__(self, other):
        self.checks += other.checks if isinstance(other, Report) else list(other)
        return self

    def __bool__(self):
        return self.passed

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "checks": [c.to_dict() for c in self.checks]}

    def table(self) -> str:
        head = ("check", "mode", "n", "max abs err", "max rel err", "resolved", "worst at",
                "analytic", "numeric", "step", "dtype", "result")
        rows = []
        for c in self.checks:
            status = "ok" if c.passed else "FAIL"
            if c.kinks:
                status += f" ({c.kinks} kink{'s' * (c.kinks > 1)} crossed)"
            if c.note:
                status += f"  {c.note}"
            idx = "" if c.worst_index is None else "[" + ",".join(map(str, c.worst_index)) + "]"
            rows.append((c.name, c.mode, str(c.n_checked), f"{c.max_abs_error:.2e}",
                         f"{c.max_rel_error:.2e}", _num(c.resolution, 0), idx, _num(c.analytic),
                         _num(c.numeric), _num(c.step, 1), c.dtype, status))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        line = lambda r: "  ".join(s.ljust(w) for s, w in zip(r, widths)).rstrip()  # noqa: E731
        if not self.checks:
            verdict = "FAILED (nothing was checked)"
        else:
            verdict = "PASSED" if self.passed else f"FAILED ({len(self.failed)} of {len(self.checks)} checks)"
            coarse = [(c.resolution, c.name) for c in self.checks
                      if c.passed and c.kind == "gradient" and c.resolution > 1e-6]
            if self.passed and coarse:   # NaN resolutions compare False and drop out
                r, who = max(coarse)
                verdict += f" (resolved only to {r:.0e} of the largest gradient in {who})"
        out = [f"{self.name}: {verdict}", line(head), line(["-" * w for w in widths])]
        return "\n".join(out + [line(r) for r in rows])

    __str__ = table


def _num(v, digits=6) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}e}"
