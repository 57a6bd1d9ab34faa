"""Holes in a plain autoencoder's latent space, and the VAE's denser one.

To *generate* with an autoencoder you would draw a code z from some simple distribution and
decode it. A plain autoencoder's decoder has only ever been trained on the exact codes f(x) of
training images, which sit on thin, irregular structures with empty space between them
("holes"); a drawn z that falls in a hole decodes to something that was never trained to look
like anything. A VAE's decoder is trained on *samples* z ~ q(z|x), which smear every code into
a Gaussian blob, and its KL term pulls the union of those blobs (the aggregate posterior)
towards the prior N(0, I). So prior samples mostly land where the decoder has been trained.

The measure (no classifier, no bandwidth to tune): call the latent points the decoder was
trained on its "training latents" (AE: f(x) for each training image; VAE: one z ~ q(z|x) per
training image). For a latent z, d(z) = distance to the nearest training latent. Calibrate
with held-out images: tau = the 99th percentile of d over test-image latents, i.e. a held-out
real digit is this far from the training latents at most 99% of the time. A prior sample with
d(z) > tau is *in a hole*. The hole fraction is the share of prior samples in holes: about 1%
when prior samples look like real latents, more when the prior puts mass where no data is.

The prior: N(0, I) for the VAE (what it was trained towards). A plain AE has no prior and its
codes have arbitrary scale, so it gets the most generous simple choice: a Gaussian with the
mean and covariance of its training codes.

Both models are minivae's default 784-400-20-400-784 ReLU networks with a Bernoulli
likelihood, trained alike (Adam, 2000 steps of 128 images). With 20-dimensional codes holes
cannot be drawn directly, so the figure shows the measure itself: the distribution of d(z)/tau
for held-out latents and for prior samples, next to decoded prior samples. (With 2-D codes the
same measure gives about 20% for both models: in 2-D a Gaussian fitted to the AE's codes
covers them fairly well, and the VAE's clusters leave gaps too; the gap opens with dimension.)

Run:  python examples/latent_holes.py [OUT_DIR] [--quick]
Writes OUT_DIR/latent_holes.png and OUT_DIR/metrics.json (default OUT_DIR: runs/examples/latent_holes).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from minivae import VAE, Adam, Autoencoder, train_step
from minivae.data import load_dataset
from minivae.engine.threads import one_blas_thread

N_PRIOR = 2000
LATENT = 20


def nearest_distance(A, B, chunk=1000):
    """For each row of A (n, L), the distance to its nearest row of B (m, L) -> (n,)."""
    bb = np.sum(B * B, axis=1)
    out = []
    for i in range(0, len(A), chunk):      # chunks of rows keep the (chunk, m) matrix small
        a = A[i:i + chunk]
        d2 = np.sum(a * a, axis=1)[:, None] - 2.0 * a @ B.T + bb[None, :]
        out.append(np.sqrt(np.maximum(d2.min(axis=1), 0.0)))
    return np.concatenate(out)


def hole_fraction(train_z, test_z, prior_z, q=0.99):
    """Share of prior_z farther from every train_z than the q-quantile of test_z's distances."""
    tau = np.quantile(nearest_distance(test_z, train_z), q)
    d = nearest_distance(prior_z, train_z)
    return float(np.mean(d > tau)), d > tau, tau


def train(model, X, steps, rng):
    opt = Adam(model.params, lr=1e-3)
    for _ in range(steps):
        train_step(model, opt, X[rng.integers(0, len(X), 128)], check=False)   # loss_and_grads + opt.step, fast


def run(out_dir, quick=False, seed=0):
    t0 = time.perf_counter()
    ds = load_dataset("mnist10k")
    X, Xt = ds.x_train, ds.x_test
    rng = np.random.default_rng(seed)
    steps = 800 if quick else 2000
    out = {}

    ae = Autoencoder(latent=LATENT, seed=seed)
    train(ae, X, steps, rng)
    z_train, z_test = ae.encode(X).astype(np.float64), ae.encode(Xt).astype(np.float64)
    prior = rng.multivariate_normal(z_train.mean(axis=0), np.cov(z_train.T), N_PRIOR)
    out["ae"] = _measure(ae, z_train, z_test, prior)

    vae = VAE(latent=LATENT, seed=seed)
    train(vae, X, steps, rng)

    def sample_q(x):
        """one z ~ q(z|x) per image: the decoder's training inputs are samples, not means"""
        mu, logvar = vae.encode(x)
        return (mu + np.exp(0.5 * logvar) * rng.normal(size=mu.shape)).astype(np.float64)

    prior = rng.normal(size=(N_PRIOR, LATENT))
    out["vae"] = _measure(vae, sample_q(X), sample_q(Xt), prior)

    for k, name in (("ae", "autoencoder (Gaussian fitted to its codes)"), ("vae", "VAE (N(0, I))")):
        print(f"{name}: {100 * out[k]['fraction']:.1f}% of {N_PRIOR} prior samples in holes "
              f"(tau = {out[k]['tau']:.3f}; 1% would mean no holes)")
    os.makedirs(out_dir, exist_ok=True)
    _plot(out, os.path.join(out_dir, "latent_holes.png"))
    metrics = {"ae_hole_fraction": out["ae"]["fraction"], "vae_hole_fraction": out["vae"]["fraction"],
               "ae_tau": out["ae"]["tau"], "vae_tau": out["vae"]["tau"], "quantile": 0.99,
               "latent": LATENT, "prior_samples": N_PRIOR, "steps": steps}
    with open(os.path.join(out_dir, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=1)
    print(f"figure and metrics.json in {out_dir} ({time.perf_counter() - t0:.1f} s)")
    return metrics


def _measure(model, z_train, z_test, prior):
    """Everything the report and the figure need about one model's holes."""
    fraction, hole, tau = hole_fraction(z_train, z_test, prior)
    return {"model": model, "fraction": fraction, "hole": hole, "tau": tau, "prior": prior,
            "d_test": nearest_distance(z_test, z_train) / tau,
            "d_prior": nearest_distance(prior, z_train) / tau}


def _plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10.5, 9), gridspec_kw={"width_ratios": [1.25, 1]})
    names = (("ae", "plain autoencoder, z ~ Gaussian fitted to its codes"),
             ("vae", "VAE, z ~ N(0, I)"))
    top = max(np.quantile(out[k]["d_prior"], 0.995) for k, _ in names)
    bins = np.linspace(0, top, 50)
    for r, (key, title) in enumerate(names):
        m = out[key]
        # 1. the measure: distance to the nearest training latent, in units of tau
        a = axes[r, 0]
        a.hist(m["d_test"], bins=bins, density=True, alpha=0.6, color="C0",
               label="held-out images' latents")
        a.hist(m["d_prior"], bins=bins, density=True, alpha=0.6, color="C3",
               label="prior samples")
        a.axvline(1.0, color="k", ls="--", lw=1, label="tau (99% of held-out below)")
        a.set(xlabel="distance to the nearest training latent / tau", ylabel="density",
              title=f"{title}\n{100 * m['fraction']:.1f}% of prior samples in holes")
        a.legend(fontsize=8)
        # 2. decoded prior samples, the ones in holes first: what generation would give
        hole = m["hole"][:64]
        order = np.argsort(~hole, kind="stable")
        imgs = m["model"].decode(m["prior"][:64][order].astype(np.float32))
        _grid(axes[r, 1], imgs, 8, hole[order])
        axes[r, 1].set_title("64 decoded prior samples (red frame: in a hole)")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def _grid(ax, imgs, n, frame=None):
    """Tile n x n images (n*n, 784) into one picture; frame[i] marks image i with red."""
    tile = np.ones((n * 30, n * 30, 3))
    for i, img in enumerate(imgs[: n * n]):
        y, x = divmod(i, n)
        block = np.repeat(img.reshape(28, 28)[:, :, None], 3, axis=2)
        cell = tile[y * 30:(y + 1) * 30, x * 30:(x + 1) * 30]
        cell[:] = (1.0, 0.0, 0.0) if frame is not None and frame[i] else 1.0
        cell[1:29, 1:29] = block
    ax.imshow(tile)
    ax.set_xticks([])
    ax.set_yticks([])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", default=os.path.join("runs", "examples", "latent_holes"))
    p.add_argument("--quick", action="store_true", help="800 training steps instead of 2000 (for tests)")
    args = p.parse_args(argv)
    # One BLAS thread, as `minivae train` uses: OpenBLAS's own threads busy-wait between the
    # products and slow a shared machine down (minivae.engine.threads explains).
    with one_blas_thread():
        run(args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
