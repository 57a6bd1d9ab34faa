"""Draw new examples from a trained VAE: decode z ~ N(0, I) and save them as a PNG grid.

  minivae sample runs/vae                   # 64 samples -> runs/vae/samples.png
  minivae sample runs/vae -n 100 --out my_samples.png --seed 3
"""
from __future__ import annotations

from . import number

from ..backend import NAMES as BACKENDS

HELP = "decode samples from the prior of a trained VAE into a PNG grid"


def add_arguments(p):
    p.add_argument("checkpoint", metavar="CKPT", help="run directory or checkpoint.npz")
    p.add_argument("-n", type=number(1, kind=int, high=10_000), default=64,
                   help="number of samples (default 64, at most 10000)")
    p.add_argument("--out", metavar="PNG", help="output file (default: samples.png in the run)")
    p.add_argument("--seed", type=number(0, kind=int), default=0)
    p.add_argument("--device", default="numpy", choices=list(BACKENDS))


def run(args) -> int:
    import math
    from pathlib import Path

    from ..cli import UserError
    from ..plots import samples
    from . import writable_dir
    from ..train import load_model

    model, meta = load_model(args.checkpoint, backend=args.device)
    if not model.has_prior:
        raise UserError("sampling needs a VAE; this checkpoint holds an autoencoder")
    ck = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ck if ck.is_dir() else ck.parent) / "samples.png"
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got {out}")
    if not out.parent.is_dir():
        raise UserError(f"directory {out.parent} does not exist")
    writable_dir(out.parent, "--out's directory")   # before the work, not after it
    side = int(round(math.sqrt(model.d_in)))
    if side * side != model.d_in:
        raise UserError(f"cannot draw {model.d_in}-pixel examples as square images")
    cols = min(args.n, max(1, int(math.ceil(math.sqrt(args.n)))))
    samples(model, out, (side, side), n=args.n, cols=cols, seed=args.seed)
    print(f"wrote {args.n} sample{'s' if args.n != 1 else ''} to {out}")
    return 0
