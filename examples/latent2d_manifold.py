"""A VAE with a 2-d latent space, so the whole learned manifold fits in one picture.

    python examples/latent2d_manifold.py             # figures into runs/examples/latent2d_manifold/
    python examples/latent2d_manifold.py /tmp/out
    python examples/latent2d_manifold.py --quick     # 1 epoch on 2,000 digits: a smoke test

With z in 2-D we can decode a regular grid of z and see every digit the decoder can draw,
sliding smoothly into each other (Kingma & Welling 2014, Fig. 4). The grid is spaced through
the Gaussian inverse CDF, so each cell covers the same probability under the prior N(0, I).
About 5 s on 2 CPU cores (--quick: under 2 s), whole command.
"""
import argparse
import dataclasses
import os
import sys

from minivae.data import load_dataset
from minivae.engine.threads import one_blas_thread
from minivae.plots import latent_scatter, manifold
from minivae.train import TrainConfig, Trainer

QUICK_TRAIN = 2000   # --quick: training digits used (of 9,000), for 1 epoch


def run(out: str, quick: bool = False) -> None:
    """Train the 2-d VAE into ``out`` and draw out/latent.png and out/manifold.png."""
    ds = load_dataset("mnist10k")
    if quick:
        ds = dataclasses.replace(ds, x_train=ds.x_train[:QUICK_TRAIN], y_train=ds.y_train[:QUICK_TRAIN])

    # A narrower network than the default and more epochs: two latent numbers are a tight
    # bottleneck, and the digits need a while to sort themselves out in that plane.
    cfg = TrainConfig(hidden=[256], latent=2, epochs=1 if quick else 15, lr=2e-3, seed=0, out=out,
                      figures=False)
    t = Trainer(cfg, dataset=ds)
    t.fit()
    print(f"test loss {t.history[-1]['test_loss']:.1f} nats (a 20-d latent reaches ~118; two "
          f"numbers per digit cost reconstruction quality)")

    # Where each test digit lands (the mean of q(z|x)), and what each point of the plane decodes to.
    print("wrote", latent_scatter(t.model, ds.x_test, ds.y_test, os.path.join(out, "latent.png")))
    print("wrote", manifold(t.model, os.path.join(out, "manifold.png"), n=20))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", default=os.path.join("runs", "examples", "latent2d_manifold"),
                   help="run directory for the checkpoint, metrics and figures "
                        "(default: runs/examples/latent2d_manifold)")
    p.add_argument("--quick", action="store_true",
                   help=f"1 epoch on {QUICK_TRAIN:,} training digits (a smoke test)")
    args = p.parse_args(argv)
    # One BLAS thread, as `minivae train` uses: OpenBLAS's own threads busy-wait between the
    # products and slow a shared machine down (minivae.engine.threads explains).
    with one_blas_thread():
        run(args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
