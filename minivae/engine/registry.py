"""The registry of fast paths: each engine function is registered against the reference
function it replaces, and one dispatch per backend picks the implementation.

    @twin_of(losses.bernoulli_nll, exact=True, case=...)
    def bernoulli_nll(xp, logits, x): ...           # the NumPy twin

    impl = pick(losses.bernoulli_nll, backend)      # the twin on NumPy, the reference elsewhere

A twin is registered with

- ``reference``: the function (or unbound method) of the reference layer it stands for;
- ``backends``: where it may run (NumPy arrays only, for every twin so far);
- ``exact``: True where it promises the reference's bits, False where it promises float64
  round-off (a different order of operations, a fused multiply-add);
- ``case(impl, backend, rng) -> list of host arrays``: runs ``impl`` (the twin or the
  reference) on inputs drawn from ``rng`` and returns what must agree. A twin whose signature
  differs from its reference's (one that writes into given buffers) has a case that calls
  each in its own way (``impl is twin.reference`` tells them apart).

``tests/test_engine.py`` walks :data:`REGISTRY` and checks every twin against its reference
run on "numpy" and on "strict" (array-api-strict). The twins register themselves when their
modules are imported (:func:`load_twins`: ``pick`` and ``minivae.engine``'s public names load
them first); this module alone holds none of them until then. Registering a fast path without a case is
not possible: that is what keeps the two rooms tied together.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Twin:
    reference: Callable
    fast: Callable
    backends: tuple
    exact: bool
    case: Callable
    name: str

    def __repr__(self):
        return f"Twin({self.name})"


REGISTRY: list[Twin] = []
_BY_BACKEND: dict = {}   # backend name -> {reference: fast}

#: the modules whose twins register themselves here when imported
TWIN_MODULES = ("numpy_twins", "optim", "cupy_twins")
_loaded = [False]


def load_twins() -> None:
    """Import the modules in :data:`TWIN_MODULES` (once), so that every twin is registered.
    ``pick``, ``has_twins`` and ``twins`` call it: they answer with every twin, whichever
    engine module was imported first (the package imports none of them: minivae/_lazy.py)."""
    if not _loaded[0]:
        for name in TWIN_MODULES:
            importlib.import_module(f"{__package__}.{name}")
        _loaded[0] = True


def _name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def twin_of(reference: Callable, *, exact: bool, case: Callable, backends=("numpy",)):
    """Decorator: register the decorated function as the fast twin of ``reference``."""
    if not callable(case):
        raise TypeError("a twin needs a case: a function that runs it and its reference")

    def register(fast):
        t = Twin(reference, fast, tuple(backends), bool(exact), case, _name(reference))
        for b in t.backends:
            old = _BY_BACKEND.get(b, {}).get(reference)
            # the same function registered again is its module imported again, after an
            # import stopped half-way (Ctrl-C as the engine first loads): it replaces itself
            if old is not None and _name(old) != _name(fast):
                raise ValueError(f"{t.name} already has a twin on {b}")
        REGISTRY[:] = [r for r in REGISTRY          # (a twin on another backend stays)
                       if not (r.reference is reference and _name(r.fast) == _name(fast))] + [t]
        for b in t.backends:
            _BY_BACKEND.setdefault(b, {})[reference] = fast
        return fast

    return register


def pick(reference: Callable, backend) -> Callable:
    """The implementation of ``reference`` to run on ``backend``: its registered twin there,
    else the reference itself. (The one place that looks at which backend is in use.)"""
    if not _loaded[0]:
        load_twins()
    return _BY_BACKEND.get(backend.name, {}).get(reference, reference)


def has_twins(backend) -> bool:
    """Whether the engine has fast paths for ``backend``."""
    load_twins()
    return bool(_BY_BACKEND.get(backend.name))


#: backends whose twins run on this machine's cores, where the thread team and the one-BLAS-
#: thread pinning apply (a GPU backend's twins are device kernels: one host thread drives them)
HOST_THREADED = ("numpy",)


def threaded(backend) -> bool:
    """Whether a step on ``backend`` is split over the engine's host threads."""
    return backend.name in HOST_THREADED and has_twins(backend)


def twins(backend_name: str = "numpy") -> dict:
    """{reference: fast} registered for a backend."""
    load_twins()
    return dict(_BY_BACKEND.get(backend_name, {}))
