"""A package's public names, imported on first use (PEP 562) rather than by its ``__init__``.

minivae's packages (``minivae``, ``minivae.engine``, ``minivae.gradcheck``) import none of
their submodules when they are imported; ``minivae.VAE``, ``minivae.engine.DataParallel`` or
``minivae.gradcheck.check_gradients`` load theirs the first time they are asked for. Why:

- **Threads importing at once.** Python takes a submodule's import lock before it imports the
  submodule's package. A package whose ``__init__`` imports its submodules therefore waits on
  another thread that holds a submodule's lock while that thread waits on the package: two
  threads importing ``minivae.engine`` and ``minivae.gradcheck`` (or ``minivae.gradcheck`` and
  ``minivae.gradcheck.core``) for the first time at once got "partially initialized module"
  ImportErrors or a ``_DeadlockError``. With no package importing its submodules (but this
  one), the imports form a graph without cycles, and per-module locks cannot deadlock on one
  (``tests/test_imports.py``). Left: a thread importing this private module itself while
  another imports ``minivae`` can still deadlock (the package imports it, and it needs the
  package), and CPython's own race (``_load_unlocked`` takes a package out of ``sys.modules``
  and puts it back when it is loaded: a thread looking the package up for a submodule just
  then gets KeyError; about 1 in 1,000 first imports from two threads at once, with a 10 us
  switch interval, in a helper's runs on Python 3.11-3.13).
- **The program's start.** ``minivae``, the program, installs its signal handlers in
  ``cli.main``, which runs after its module's import: that import took ``import minivae`` with
  it, NumPy and every submodule (0.25-0.3 s in which Ctrl-C printed a traceback). It is now
  the standard library only.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys


def lazy_names(package: str, where: dict, before=None):
    """-> (``__getattr__``, ``__dir__``) for the package named ``package``: a name in
    ``where`` is imported from the submodule ``where[name]`` (the submodule itself where the
    two are the same) on first use and then kept in the package, and so is a submodule asked
    for by its name (``minivae.layers``); any other name raises AttributeError. ``before()``,
    if given, is called before a name in ``where`` is imported (the engine loads its fast
    paths, which register themselves)."""

    def __getattr__(name: str):
        sub = where.get(name)
        if sub is None:
            # any submodule, as when the package imported them all (``minivae.layers``); also
            # what ``from . import kernels`` inside the package asks first
            if name.startswith("__") or importlib.util.find_spec(f"{package}.{name}") is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            sub = name
        elif before is not None:
            before()
        module = importlib.import_module(f"{package}.{sub}")
        value = module if name == sub else getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        mod = sys.modules[package]
        subs = {m.name for m in pkgutil.iter_modules(mod.__path__) if not m.name.startswith("_")}
        return sorted(set(vars(mod)) | set(where) | subs)

    return __getattr__, __dir__
