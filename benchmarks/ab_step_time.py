#!/usr/bin/env python
"""A/B: this checkout's training step against another checkout's, interleaved in one process.

    git worktree add /tmp/base <commit>          # e.g. the commit before a refactor
    python benchmarks/ab_step_time.py --other /tmp/base --batch 128

For a change that must not cost speed (a refactor), two separate runs of step_time.py on a
shared machine differ by more than the change could: the noise moves both by 30% between runs.
Here both versions run in the same process on the same batches, taking turns of --block
seconds (step_time.py's method: medians of the steps after the first --settle seconds of each
turn), so a noisy neighbour slows both alike. The other checkout's ``minivae`` package is
copied under the name ``minivae_other`` (its imports are relative); its compiled kernels are
used when that checkout has them built. Both get the same thread count.

Each version's step is what its trainer runs: ``train_step(model, opt, x, check=False)``
(``minivae.train_step`` in both). Reported: the median ms per step of each, their ratio
(this / other), and PyTorch eager's median in the same turns for scale.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _machine  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--other", required=True, help="root of the other checkout (has minivae/)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=400, help="timed steps per version")
    p.add_argument("--block", type=float, default=0.6)
    p.add_argument("--settle", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON (last line)")
    p.add_argument("--save", metavar="NAME", default=None,
                   help="also write benchmarks/results/NAME.json (only when given)")
    p.add_argument("--label", default=None, help="what the other checkout is (kept in --save)")
    return p.parse_args(argv)


def own_team(lib) -> None:
    """OpenBLAS's parallel jobs go to ``lib``'s thread team (minivae.engine.blas.team_backend),
    where that copy hands them to a team at all."""
    blas, kernels = lib.engine.blas, lib.engine.kernels
    if blas.team_backend():
        kernels._c.team_blas(blas._callback_setter(), True)


def load_other(root):
    src = os.path.join(root, "minivae")
    if not os.path.isfile(os.path.join(src, "__init__.py")):
        raise SystemExit(f"ab_step_time.py: error: {src} is not a minivae package")
    tmp = tempfile.mkdtemp(prefix="minivae_other_")
    shutil.copytree(src, os.path.join(tmp, "minivae_other"))
    sys.path.insert(0, tmp)
    return importlib.import_module("minivae_other")


def main(argv=None) -> int:
    args = parse(argv)
    threads = _machine.set_threads(args.threads, None)
    import numpy as np
    import torch

    import minivae
    other = load_other(args.other)
    other.set_num_threads(threads)
    torch.set_num_threads(threads)
    info = _machine.machine_info()
    print(f"# this: {os.path.dirname(minivae.__file__)}\n# other: {args.other}")
    _machine.print_machine(info)

    B, n_batches = args.batch, 32
    host = _machine.mnist_batches(B, n_batches)

    owner = [None]      # whose thread team OpenBLAS hands its parallel jobs to now

    def contender(lib):
        model = lib.VAE(seed=0)
        opt = lib.Adam(model.params, lr=1e-3)
        xs = [model.backend.asarray(x) for x in host]

        def step(i):
            if owner[0] is not lib:
                # Each copy's compiled kernels have their own team, but OpenBLAS has one
                # callback for the process: the copy whose turn it is installs its own, or
                # its products would run on the other copy's team while its kernels use its
                # own (two pools on the cores: identical code measured 1.06 before this).
                own_team(lib)
                owner[0] = lib
            t0 = time.perf_counter()
            lib.train_step(model, opt, xs[i % n_batches], check=False)
            return time.perf_counter() - t0, 0.0
        return step

    tm = _machine.torch_vae(784, 400, 20)
    topt = torch.optim.Adam(tm.parameters(), lr=1e-3)
    txs = [torch.from_numpy(x) for x in host]

    def torch_step(i):
        t0 = time.perf_counter()
        topt.zero_grad()
        tm(txs[i % n_batches]).backward()
        topt.step()
        return time.perf_counter() - t0, 0.0

    from step_time import measure

    fns = {"this": contender(minivae), "other": contender(other), "torch": torch_step}
    kept = measure(fns, args.steps, args.block, args.settle, warmup=20)
    med = {n: float(np.median([a for a, _ in v])) * 1e3 for n, v in kept.items()}
    res = {"batch": B, "threads": threads, "this_ms": med["this"], "other_ms": med["other"],
           "torch_ms": med["torch"], "ratio_this_to_other": med["this"] / med["other"],
           "ratio_this_to_torch": med["this"] / med["torch"],
           "ratio_other_to_torch": med["other"] / med["torch"],
           "steps_kept": {n: len(v) for n, v in kept.items()}, "other": args.label or args.other,
           "block_s": args.block, "settle_s": args.settle, "machine": info}
    print(f"# batch {B}, {threads} threads, median of >= {args.steps} interleaved steps")
    for n in ("this", "other", "torch"):
        print(f"{n:8}{med[n]:9.3f} ms/step")
    print(f"this / other = {res['ratio_this_to_other']:.3f}   this / torch = "
          f"{res['ratio_this_to_torch']:.3f}   other / torch = {res['ratio_other_to_torch']:.3f}")
    if args.save:
        path = _machine.save(args.save + ".json", res)
        print(f"# wrote {os.path.relpath(path)}")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
