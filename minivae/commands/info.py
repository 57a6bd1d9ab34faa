"""Versions, the BLAS NumPy uses, which backends work here, and the GPU if there is one.

  minivae info
  minivae info --json
"""
from __future__ import annotations

from ..backend import strict_json

HELP = "versions, BLAS configuration, usable backends and GPU"


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _blas() -> str:
    """The BLAS/LAPACK NumPy was built against, and its thread count when threadpoolctl is here."""
    import io
    import contextlib

    import numpy as np

    lines = []
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg.get("Build Dependencies", {}).get("blas", {})
        lines.append(f"{b.get('name', '?')} {b.get('version', '')}".strip())
    except TypeError:  # NumPy < 1.26 prints only
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            np.show_config()
        lines.append(" ".join(buf.getvalue().split())[:200])
    try:
        from threadpoolctl import threadpool_info

        for t in threadpool_info():
            if t.get("user_api") == "blas":
                lines.append(f"{t.get('internal_api')} {t.get('version')}, {t.get('num_threads')} threads")
    except ImportError:
        pass
    return "; ".join(lines)


def info() -> dict:
    import os
    import platform
    import sys

    import numpy as np

    from .. import __version__
    from ..backend import available

    versions = {"minivae": __version__, "python": sys.version.split()[0], "numpy": np.__version__}
    for mod in ("array_api_compat", "array_api_strict", "matplotlib", "tqdm", "cupy", "torch", "jax"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # absent or broken: say so, never fail
            versions[mod] = None
    gpu = None
    backends = available()
    if backends.get("cupy") == "ok":
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        gpu = {"name": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
               "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
               "count": cupy.cuda.runtime.getDeviceCount()}
    from ..engine import blas, kernels, threads as parallel

    threads = {"minivae": parallel.get_num_threads(), "usable_cores": parallel.usable_cores(),
               **{f"blas_{k}": v for k, v in blas.available().items()}}
    return {"versions": versions, "platform": platform.platform(), "cpus": os.cpu_count(),
            "blas": _blas(), "threads": threads, "kernels": kernels.describe(),
            "backends": backends, "gpu": gpu}


def run(args) -> int:
    import json

    d = info()
    if args.json:
        print(strict_json(d, indent=1))
        return 0
    print("versions:  " + ", ".join(f"{k} {v}" for k, v in d["versions"].items() if v))
    missing = [k for k, v in d["versions"].items() if not v]
    if missing:
        print("absent:    " + ", ".join(missing))
    print(f"platform:  {d['platform']}, {d['cpus']} CPUs")
    print(f"BLAS:      {d['blas']}")
    from ..engine import threads as parallel

    t = d["threads"]
    how = (f"the batch split over them from {parallel.MIN_ROWS} rows a thread, one BLAS thread "
           "each; smaller batches on BLAS threads" + (
               ", run with the compiled kernels on minivae's thread team"
               if t["blas_threads_callback"] else "") if t["blas_set_threads"] else
           "one thread: NumPy's BLAS is not an OpenBLAS >= 0.3.27, so minivae cannot split")
    print(f"threads:   {t['minivae']} of {t['usable_cores']} usable cores ({how}); "
          f"fused axpby: {'yes' if t['blas_saxpby'] else 'no (NumPy fallback)'}")
    print(f"C kernels: {d['kernels']}")
    print("backends:")
    for name, status in d["backends"].items():
        print(f"  {name:7s} {status}")
    g = d["gpu"]
    print(f"GPU:       {g['name']} x{g['count']}, {g['memory_gib']} GiB" if g else "GPU:       none usable")
    return 0
