"""A plain autoencoder beside a VAE: both compress digits to 2 numbers, only one can generate.

    python examples/ae_vs_vae.py                     # figure into runs/examples/ae_vs_vae/
    python examples/ae_vs_vae.py /tmp/out
    python examples/ae_vs_vae.py --quick             # 1 epoch each on 2,000 digits: a smoke test

Same encoder/decoder sizes (784-256-2-256-784), same data, same optimiser. The difference is
the loss: the autoencoder only reconstructs; the VAE also pays KL(q(z|x) || N(0, I)), which
pulls its codes into the region a standard normal covers. The autoencoder's codes spread
wherever they like (look at the axis ranges), so N(0, I) says nothing about where its digits
are: decoding z ~ N(0, I) lands among a few classes or between them (smudges), while for the
VAE it is a way to generate new digits. The autoencoder reconstructs better: it pays no KL.
About 5 s on 2 CPU cores (--quick: under 2 s), whole command.
"""
import argparse
import dataclasses
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from minivae.data import load_dataset  # noqa: E402
from minivae.engine.threads import one_blas_thread  # noqa: E402
from minivae.plots import tile  # noqa: E402
from minivae.train import TrainConfig, Trainer  # noqa: E402

QUICK_TRAIN = 2000   # --quick: training digits used (of 9,000), for 1 epoch per model


def run(out, quick: bool = False) -> Path:
    """Train both models (runs in out/autoencoder and out/vae) and draw out/ae_vs_vae.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("mnist10k")
    if quick:
        ds = dataclasses.replace(ds, x_train=ds.x_train[:QUICK_TRAIN], y_train=ds.y_train[:QUICK_TRAIN])

    models = {}
    for kind in ("autoencoder", "vae"):
        cfg = TrainConfig(model=kind, hidden=[256], latent=2, epochs=1 if quick else 8, seed=0,
                          out=str(out / kind), figures=False)
        t = Trainer(cfg, dataset=ds)
        t.fit()
        models[kind] = t.model
        print(f"{kind}: test reconstruction {t.history[-1]['test_recon']:.1f} nats, "
              f"KL {t.history[-1]['test_kl']:.1f}")

    # One row per model: its test codes coloured by digit, and 36 decodings of z ~ N(0, I).
    z = np.random.default_rng(0).standard_normal((36, 2)).astype(np.float32)
    fig, axes = plt.subplots(2, 2, figsize=(10, 9.5))
    for row, (kind, m) in enumerate(models.items()):
        code = m.code(ds.x_test)                           # the VAE's code is the mean of q(z|x)
        ax = axes[row, 0]
        sc = ax.scatter(code[:, 0], code[:, 1], c=ds.y_test, cmap="tab10", s=5, vmin=-0.5, vmax=9.5)
        # the unit circle and 2-sigma circle of the prior N(0, I), for scale
        for r in (1, 2):
            ax.add_patch(plt.Circle((0, 0), r, fill=False, ls="--", color="k", lw=0.8))
        ax.set_title(f"{kind}: test codes (dashed: 1 and 2 sd of N(0, I))", fontsize=10)
        ax.set_xlabel("z 1")
        ax.set_ylabel("z 2")
        ax.set_aspect("equal", adjustable="datalim")
        fig.colorbar(sc, ax=ax, ticks=range(10), fraction=0.046).set_label("digit")
        ax = axes[row, 1]
        ax.imshow(tile(m.decode(z), (28, 28), 6), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"{kind}: decoder at 36 draws z ~ N(0, I)", fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "ae_vs_vae.png", dpi=90)
    plt.close(fig)
    print(f"wrote {out / 'ae_vs_vae.png'}")
    return out / "ae_vs_vae.png"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", default=os.path.join("runs", "examples", "ae_vs_vae"),
                   help="directory for the two runs and the figure (default: runs/examples/ae_vs_vae)")
    p.add_argument("--quick", action="store_true",
                   help=f"1 epoch per model on {QUICK_TRAIN:,} training digits (a smoke test)")
    args = p.parse_args(argv)
    # One BLAS thread, as `minivae train` uses: OpenBLAS's own threads busy-wait between the
    # products and slow a shared machine down (minivae.engine.threads explains).
    with one_blas_thread():
        run(args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
