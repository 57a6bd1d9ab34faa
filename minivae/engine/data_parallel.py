"""Data parallelism as a wrapper, in the spirit of torch's DistributedDataParallel.

    dp = DataParallel(model)                 # owns the threads; the model knows nothing of them
    r = dp.loss_and_grads(x)                 # = model.loss_and_grads(x), to round-off
    r = dp.train_step(opt, x)                # = the above, then opt.step(), in one section

What one step does, for a batch x of B rows (the model's maths is its ``forward_backward``):

1. **shard rows**: the communicator gives this process its rows [lo, hi) of the batch (all of
   them, in one process); the process splits them again into k row blocks, one per thread.
2. **forward/backward per block**: thread j runs the model pass (its NumPy twin, from the
   engine registry) on block j into its own gradient buffer, writing d(sum of its rows'
   losses / B)/d params, so that the blocks' gradients add up to the batch mean's.
3. **all-reduce the flat gradient**: the k buffers are summed, each thread its own slice of
   the flat buffer; across processes the communicator sums the result (one all-reduce of one
   flat buffer per step: why minivae keeps its parameters in one buffer).
4. **optimizer update**: through the optimizer's public ``start_step()`` (once) and
   ``update(lo, hi, grads)`` (per slice), unless the batch's loss or the summed gradient
   holds NaN or Inf (:class:`NonFiniteStep`: nothing is updated). In one process, steps 3
   and 4 are fused: after a barrier (which judges the loss and each block's gradient) each
   thread sums its slice and updates it in the same pass.

Only the order of the floating-point additions over the batch changes; the random stream does
not (eps is drawn for the whole batch, then split). ``tests/test_parallel.py`` holds the
wrapper to the reference step.

The communicator is the seam for more than one process (MPI): anything with ``rank``,
``size``, ``rows(n)``, ``allreduce_sum(buf)`` and ``broadcast(buf)``, as :class:`Communicator`
describes. :class:`SingleProcess` is one; ``minivae/engine/mpi.py``'s ``MPICommunicator`` (over
mpi4py) is the other. :func:`check_same` and :func:`share_bytes`, built on the same four calls,
are what a multi-rank trainer needs besides the step: replica checksums, and one rank's file
read for all.
"""
from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from numbers import Integral
import weakref
from contextlib import nullcontext
from functools import partial

import numpy as np

from ..models import LossResult
from ..optim import Optimizer, check_buffers, check_finite_grad, read_only_buffers, sum_into_first
from . import blas, kernels
from . import threads as _threads
from .optim import checked_step
from .registry import pick, threaded


class Communicator(ABC):
    """What a multi-process strategy implements (e.g. over mpi4py). All ranks call every
    method in the same order.

    rank, size                 this process's index and the number of processes
    rows(n) -> (lo, hi)        this rank's rows of a global batch of n rows
    allreduce_sum(buf)         buf <- the sum of every rank's buf, in place (a flat array)
    broadcast(buf, root=0)     buf <- root's buf, in place
    """

    rank = 0
    size = 1

    @abstractmethod
    def rows(self, n: int) -> tuple[int, int]:
        """This rank's rows [lo, hi) of a global batch of n rows."""

    @abstractmethod
    def allreduce_sum(self, buf) -> None:
        """buf <- the sum of every rank's buf, in place."""

    @abstractmethod
    def broadcast(self, buf, root: int = 0) -> None:
        """buf <- root's buf, in place."""


class SingleProcess(Communicator):
    """One process: all rows are ours, and there is nobody to sum with."""

    def rows(self, n):
        return 0, n

    def allreduce_sum(self, buf):
        pass

    def broadcast(self, buf, root=0):
        pass


class DataParallel:
    """A model's training step split over threads (and, through ``comm``, processes).

    model: a VAE or Autoencoder. threads: how many (default :func:`minivae.get_num_threads`,
    read at each step); used only where the engine has twins for the model's backend (NumPy),
    elsewhere the step is the reference, on one thread. comm: a :class:`Communicator`
    (default :class:`SingleProcess`); its ``broadcast`` makes every rank start from rank 0's
    parameters.
    """

    def __init__(self, model, threads: int | None = None, comm: Communicator | None = None):
        self.comm = SingleProcess() if comm is None else comm
        missing = [m for m in ("rows", "allreduce_sum", "broadcast", "rank", "size")
                   if not hasattr(self.comm, m)]
        if missing:
            raise TypeError(f"comm must be a Communicator (rank, size, rows, allreduce_sum, "
                            f"broadcast); a {type(comm).__name__} has no {', '.join(missing)}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, Integral)
                                    or threads < 1):
            raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
        if not (hasattr(model, "forward_backward") and hasattr(model, "params")):
            raise TypeError(f"DataParallel wraps a minivae VAE or Autoencoder, got "
                            f"{type(model).__name__}")
        self._model, self._model_ref = model, None
        self.threads = threads
        self.engine = threaded(model.backend)
        self._forward_backward = pick(type(model).forward_backward, model.backend)
        self._replicas = []                  # Params sharing model.params.data, one per thread
        self.comm.broadcast(model.params.data)

    @property
    def model(self):
        """The wrapped model. The DataParallel that :func:`train_step` keeps for a model holds
        it weakly (:meth:`_hold_weakly`), so that a model the user drops is freed, with its
        per-thread gradient buffers and step plans."""
        return self._model if self._model_ref is None else self._model_ref()

    def _hold_weakly(self) -> "DataParallel":
        self._model_ref, self._model = weakref.ref(self._model), None
        return self

    def __repr__(self):
        return f"DataParallel({type(self.model).__name__}, threads={self.threads}, " \
               f"comm={type(self.comm).__name__})"

    def _threads(self) -> int:
        if not self.engine:
            return 1
        return _threads.get_num_threads() if self.threads is None else self.threads

    def _k(self, rows: int) -> int:
        """Row blocks (threads) a pass over ``rows`` rows is split into: as many as the
        threads allow with at least ``MIN_ROWS`` rows each (engine/threads.py)."""
        return max(1, min(self._threads(), rows // _threads.MIN_ROWS))

    def _refusal(self, loss, parts) -> str | None:
        """Why this step must not be applied (its loss or a gradient holds NaN or Inf), or None.
        Checked on NumPy only: on CuPy reading the loss would stop the device's pipeline
        every step, and the strict backend stands in for a device (tests/test_train.py holds
        the training loop to no read-back between log intervals there)."""
        if not self.engine:           # not the NumPy engine: a device, or stands in for one
            return None
        if not math.isfinite(float(loss)):
            return (f"the training loss is {float(loss)} at this step: the update was not "
                    f"applied (parameters, optimizer state and noise stream unchanged); lower the learning "
                    f"rate, or look for extreme inputs")
        if _finite_code(self.model.params.grad, parts=parts) == 0:
            return _GRAD_NONFINITE
        return None

    # -- public steps ---------------------------------------------------------------------------
    def loss_and_grads(self, x, eps=None, check=True) -> LossResult:
        """model.loss_and_grads(x, eps, check), split over the threads (and ranks)."""
        return self._step(x, eps, check, opt=None)

    def _check_opt(self, opt):
        if not isinstance(opt, Optimizer):
            raise TypeError(f"expected a minivae optimizer (e.g. Adam(model.params)), got "
                            f"{type(opt).__name__}")
        if opt.params is not self.model.params:
            raise ValueError("the optimizer was built for another model's parameters")
        check_buffers(opt)              # before any noise is drawn or step counted

    def train_step(self, opt, x, eps=None, check=True) -> LossResult:
        """loss_and_grads, then one optimizer step, in one parallel section. Raises
        :class:`NonFiniteStep` (a FloatingPointError), without updating anything, when the
        step's loss or gradient holds NaN or Inf (NumPy backend; see there)."""
        self._check_opt(opt)
        return self._step(x, eps, check, opt=opt)

    def optimizer_step(self, opt) -> None:
        """``opt.step()`` on the gradient in ``model.params.grad``: :func:`optimizer_step`.
        Like ``opt.step()``, raises FloatingPointError, changing nothing, for a gradient that
        holds NaN or Inf."""
        self._check_opt(opt)
        check_finite_grad(opt.params)
        optimizer_step(opt)

    # -- the step -------------------------------------------------------------------------------
    def _step(self, x, eps, check, opt):
        m = self.model
        if opt is None and (bad := read_only_buffers(m.params, data=False)):
            # (with an optimizer, _check_opt has checked its buffers and these): the pass
            # writes the gradient, some of it through raw pointers that no flag stops
            raise ValueError(f"{'; '.join(bad)}: nothing computed")
        if check:
            m.check_input(x)
        B = x.shape[0]
        lo, hi = self.comm.rows(B)          # checked before any noise is drawn
        if not (isinstance(lo, Integral) and isinstance(hi, Integral) and 0 <= lo <= hi <= B) or (
                self.comm.size == 1 and (lo, hi) != (0, B)):
            raise ValueError(f"comm.rows({B}) gave {(lo, hi)!r}: a rank's rows [lo, hi) must lie "
                             f"within the batch, and one process must take all of them")
        # a refused step (NonFiniteStep) leaves the model's noise stream where it was, too:
        # retrying the call draws the same eps (one state copy, ~1 us)
        snap = m.rng.snapshot() if eps is None and opt is not None else None
        eps = m.prepare_eps(eps, B, check)
        try:
            return self._step_rows(x, eps, check, opt, B, lo, hi)
        except NonFiniteStep:
            m.rng.rewind(snap)
            raise

    def _step_rows(self, x, eps, check, opt, B, lo, hi):
        m, xp = self.model, self.model.xp
        if (lo, hi) != (0, B):
            x, eps = x[lo:hi], (None if eps is None else eps[lo:hi])
        k = self._k(hi - lo)
        fuse = opt is not None and self.comm.size == 1
        blocks = self._blocks(x, eps, B, k, opt if fuse else None) if k > 1 else None
        terms, stepped = blocks if blocks is not None else (None, False)
        blas_k = parts = 1
        if terms is None:
            # Too few rows to split (or the team is busy: a nested call): the pass runs here,
            # its matrix products on the BLAS's threads, which split them without the per-
            # thread gradient buffers a row split needs (engine/threads.py, MIN_ROWS).
            # (never more BLAS threads than cores: OpenBLAS's jobs wait for each other, so
            # 64 of them on 2 cores crawl; measured 60 ms a step at batch 7, --threads 64)
            blas_k = min(self._threads(), _threads.usable_cores()) if k == 1 else 1
            # the compiled kernels split over the team that runs the BLAS's jobs
            parts = blas_k if blas_k > 1 and blas.team_backend() else 1
            pin = _threads.blas_threads(blas_k) if self.engine else nullcontext()
            with pin, kernels.parts(parts):
                terms = self._forward_backward(m, m.params, x, eps, B)
            fuse = False
        if self.comm.size > 1:
            self.comm.allreduce_sum(m.params.grad)
        loss_b, recon, kl = terms
        if self.comm.size == 1 and type(loss_b) is np.ndarray:
            # np.mean's own steps (add.reduce, then / count) without its Python wrapper: the
            # same float to the bit, ~10 us a step less
            add = np.add.reduce
            loss, mrecon, mkl = add(loss_b) / B, add(recon) / B, add(kl) / B
        elif self.comm.size == 1:
            loss, mrecon, mkl = xp.mean(loss_b), xp.mean(recon), xp.mean(kl)
        else:                               # means over the global batch (before the update:
            sums = xp.stack([xp.sum(loss_b), xp.sum(recon), xp.sum(kl)])   # every rank then
            self.comm.allreduce_sum(sums)                                  # decides alike)
            loss, mrecon, mkl = sums[0] / B, sums[1] / B, sums[2] / B
        if opt is not None and not fuse:
            # the gradient check and the update in one compiled pass where the optimizer has
            # one (engine/optim.py: checked_step); else the check, then the update
            done = checked_step(opt, parts) if self.engine and (
                parts > 1 or self._threads() == 1) and math.isfinite(float(loss)) else None
            if done is False:
                raise NonFiniteStep(_GRAD_NONFINITE)
            if done is None:
                why = self._refusal(loss, parts)
                if why:
                    raise NonFiniteStep(why)
                # after a pass on BLAS threads the update runs from this thread, its compiled
                # kernel split over the team that ran the products' jobs (blas.team_backend)
                with kernels.parts(parts):
                    optimizer_step(opt, split=blas_k == 1)
        elif fuse and not stepped:          # the row blocks' barrier refused the step
            raise NonFiniteStep(self._refusal(loss, 1)      # params.grad holds the sum
                                or "a row block's gradient holds NaN or Inf")
        return LossResult(loss=loss, recon=mrecon, kl=mkl, elbo=-(recon + kl), grads=m.params.grad)

    def _blocks(self, x, eps, B, k, opt):
        """The model pass on k row blocks in k threads; then, once all k are done (a barrier),
        each thread sums the k gradient buffers over its slice of the flat buffer into
        params.grad and, given an optimizer, applies the update to that slice (the update
        sums the buffers itself, in the same pass). The first barrier decides on the batch's
        loss and each block's gradient; where a block holds numbers so large that the sum
        could overflow, each thread sums and checks its slice first, and a second barrier
        decides on the sum. -> ((loss, recon, kl) per row, whether the update was applied; the
        summed gradient is in params.grad either way), or None when the team is busy."""
        m = self.model
        if len(self._replicas) < k - 1 or any(r.data is not m.params.data for r in self._replicas):
            self._replicas = [m.params.with_own_grad() for _ in range(k - 1)]
        shards = [m.params, *self._replicas[: k - 1]]
        grads = [P.grad for P in shards]
        rows, slices = _threads.bounds(x.shape[0], k), _threads.bounds(grads[0].shape[0], k)
        update = None if opt is None else pick(type(opt).update, m.backend)
        headroom = max(1, (k - 1).bit_length())   # 2^headroom >= k: a sum of k can't overflow
        losses = [None] * k           # each block's per-row losses
        codes = [1] * k               # each block's gradient: 0 NaN/Inf, 2 near overflow, 1 ok
        finite = [True] * k           # careful mode: each thread's slice of the sum is finite
        mode, stepped = ["refuse"], [False]

        def decide_blocks():          # once, by the last block to reach the first barrier
            # the batch's loss as _step will compute it (the same sum over the same rows):
            # NaN/Inf there or in a block's gradient, and no thread updates (see _step);
            # numbers so large that the blocks' sum could overflow: sum first, then decide
            if 0 in codes or not math.isfinite(np.add.reduce(np.concatenate(losses)) / B):
                mode[0] = "refuse"
            elif 2 in codes:
                mode[0] = "careful"
            else:
                mode[0] = "update"    # the update sums the blocks itself, in the same pass
                opt.start_step()
                stepped[0] = True

        def decide_sum():             # careful mode, once all slices of the sum are checked
            if all(finite):
                opt.start_step()
                stepped[0] = True

        all_done = threading.Barrier(k, action=None if opt is None else decide_blocks)
        decided = threading.Barrier(k, action=None if opt is None else decide_sum)
        fb = self._forward_backward

        def job(j):
            (lo, hi), (a, b) = rows[j], slices[j]
            try:
                out = fb(m, shards[j], x[lo:hi], None if eps is None else eps[lo:hi], B)
                losses[j] = out[0]
                if opt is not None:
                    codes[j] = _finite_code(grads[j], headroom)
                all_done.wait()       # every block's gradient is complete (and judged)
                gs = tuple(g[a:b] for g in grads)
                if mode[0] == "update":
                    update(opt, a, b, gs)
                    return out
                sum_into_first(gs)    # this slice of params.grad: the batch's gradient
                if opt is None or mode[0] == "refuse":
                    return out
                finite[j] = _finite_code(gs[0]) != 0
                decided.wait()        # every slice of the sum is checked
            except BaseException:
                all_done.abort()      # the others stop waiting; the team re-raises this error
                decided.abort()
                raise
            if stepped[0]:
                update(opt, a, b, (gs[0],))
            return out

        parts = _threads.team(k).run([partial(job, j) for j in range(k)], concurrent=True)
        if parts is None:
            return None
        return tuple(m.xp.concat([p[j] for p in parts]) for j in range(3)), stepped[0]


_GRAD_NONFINITE = ("the gradient holds NaN or Inf at this step (the loss is finite): the update "
                   "was not applied (parameters, optimizer state and noise stream unchanged); "
                   "lower the learning rate, or look for extreme inputs or parameters")


class NonFiniteStep(FloatingPointError):
    """A training step's loss or gradient held NaN or Inf: the step was refused, and the
    parameters, the optimizer's state and its step count are as they were, and so is the
    model's noise stream where the step drew its eps (NumPy, strict), so that a retry draws
    the same noise (params.grad holds the refused step's gradient). Raised by :meth:`DataParallel.train_step` and
    :func:`minivae.train_step` on NumPy (the loss is one float; the gradient check is one
    compiled pass over it, about 2% of the default model's step at batch 128); on CuPy the
    check would stop the device's pipeline every step, so it is not made there, nor on the
    strict backend, which stands in for a device (the Trainer checks the loss it reads back
    every ``log_every`` steps). A finite gradient whose update overflows (|g| near 1e19 in
    float32 squares to Inf in Adam's v) is not caught here: the Trainer refuses to save such
    a state (Diverged)."""


def _finite_code(a, headroom: int = 0, parts: int = 1) -> int:
    """kernels.finite_code of a flat NumPy gradient buffer: 0 NaN/Inf, 2 a number within
    2^headroom of overflowing, 1 neither; one compiled pass on ``parts`` threads of the team,
    or NumPy's min and max where the kernels are not built (NaN propagates through both, and
    an infinity is one of them)."""
    if kernels.enabled() and a.flags.c_contiguous and a.ndim == 1:
        return kernels.finite_code(a, parts, headroom)
    if not a.shape[0]:
        return 1
    lo, hi = np.min(a), np.max(a)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return 0
    if not headroom:                  # finite is all that is asked (and 2.0 ** 1024 overflows)
        return 1
    return 2 if max(-float(lo), float(hi)) >= 2.0 ** (np.finfo(a.dtype).maxexp - headroom) else 1


def optimizer_step(opt, split: bool = True) -> None:
    """``opt.step()`` with its update shared out over the threads in slices of the flat
    buffers (``split=False``: on the calling thread), through the engine's in-place twin of the
    update (on NumPy; the reference elsewhere). The same result as ``opt.step()`` to round-off."""
    be = opt.params.backend
    opt.start_step()
    update = pick(type(opt).update, be)
    grad = opt.params.grad
    if not (split and threaded(be)):
        update(opt, 0, grad.shape[0], (grad,))
        return
    _threads.in_ranges(grad.shape[0], lambda lo, hi: update(opt, lo, hi, (grad[lo:hi],)))


_wrappers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def train_step(model, opt, x, eps=None, check=True) -> LossResult:
    """One optimisation step on the batch x: (B, D); the same as its plain twin

        r = model.loss_and_grads(x, eps, check); opt.step(); return r

    to round-off (``tests/test_parallel.py``), through the model's :class:`DataParallel`
    (made on first use and kept with the model): on NumPy the forward/backward, the gradient
    sum and the optimizer update run in one parallel section. The trainer uses this.
    On NumPy a step whose loss or gradient holds NaN or Inf raises :class:`NonFiniteStep` (a
    FloatingPointError) and updates nothing, as ``opt.step()`` refuses a NaN/Inf gradient.
    """
    if not (hasattr(model, "forward_backward") and hasattr(model, "params")):
        raise TypeError(f"train_step(model, opt, x): the first argument must be a minivae VAE "
                        f"or Autoencoder, got {type(model).__name__}")
    dp = _wrappers.get(model)
    if dp is None:
        # held weakly by the wrapper it keys: a value holding its key strongly would keep
        # every model ever stepped alive (with its buffers and plans) for the process's life
        dp = _wrappers[model] = DataParallel(model)._hold_weakly()
    return dp.train_step(opt, x, eps, check)


# -- what more than one rank needs besides the step ----------------------------------------------
class ReplicasDiffer(RuntimeError):
    """Ranks that must hold identical state (parameters, optimizer buffers, data) do not.
    Raised on every rank at once (``all_ranks``)."""

    all_ranks = True


def _crc(a) -> int:
    import zlib

    import numpy as np

    if type(a).__module__.startswith("cupy"):
        a = a.get()
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


def check_same(comm: Communicator, arrays: dict, when: str) -> None:
    """Compare a CRC-32 of each array's bytes across the ranks (one ``allreduce_sum`` of a
    (len(arrays), size) table); every rank raises :class:`ReplicasDiffer` naming the arrays
    and the ranks whose bytes differ from rank 0's. ``arrays``: {name: array} (host or
    device); ``when``: for the message ("after epoch 3"). Nothing happens in one process."""
    if comm.size == 1:
        return
    import numpy as np

    names = list(arrays)
    table = np.zeros((len(names), comm.size), np.float64)     # a CRC-32 is exact in float64
    table[:, comm.rank] = [_crc(arrays[n]) for n in names]
    flat = table.reshape(-1)
    comm.allreduce_sum(flat)
    table = flat.reshape(len(names), comm.size)
    bad = [(n, [r for r in range(comm.size) if table[i, r] != table[i, 0]])
           for i, n in enumerate(names)]
    bad = [(n, rs) for n, rs in bad if rs]
    if bad:
        what = "; ".join(f"{n} on rank{'s' if len(rs) > 1 else ''} "
                         f"{', '.join(map(str, rs))} (CRC-32 "
                         f"{', '.join(f'{int(table[names.index(n), r]):#010x}' for r in rs)} vs "
                         f"rank 0's {int(table[names.index(n), 0]):#010x})" for n, rs in bad)
        raise ReplicasDiffer(f"{when}, the ranks no longer hold the same state: {what} differ "
                             f"from rank 0. Every rank must run the same minivae, NumPy and "
                             f"data; the run stopped without saving this state")


def share_bytes(comm: Communicator, make, errors: tuple = (), root: int = 0) -> bytes:
    """Rank ``root`` calls ``make() -> bytes``; every rank returns those bytes (two
    ``broadcast`` calls: the length, then the bytes). An exception of a type in ``errors``
    raised by ``make`` on root is raised on every rank, same type and message, marked
    ``all_ranks`` (the type must take one message argument); other exceptions propagate on
    root only. Used to read a checkpoint on rank 0 alone (no shared file system needed)."""
    if comm.size == 1:
        return make()
    import numpy as np

    head = np.zeros(2, np.int64)                 # [length, 1 + index of the error type, or 0]
    err = None
    if comm.rank == root:
        try:
            data = bytes(make())
        except errors as e:
            err, data = e, str(e).encode()
            head[1] = 1 + next(i for i, t in enumerate(errors) if isinstance(e, t))
        head[0] = len(data)
    comm.broadcast(head, root)
    buf = (np.frombuffer(data, np.uint8).copy() if comm.rank == root
           else np.empty(int(head[0]), np.uint8))
    if buf.size:
        comm.broadcast(buf, root)
    if head[1]:
        e = err if err is not None else errors[int(head[1]) - 1](buf.tobytes().decode())
        e.all_ranks = True
        raise e
    return buf.tobytes()
