"""Writing files so that nothing is ever half-written: checkpoints, metrics, figures."""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


NAME_MAX = 255      # bytes in one file name, on the file systems minivae writes to
STALE_S = 600       # a temp file of a gone writer untouched this long is removed


def _host() -> str:
    return (socket.gethostname().replace(os.sep, "_") or "host")[:32]


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):    # PermissionError: it exists
        return True
    return True


def remove_stale_temps(path) -> list:
    """Remove the temp files that :func:`temp_path` names for ``path`` and that a process of
    this host which no longer exists left behind (killed by SIGKILL or a power cut mid-write:
    nothing could clean up), once untouched for STALE_S seconds. A temp of another host, of
    a live process (its writer, or one that reused the id), touched more recently, or not of
    that form is left alone. -> the paths removed."""
    path = Path(path)
    prefix, host, gone = path.name + ".", _host(), []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return gone
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        parts = name[len(prefix):-len(".tmp")].rsplit(".", 2)
        if len(parts) != 3 or parts[0] != host or not all(
                p.isascii() and p.isdigit() for p in parts[1:]):      # not '²', which int refuses
            continue
        pid = int(parts[1])
        if pid == os.getpid() or pid <= 0 or _alive(pid):
            continue
        temp = path.parent / name
        with contextlib.suppress(OSError):
            # untouched for STALE_S: a host that shares this name (cloned machines, names
            # alike in their first 32 characters) writing to a shared file system has its
            # own process ids, and a live write of its own moves the file's mtime
            if time.time() - temp.lstat().st_mtime >= STALE_S:
                temp.unlink()
                gone.append(temp)
    return gone


def temp_path(path) -> Path:
    """The temp file :func:`atomic_write` fills for ``path`` in this thread: beside it, named
    for the host, process and thread (``samples.png.<host>.<pid>.<thread>.tmp``), so that two
    writers of one path at once (two ``minivae sample --out s.png``, MPI ranks on a shared
    filesystem) each fill their own and the last rename wins with a whole file. With one
    shared temp name they wrote into each other's file: a mixed, sometimes undecodable PNG."""
    path = Path(path)
    suffix = f".{_host()}.{os.getpid()}.{threading.get_ident()}.tmp"
    name = path.name
    while len(os.fsencode(name + suffix)) > NAME_MAX:   # a long valid name: shorten the temp's
        name = name[:-1]
    return path.with_name(name + suffix)


def atomic_write(path, write, what="file") -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temp file beside it (:func:`temp_path`),
    which is fsynced and renamed over ``path``. A crash or a full disk mid-write leaves the
    previous file intact; the error names the path and says so. Writers of one path at once
    each leave a whole file: the last one's. A temp file for ``path`` that a killed process
    of this host left is removed first (:func:`remove_stale_temps`). Used for checkpoints,
    metrics, figures."""
    path = Path(path)
    remove_stale_temps(path)
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
        kept = (f"{path} is a directory: move it away" if path.is_dir() else
                f"the previous {what} {path} is intact" if path.exists() else
                f"no {what} written")
        raise OSError(e.errno, f"could not write {path} ({e.strerror or e}); {kept}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
