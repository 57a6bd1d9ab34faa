"""Writing files so that nothing is ever half-written: checkpoints, metrics, figures."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path, write, what="file") -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temp file beside it, which is fsynced
    and renamed over ``path``. A crash or a full disk mid-write leaves the previous file
    intact; the error names the path and says so. Used for checkpoints, metrics, figures."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)   # never leave half a file lying about
        kept = f"the previous {what} {path} is intact" if path.exists() else f"no {what} written"
        raise OSError(e.errno, f"could not write {path} ({e.strerror or e}); {kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
