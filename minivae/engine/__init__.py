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
from . import cupy_twins, numpy_twins, optim  # noqa: F401  (registers the twins)
from .data_parallel import (Communicator, DataParallel, NonFiniteStep, SingleProcess,
                            optimizer_step, train_step)
from .registry import REGISTRY, has_twins, pick
from .threads import get_num_threads, set_num_threads

__all__ = ["DataParallel", "Communicator", "SingleProcess", "train_step", "optimizer_step",
           "NonFiniteStep", "REGISTRY", "pick",
           "has_twins", "get_num_threads", "set_num_threads"]
