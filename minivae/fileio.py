"""Writing files so that nothing is ever half-written: checkpoints, metrics, figures."""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


NAME_MAX = 255      # bytes in one file name, on the file systems minivae writes to


def temp_path(path) -> Path:
    """The temp file :func:`atomic_write` fills for ``path`` in this thread: beside it, named
    for the host, process and thread (``samples.png.<host>.<pid>.<thread>.tmp``), so that two
    writers of one path at once (two ``minivae sample --out s.png``, MPI ranks on a shared
    filesystem) each fill their own and the last rename wins with a whole file. With one
    shared temp name they wrote into each other's file: a mixed, sometimes undecodable PNG."""
    path = Path(path)
    host = (socket.gethostname().replace(os.sep, "_") or "host")[:32]
    suffix = f".{host}.{os.getpid()}.{threading.get_ident()}.tmp"
    name = path.name
    while len(os.fsencode(name + suffix)) > NAME_MAX:   # a long valid name: shorten the temp's
        name = name[:-1]
    return path.with_name(name + suffix)


def atomic_write(path, write, what="file") -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temp file beside it (:func:`temp_path`),
    which is fsynced and renamed over ``path``. A crash or a full disk mid-write leaves the
    previous file intact; the error names the path and says so. Writers of one path at once
    each leave a whole file: the last one's. Used for checkpoints, metrics, figures."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)   # never leave half a file lying about
        kept = f"the previous {what} {path} is intact" if path.exists() else f"no {what} written"
        raise OSError(e.errno, f"could not write {path} ({e.strerror or e}); {kept}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
