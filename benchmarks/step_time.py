#!/usr/bin/env python
"""Time one full training step (forward, backward, Adam) of the 784-400-20 Bernoulli VAE,
float32: minivae vs PyTorch eager, and the step's GEMM floor.

    python benchmarks/step_time.py                      # CPU, batch 128; writes nothing
    python benchmarks/step_time.py --batch 512 --json   # last line: one JSON object
    python benchmarks/step_time.py --save               # also benchmarks/results/step_time_cpu_b128.json
    python benchmarks/step_time.py --device gpu         # CuPy vs PyTorch CUDA (needs a GPU)
    python benchmarks/step_time.py --device gpu --batch 4096 --torch-compile --json

Method. Both libraries run in one process, on the same MNIST batches (bundled mnist10k), each
drawing its own eps. Contenders take turns of --block seconds (interleaved, so a noisy
neighbour slows all of them alike); the first --settle seconds of each turn are not counted,
since the previous contender's BLAS threads may still be spinning then, which a real training
loop never pays. Reported: the median over at least --steps counted steps each. Both libraries
get the same number of threads (--threads, default: the usable cores): minivae's data-parallel
step (minivae.set_num_threads; one BLAS thread per worker) and torch.set_num_threads. NumPy's
OpenBLAS is left as installed.

Also timed, for reference: minivae's unfused step (DataParallel.loss_and_grads, then its
optimizer_step: the phase split), minivae without its compiled kernels (MINIVAE_KERNELS=0: Adam as seven NumPy passes,
what a machine without a C compiler at install time runs) and PyTorch with its fused Adam kernel (torch.optim.Adam(fused=True)), which is not what
the PyTorch example or most code uses, but is PyTorch at its best.

GEMM floor: the time of only the matrix products a step must do (4 forward, 4 weight-gradient,
3 input-gradient; the first layer needs no input gradient), with NumPy's BLAS into
preallocated outputs, done the fastest of three ways: whole-batch products on BLAS threads
(the way minivae's step does them below MIN_ROWS = 256 rows a thread), once with OpenBLAS's
jobs run by minivae's thread team as in its step (minivae.engine.blas.team_backend) and once on
OpenBLAS's own pool, or the batch
split into one block per thread with a one-thread BLAS each (the way minivae's step does them
above; its weight gradients then still need summing, which the floor does not count). No step on this BLAS can be faster. torch's own floor (MKL, torch.mm) is reported
beside it for reference.

GEMM floor + Adam: the same products, then one Adam pass over their weights and weight
gradients (minivae's compiled Adam on every thread, the fastest Adam measured here): the floor
plus that pass. An Adam step reads the parameters, their
gradient and two moments, and writes three of them back (7 x 4 bytes a parameter, 18 MB for
the default model), so no step that keeps float32 Adam state in memory can be faster on this
machine, whatever it compiles. Each peer's own time over the GEMM floor is reported too.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _machine  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--latent", type=int, default=20)
    p.add_argument("--steps", type=int, default=300, help="timed steps per contender")
    p.add_argument("--block", type=float, default=0.6, help="seconds per turn")
    p.add_argument("--settle", type=float, default=0.2,
                   help="seconds at the start of each turn not counted (thread pools settle)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=None,
                   help="threads for each library (default: the usable cores)")
    p.add_argument("--minivae-threads", type=int, default=None,
                   help="threads for minivae only (default: --threads); 1 = the one-thread step")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--json", action="store_true", help="print the result as JSON (last line)")
    p.add_argument("--save", action="store_true",
                   help="also write benchmarks/results/step_time_<device>_b<batch>.json (only when given)")
    p.add_argument("--torch-compile", action="store_true",
                   help="add torch.compile(model) as a contender (compiles during warm-up; "
                        "left out, with the reason, where it fails)")
    p.add_argument("--jax", action="store_true",
                   help="add JAX (value_and_grad + optax.adam, the whole step jax.jit-compiled) "
                        "as a contender (left out, with the reason, where jax/optax are missing)")
    p.add_argument("--peers", action="store_true",
                   help="every compiled peer: --torch-compile and --jax")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    for name in ("batch", "hidden", "latent", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.block <= 0 or args.settle < 0 or args.settle >= args.block or args.warmup < 0:
        p.error("--block must be > 0, --settle in [0, --block) and --warmup >= 0")
    for name in ("threads", "minivae_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.peers:
        args.torch_compile = args.jax = True
    return args


class GPUUnavailable(RuntimeError):
    pass


SKIPPED: dict = {}   # contender -> why it did not run


def _gpu_libs():
    """(cupy, torch) when both can use a CUDA GPU, else GPUUnavailable saying why."""
    from minivae.backend import BackendUnavailable, get_backend

    try:
        get_backend("cupy")
    except BackendUnavailable as e:
        raise GPUUnavailable(f"--device gpu: minivae's CuPy backend is unusable: {e}") from None
    import cupy
    import torch

    if not torch.cuda.is_available():
        raise GPUUnavailable("--device gpu: this torch build cannot use CUDA "
                             f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
    return cupy, torch


def contenders(args):
    """name -> (step function returning phase times, sync); all on the same batches."""
    import numpy as np

    from minivae import VAE, Adam, DataParallel
    from minivae.engine import blas, kernels

    gpu = args.device == "gpu"
    if gpu:
        cupy, _ = _gpu_libs()    # first: no GPU is the reason to give, torch or no torch
    import torch
    B, H, L, D = args.batch, args.hidden, args.latent, 784
    n_batches = 32
    host = _machine.mnist_batches(B, n_batches)

    # minivae
    model = VAE(d_in=D, hidden=(H,), latent=L, backend="cupy" if gpu else "numpy", seed=0)
    opt = Adam(model.params, lr=1e-3)
    dp = DataParallel(model)            # minivae's fast step: threads, in-place twins
    xs = [model.backend.asarray(x) for x in host]
    sync_mv = model.backend.synchronize

    def minivae_step(i):        # what the trainer does: one parallel section per step
        t0 = time.perf_counter()
        dp.train_step(opt, xs[i % n_batches], check=False)
        sync_mv()
        return time.perf_counter() - t0, 0.0

    def minivae_phases(i):      # the same, unfused, to see forward+backward and Adam apart
        t0 = time.perf_counter()
        dp.loss_and_grads(xs[i % n_batches], check=False)
        sync_mv()
        t1 = time.perf_counter()
        dp.optimizer_step(opt)
        sync_mv()
        return t1 - t0, time.perf_counter() - t1

    def minivae_numpy(i):       # the same step on the NumPy twins of the compiled kernels
        previous = kernels.set_enabled(False)
        try:
            return minivae_step(i)
        finally:
            kernels.set_enabled(previous)

    # torch eager, as people write it (default Adam), and with torch's fused Adam kernel
    dev = torch.device("cuda" if gpu else "cpu")
    txs = [torch.from_numpy(x).to(dev) for x in host]
    sync_t = torch.cuda.synchronize if gpu else (lambda: None)

    def torch_contender(compile=False, **adam_kw):
        tm = _machine.torch_vae(D, H, L).to(dev)
        topt = torch.optim.Adam(tm.parameters(), lr=1e-3, **adam_kw)
        if compile:
            tm = torch.compile(tm)

        def torch_step(i):
            t0 = time.perf_counter()
            topt.zero_grad()
            loss = tm(txs[i % n_batches])
            loss.backward()
            sync_t()
            t1 = time.perf_counter()
            topt.step()
            sync_t()
            return t1 - t0, time.perf_counter() - t1

        return torch_step

    torch_step = torch_contender()
    torch_compiled = None
    if args.torch_compile:
        try:
            torch_compiled = torch_contender(compile=True)
            for i in range(3):                 # compiles here, not in the timed turns
                torch_compiled(i)
        except Exception as e:                 # no compiler, no triton, an unsupported op
            SKIPPED["torch_compile"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            torch_compiled = None
    jax_fn = None
    if args.jax and not gpu:
        try:
            import jax

            jrun, _ = _machine.jax_step(D, H, L)
            jxs = [jax.device_put(x) for x in host]
            for i in range(3):                 # compiles here, not in the timed turns
                jrun(jxs[i % n_batches]).block_until_ready()

            def jax_fn(i):
                t0 = time.perf_counter()
                jrun(jxs[i % n_batches]).block_until_ready()
                return time.perf_counter() - t0, 0.0
        except Exception as e:
            SKIPPED["jax_jit"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            jax_fn = None
    elif args.jax:
        SKIPPED["jax_jit"] = "the JAX contender runs on the CPU only here"
    try:
        torch_fused = torch_contender(fused=True)
        torch_fused(0)
    except (RuntimeError, TypeError):  # a torch without a fused Adam for this device
        torch_fused = None

    # GEMM floors: the 11 products of a step, into preallocated outputs
    def gemm_set(lib, empty, rand, sync, B=B):
        shapes_fwd = [((B, D), (D, H)), ((B, H), (H, 2 * L)), ((B, L), (L, H)), ((B, H), (H, D))]
        ops = []
        for (a, w) in shapes_fwd:          # forward  x @ W
            ops.append((rand(*a), rand(*w), empty(a[0], w[1])))
        for (a, w) in shapes_fwd:          # weight gradient  x.T @ G
            ops.append((rand(*a).T, rand(a[0], w[1]), empty(*w)))
        for (a, w) in shapes_fwd[1:]:      # input gradient  G @ W.T (not for the first layer)
            ops.append((rand(a[0], w[1]), rand(*w).T, empty(*a)))
        mm = lib.matmul

        def floor(i):
            t0 = time.perf_counter()
            for a, b, out in ops:
                mm(a, b, out=out)
            sync()
            return time.perf_counter() - t0, 0.0

        floor.ops = ops
        return floor

    rng = np.random.default_rng(0)
    if gpu:
        np_floor = gemm_set(cupy, lambda *s: cupy.empty(s, dtype=cupy.float32),
                            lambda *s: cupy.asarray(rng.standard_normal(s), dtype=cupy.float32),
                            sync_mv)
        split_floor = np_floor  # one device: nothing to split
    else:
        np_floor = gemm_set(np, lambda *s: np.empty(s, dtype=np.float32),
                            lambda *s: rng.standard_normal(s).astype(np.float32), sync_mv)
        split_floor = split_gemm_floor(B, gemm_set, rng)
    t_ops = gemm_set(torch, lambda *s: torch.empty(s, dtype=torch.float32, device=dev),
                     lambda *s: torch.randn(s, dtype=torch.float32, device=dev), sync_t)

    def torch_floor(i):
        with torch.no_grad():
            return t_ops(i)

    def pool_floor(i):           # the same products on OpenBLAS's own pool, not minivae's team
        with blas.openblas_pool():
            return np_floor(i)

    gemm_adam_floor = None
    if not gpu and kernels.available() and kernels.enabled():
        # the products, then one Adam pass over their weights with their weight gradients
        # (warm from the products, as in a real step) and two moment buffers (touched by Adam
        # alone, as in a real step), by minivae's compiled Adam on every thread: the fastest
        # Adam measured here (torch's fused Adam is in phases_ms). What any step with an
        # in-memory float32 Adam pays beyond the products: 4 arrays read, 3 written. (The
        # biases, 0.25% of the parameters, are left out.)
        from minivae.engine import threads as parallel

        ops = np_floor.ops
        layers = [(ops[j][1].reshape(-1), ops[4 + j][2].reshape(-1))   # (W, its gradient),
                  for j in range(4)]                                   # flat views of both
        assert all(np.shares_memory(w, ops[j][1]) for j, (w, _) in enumerate(layers))
        moments = [(np.zeros_like(w), np.full_like(w, 1e-4)) for w, _ in layers]
        k = parallel.get_num_threads()

        def products_then_adam(i):
            t0 = time.perf_counter()
            np_floor(i)
            t1 = time.perf_counter()
            with kernels.parts(k):
                for (w, gw), (m, v) in zip(layers, moments):
                    kernels.adam([gw], w, m, v, 0.9, 0.1, 0.999, 0.001, 1e-7, 1e-8, 1.0)
            return t1 - t0, time.perf_counter() - t1

        gemm_adam_floor = products_then_adam

    fns = {"minivae": minivae_step, "minivae_unfused": minivae_phases,
           "minivae_no_kernels": minivae_numpy if kernels.available() and not gpu else None,
           "torch": torch_step, "torch_compile": torch_compiled, "jax_jit": jax_fn,
           "torch_fused_adam": torch_fused, "gemm_floor": np_floor,
           "gemm_floor_split": split_floor, "torch_gemm_floor": torch_floor,
           "gemm_floor_pool": None if gpu or not blas.team_backend() else pool_floor,
           "gemm_adam_floor": gemm_adam_floor}
    return {name: f for name, f in fns.items() if f is not None}


def split_gemm_floor(B, gemm_set, rng):
    """The floor's products with the batch split over minivae's threads: block i of the batch
    in thread i with a one-thread BLAS, as minivae's data-parallel step does them at large
    batches. Split over all the threads whatever the batch (minivae itself splits only from
    MIN_ROWS rows a thread), so that the floor is the lower of the two ways at every batch."""
    import numpy as np

    from minivae.engine import threads as parallel

    k = max(1, min(parallel.get_num_threads(), B))
    blocks = [gemm_set(np, lambda *s: np.empty(s, dtype=np.float32),
                       lambda *s: rng.standard_normal(s).astype(np.float32), lambda: None,
                       B=hi - lo) for lo, hi in parallel.bounds(B, k)]
    team = parallel.team(k)

    def floor(i):
        t0 = time.perf_counter()
        team.run([lambda f=f: f(i) for f in blocks])
        return time.perf_counter() - t0, 0.0

    return floor


def measure(fns, steps, block_s=0.6, settle_s=0.2, warmup=5):
    """Interleave the contenders in turns of ``block_s`` seconds; -> name -> list of
    (phase1, phase2) times of the steps that started after the first ``settle_s`` of a turn.

    Why settle: a BLAS thread pool spins for a while after its last call (OpenBLAS: 2^28
    cycles, ~0.1 s) and would steal a core from the next library's first steps; a real
    training loop with one library never pays that.
    """
    for name, f in fns.items():
        for i in range(warmup):
            f(i)
    kept = {n: [] for n in fns}
    i = 0
    while min(len(v) for v in kept.values()) < steps:
        for name, f in fns.items():
            t0 = time.perf_counter()
            while (now := time.perf_counter()) - t0 < block_s:
                r = f(i)
                i += 1
                if now - t0 >= settle_s:
                    kept[name].append(r)
    return kept


def main(argv=None) -> int:
    args = parse(argv)
    threads = _machine.set_threads(args.threads, args.minivae_threads)
    if args.device == "gpu":
        try:
            _gpu_libs()          # first: no GPU is the reason to give, torch or no torch
        except GPUUnavailable as e:
            print(f"step_time.py: error: {e}", file=sys.stderr)
            return 2
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    info = _machine.machine_info()
    if args.device == "gpu":
        info["gpu"] = _machine.gpu_info()
        info["torch_cuda"] = getattr(torch.version, "cuda", None)
    if not args.quiet:
        _machine.print_machine(info)
    try:
        fns = contenders(args)
    except GPUUnavailable as e:
        print(f"step_time.py: error: {e}", file=sys.stderr)
        return 2
    kept = measure(fns, args.steps, args.block, args.settle, args.warmup)
    med = {n: float(np.median([a + b for a, b in v])) * 1e3 for n, v in kept.items()}
    phase = {n: [float(np.median([r[k] for r in v])) * 1e3 for k in (0, 1)]
             for n, v in kept.items()}
    floor_ways = [med["gemm_floor"], med["gemm_floor_split"]] + (
        [med["gemm_floor_pool"]] if "gemm_floor_pool" in med else [])
    floor = min(floor_ways)
    res = {
        "batch": args.batch, "device": args.device,
        "minivae_threads": info["minivae_threads"],
        "minivae_ms": med["minivae"], "torch_ms": med["torch"],
        "gemm_floor_ms": floor,
        "gemm_floor_blas_threads_ms": med["gemm_floor"],
        "gemm_floor_openblas_pool_ms": med.get("gemm_floor_pool"),
        "gemm_floor_batch_split_ms": med["gemm_floor_split"],
        "ratio_minivae_to_torch": med["minivae"] / med["torch"],
        "ratio_minivae_to_gemm_floor": med["minivae"] / floor,
        "torch_gemm_floor_ms": med["torch_gemm_floor"],
        "minivae_unfused_ms": med["minivae_unfused"],
        "minivae_no_kernels_ms": med.get("minivae_no_kernels"),
        "ratio_minivae_no_kernels_to_torch": (med["minivae_no_kernels"] / med["torch"]
                                              if "minivae_no_kernels" in med else None),
        "torch_fused_adam_ms": med.get("torch_fused_adam"),
        "ratio_minivae_to_torch_fused_adam": (med["minivae"] / med["torch_fused_adam"]
                                              if "torch_fused_adam" in med else None),
        "jax_jit_ms": med.get("jax_jit"),
        "ratio_minivae_to_jax_jit": (med["minivae"] / med["jax_jit"] if "jax_jit" in med else None),
        "torch_compile_ms": med.get("torch_compile"),
        "ratio_minivae_to_torch_compile": (med["minivae"] / med["torch_compile"]
                                           if "torch_compile" in med else None),
        "contenders": sorted(med), "skipped": dict(SKIPPED),
        "adam_pass_ms": phase["gemm_adam_floor"][1] if "gemm_adam_floor" in phase else None,
        "phases_ms": {n: {"forward_backward": phase[n][0], "adam": phase[n][1]}
                      for n in ("minivae_unfused", "torch", "torch_fused_adam", "torch_compile")
                      if n in phase},
        "model": f"784-{args.hidden}-{args.latent} Bernoulli VAE, float32",
        "steps_kept": {n: len(v) for n, v in kept.items()}, "block_s": args.block,
        "settle_s": args.settle, "threads": threads,
        "machine": info,
    }
    if res["adam_pass_ms"] is not None:
        # the GEMM floor plus the Adam pass that followed the same products: a floor for any
        # step that keeps its float32 Adam state in memory
        both = floor + res["adam_pass_ms"]
        res["products_and_adam_floor_ms"] = both
        res["ratio_products_and_adam_floor_to_gemm_floor"] = both / floor
        res["ratio_minivae_to_products_and_adam_floor"] = med["minivae"] / both
    for peer in ("torch", "torch_fused_adam", "torch_compile", "jax_jit"):
        if peer in med:                                  # how far each peer is from the floor
            res[f"ratio_{peer}_to_gemm_floor"] = med[peer] / floor
    # A busy machine shows as two measurements of the same products that disagree: then no
    # ratio of this run is worth quoting (say so, in the output and the JSON).
    floors = (med["gemm_floor"], med["gemm_floor_split"])
    res["disturbed"] = args.device == "cpu" and max(floors) > 2.0 * min(floors)
    if res["disturbed"]:
        print(f"step_time.py: warning: the GEMM floor measured {floors[0]:.3f} ms on BLAS threads "
              f"and {floors[1]:.3f} ms split over the batch: another process is competing for "
              f"the cores, so these ratios are not trustworthy; measure on a quiet machine",
              file=sys.stderr)
    if not args.quiet:
        print(f"# {res['model']}, batch {args.batch}, {args.device}, {threads} threads, "
              f"median of {args.steps} interleaved steps")
        print(f"{'':22}{'ms/step':>9}  {'fwd+bwd':>8}  {'adam':>6}")
        print(f"{'minivae (train_step)':22}{med['minivae']:9.3f}")
        if "minivae_no_kernels" in med:
            print(f"{'minivae, no C kernels':22}{med['minivae_no_kernels']:9.3f}")
        for n in ("minivae_unfused", "torch", "torch_fused_adam", "torch_compile"):
            if n in med:
                print(f"{n:22}{med[n]:9.3f}  {phase[n][0]:8.3f}  {phase[n][1]:6.3f}")
        if "jax_jit" in med:
            print(f"{'jax_jit (whole step)':22}{med['jax_jit']:9.3f}")
        pool = (f", OpenBLAS's own pool {med['gemm_floor_pool']:.3f}"
                if "gemm_floor_pool" in med else "")
        print(f"{'GEMM floor (numpy)':22}{res['gemm_floor_ms']:9.3f}   = min(BLAS threads "
              f"{med['gemm_floor']:.3f}{pool}, batch split {med['gemm_floor_split']:.3f})")
        print(f"{'GEMM floor (torch)':22}{med['torch_gemm_floor']:9.3f}")
        if res["adam_pass_ms"] is not None:
            print(f"{'GEMM floor + Adam':22}{res['products_and_adam_floor_ms']:9.3f}   = the "
                  f"floor + one Adam pass after the products ({res['adam_pass_ms']:.3f}): "
                  f"{res['ratio_products_and_adam_floor_to_gemm_floor']:.3f}x the floor")
        print(f"minivae / torch = {res['ratio_minivae_to_torch']:.3f}   "
              f"minivae / GEMM floor = {res['ratio_minivae_to_gemm_floor']:.3f}")
    if args.save:
        stem = f"step_time_{args.device}_b{args.batch}"
        if args.minivae_threads and args.minivae_threads != threads:
            stem += f"_minivae{args.minivae_threads}t"
        path = _machine.save(stem + ".json", res)
        if not args.quiet:
            print(f"# wrote {os.path.relpath(path)}")
    if args.json:
        import json

        keys = ["batch", "device", "minivae_ms", "torch_ms", "gemm_floor_ms",
                "ratio_minivae_to_torch", "ratio_minivae_to_gemm_floor", "disturbed"]
        if args.device == "gpu" or args.torch_compile or args.jax:
            keys += ["torch_fused_adam_ms", "ratio_minivae_to_torch_fused_adam",
                     "torch_compile_ms", "ratio_minivae_to_torch_compile", "jax_jit_ms",
                     "ratio_minivae_to_jax_jit", "minivae_unfused_ms",
                     "phases_ms", "contenders", "skipped", "steps_kept", "model", "machine"]
            keys += [k for k in res if k.startswith(("ratio_torch", "ratio_jax",
                                                     "ratio_products", "products_and",
                                                     "ratio_minivae_to_products", "adam_pass"))]
        print(json.dumps({k: res[k] for k in keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
