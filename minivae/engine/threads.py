"""CPU threads for the NumPy backend: a data-parallel training step on a small team of threads.

Why. NumPy runs each elementwise operation on one core, and its BLAS (OpenBLAS) splits each
matrix product over its own thread pool, whose workers busy-wait ~0.1 s after every product.
So in a plain NumPy step the ReLUs, the likelihood, the sampler and Adam run on one core while
the other cores spin. Instead minivae splits the *batch*: with k threads, thread i runs the
whole forward and backward pass on rows [lo_i, hi_i), with the BLAS on one thread, writing
d(sum of its rows' losses / B)/d params into its own gradient buffer; the k buffers are then
summed, slice by slice, in parallel. Adam runs on k slices of the flat buffers the same way.
Every core does useful work, and nothing spins.

That pays only for enough rows a thread (MIN_ROWS = 256). Below it a row split costs more than
it saves: every thread writes a whole weight gradient from a few rows, the k buffers must then
be summed, and the Python of k passes runs under one GIL. So a smaller batch runs its pass on
the calling thread with the BLAS on k threads, which split each product among themselves, and
Adam follows, its compiled pass split into k slices. Both run on one pool: the compiled
kernels' thread team (minivae/engine/_kernels.c), which also runs OpenBLAS's parallel jobs
(:func:`minivae.engine.blas.team_backend`). A Python hand-off costs ~67 us; the team's, to a
worker still awake from the last product, about 3 us. With OpenBLAS's own pool spinning on
the other core, a second thread for Adam cost more than it saved. The
choice depends only on the batch and the thread count, never on a timing, so a run is
reproducible bit for bit (as long as it is the only minivae step running in the process: a
second one at the same time finds the team busy, or changes the process-wide BLAS count, and
its sums then round differently). Measured on 2 cores by benchmarks/split_modes.py (784-400-20,
float32, one Adam step; results/split_modes.json): batch 32/64/128/256 on BLAS threads
1.42/1.91/2.98/4.84 ms against 2.27/2.35/3.42/5.08 split; batch 512 split 8.30 against 9.08.

What changes. Only the order of the floating-point additions over the batch, exactly as a
different BLAS thread count would. The random stream does not change: eps is drawn for the
whole batch, then split. ``tests/test_parallel.py`` checks the parallel step against the
one-thread step.

    minivae.set_num_threads(2)       # or MINIVAE_NUM_THREADS=2; default min(usable cores, 4)
    minivae.get_num_threads()

With 1 thread the step runs on the calling thread as before, also with a one-thread BLAS.
The BLAS thread count is process-wide: while a minivae step runs, other threads' NumPy
products also get the step's count (one, or k for a batch too small to split); it is restored
when the step ends. Splitting needs
NumPy's BLAS to be an OpenBLAS >= 0.3.27 (what NumPy's wheels ship, see :mod:`minivae.engine.blas`);
with another BLAS minivae runs one thread and leaves the BLAS's threading alone.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import queue
import threading

from . import blas

MAX_DEFAULT_THREADS = 4
MAX_THREADS = 1024   # more is a typo: only the cores (and the batch's rows) are ever used
MIN_ROWS = 256         # batch rows per thread for a row split. With fewer, the pass runs on the
                       # calling thread and the BLAS threads its matrix products instead: a row
                       # split then costs more than it saves (each thread writes a whole weight
                       # gradient from a few rows, and Python runs twice under one GIL): see
                       # the module's docstring and benchmarks/split_modes.py
MIN_SLICE = 1 << 16    # numbers per thread in an elementwise update, same reason

_threads: int | None = None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def get_num_threads() -> int:
    """Threads minivae's NumPy training step uses: set_num_threads(), else $MINIVAE_NUM_THREADS,
    else :func:`default_threads` (min(usable cores, 4), divided among the MPI ranks on this
    machine); 1 when the BLAS cannot be pinned to one thread per worker."""
    if not blas.pinnable():
        return 1
    if _threads is not None:
        return _threads
    env = os.environ.get("MINIVAE_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"MINIVAE_NUM_THREADS must be a whole number, got {env!r}") from None
        if not 1 <= n <= MAX_THREADS:
            raise ValueError(f"MINIVAE_NUM_THREADS must be from 1 to {MAX_THREADS}, got {env!r}")
        return n
    return default_threads()


def default_threads() -> int:
    """min(usable cores, 4), shared out among the ranks of an MPI launch on this machine
    (``mpiexec -n 2`` on 2 cores: 1 thread each; 2 threads each fought over the cores and took
    10x as long an epoch)."""
    from .mpi import launched_local_size

    cores = usable_cores()
    local = launched_local_size()
    if local and local > 1:
        cores //= local
    return max(1, min(cores, MAX_DEFAULT_THREADS))


def set_num_threads(n: int | None) -> None:
    """Set the thread count (``None``: back to the default). ValueError unless a whole number
    from 1 to MAX_THREADS (1024)."""
    global _threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral)
                          or not 1 <= n <= MAX_THREADS):
        raise ValueError(f"number of threads must be a whole number from 1 to {MAX_THREADS}, "
                         f"got {n!r}")
    _threads = None if n is None else int(n)


_pin_lock = threading.Lock()
_pin_depth = 0          # how many blocks (in any thread) are inside blas_threads
_pin_saved = 0          # the count to restore when the last one leaves
_pin_current = 0        # the count the blocks have set now


@contextlib.contextmanager
def blas_threads(n: int):
    """Matrix products use n BLAS threads inside the block (process-wide: see
    :func:`blas.set_threads`). Blocks nest: an inner block's count holds while it runs, and
    the enclosing block's is set again when it ends (the CLI runs every command inside
    ``one_blas_thread()``, and a small batch's step inside that asks for k threads for its
    products). Blocks may also overlap across threads: the count is then the latest block's,
    and the count from before the first block is restored when the last one ends."""
    global _pin_depth, _pin_saved, _pin_current
    if not blas.pinnable():
        yield
        return
    n = int(n)
    if n > 1:
        blas.team_backend()     # once: OpenBLAS's jobs on the kernels' team (see there)
    with _pin_lock:
        enclosing = _pin_current if _pin_depth else None
        if _pin_depth == 0:
            _pin_saved = blas.set_threads(n)
        elif n != _pin_current:
            blas.set_threads(n)
        _pin_current = n
        _pin_depth += 1
    try:
        yield
    finally:
        with _pin_lock:
            _pin_depth -= 1
            if _pin_depth == 0:
                blas.set_threads(_pin_saved)
                _pin_current = 0
            elif enclosing is not None and _pin_current != enclosing:
                blas.set_threads(enclosing)
                _pin_current = enclosing


def one_blas_thread():
    """Matrix products use one BLAS thread inside the block: :func:`blas_threads` (1)."""
    return blas_threads(1)


# -- the team ----------------------------------------------------------------------------------
class Team:
    """k - 1 persistent worker threads; :meth:`run` runs k functions, the first in the caller.

    Workers block on a queue between jobs (no spinning). While :meth:`run` runs, the BLAS
    uses one thread, so that k concurrent products do not oversubscribe the cores.
    """

    def __init__(self, k: int):
        self.k = int(k)
        self._jobs: list[queue.SimpleQueue] = []
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._busy = threading.Lock()
        self._state = threading.Lock()   # guards _retired against a run ending at that moment
        self._retired = False
        self._threads: list[threading.Thread] = []
        for i in range(self.k - 1):
            q: queue.SimpleQueue = queue.SimpleQueue()
            t = threading.Thread(target=self._work, args=(q,), name=f"minivae-{i + 1}", daemon=True)
            t.start()
            self._jobs.append(q)
            self._threads.append(t)

    def _work(self, jobs):
        while True:
            fn = jobs.get()
            if fn is None:              # the team was retired (a bigger one replaced it)
                return
            try:
                self._done.put((True, fn()))
            except BaseException as e:  # handed to the caller, re-raised there
                self._done.put((False, e))
            # drop the job before waiting for the next one: its closure holds the caller's
            # model, batch and buffers, which would otherwise outlive them until then
            fn = None

    def run(self, fns, concurrent: bool = False) -> list | None:
        """Call every function in ``fns`` (at most k) concurrently; -> their results in order.
        Re-raises the first exception after all have finished. When the team is already busy
        (a job that itself calls run, or another user thread) they run one after another in
        the caller instead: slower, never a deadlock. ``concurrent=True`` is for jobs that wait
        for one another (a barrier) and so cannot run one after another: then a busy team
        runs nothing and returns None."""
        fns = list(fns)
        if len(fns) > self.k:
            raise ValueError(f"{len(fns)} jobs for a team of {self.k}")
        free = self._busy.acquire(blocking=False)
        if free and len(fns) > len(self._jobs) + 1:    # retired: its workers are gone
            self._busy.release()
            free = False
        if not free:
            if concurrent:
                return None
            with one_blas_thread():
                return [fn() for fn in fns]
        try:
            with one_blas_thread():
                return self._run(fns)
        finally:
            with self._state:
                if self._retired:
                    self._stop()
                self._busy.release()

    def retire(self) -> None:
        """Stop the workers, now or, when a run is in progress, as it ends. A retired team
        still runs what it is given, one job after another in the caller."""
        with self._state:
            self._retired = True
            if self._busy.acquire(blocking=False):
                try:
                    self._stop()
                finally:
                    self._busy.release()

    def _stop(self):
        for q in self._jobs:
            q.put(None)
        self._jobs = []

    def _run(self, fns) -> list:
        for i, fn in enumerate(fns[1:]):
            self._jobs[i].put(_Indexed(i + 1, fn))
        results: list = [None] * len(fns)
        error = None
        try:
            results[0] = fns[0]()
        except BaseException as e:
            error = e
        # Collect every worker's answer before leaving, even when Ctrl-C lands while waiting:
        # an answer left in the queue would be taken for the next run's.
        pending = len(fns) - 1
        while pending:
            try:
                ok, value = self._done.get()
            except BaseException as e:  # KeyboardInterrupt: re-raised once all are in
                error = error or e
                continue
            pending -= 1
            if not ok:
                error = _first_cause(error, value)
            else:
                i, r = value
                results[i] = r
        if error is not None:
            raise error
        return results


def _first_cause(error, new):
    """Keep the error that caused the others: a job's real error over the BrokenBarrierError
    that another job saw because the first one aborted the barrier."""
    if error is None or (isinstance(error, threading.BrokenBarrierError)
                         and not isinstance(new, threading.BrokenBarrierError)):
        return new
    return error


class _Indexed:
    """A job that returns (its index, result), so results come back in order."""

    __slots__ = ("i", "fn")

    def __init__(self, i, fn):
        self.i, self.fn = i, fn

    def __call__(self):
        return self.i, self.fn()


_team: Team | None = None
_team_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child has the team object but none of its threads: start afresh there."""
    global _team, _team_lock, _pin_lock, _pin_depth
    _team, _team_lock = None, threading.Lock()
    _pin_lock, _pin_depth = threading.Lock(), 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def team(k: int) -> Team:
    """The shared team, grown to at least k threads."""
    global _team
    with _team_lock:
        if _team is None or _team.k < k:
            if _team is not None:
                _team.retire()          # its workers would otherwise wait for good
            _team = Team(k)
        return _team


def bounds(n: int, k: int) -> list[tuple[int, int]]:
    """k contiguous, near-equal ranges covering [0, n)."""
    cuts = [n * i // k for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def in_ranges(n: int, fn) -> None:
    """fn(lo, hi) over contiguous ranges covering [0, n), one per thread (one range, in the
    caller, when n is small): elementwise work over flat buffers, such as an optimizer update."""
    k = max(1, min(get_num_threads(), n // MIN_SLICE))
    if k == 1:
        with one_blas_thread():
            fn(0, n)
        return
    team(k).run([_bind(fn, lo, hi) for lo, hi in bounds(n, k)])


def _bind(fn, lo, hi):
    return lambda: fn(lo, hi)
