#!/usr/bin/env python
"""Where minivae's NumPy step should stop splitting the batch over threads (MIN_ROWS).

    python benchmarks/split_modes.py                       # batch 32..512, 2 threads
    python benchmarks/split_modes.py --save                # also benchmarks/results/split_modes.json

The two ways minivae can use k threads for one step of the 784-400-20 Bernoulli VAE (float32,
Adam, real MNIST batches): **rows** (the batch split into k row blocks, one thread each with a
one-thread BLAS, the k gradient buffers summed inside the fused Adam update) and **blas** (the
pass on the calling thread, its matrix products on k BLAS threads, then Adam on the calling
thread). Each (batch, way) runs in its own fresh process, the ways alternating, --runs times;
a process reports the median of its steps after a warm-up. Separate processes, because after
a step on BLAS threads OpenBLAS's workers spin for ~0.1 s and would slow a row-split step that
follows in the same process, which no real training run does (it uses one way throughout).
The ratio blas / rows is what MIN_ROWS (minivae/engine/threads.py) is chosen from.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _machine  # noqa: E402

CHILD = r"""
import sys, time
sys.path.insert(0, {bench!r})
import _machine
_machine.set_threads({threads})
import numpy as np
from minivae import VAE, Adam, DataParallel
from minivae.engine import threads as T
B = {batch}
T.MIN_ROWS = 1 if {mode!r} == "rows" else 10**9
xs = _machine.mnist_batches(B, 32)
m = VAE(d_in=784, hidden=(400,), latent=20, seed=0)
opt = Adam(m.params, lr=1e-3)
dp = DataParallel(m)
ts = []
for i in range({steps} + 20):
    t = time.perf_counter()
    dp.train_step(opt, xs[i % 32], check=False)
    ts.append(time.perf_counter() - t)
print(float(np.median(ts[20:])) * 1e3)
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="32,64,128,256,512")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--save", action="store_true",
                   help="write benchmarks/results/split_modes.json (only when given)")
    args = p.parse_args(argv)
    if args.threads < 2 or args.runs < 1 or args.steps < 1:
        p.error("--threads must be >= 2, --runs and --steps >= 1")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches must be whole numbers separated by commas, got {args.batches!r}")
    if any(b < args.threads for b in batches):
        p.error(f"every batch must have at least --threads ({args.threads}) rows")
    _machine.set_threads(args.threads)
    info = _machine.machine_info()
    _machine.print_machine(info)
    bench = os.path.dirname(os.path.abspath(__file__))
    rows = []
    print(f"{'batch':>6} {'rows ms':>9} {'blas ms':>9} {'blas/rows':>10}")
    for B in batches:
        runs = {"rows": [], "blas": []}
        for _ in range(args.runs):
            for mode in ("rows", "blas"):
                code = CHILD.format(bench=bench, threads=args.threads, batch=B, mode=mode,
                                    steps=max(20, int(args.steps * (128 / B) ** 0.5)))
                out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                     text=True, check=True)
                runs[mode].append(float(out.stdout.split()[-1]))
        med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
        rows.append({"batch": B, "rows_ms": med["rows"], "blas_ms": med["blas"],
                     "ratio_blas_to_rows": med["blas"] / med["rows"], "runs": runs})
        print(f"{B:6d} {med['rows']:9.3f} {med['blas']:9.3f} {med['blas'] / med['rows']:10.3f}")
    if args.save:
        path = _machine.save("split_modes.json", {"rows": rows, "threads": args.threads,
                                                  "machine": info})
        print(f"# wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
