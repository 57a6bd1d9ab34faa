"""A plain autoencoder beside a VAE: both compress digits to 2 numbers, only one can generate.

    python examples/ae_vs_vae.py                     # figure into runs/examples/ae_vs_vae/
    python examples/ae_vs_vae.py /tmp/out

Same encoder/decoder sizes (784-256-2-256-784), same data, same optimiser. The difference is
the loss: the autoencoder only reconstructs; the VAE also pays KL(q(z|x) || N(0, I)), which
pulls its codes into the region a standard normal covers. The autoencoder's codes spread
wherever they like (look at the axis ranges), so N(0, I) says nothing about where its digits
are: decoding z ~ N(0, I) lands among a few classes or between them (smudges), while for the
VAE it is a way to generate new digits. The autoencoder reconstructs better: it pays no KL.
About 20-40 s on 2 CPU cores.
"""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from minivae.data import load_dataset  # noqa: E402
from minivae.plots import tile  # noqa: E402
from minivae.train import TrainConfig, Trainer  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/examples/ae_vs_vae")
out.mkdir(parents=True, exist_ok=True)
ds = load_dataset("mnist10k")

models = {}
for kind in ("autoencoder", "vae"):
    cfg = TrainConfig(model=kind, hidden=[256], latent=2, epochs=8, seed=0, out=str(out / kind),
                      figures=False)
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
    ax.set_aspect("equal", adjustable="datalim")
    fig.colorbar(sc, ax=ax, ticks=range(10), fraction=0.046)
    ax = axes[row, 1]
    ax.imshow(tile(m.decode(z), (28, 28), 6), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(f"{kind}: decoder at 36 draws z ~ N(0, I)", fontsize=10)
    ax.axis("off")
fig.tight_layout()
fig.savefig(out / "ae_vs_vae.png", dpi=90)
print(f"wrote {out / 'ae_vs_vae.png'}")
