#!/usr/bin/env python
"""Step time over batch size (32..1024) and hidden width: minivae vs PyTorch eager (CPU), and
with --peers every compiled peer too (torch fused Adam, torch.compile, JAX jit).

    python benchmarks/sweep.py                  # prints the table; writes nothing
    python benchmarks/sweep.py --save           # also benchmarks/results/sweep.json and sweep.png
    python benchmarks/sweep.py --peers --save   # ... against every peer (slower: each point compiles)
    python benchmarks/sweep.py --steps 40 --batches 32,128,512 --hidden 400 --out /tmp/s  # /tmp/s.{json,png}

Each point is measured as in step_time.py (interleaved turns, medians, same thread count), in
--rounds passes over the grid; per point the pass with the lowest GEMM floor is kept: on a
shared machine another process can stall OpenBLAS's busy-waiting threads for a whole point
(seen here: 50x slower products), and the floor, measured in the same interleaved turns, shows
it. The plot shows time per example and the ratio minivae / torch (below 1: minivae faster).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _machine  # noqa: E402


def ints(text):
    return [int(s) for s in text.split(",") if s.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=ints, default=[32, 64, 128, 256, 512, 1024])
    p.add_argument("--hidden", type=ints, default=[200, 400, 800])
    p.add_argument("--steps", type=int, default=30, help="timed steps per contender and point")
    p.add_argument("--rounds", type=int, default=2,
                   help="passes over the grid; per point the pass with the lowest GEMM floor "
                        "(least disturbed by other processes) is kept")
    p.add_argument("--block", type=float, default=0.4, help="seconds per turn")
    p.add_argument("--settle", type=float, default=0.2, help="seconds per turn not counted")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peers", action="store_true",
                   help="also torch fused Adam, torch.compile and JAX jit (as step_time.py --peers)")
    p.add_argument("--save", action="store_true",
                   help="also write benchmarks/results/sweep.json and sweep.png (only when given)")
    p.add_argument("--out", default=None, metavar="STEM",
                   help="write STEM.json and STEM.png instead (implies --save)")
    args = p.parse_args(argv)
    threads = _machine.set_threads(args.threads)
    import numpy as np
    import torch

    import step_time

    torch.set_num_threads(threads)
    info = _machine.machine_info()
    _machine.print_machine(info)
    best = {}  # (hidden, batch) -> the least disturbed measurement of that point
    for r in range(args.rounds):
        print(f"# round {r + 1} of {args.rounds}")
        print(f"{'hidden':>6} {'batch':>6} {'minivae ms':>11} {'torch ms':>9} {'floor ms':>9} "
              f"{'mv/torch':>9} {'mv/floor':>9}")
        for h in args.hidden:
            for b in args.batches:
                pt = measure_point(step_time, h, b, args)
                print(f"{h:6d} {b:6d} {pt['minivae_ms']:11.3f} {pt['torch_ms']:9.3f} "
                      f"{pt['gemm_floor_ms']:9.3f} {pt['ratio_minivae_to_torch']:9.3f} "
                      f"{pt['ratio_minivae_to_gemm_floor']:9.3f}" + "".join(
                          f"  /{peer} {pt[f'ratio_minivae_to_{peer}']:.3f}" for peer in PEERS[1:]
                          if f"ratio_minivae_to_{peer}" in pt), flush=True)
                key = (h, b)
                if key not in best or pt["gemm_floor_ms"] < best[key]["gemm_floor_ms"]:
                    best[key] = pt
    points = [best[k] for k in sorted(best)]
    if not (args.save or args.out):
        return 0
    stem = os.path.splitext(args.out or str(_machine.RESULTS / "sweep"))[0]
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({
            "what": "one training step (forward, backward, Adam), 784-H-20 Bernoulli VAE, float32, CPU",
            "steps": args.steps, "rounds": args.rounds, "threads": threads,
            "minivae_threads": info["minivae_threads"],
            "points": points, "machine": info}, f, indent=2)
        f.write("\n")
    plot(points, stem + ".png", info)
    print(f"# wrote {stem}.json and {stem}.png")
    return 0


def measure_point(step_time, h, b, args):
    import numpy as np

    a = step_time.parse(["--batch", str(b), "--hidden", str(h)]
                        + (["--peers"] if args.peers else []))
    fns = step_time.contenders(a)
    for extra in ("minivae_unfused", "minivae_no_kernels") + (
            () if args.peers else ("torch_fused_adam",)):    # step_time.py's business
        fns.pop(extra, None)
    kept = step_time.measure(fns, args.steps, args.block, args.settle, warmup=3)
    med = {n: float(np.median([x + y for x, y in v])) * 1e3 for n, v in kept.items()}
    floor = min(med["gemm_floor"], med["gemm_floor_split"])   # as step_time.py defines it
    pt = {"hidden": h, "batch": b, "minivae_ms": med["minivae"], "gemm_floor_ms": floor,
          "torch_gemm_floor_ms": med["torch_gemm_floor"],
          "ratio_minivae_to_gemm_floor": med["minivae"] / floor}
    for peer in PEERS:
        if peer in med:
            pt[f"{peer}_ms"] = med[peer]
            pt[f"ratio_minivae_to_{peer}"] = med["minivae"] / med[peer]
    return pt


#: the contenders minivae is compared with, where they ran
PEERS = ("torch", "torch_fused_adam", "torch_compile", "jax_jit")


def plot(points, path, info):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hs = sorted({p["hidden"] for p in points})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.6))
    for i, h in enumerate(hs):
        pts = sorted((p for p in points if p["hidden"] == h), key=lambda p: p["batch"])
        b = [p["batch"] for p in pts]
        c = f"C{i}"
        a1.plot(b, [1e3 * p["minivae_ms"] / p["batch"] for p in pts], "-o", color=c,
                label=f"minivae, H={h}")
        a1.plot(b, [1e3 * p["torch_ms"] / p["batch"] for p in pts], "--s", color=c,
                label=f"torch, H={h}")
        a1.plot(b, [1e3 * p["gemm_floor_ms"] / p["batch"] for p in pts], ":", color=c,
                label=f"GEMM floor, H={h}")
        for peer, marker in zip(PEERS, "os^D"):
            if all(f"ratio_minivae_to_{peer}" in p for p in pts):
                a2.plot(b, [p[f"ratio_minivae_to_{peer}"] for p in pts], "-" + marker, color=c,
                        ms=4, alpha=1.0 if peer == "torch" else 0.6,
                        label=f"/ {peer}, H={h}")
        a2.plot(b, [p["ratio_minivae_to_gemm_floor"] for p in pts], ":", color=c,
                label=f"/ GEMM floor, H={h}")
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xlabel("batch size")
    a1.set_yscale("log")
    a1.set_ylabel("µs per example (one training step)")
    a1.legend(fontsize=7, ncol=1)
    a2.axhline(1.0, color="k", lw=0.8)
    a2.set_ylabel("minivae time / peer's time")
    a2.set_yscale("log")
    a2.legend(fontsize=6, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside:
    # inside, it hid the floor's curves
    fig.suptitle(f"784-H-20 VAE step, float32 — {info['cpu']}, {info['cores']} cores, "
                 f"numpy {info['numpy']} ({info['numpy_blas'].get('name')}), torch {info.get('torch')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
