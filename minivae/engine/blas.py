"""Two things NumPy does not expose from its own BLAS, reached through ctypes.

1. ``set_threads(n) -> previous``: the BLAS thread count, cheaply and reversibly, through
   OpenBLAS's ``openblas_set_num_threads_local`` (OpenBLAS >= 0.3.27). Despite its name, in
   the pthreads builds NumPy ships it sets the count for the whole process (measured: a
   worker thread's call changes the main thread's products), and it returns the previous
   count without resizing the thread pool. minivae sets one BLAS thread only while its
   data-parallel step runs and restores the count after (:mod:`minivae.engine.threads`).
2. ``axpby(a, x, b, y)``: y <- a x + b y in one pass over memory. In NumPy the same update is
   two or three passes (``y *= b; np.multiply(x, a, out=tmp); y += tmp``), and the optimizers'
   updates are memory-bound, so passes are what they cost (minivae.optim).

Both fall back to plain NumPy (or to doing nothing, for the thread count) when NumPy's BLAS is
not an OpenBLAS that has them; results then differ only by the rounding of a fused
multiply-add. Only NumPy's own BLAS is used: the one already loaded in this process.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import os

import numpy as np

_lib = None        # ctypes.CDLL of NumPy's OpenBLAS, or False when there is none
_fns: dict = {}    # resolved functions, by name


def _library():
    global _lib
    if _lib is None:
        _lib = False
        paths = []
        try:
            with open("/proc/self/maps") as f:   # the library this process actually loaded
                paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower()})
        except OSError:
            pass
        libs_dir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
        paths += sorted(glob.glob(os.path.join(libs_dir, "*openblas*")))
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            if hasattr(lib, "openblas_set_num_threads_local"):
                _lib = lib
                break
    return _lib


def _symbol(lib, base: str):
    """OpenBLAS's own function ``base`` (e.g. get_num_threads) under the names builds give it:
    scipy_openblas_<base>64_ (NumPy's ILP64 wheels), scipy_openblas_<base>, openblas_<base>."""
    for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "")):
        fn = getattr(lib, f"{prefix}_{base}{suffix}", None)
        if fn is not None:
            return fn
    return None


def _int_type(lib):
    """The BLAS integer: int64 for an ILP64 build (NumPy's wheels: scipy_openblas64)."""
    fn = _symbol(lib, "get_config")
    if fn is not None:
        fn.restype = ctypes.c_char_p
        if b"USE64BITINT" in fn():
            return ctypes.c_int64
    return ctypes.c_int32


def _function(name: str):
    """cblas_<name> (e.g. saxpby) with argtypes set, or None."""
    if name not in _fns:
        _fns[name] = None
        lib = _library()
        if lib:
            n = _int_type(lib)
            real = ctypes.c_float if name[0] == "s" else ctypes.c_double
            for sym in (f"scipy_cblas_{name}64_", f"cblas_{name}64_", f"scipy_cblas_{name}",
                        f"cblas_{name}"):
                fn = getattr(lib, sym, None)
                if fn is not None:
                    if name.endswith("axpby"):   # (n, a, x, incx, b, y, incy)
                        fn.argtypes = [n, real, ctypes.c_void_p, n, real, ctypes.c_void_p, n]
                    fn.restype = None
                    _fns[name] = fn
                    break
    return _fns[name]


def gemm_addresses():
    """(address of cblas_sgemm, of cblas_dgemm, whether their integers are 64-bit) in the
    OpenBLAS NumPy's matmul calls, for the compiled step plan (engine/plan.py); None where
    NumPy's BLAS is not an OpenBLAS found here."""
    sg, dg = _function("sgemm"), _function("dgemm")
    if sg is None or dg is None:
        return None
    return (ctypes.cast(sg, ctypes.c_void_p).value, ctypes.cast(dg, ctypes.c_void_p).value,
            _int_type(_library()) is ctypes.c_int64)


# -- threads -------------------------------------------------------------------------------------
def pinnable() -> bool:
    """Whether minivae can set the BLAS thread count (NumPy's BLAS is a recent OpenBLAS)."""
    return bool(_library())


def set_threads(n: int) -> int:
    """BLAS threads for the process's matrix products from now on; -> the previous count."""
    fn = _fns.get("set_threads")
    if fn is None:                      # set up once: this runs twice a training step
        fn = _library().openblas_set_num_threads_local
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        _fns["set_threads"] = fn
    return fn(int(n))


# -- the team as OpenBLAS's threads -------------------------------------------------------------
_team_backend = None    # None: not tried yet; True: minivae's team runs OpenBLAS's jobs; False


def _callback_setter() -> int | None:
    """The address of OpenBLAS's openblas_set_threads_callback_function, or None."""
    lib = _library()
    setter = _symbol(lib, "set_threads_callback_function") if lib else None
    return None if setter is None else ctypes.cast(setter, ctypes.c_void_p).value


def team_backend() -> bool:
    """Hand OpenBLAS's parallel jobs to the compiled kernels' thread team, once per process
    (OpenBLAS >= 0.3.27: openblas_set_threads_callback_function). -> whether it does.

    Why: OpenBLAS's own workers busy-wait (sched_yield) ~0.1 s after every product, on the
    cores where a second thread for the step's elementwise work (Adam) would run; two pools
    then fight for the cores (measured: Adam on two threads took 0.46 ms after a product, not
    0.20). With one pool for both, Adam's second half runs on the worker that just finished
    its part of the product. The products are OpenBLAS's own jobs over the same ranges, so
    the results do not change. Off with MINIVAE_BLAS_TEAM=0 (and without the kernels)."""
    global _team_backend
    if _team_backend is None:
        from . import kernels
        wanted = team_wanted()      # a bad setting raises here, and nothing is decided yet
        setter = _callback_setter()
        if wanted and setter is not None and kernels.enabled():
            kernels.spin_from_env()
            _team_backend = bool(kernels._c.team_blas(setter, True))
        else:
            _team_backend = False
    return _team_backend


def team_wanted() -> bool:
    """$MINIVAE_BLAS_TEAM: 1/true/yes/on (the default) or 0/false/no/off; ValueError for
    anything else, so that a typo cannot silently pick the other way."""
    value = os.environ.get("MINIVAE_BLAS_TEAM", "").strip().lower() or "1"   # empty: unset,
                                                   # as for the other MINIVAE_ variables
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"MINIVAE_BLAS_TEAM must be 1 or 0 (true/false, yes/no, on/off), got "
                     f"{os.environ['MINIVAE_BLAS_TEAM']!r}")


@contextlib.contextmanager
def openblas_pool():
    """OpenBLAS's own thread pool inside the block, whatever :func:`team_backend` set (for
    benchmarks and tests that compare the two); the team is handed the jobs again after."""
    global _team_backend
    was = _team_backend
    if was:                         # True only where the setter was found
        from . import kernels
        kernels._c.team_blas(_callback_setter(), False)
    _team_backend = False
    try:
        yield
    finally:
        _team_backend = None if was else was
        if was:
            team_backend()


# -- y <- a x + b y ------------------------------------------------------------------------------
_PREFIX = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}


def axpby(a: float, x: np.ndarray, b: float, y: np.ndarray, tmp: np.ndarray | None = None) -> None:
    """y <- a x + b y, in place. x, y: (n,) NumPy arrays of one float dtype.

    One BLAS pass when x and y are contiguous float32/float64; otherwise NumPy (``tmp``, (n,),
    is used as scratch if given)."""
    fn = None
    if x.dtype == y.dtype and x.shape == y.shape and x.ndim == 1:
        if x.flags.c_contiguous and y.flags.c_contiguous and x.dtype in _PREFIX:
            fn = _function(_PREFIX[x.dtype] + "axpby")
    if fn is not None:
        fn(x.shape[0], a, x.ctypes.data, 1, b, y.ctypes.data, 1)
        return
    if b != 1.0:
        y *= b
    if tmp is None:
        y += a * x
    else:
        np.multiply(x, a, out=tmp)
        y += tmp


def describe() -> dict:
    """OpenBLAS's current thread count and the kernel core it picked ({} without OpenBLAS)."""
    lib = _library()
    if not lib:
        return {}
    info = {}
    getn, core = _symbol(lib, "get_num_threads"), _symbol(lib, "get_corename")
    if getn is not None:
        info["threads"] = int(getn())
    if core is not None:
        core.restype = ctypes.c_char_p
        info["core"] = core().decode()
    return info


def available() -> dict:
    """What was found, for ``minivae info`` and the benchmarks."""
    return {"set_threads": pinnable(), "threads_callback": _callback_setter() is not None,
            "saxpby": _function("saxpby") is not None, "daxpby": _function("daxpby") is not None}
