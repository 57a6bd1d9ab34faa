"""Finite-difference gradient checking that never says PASSED without evidence.

    from minivae.gradcheck import check_gradients, assert_gradients, check_layer
    report = check_gradients(f, {"W": W}, {"W": dW})   # f() -> scalar from the current W
    print(report)          # one row per tensor: worst element, analytic vs numeric there, ...
    assert report.passed   # or assert_gradients(...) in a test: raises with the table

What a verdict rests on (details in :mod:`minivae.gradcheck.core`):

- f is called three times first: a non-deterministic, non-scalar or non-finite f is refused
  with an error that says how to fix it (for a VAE: pass eps).
- Each tensor is perturbed in the memory f reads (views, transposes, Fortran order, 0-d);
  scalars, integer/bool/float16 tensors, read-only or overlapping arrays are refused by name.
- The numeric derivative is Ridders' extrapolation of central differences with relative,
  per-element steps and an error estimate that includes f's measured round-off noise
  (:mod:`minivae.gradcheck.numeric`); the pass rule is
  |a - n| <= atol + rtol * max(|a|, |n|) + 3 err(n), and an item whose error is too large to
  mean anything is a failure, not a pass.
- Kinks are excluded only where the analytic value is one of the one-sided slopes; a jump that
  does not shrink with the step is a discontinuity (a failure by default).
- A failing random direction is bisected to the wrong elements: "worst at" is always an
  element shown wrong.
- A tensor with no comparison that counted fails.

:func:`check_layer` checks a layer's forward/backward pair (one or several inputs and outputs)
plus two properties every backward must have; :func:`run_all` is the suite behind
``minivae gradcheck``; :func:`check_model` checks a whole model with eps fixed.
"""
import typing as _typing

from .._lazy import lazy_names as _lazy_names

__all__ = ["check_gradients", "assert_gradients", "check_layer", "check_backward_properties",
           "check_model", "run_all", "Check", "Report", "GradcheckError",
           "NondeterministicError", "default_rtol"]

# loaded on first use, not by ``import minivae.gradcheck`` (minivae/_lazy.py says why)
__getattr__, __dir__ = _lazy_names(__name__, {
    "assert_gradients": "core", "check_gradients": "core", "default_rtol": "core",
    "check_backward_properties": "layer", "check_layer": "layer",
    "GradcheckError": "numeric", "NondeterministicError": "numeric",
    "Check": "report", "Report": "report", "check_model": "suite", "run_all": "suite"})

if _typing.TYPE_CHECKING:
    from .core import assert_gradients, check_gradients, default_rtol
    from .layer import check_backward_properties, check_layer
    from .numeric import GradcheckError, NondeterministicError
    from .report import Check, Report
    from .suite import check_model, run_all
