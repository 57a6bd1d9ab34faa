"""A VAE with a 2-d latent space, so the whole learned manifold fits in one picture.

    python examples/latent2d_manifold.py             # figures into runs/examples/latent2d/
    python examples/latent2d_manifold.py /tmp/out

With z in 2-D we can decode a regular grid of z and see every digit the decoder can draw,
sliding smoothly into each other (Kingma & Welling 2014, Fig. 4). The grid is spaced through
the Gaussian inverse CDF, so each cell covers the same probability under the prior N(0, I).
About 20-40 s on 2 CPU cores.
"""
import sys

from minivae.data import load_dataset
from minivae.plots import latent_scatter, manifold
from minivae.train import TrainConfig, Trainer

out = sys.argv[1] if len(sys.argv) > 1 else "runs/examples/latent2d"
ds = load_dataset("mnist10k")

# A narrower network than the default and more epochs: two latent numbers are a tight
# bottleneck, and the digits need a while to sort themselves out in that plane.
cfg = TrainConfig(hidden=[256], latent=2, epochs=15, lr=2e-3, seed=0, out=out, figures=False)
t = Trainer(cfg, dataset=ds)
t.fit()
print(f"test loss {t.history[-1]['test_loss']:.1f} nats (a 20-d latent reaches ~118; two "
      f"numbers per digit cost reconstruction quality)")

# Where each test digit lands (the mean of q(z|x)), and what each point of the plane decodes to.
print("wrote", latent_scatter(t.model, ds.x_test, ds.y_test, f"{out}/latent.png"))
print("wrote", manifold(t.model, f"{out}/manifold.png", n=20))
