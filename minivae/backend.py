"""Which array library the maths runs on, and where its random numbers come from.

A :class:`Backend` bundles

- ``xp``: an array-API namespace (``array_api_compat.numpy``, ``array_api_compat.cupy``
  or ``array_api_strict``). Layer code is written against it and nothing else.
- a seeded :class:`RNG` that draws standard normals / uniforms *on that backend*.
- host <-> device helpers (:meth:`Backend.asarray`, :meth:`Backend.to_host`).

Names:

``"numpy"``   CPU through NumPy.
``"cupy"``    NVIDIA GPU through CuPy. Raises :class:`BackendUnavailable` saying whether CuPy
              is missing or CuPy is present but no CUDA device/driver works.
``"strict"``  CPU through ``array_api_strict``: any NumPy call or non-standard function leaks
              out as an error, which proves the layer code is portable (test backend).
``"auto"``    ``"cupy"`` when a GPU works, else ``"numpy"``.
"""
from __future__ import annotations

import functools
import importlib
import json
import math
import types

import numpy as np

NAMES = ("numpy", "cupy", "strict", "auto")


class _ModuleName:
    """A module in a pickled state: by name, imported again when unpickled (no __slots__:
    pickle's protocols 0 and 1 cannot take a class with slots and no __getstate__)."""

    def __init__(self, name):
        self.name = name


class Picklable:
    """``pickle`` and ``copy.deepcopy`` for objects that hold their array namespace (a
    module, which cannot be pickled) in an attribute (``self.xp``): the module goes by its
    name and is imported again (``array_api_compat.numpy`` and the like). A copy then holds
    the same namespace and everything else copied."""

    def __getstate__(self):
        return {k: _ModuleName(v.__name__) if isinstance(v, types.ModuleType) else v
                for k, v in self.__dict__.items()}

    def __setstate__(self, state):
        self.__dict__.update({k: importlib.import_module(v.name) if isinstance(v, _ModuleName)
                              else v for k, v in state.items()})


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine (the message says why)."""


class RNG:
    """A seeded generator of random arrays on one backend.

    NumPy and strict draw with NumPy's PCG64 (strict then wraps the host array, so the two
    backends see identical noise for the same seed); CuPy draws on the device.
    """

    def __init__(self, backend: "Backend", seed: int | None = 0):
        self.backend = backend
        self.seed = seed
        if backend.name == "cupy":
            import cupy

            self._gen = cupy.random.default_rng(seed)
        else:
            self._gen = np.random.default_rng(seed)

    def normal(self, shape, dtype=None):
        """Standard normal draws, ``shape`` -> array of ``dtype`` (default float32) on the backend."""
        dtype = self.backend.dtype(dtype or "float32")
        if self.backend.name == "cupy":
            return self._gen.standard_normal(shape, dtype=dtype)
        out = self._gen.standard_normal(shape, dtype=_np_dtype(dtype))
        return self.backend.asarray(out)

    def uniform(self, shape, dtype=None):
        """Uniform draws in [0, 1)."""
        dtype = self.backend.dtype(dtype or "float32")
        if self.backend.name == "cupy":
            return self._gen.random(shape, dtype=dtype)
        return self.backend.asarray(self._gen.random(shape, dtype=_np_dtype(dtype)))

    def permutation(self, n: int) -> np.ndarray:
        """A random permutation of range(n) as a *host* int64 array (used to index host data)."""
        if self.backend.name == "cupy":
            return self._gen.permutation(n).get()
        return self._gen.permutation(n)

    def snapshot(self):
        """The generator's state, for :meth:`rewind` (None on CuPy, whose state stays on the
        device: a refused step there is not rewound)."""
        return None if self.backend.name == "cupy" else self._gen.bit_generator.state

    def rewind(self, snap) -> None:
        """Back to a :meth:`snapshot`, as if nothing had been drawn since (None: nothing)."""
        if snap is not None:
            self._gen.bit_generator.state = snap

    # -- checkpointing -------------------------------------------------------------------
    def get_state(self) -> dict:
        """A JSON-able description of the generator state (for checkpoints)."""
        if self.backend.name == "cupy":
            # CuPy keeps its generator state on the device with no portable form; a resumed
            # run continues from the seed: a different, equally valid noise stream.
            return {"kind": "cupy", "seed": self.seed}
        return {"kind": "numpy", "state": jsonable(self._gen.bit_generator.state)}

    def set_state(self, state: dict) -> bool:
        """Restore :meth:`get_state`'s output. Returns True if the exact stream was restored,
        False if it could not be (CuPy, or a state from the other RNG family)."""
        if state.get("kind") == "numpy" and self.backend.name != "cupy":
            self._gen.bit_generator.state = state["state"]
            return True
        return False


def pcg64_state_ok(st) -> bool:
    """Whether ``st`` is a NumPy PCG64 bit generator's state as ``bit_generator.state`` gives
    it: whole numbers of 128 bits and below (a float, a negative or a 200-bit number is damage,
    which NumPy would take, or refuse with an OverflowError)."""
    def u(v, bits):
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** bits
    inner = st.get("state") if isinstance(st, dict) else None
    return (isinstance(st, dict) and st.get("bit_generator") == "PCG64"
            and isinstance(inner, dict) and u(inner.get("state"), 128) and u(inner.get("inc"), 128)
            and st.get("has_uint32") in (0, 1) and u(st.get("uinteger"), 32))


def rng_state_ok(state) -> bool:
    """Whether ``state`` is what :meth:`RNG.get_state` writes: a NumPy PCG64 state, or a CuPy
    generator's seed (None or a whole number)."""
    if not isinstance(state, dict):
        return False
    if state.get("kind") == "numpy":
        return pcg64_state_ok(state.get("state"))
    seed = state.get("seed")
    return state.get("kind") == "cupy" and (seed is None or (isinstance(seed, int)
                                                            and not isinstance(seed, bool)))


def jsonable(obj):
    """Dicts of NumPy integers and arrays (a bit generator's state) -> plain JSON types."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def strict_json(obj, **kw) -> str:
    """json.dumps that never writes NaN/Infinity (not JSON): a non-finite float becomes null."""
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o
    return json.dumps(clean(obj), allow_nan=False, **kw)


def real_values(backend, values, dtype, what: str, nonnegative: str | None = None):
    """``values`` (a host or backend array, or a sequence of numbers) as a backend array of
    ``dtype``, checked: ValueError naming ``what`` for values that are not real numbers
    (complex, strings, objects), NaN/Inf, numbers ``dtype`` cannot hold (1e300 in float32),
    and, given ``nonnegative`` (the reason, said in the message), numbers below 0. The reference modules (params, optim) check
    what they load through this, so that they import no NumPy themselves."""
    kind = getattr(values, "dtype", None)
    if kind is None:                     # a list or another sequence: NumPy says what it is
        kind = np.asarray(values).dtype
    name = str(kind)                     # NumPy, CuPy and array-api-strict dtypes alike
    if "complex" in name or not any(t in name for t in ("float", "int", "bool")):
        raise ValueError(f"{what} must hold real numbers, got dtype {name}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = backend.asarray(values, dtype=dtype)
    xp = backend.xp
    if not bool(xp.all(xp.isfinite(out))):
        finite = bool(xp.all(xp.isfinite(backend.asarray(values))))
        raise ValueError(f"{what} holds numbers too large for {dtype_name(dtype)}" if finite
                         else f"{what} holds NaN or Inf")
    if nonnegative and bool(xp.any(out < 0)):
        raise ValueError(f"{what} holds negative numbers; {nonnegative}")
    return out


def all_finite(xp, a) -> bool:
    """Whether the 1-D array ``a`` holds no NaN or Inf: one min and one max (NaN propagates
    through both, an infinity is one of them), no temporaries."""
    return not a.shape[0] or (bool(xp.isfinite(xp.min(a))) and bool(xp.isfinite(xp.max(a))))


def dtype_name(d) -> str:
    """"float32" for np.float32, dtype('float32') or array_api_strict.float32."""
    return str(getattr(d, "__name__", d)).rsplit(".", 1)[-1]


def _np_dtype(dtype):
    """NumPy dtype of a backend dtype (array_api_strict dtypes wrap one in ``_np_dtype``)."""
    return np.dtype(getattr(dtype, "_np_dtype", dtype))


class Backend:
    """An array namespace plus RNG factory and transfer helpers. Obtain with :func:`get_backend`."""

    def __init__(self, name: str, xp):
        self.name = name
        self.xp = xp

    def __repr__(self):
        return f"Backend({self.name!r})"

    def __reduce__(self):
        # pickled and copied by name: one Backend object per name in a process
        return get_backend, (self.name,)

    def dtype(self, d):
        """Map a name ("float32", "float64") or dtype to this backend's dtype object."""
        if isinstance(d, str):
            if d not in ("float32", "float64"):
                raise ValueError(f"dtype must be float32 or float64, got {d!r}")
            return getattr(self.xp, d)
        name = str(getattr(d, "name", d))
        for cand in ("float32", "float64"):
            if cand in name:
                return getattr(self.xp, cand)
        raise ValueError(f"dtype must be float32 or float64, got {d!r}")

    def rng(self, seed: int | None = 0) -> RNG:
        return RNG(self, seed)

    def asarray(self, a, dtype=None):
        """Host (NumPy) or backend array -> backend array (copies across host/device)."""
        if dtype is not None:
            dtype = self.dtype(dtype)
        if self.name == "cupy":
            import cupy

            return cupy.asarray(a, dtype=dtype)
        if self.name == "strict":
            if isinstance(a, np.ndarray) or np.isscalar(a):
                a = np.asarray(a)
                return self.xp.asarray(a, dtype=dtype if dtype is not None else None)
            return self.xp.asarray(a, dtype=dtype)
        return np.asarray(a, dtype=dtype)

    def to_host(self, a) -> np.ndarray:
        """Backend array -> NumPy array on the host (one transfer; syncs a GPU)."""
        if self.name == "cupy":
            return a.get()
        if self.name == "strict":
            return np.asarray(a._array) if hasattr(a, "_array") else np.asarray(a)
        return np.asarray(a)

    def is_array(self, a) -> bool:
        if self.name == "numpy":   # np.matrix (* and indexing differ) and masked arrays (the
            return (isinstance(a, np.ndarray)          # mask would be silently dropped)
                    and not isinstance(a, (np.matrix, np.ma.MaskedArray)))
        if self.name == "strict":
            return isinstance(a, self.xp.Array) if hasattr(self.xp, "Array") else hasattr(a, "_array")
        import cupy

        return isinstance(a, cupy.ndarray)

    def memory_bytes(self) -> int | None:
        """Total memory arrays can live in: the device's on a GPU, else the machine's RAM
        (None where it cannot be read)."""
        try:
            if self.name == "cupy":
                import cupy

                return int(cupy.cuda.Device().mem_info[1])
            import os

            return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError, ImportError):
            return None

    def host_memory(self, a):
        """The NumPy array whose memory holds ``a`` (writing into it writes into ``a``), or
        None where ``a`` lives on a device."""
        if self.name == "cupy":
            return None
        if self.name == "strict":
            return a._array
        return a

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on CPU). For timing only."""
        if self.name == "cupy":
            import cupy

            cupy.cuda.get_current_stream().synchronize()


def _cupy_backend() -> Backend:
    try:
        import cupy
    except ImportError as e:
        raise BackendUnavailable(
            "backend 'cupy' needs CuPy, which is not installed: pip install 'minivae[gpu]' "
            "(CUDA 12) or pip install cupy-cuda13x (CUDA 13)"
        ) from e
    except Exception as e:  # a broken CuPy install (missing CUDA libraries) raises other errors
        raise BackendUnavailable(f"backend 'cupy': CuPy is installed but failed to import: {e}") from e
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            raise RuntimeError("no CUDA device found")
        float((cupy.ones(2) * 2).sum())  # touches driver, context and a kernel launch
    except Exception as e:
        raise BackendUnavailable(
            f"backend 'cupy': CuPy is installed but no CUDA device/driver is usable ({e})"
        ) from e
    import array_api_compat.cupy as xp

    return Backend("cupy", xp)


def get_backend(name: str = "numpy") -> Backend:
    """Return the backend called ``name`` (one of :data:`NAMES`). Looked up once and cached.
    Raises ValueError for another name, :class:`BackendUnavailable` where it cannot run."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    return _get_backend(name)


@functools.lru_cache(maxsize=None)
def _get_backend(name: str) -> Backend:
    if name == "numpy":
        import array_api_compat.numpy as xp

        return Backend("numpy", xp)
    if name == "strict":
        try:
            import array_api_strict as xp
        except ImportError as e:
            raise BackendUnavailable(
                "backend 'strict' needs array-api-strict: pip install 'minivae[test]'"
            ) from e
        return Backend("strict", xp)
    if name == "cupy":
        return _cupy_backend()
    try:  # auto
        return _cupy_backend()
    except BackendUnavailable:
        return _get_backend("numpy")


def backend_of(a) -> Backend | None:
    """The backend whose array ``a`` is (without importing one that is not loaded), or None."""
    if isinstance(a, np.ndarray):
        return get_backend("numpy")
    mod = type(a).__module__
    if mod.startswith("array_api_strict") and hasattr(a, "_array"):
        return get_backend("strict")
    if mod.startswith("cupy"):
        return get_backend("cupy")
    return None


def resolve(backend) -> Backend:
    """Accept a Backend or a name."""
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str):
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(NAMES)}")
    return get_backend(backend)


def available() -> dict[str, str]:
    """Which backends work here: name -> "ok" or the reason it does not."""
    out = {}
    for n in ("numpy", "strict", "cupy"):
        try:
            get_backend(n)
            out[n] = "ok"
        except BackendUnavailable as e:
            out[n] = str(e)
    return out
