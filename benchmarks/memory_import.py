#!/usr/bin/env python
"""Import time and peak memory of a short training run: minivae vs PyTorch (CPU).

Every measurement runs in a fresh Python subprocess (so nothing is already imported or
allocated), repeated --repeats times, median reported:

- import time: wall time of ``import minivae`` with what a training script uses (``minivae.VAE``,
  ``minivae.Adam``, ``minivae.train_step``: the package itself loads its names on first use)
  vs ``import torch`` (+ torch.nn, torch.optim), measured inside the subprocess;
- peak RSS (VmHWM in /proc/self/status: the high-water mark of this process's own memory;
  ru_maxrss would carry the parent's over fork/exec) of: the interpreter after the import, and after a
  short training run (--steps Adam steps of the 784-400-20 VAE at --batch, float32, on the
  bundled MNIST). ``python`` alone is the baseline.

    python benchmarks/memory_import.py          # prints the table; writes nothing
    python benchmarks/memory_import.py --save   # also benchmarks/results/memory_import.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _machine  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r'''
import json, sys, time
def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
t0 = time.perf_counter()
which, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if which == "minivae":
    import minivae
    minivae.VAE, minivae.Adam, minivae.train_step     # loaded on first use (minivae/_lazy.py)
elif which == "torch":
    import torch, torch.nn, torch.optim
t_import = time.perf_counter() - t0
rss_import = hwm_kb()
if steps and which != "python":
    sys.path.insert(0, sys.argv[4])
    import _machine
    xs = _machine.mnist_batches(batch, 8)
    if which == "minivae":
        model = minivae.VAE(seed=0)
        opt = minivae.Adam(model.params, lr=1e-3)
        for i in range(steps):
            model.loss_and_grads(xs[i % 8], check=False)
            opt.step()
    else:
        torch.set_num_threads(int(sys.argv[5]))
        model = _machine.torch_vae()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        txs = [torch.from_numpy(x) for x in xs]
        for i in range(steps):
            opt.zero_grad()
            model(txs[i % 8]).backward()
            opt.step()
print(json.dumps({"import_s": t_import, "rss_after_import_kb": rss_import,
                  "peak_rss_kb": hwm_kb()}))
'''


def child(which, steps, batch, threads):
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(steps), str(batch), HERE,
                          str(threads)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON (last line)")
    p.add_argument("--save", action="store_true",
                   help="also write benchmarks/results/memory_import.json (only when given)")
    args = p.parse_args(argv)
    threads = _machine.set_threads(args.threads)
    import numpy as np

    info = _machine.machine_info()
    _machine.print_machine(info)
    res = {}
    for which in ("python", "minivae", "torch"):
        imp = [child(which, 0, args.batch, threads) for _ in range(args.repeats)]
        run = [child(which, args.steps, args.batch, threads) for _ in range(max(1, args.repeats // 2))]
        res[which] = {
            "import_ms": float(np.median([r["import_s"] for r in imp])) * 1e3,
            "rss_after_import_mib": float(np.median([r["rss_after_import_kb"] for r in imp])) / 1024,
            "peak_rss_training_mib": float(np.median([r["peak_rss_kb"] for r in run])) / 1024,
        }
    print(f"{'':10}{'import ms':>10}{'RSS after import MiB':>22}{'peak RSS, training MiB':>25}")
    for k, v in res.items():
        print(f"{k:10}{v['import_ms']:10.1f}{v['rss_after_import_mib']:22.1f}"
              f"{v['peak_rss_training_mib']:25.1f}")
    payload = {"what": f"fresh subprocess each; training = {args.steps} Adam steps, 784-400-20 "
                       f"VAE, batch {args.batch}, float32, CPU; medians of {args.repeats} runs",
               "results": res, "machine": info}
    if args.save:
        path = _machine.save("memory_import.json", payload)
        print(f"# wrote {os.path.relpath(path)}")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
