"""Shared helpers for the benchmarks: thread settings, machine description, the torch VAE.

Import this module *before* numpy/torch in a benchmark script: :func:`set_threads` exports the
thread-count variables, which BLAS libraries read when they load.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(n: int | None, minivae_threads: int | None = None) -> int:
    """Give NumPy's BLAS, minivae and torch the same number of threads (call before importing
    numpy). Returns n (default: the usable cores).

    OpenBLAS is left as installed (its workers busy-wait ~0.1 s after a product; the
    benchmarks' settle time keeps that from landing on the next contender). minivae's NumPy
    step runs data-parallel on ``minivae_threads`` (default n) threads with a one-thread BLAS
    each (see minivae/engine/data_parallel.py); torch (MKL/OpenMP) uses its own pool of n.
    """
    n = int(n or usable_cores())
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ.pop("OPENBLAS_THREAD_TIMEOUT", None)
    os.environ["MINIVAE_NUM_THREADS"] = str(int(minivae_threads or n))
    if n == 1:   # XLA's CPU backend: one thread for its Eigen pool and its intra-op work
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    return n


def blas_info() -> dict:
    import numpy as np

    info = {}
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info = {"name": cfg.get("name"), "version": cfg.get("version")}
    except Exception:  # older NumPy
        pass
    from minivae.engine import blas

    info.update(blas.describe())   # threads, core: from the OpenBLAS NumPy loaded
    return info


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU, cores, library versions and thread counts, for the result files."""
    import numpy as np

    import minivae
    from minivae.engine import kernels

    info = {
        "cpu": cpu_model(), "cores": usable_cores(), "platform": platform.platform(),
        "python": sys.version.split()[0], "numpy": np.__version__, "minivae": minivae.__version__,
        "numpy_blas": blas_info(), "minivae_threads": minivae.get_num_threads(),
        "minivae_kernels": kernels.describe(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT",
                                               "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                               "MINIVAE_NUM_THREADS", "MINIVAE_KERNELS")},
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_blas"] = "MKL" if torch.backends.mkl.is_available() else "other"
    except ImportError:
        info["torch"] = None
    for mod in ("jax", "jaxlib", "optax"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def gpu_info() -> dict | None:
    """The CUDA GPU CuPy sees (model, memory, driver and runtime versions, CuPy's version),
    or None where CuPy or a GPU is missing."""
    try:
        import cupy

        rt = cupy.cuda.runtime
        props = rt.getDeviceProperties(0)
        name = props["name"]
        return {"name": name.decode() if isinstance(name, bytes) else str(name),
                "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                "count": rt.getDeviceCount(), "cuda_runtime": rt.runtimeGetVersion(),
                "cuda_driver": rt.driverGetVersion(), "cupy": cupy.__version__}
    except Exception:
        return None


def print_machine(info: dict) -> None:
    b = info["numpy_blas"]
    print(f"# cpu: {info['cpu']}, {info['cores']} usable cores; python {info['python']}")
    print(f"# numpy {info['numpy']} with {b.get('name')} {b.get('version')} "
          f"(core {b.get('core')}, {b.get('threads')} threads); minivae {info['minivae']} "
          f"({info['minivae_threads']} threads, C kernels {info.get('minivae_kernels')})")
    if info.get("torch"):
        print(f"# torch {info['torch']} ({info['torch_blas']}, {info['torch_threads']} threads)")
    if info.get("gpu"):
        g = info["gpu"]
        print(f"# gpu: {g['name']} ({g['memory_gib']} GiB), CUDA runtime {g['cuda_runtime']}, "
              f"driver {g['cuda_driver']}, cupy {g['cupy']}")


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def mnist_batches(batch: int, n_batches: int, seed: int = 0, dtype="float32"):
    """n_batches of real MNIST digits (the bundled mnist10k) as host arrays (B, 784); a
    seeded synthetic stand-in if the data module is unavailable."""
    import numpy as np

    rng = np.random.default_rng(seed)
    try:
        from minivae.data import load_dataset

        x = load_dataset("mnist10k").x_train
    except Exception:  # pragma: no cover - the bundled set ships with minivae
        x = (rng.random((9000, 784)) < 0.15).astype(np.float32)
    idx = rng.permutation(len(x))
    need = batch * n_batches
    idx = np.resize(idx, need)
    return [np.ascontiguousarray(x[idx[i * batch:(i + 1) * batch]], dtype=dtype)
            for i in range(n_batches)]


def jax_step(d_in=784, hidden=400, latent=20, seed=0):
    """The same VAE in JAX as a user would write it for speed: the loss of the PyTorch example
    (BCE-with-logits sum + closed-form KL, eps from jax.random), value_and_grad and optax.adam
    (lr 1e-3) in one jax.jit-compiled step. -> (step(x) -> loss array, state dict), or raises
    ImportError where jax or optax is missing."""
    import jax
    import jax.numpy as jnp
    import optax

    key = jax.random.PRNGKey(seed)
    ks = jax.random.split(key, 5)

    def linear(k, fan_in, fan_out):                    # nn.Linear's default initialisation
        bound = 1.0 / fan_in ** 0.5
        kw, kb = jax.random.split(k)
        return (jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound),
                jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound))

    params = {"enc": linear(ks[0], d_in, hidden), "enc_out": linear(ks[1], hidden, 2 * latent),
              "dec": linear(ks[2], latent, hidden), "dec_out": linear(ks[3], hidden, d_in)}

    def loss_fn(p, x, k):
        h = jax.nn.relu(x @ p["enc"][0] + p["enc"][1]) @ p["enc_out"][0] + p["enc_out"][1]
        mu, logvar = h[:, :latent], h[:, latent:]
        z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(k, mu.shape, jnp.float32)
        logits = jax.nn.relu(z @ p["dec"][0] + p["dec"][1]) @ p["dec_out"][0] + p["dec_out"][1]
        recon = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x))
        kl = 0.5 * jnp.sum(mu * mu + jnp.exp(logvar) - 1.0 - logvar)
        return (recon + kl) / x.shape[0]

    opt = optax.adam(1e-3)

    @jax.jit
    def step(p, opt_state, x, k):
        k, sub = jax.random.split(k)
        loss, grads = jax.value_and_grad(loss_fn)(p, x, sub)
        updates, opt_state = opt.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, k, loss

    state = {"p": params, "opt": opt.init(params), "k": ks[4]}

    def run(x):
        state["p"], state["opt"], state["k"], loss = step(state["p"], state["opt"], x, state["k"])
        return loss

    return run, state


def torch_vae(d_in=784, hidden=400, latent=20):
    """The PyTorch VAE as people write it (the pytorch/examples VAE): nn.Linear layers,
    F.binary_cross_entropy_with_logits(sum), the closed-form KL, randn_like for eps."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class TorchVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(d_in, hidden)
            self.enc_out = nn.Linear(hidden, 2 * latent)  # mu | logvar, like minivae
            self.dec = nn.Linear(latent, hidden)
            self.dec_out = nn.Linear(hidden, d_in)

        def forward(self, x):
            h = self.enc_out(F.relu(self.enc(x)))
            mu, logvar = h[:, :latent], h[:, latent:]
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            logits = self.dec_out(F.relu(self.dec(z)))
            recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
            kl = 0.5 * torch.sum(mu * mu + logvar.exp() - 1.0 - logvar)
            return (recon + kl) / x.shape[0]

    return TorchVAE()
