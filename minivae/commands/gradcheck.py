"""Gradient-check every hand-written backward in minivae, in float64, and print the report.

Checks each layer (Dense and every activation), the reparametrized sampler, the Bernoulli and
Gaussian likelihoods, the analytic and Monte-Carlo KL, and the whole VAE and Autoencoder end
to end with fixed eps, against Ridders-extrapolated finite differences (minivae.gradcheck;
the suite itself is minivae.gradcheck.run_all). Exits 1 if any check fails.

  minivae gradcheck                 # the table
  minivae gradcheck --json          # {"backend", "dtype", "seed", "full", "passed": bool,
                                    #  "checks": [{"name", "max_abs_error", "max_rel_error",
                                    #              "passed"}, ...]}
  minivae gradcheck --backend cupy  # the same checks on the GPU (float64 on the device)
  minivae gradcheck --full          # also the default 784-400-20 VAE (random directions)
"""
from __future__ import annotations

from ..backend import strict_json

import json
import time

HELP = "gradient-check every layer, loss, the sampler and the whole VAE/Autoencoder (float64)"


def _seed(text):
    import argparse

    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--backend", default="numpy", choices=["numpy", "strict", "cupy"],
                   help="array backend to check on (default numpy)")
    p.add_argument("--seed", type=_seed, default=0, help="seed for inputs, weights and directions")
    p.add_argument("--full", action="store_true",
                   help="also check the default-size 784-400-20 VAE (random-direction mode)")


def run(args) -> int:
    t0 = time.perf_counter()
    from ..backend import BackendUnavailable
    from ..gradcheck import run_all

    try:
        report = run_all(args.backend, seed=args.seed, full=args.full)
    except BackendUnavailable as e:
        if args.json:     # a script reading stdout gets JSON either way (the line goes to stderr)
            print(strict_json({"backend": args.backend, "passed": False, "error": str(e),
                               "checks": []}))
        raise
    if args.json:
        print(strict_json({
            "backend": args.backend, "dtype": "float64", "seed": args.seed, "full": args.full,
            "passed": report.passed,
            "checks": [{"name": c.name, "max_abs_error": c.max_abs_error,
                        "max_rel_error": c.max_rel_error, "passed": c.passed}
                       for c in report.checks],
        }))
    else:
        print(report.table())
        print(f"\n{len(report.checks)} checks, {len(report.failed)} failed, "
              f"{time.perf_counter() - t0:.1f} s")
    return 0 if report.passed else 1
