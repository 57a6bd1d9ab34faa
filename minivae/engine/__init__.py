"""The engine: minivae's speed machinery, kept apart from the reference maths.

    minivae/engine/
      registry.py       each fast path registered against the reference function it replaces;
                        ``pick(reference, backend)`` is the one dispatch
      numpy_twins.py    in-place NumPy twins of Dense, ReLU, the Bernoulli likelihood and the
                        model passes
      plan.py           the model passes' step plan: buffers made once per batch size, the
                        same kernel calls without the walking (bit for bit the pass above)
      optim.py          in-place NumPy twins of the optimizers' updates
      cupy_twins.py     fused CuPy kernels: Adam, the sampler with its KL, the Bernoulli
                        likelihood, and the model passes that use them (GPU only)
      kernels.py        the optional compiled kernels (_kernels.c) and their loader
      blas.py           NumPy's OpenBLAS through ctypes: thread pinning, axpby
      threads.py        the thread team, the thread count, one-BLAS-thread sections
      data_parallel.py  DataParallel (the wrapper: shard rows, all-reduce, update) and
                        train_step
      mpi.py            the MPI communicator (mpi4py) behind DataParallel's comm seam, launch
                        detection, and aborting every rank when one fails

The rule between the two rooms: the reference (layers, sampling, losses, models, optim) never
imports the engine; the engine imports the reference, and every twin has a test that ties it to
its reference (tests/test_engine.py).
"""
import typing as _typing

from .._lazy import lazy_names as _lazy_names

__all__ = ["DataParallel", "Communicator", "SingleProcess", "train_step", "optimizer_step",
           "NonFiniteStep", "REGISTRY", "pick",
           "has_twins", "get_num_threads", "set_num_threads"]


def _load_twins():
    from .registry import load_twins
    load_twins()


# loaded on first use, not by ``import minivae.engine`` (minivae/_lazy.py says why); the
# fast paths first, which register themselves (REGISTRY)
__getattr__, __dir__ = _lazy_names(__name__, {
    "Communicator": "data_parallel", "DataParallel": "data_parallel",
    "NonFiniteStep": "data_parallel", "SingleProcess": "data_parallel",
    "optimizer_step": "data_parallel", "train_step": "data_parallel",
    "REGISTRY": "registry", "has_twins": "registry", "pick": "registry",
    "get_num_threads": "threads", "set_num_threads": "threads"}, before=_load_twins)

if _typing.TYPE_CHECKING:
    from .data_parallel import (Communicator, DataParallel, NonFiniteStep, SingleProcess,
                                optimizer_step, train_step)
    from .registry import REGISTRY, has_twins, pick
    from .threads import get_num_threads, set_num_threads
