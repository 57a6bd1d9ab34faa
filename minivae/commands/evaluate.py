"""Evaluate a trained model on its test split: the ELBO and the importance-weighted bound.

  minivae evaluate runs/vae                 # the run directory or its checkpoint.npz
  minivae evaluate runs/vae --k 1000        # tighter bound on -log p(x), slower
  minivae evaluate runs/vae --json

Prints loss = -ELBO (nats per example, one z per example, as the PyTorch example) with its
reconstruction and KL parts, and nll_k = -IWAE_k, an upper bound on -log p(x) that tightens as
k grows (Burda et al. 2016). The data set and binarization are the ones the run trained on.
"""
from __future__ import annotations

from . import number

from ..backend import strict_json

from ..backend import NAMES as BACKENDS

#: the most importance samples --k takes: Burda et al. (2016) report IWAE_5000; 100,000 is already
#: ~3 hours for mnist10k's 1000 test images on 2 cores, and more is surely a typo
MAX_K = 100_000

HELP = "test ELBO and importance-weighted log-likelihood bound (IWAE_k) of a checkpoint"


def add_arguments(p):
    p.add_argument("checkpoint", metavar="CKPT", help="run directory or checkpoint.npz")
    p.add_argument("--k", type=number(0, kind=int, high=MAX_K), default=100,
                   help=f"importance samples per example (default 100, at most {MAX_K:,}; 0 "
                        f"skips the IWAE bound)")
    p.add_argument("--n", type=number(1, kind=int), default=None, metavar="N",
                   help="evaluate the first N test examples only")
    p.add_argument("--device", default="numpy", choices=list(BACKENDS))
    p.add_argument("--seed", type=number(0, kind=int), default=0, help="seed of the evaluation noise")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar for the IWAE pass (it shows only on a terminal)")


def run(args) -> int:
    import json
    import sys
    import time

    from ..cli import UserError
    from ..evaluate import evaluate
    from ..train import TrainConfig, data_mismatch, load_model, prepare_data

    model, meta = load_model(args.checkpoint, backend=args.device)
    cfg = TrainConfig.from_json(meta["train_config"])
    ds, _, x_test = prepare_data(cfg)
    why = data_mismatch(cfg, ds, meta, args.checkpoint, splits=("test",))   # what it reads
    if why and ds.dim != model.d_in:
        raise UserError(f"{why}; it cannot be evaluated on these images")
    if why:
        print(f"note: {why}; evaluating on it as it is now", file=sys.stderr)
    if args.n is not None:
        x_test = x_test[: args.n]
    t0 = time.perf_counter()
    k = args.k if model.has_prior else 0        # an Autoencoder has no IWAE bound
    if args.k and not model.has_prior:
        print(f"note: {args.checkpoint} holds an Autoencoder, which has no ELBO or IWAE bound; "
              f"reporting its reconstruction loss", file=sys.stderr)
    import warnings

    import numpy as np

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # reported below, once, as "finite"
        res = evaluate(model, x_test, k=k, seed=args.seed, progress=not args.no_progress)
    res.update(n=int(x_test.shape[0]), data=ds.name, epoch=meta["epoch"],
               seconds=time.perf_counter() - t0)
    import math

    res["finite"] = all(math.isfinite(v) for v in res.values() if isinstance(v, float))
    if args.json:
        print(strict_json(res))      # a non-finite number is null, with "finite": false
        return 0
    if not res["finite"]:
        print(f"note: the loss of {args.checkpoint} is not finite (NaN or Inf): its weights "
              f"overflow on this data", file=sys.stderr)
    print(f"{args.checkpoint}: {type(model).__name__}, epoch {meta['epoch']}, {res['n']} test example{'s' if res['n'] != 1 else ''} of {ds.name}")
    if model.has_prior:
        print(f"  loss = -ELBO   {res['loss']:9.2f} nats/example "
              f"(recon {res['recon']:.2f} + KL {res['kl']:.2f})")
    else:
        print(f"  loss = -log p(x | code)   {res['loss']:9.2f} nats/example (reconstruction)")
    if f"nll_{args.k}" in res:
        print(f"  -IWAE_{args.k:<7d}{res[f'nll_{args.k}']:9.2f} nats/example "
              f"(upper bound on -log p(x))")
    return 0
