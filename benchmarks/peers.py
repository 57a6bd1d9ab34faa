#!/usr/bin/env python
"""minivae against every CPU peer, repeated: the numbers behind the README's speed table.

    python benchmarks/peers.py                        # 5 runs x batch 32, 128, 512; prints
    python benchmarks/peers.py --runs 3 --save        # also benchmarks/results/peers_cpu.json

Each run is one fresh ``benchmarks/step_time.py --peers --json`` process per batch size
(minivae, torch eager, torch fused Adam, torch.compile, JAX jit and the GEMM floor, interleaved
in one process, medians over --steps steps each; the same thread count for every library).
Also per batch: each peer's time over the GEMM floor, and the floor plus one Adam pass over
the products' weights (``products_and_adam_floor``: what any step with in-memory float32 Adam
state pays at least). Runs are spread over time (run 1 of every batch, then run 2, ...) so that a noisy minute hits
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

PEERS = ("torch", "torch_fused_adam", "torch_compile", "jax_jit", "gemm_floor",
         "products_and_adam_floor")
#: each of these over the GEMM floor (key ratio_<name>_to_gemm_floor): how far every peer, and
#: the products with one Adam pass, are from the products alone
OVER_FLOOR = ("torch", "torch_fused_adam", "torch_compile", "jax_jit", "products_and_adam_floor")


def _stats(vals):
    vals = sorted(vals)
    return {"median": vals[len(vals) // 2] if len(vals) % 2 else
            0.5 * (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]),
            "min": vals[0], "max": vals[-1], "runs": len(vals)}


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
    summary, over_floor = {}, {}
    for b in batches:
        row, row_f = {}, {}
        for k in PEERS:
            vals = [x[f"ratio_minivae_to_{k}"] for x in runs[b]
                    if x.get(f"ratio_minivae_to_{k}") is not None]
            if vals:
                row[k] = _stats(vals)
        for k in OVER_FLOOR:
            vals = [x[f"ratio_{k}_to_gemm_floor"] for x in runs[b]
                    if x.get(f"ratio_{k}_to_gemm_floor") is not None]
            if vals:
                row_f[k] = _stats(vals)
        summary[b], over_floor[b] = row, row_f

    def table(title, names, rows):
        print(f"\n# {title}, median over {args.runs} runs [min, max]")
        print(f"{'batch':>6}" + "".join(f"{k:>24}" for k in names))
        for b in batches:
            cells = []
            for k in names:
                c = rows[b].get(k)
                cells.append(f"{c['median']:.2f} [{c['min']:.2f}, {c['max']:.2f}]" if c else "-")
            print(f"{b:>6}" + "".join(f"{c:>24}" for c in cells))

    table("minivae / peer (>1: minivae slower)", PEERS, summary)
    table("peer / GEMM floor", OVER_FLOOR, over_floor)
    if args.save:
        info = runs[batches[0]][0]["machine"]
        path = _machine.save("peers_cpu.json", {
            "what": "one training step (forward, backward, Adam), 784-400-20 Bernoulli VAE, "
                    "float32, CPU; ratio = minivae time / peer time",
            "summary": {str(b): v for b, v in summary.items()},
            "over_gemm_floor": {str(b): v for b, v in over_floor.items()},
            "runs": {str(b): v for b, v in runs.items()}, "steps": args.steps,
            "seconds": time.time() - t0, "machine": info})
        print(f"# wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
