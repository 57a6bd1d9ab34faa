#!/usr/bin/env python
"""minivae against every CPU peer, repeated: the numbers behind the README's speed table.

    python benchmarks/peers.py                        # 5 runs x batch 32, 128, 512; prints
    python benchmarks/peers.py --runs 3 --save        # also benchmarks/results/peers_cpu.json

Each run is one fresh ``benchmarks/step_time.py --peers --json`` process per batch size
(minivae, torch eager, torch fused Adam, torch.compile, JAX jit and the GEMM floor, interleaved
in one process, medians over --steps steps each; the same thread count for every library).
Runs are spread over time (run 1 of every batch, then run 2, ...) so that a noisy minute hits
all batch sizes alike. Reported per batch: the median over the runs of each ratio
minivae / peer, with the smallest and largest run, and every run in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _machine  # noqa: E402

PEERS = ("torch", "torch_fused_adam", "torch_compile", "jax_jit", "gemm_floor")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batches", default="32,128,512")
    p.add_argument("--steps", type=int, default=150, help="timed steps per contender and run")
    p.add_argument("--threads", type=int, default=None, help="for every library (default: cores)")
    p.add_argument("--save", action="store_true",
                   help="write benchmarks/results/peers_cpu.json (only when given)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.steps < 1:
        p.error("--runs and --steps must be >= 1")
    batches = [int(b) for b in args.batches.split(",")]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_time.py")
    extra = ["--threads", str(args.threads)] if args.threads else []
    runs = {b: [] for b in batches}
    t0 = time.time()
    for r in range(args.runs):
        for b in batches:
            out = subprocess.run([sys.executable, script, "--batch", str(b), "--steps",
                                  str(args.steps), "--peers", "--json", "--quiet", *extra],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[b].append(res)
            print(f"run {r + 1}/{args.runs} batch {b}: minivae {res['minivae_ms']:.3f} ms; "
                  + ", ".join(f"/{k} {res.get(f'ratio_minivae_to_{k}') or float('nan'):.3f}"
                              for k in PEERS), flush=True)
    summary = {}
    for b in batches:
        row = {}
        for k in PEERS:
            vals = sorted(x[f"ratio_minivae_to_{k}"] for x in runs[b]
                          if x.get(f"ratio_minivae_to_{k}") is not None)
            if vals:
                row[k] = {"median": vals[len(vals) // 2] if len(vals) % 2 else
                          0.5 * (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]),
                          "min": vals[0], "max": vals[-1], "runs": len(vals)}
        summary[b] = row
    print(f"\n# minivae / peer, median over {args.runs} runs [min, max] (>1: minivae slower)")
    print(f"{'batch':>6}" + "".join(f"{k:>24}" for k in PEERS))
    for b in batches:
        cells = []
        for k in PEERS:
            c = summary[b].get(k)
            cells.append(f"{c['median']:.2f} [{c['min']:.2f}, {c['max']:.2f}]" if c else "-")
        print(f"{b:>6}" + "".join(f"{c:>24}" for c in cells))
    if args.save:
        info = runs[batches[0]][0]["machine"]
        path = _machine.save("peers_cpu.json", {
            "what": "one training step (forward, backward, Adam), 784-400-20 Bernoulli VAE, "
                    "float32, CPU; ratio = minivae time / peer time",
            "summary": {str(b): v for b, v in summary.items()},
            "runs": {str(b): v for b, v in runs.items()}, "steps": args.steps,
            "seconds": time.time() - t0, "machine": info})
        print(f"# wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
