"""Check minivae's hand-written gradients against an autograd framework, tensor by tensor.

Builds the model (default: the 784-400-20 Bernoulli VAE), copies its weights into the same
model written in PyTorch (or JAX), feeds both the same batch and the same eps, runs one
forward/backward in each and prints, per gradient tensor (and for the loss):

    max abs diff = max |a - b|
    max rel diff = max |a - b| / max(max |a|, max |b|)     (the tensor's scale; 0 if all zero)

Exits 1 when the largest relative difference is above the dtype's tolerance (float64: 1e-10,
float32: 1e-4): agreement to round-off, not just "close".

  minivae compare --against torch                     # float64 table
  minivae compare --against torch --dtype float32 --json
  minivae compare --model autoencoder --likelihood gaussian --hidden 256,128 --latent 8

The batch is synthetic (seeded): Bernoulli pixels for --likelihood bernoulli, uniform [0, 1]
values otherwise. Needs torch: pip install 'minivae[compare]' (here: pip install torch==2.13.0);
--against jax needs jax: pip install 'minivae[jax]'.
"""
from __future__ import annotations

from ..backend import strict_json

import argparse
import json

import numpy as np

from ..layers import ACTIVATIONS
from ..losses import LIKELIHOODS
from ..models import MODELS
from . import layer_sizes, number

HELP = "compare loss and gradients with the same model in PyTorch (or JAX), per tensor"


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_arguments(p):
    p.add_argument("--against", default="torch", choices=["torch", "jax"],
                   help="autograd framework to compare with (default torch)")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                   help="precision of both computations (default float64)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--model", default="vae", choices=list(MODELS))
    p.add_argument("--likelihood", default="bernoulli",
                   choices=list(LIKELIHOODS))
    p.add_argument("--activation", default="relu",
                   choices=list(ACTIVATIONS))
    p.add_argument("--hidden", type=layer_sizes, default=[400], metavar="SIZES",
                   help="hidden widths, e.g. 400 or 512,256 (default 400)")
    p.add_argument("--latent", type=_positive_int, default=20, help="latent size (default 20)")
    p.add_argument("--d-in", type=_positive_int, default=784, help="input size (default 784)")
    p.add_argument("--batch", type=_positive_int, default=128, help="batch size (default 128)")
    p.add_argument("--backend", default="numpy", choices=["numpy", "strict", "cupy"],
                   help="minivae's array backend (default numpy)")
    p.add_argument("--seed", type=number(0, kind=int), default=0, help="seed for weights, batch and eps")


def build(args):
    """The model and a seeded batch (x, eps) that ``args`` describe."""
    from ..models import MODELS

    cls = MODELS[args.model]
    model = cls(d_in=args.d_in, hidden=args.hidden, latent=args.latent,
                activation=args.activation, likelihood=args.likelihood,
                backend=args.backend, dtype=args.dtype, seed=args.seed)
    rng = np.random.default_rng(args.seed + 1)
    shape = (args.batch, args.d_in)
    if args.likelihood == "bernoulli":
        x = (rng.random(shape) < 0.3).astype(args.dtype)
    else:
        x = rng.random(shape).astype(args.dtype)
    eps = rng.standard_normal((args.batch, args.latent)).astype(args.dtype) \
        if cls.has_prior else None
    return model, x, eps


def run(args) -> int:
    from ..cli import UserError
    from ..compare import FrameworkMissing, compare

    model, x, eps = build(args)
    try:
        c = compare(model, x, eps, against=args.against)
    except FrameworkMissing as e:
        raise UserError(str(e)) from None
    if args.json:
        print(strict_json(c.to_json()))
    else:
        print(f"{type(model).__name__} {args.d_in}-{'-'.join(map(str, args.hidden))}-"
              f"{args.latent}, {args.likelihood}, batch {args.batch}, backend {args.backend}")
        print(c.table())
    return 0 if c.passed else 1
