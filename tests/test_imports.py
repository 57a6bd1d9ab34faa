"""The package's import: concurrent first imports from threads, and what ``import minivae`` and
the program's module load before the program's signal handlers are in place."""
import os
import subprocess
import sys

import pytest

# two threads start importing at once (a barrier), in a fresh interpreter each time
RACE = r"""
import importlib, sys, threading
names = sys.argv[1:]
barrier = threading.Barrier(len(names))
errors = []
def load(name):
    barrier.wait()
    try:
        importlib.import_module(name)
    except BaseException as e:
        errors.append(f"{name}: {type(e).__name__}: {e}")
threads = [threading.Thread(target=load, args=(n,)) for n in names]
for t in threads:
    t.start()
for t in threads:
    t.join()
import minivae
assert minivae.VAE is importlib.import_module("minivae.models").VAE
assert minivae.train_step is importlib.import_module("minivae.engine").train_step
print("\n".join(errors) or "ok")
"""


def _python(code, *args) -> str:
    """Run ``code`` in a fresh interpreter -> what it printed (it must exit 0)."""
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env=dict(os.environ, OPENBLAS_NUM_THREADS="1", MINIVAE_NUM_THREADS="1"),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("names", [
    ("minivae.gradcheck", "minivae.engine"),          # ImportError 3 of 3 before the fix
    ("minivae.engine", "minivae.gradcheck"),
    ("minivae", "minivae.gradcheck"),
    ("minivae.train", "minivae.gradcheck.core"),
    ("minivae.cli", "minivae.engine", "minivae.gradcheck"),
])
def test_concurrent_first_imports_from_threads_all_succeed(names):
    """Python takes a submodule's import lock before it imports the package: a package
    ``__init__`` that imported its submodules then waited on another thread's lock while that
    thread waited on the package's, and both got "partially initialized module" ImportErrors."""
    for _ in range(2):
        assert _python(RACE, *names) == "ok"


def test_import_minivae_loads_no_submodule_and_the_program_module_no_numpy():
    """``import minivae`` is a few milliseconds (only the small minivae._lazy with it): the
    public names load on first use. The program's module (the console script's
    ``minivae.cli``) loads only the standard library, so that its signal handlers are in
    place before NumPy and the rest load (Ctrl-C there is one line, not a traceback)."""
    code = ("import sys, minivae; a = sorted(m for m in sys.modules if m.startswith('minivae.') "
            "or m == 'numpy'); import minivae.cli; "
            "b = sorted(m for m in sys.modules if m.startswith(('minivae.', 'numpy'))); "
            "print(a, b)")
    assert _python(code) == "['minivae._lazy'] ['minivae._lazy', 'minivae.cli']"


def test_the_public_names_are_the_submodules_objects():
    import minivae
    from minivae import engine, gradcheck, models, optim, params
    from minivae import backend as be

    assert set(minivae.__all__) <= set(dir(minivae))
    for name in minivae.__all__:
        value = getattr(minivae, name)
        where = {"gradcheck": gradcheck}.get(name)
        assert value is (where or getattr(
            next(m for m in (be, models, optim, params, engine) if hasattr(m, name)), name))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        minivae.nope


def test_a_submodule_is_an_attribute_of_its_package_as_before():
    """When the packages imported their submodules, ``import minivae; minivae.layers.Dense``
    worked; it still does, loading the submodule on first use."""
    code = ("import minivae, minivae.engine as e; import sys; "
            "assert not {'minivae.layers', 'minivae.engine.kernels'} & set(sys.modules); "
            "D, p, c = minivae.layers.Dense, e.kernels.parts, minivae.gradcheck.core; "
            "from minivae.layers import Dense; from minivae.engine.kernels import parts; "
            "assert D is Dense and p is parts; "
            "assert c.check_gradients is minivae.gradcheck.check_gradients; "
            "print('ok')")
    assert _python(code) == "ok"
    import minivae
    for name in ("nope", "__wrapped__", "_nope"):
        with pytest.raises(AttributeError, match=f"no attribute '{name}'"):
            getattr(minivae, name)


def test_the_engine_loads_again_after_an_import_stopped_half_way():
    """Ctrl-C while the engine first loads (its twins register themselves as they are
    imported) left the registry holding a half-imported module's twins: the next import
    said 'Dense.backward already has a twin on numpy' for the rest of the session. A twin
    registered again by the same function replaces itself; another function is refused."""
    code = ("import sys, importlib\n"
            "from minivae.engine import registry, REGISTRY\n"
            "n = len(REGISTRY)\n"
            "del sys.modules['minivae.engine.numpy_twins']   # as after a KeyboardInterrupt\n"
            "nt = importlib.import_module('minivae.engine.numpy_twins')\n"
            "assert len(REGISTRY) == n == len({(t.reference, t.backends) for t in REGISTRY})\n"
            "assert {b for t in REGISTRY for b in t.backends} == {'numpy', 'cupy'}\n"
            "assert all(any(t.reference is ref and t.fast is fast and b in t.backends\n"
            "               for t in REGISTRY)          # every table entry is in REGISTRY\n"
            "           for b, table in registry._BY_BACKEND.items()\n"
            "           for ref, fast in table.items())\n"
            "from minivae.layers import Dense\n"
            "assert registry.pick(Dense.backward, nt.NP) is nt.dense_backward\n"
            "try:\n"
            "    registry.twin_of(Dense.backward, exact=True, case=list)(lambda *a: None)\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    assert _python(code) == "minivae.layers.Dense.backward already has a twin on numpy"


def test_dir_lists_the_public_names_and_submodules():
    import minivae
    import minivae.engine

    names = dir(minivae)
    assert set(minivae.__all__) <= set(names)
    assert {"layers", "engine", "gradcheck", "train", "cli"} <= set(names)
    assert {"kernels", "plan", "registry"} <= set(dir(minivae.engine))
    assert not {"TYPE_CHECKING", "annotations", "lazy_names"} & set(names)
