"""The bottleneck: why an autoencoder's code must be narrower than its input.

An autoencoder is trained to reproduce its input. If the code is as wide as the input, the
identity map is a perfect solution: reconstruction error goes to zero and nothing about the
data has been learned. The network has become a copy machine, and reconstruction error, the
very thing it was trained on, cannot tell (Goodfellow, Bengio & Courville, "Deep Learning",
ch. 14: "an autoencoder that succeeds in learning to set g(f(x)) = x everywhere is not
especially useful"). A narrow code forces the network to keep only what digits have in common.

How to see it: feed the trained autoencoders images that are *not* digits (uniform noise in
the pixels where digits live). A model that learned digits maps noise to something digit-like
and reconstructs it badly; a copy machine reconstructs noise as well as digits.

This script sweeps the code size L for two autoencoders on 14 x 14 MNIST (2 x 2 average-pooled,
so that the full-width model, L = 196, trains in seconds):
  - linear (activation=None, squared error): the PCA model of pca_linear_autoencoder.py; at
    L = 196 it can represent the identity exactly;
  - ReLU, 196-256-L-256-196, Bernoulli likelihood.
It records reconstruction error on test digits and on noise, for every L.

Run:  python examples/bottleneck.py [OUT_DIR] [--quick]
Writes OUT_DIR/bottleneck.png and OUT_DIR/metrics.json (default OUT_DIR: runs/examples/bottleneck).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from minivae import Adam, Autoencoder, train_step
from minivae.data import load_dataset
from minivae.engine.threads import one_blas_thread

D = 196  # 14 x 14 pixels


def pool(X):
    """(N, 784) 28 x 28 images -> (N, 196) 14 x 14, averaging 2 x 2 blocks."""
    return X.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(-1, D).astype(np.float32)


def make(kind, L, seed):
    if kind == "linear":
        return Autoencoder(d_in=D, hidden=(), latent=L, activation=None,
                           likelihood="gaussian", seed=seed), 3e-3
    return Autoencoder(d_in=D, hidden=(256,), latent=L, activation="relu",
                       likelihood="bernoulli", seed=seed), 1e-3


def train(model, lr, X, steps, rng):
    opt = Adam(model.params, lr=lr)
    for t in range(steps):
        opt.lr = lr if t < 0.7 * steps else lr / 5   # smaller steps at the end: less jitter
        train_step(model, opt, X[rng.integers(0, len(X), 128)], check=False)   # loss_and_grads + opt.step, fast


def mse(model, X):
    """Mean squared error per pixel between X and its reconstruction."""
    return float(np.mean((model.reconstruct(X) - X) ** 2))


def run(out_dir, quick=False, seed=0):
    t0 = time.perf_counter()
    ds = load_dataset("mnist10k")
    X, Xt = pool(ds.x_train), pool(ds.x_test[:500])
    rng = np.random.default_rng(seed)
    # "not a digit": uniform noise on the pixels that vary across digits, zero elsewhere
    window = X.std(axis=0) > 0.05
    noise = (rng.random((500, D)) * window).astype(np.float32)
    sizes = (2, 32, D) if quick else (2, 8, 32, 64, D)
    steps = 600 if quick else 3000

    results = {}
    shown = {}          # reconstructions of one digit and one noise image, per model and L
    for kind in ("linear", "relu"):
        for L in sizes:
            model, lr = make(kind, L, seed)
            train(model, lr, X, steps, rng)
            results[kind, L] = (mse(model, Xt), mse(model, noise))
            shown[kind, L] = model.reconstruct(np.stack([Xt[0], noise[0]]))
            print(f"{kind:>6} AE, code {L:>3}: squared error per pixel on digits "
                  f"{results[kind, L][0]:.4f}, on noise {results[kind, L][1]:.4f}")
    floor = float(np.mean((noise - noise.mean(axis=0)) ** 2))  # error of predicting the mean noise
    print(f"for scale: predicting each noise pixel's mean gives {floor:.4f}")

    os.makedirs(out_dir, exist_ok=True)
    _plot(results, shown, sizes, Xt[0], noise[0], floor, os.path.join(out_dir, "bottleneck.png"))
    metrics = {"squared_error_per_pixel": {f"{k} L={L}": {"digits": e[0], "noise": e[1]}
                                           for (k, L), e in results.items()},
               "noise_predict_mean": floor, "steps": steps}
    with open(os.path.join(out_dir, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=1)
    print(f"figure and metrics.json in {out_dir} ({time.perf_counter() - t0:.1f} s)")
    return metrics


def _plot(results, shown, sizes, digit, noise, floor, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 4.2))
    ax = fig.add_axes([0.06, 0.14, 0.3, 0.76])
    for kind, color in (("linear", "C0"), ("relu", "C3")):
        ax.plot(sizes, [results[kind, L][0] for L in sizes], "o-", color=color,
                label=f"{kind} AE: digits")
        ax.plot(sizes, [results[kind, L][1] for L in sizes], "s--", color=color,
                label=f"{kind} AE: noise")
    ax.axhline(floor, color="0.5", lw=1, ls=":", label="noise: predict the mean")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xlabel=f"code size L (input: {D} pixels)", ylabel="squared error per pixel",
           title="wider code: lower error, on noise too")
    ax.legend(fontsize=8)

    # image grid: rows (linear digit, linear noise, relu digit, relu noise), columns input + L
    rows = [(k, i) for k in ("linear", "relu") for i in (0, 1)]
    n = len(sizes) + 1
    for r, (kind, i) in enumerate(rows):
        for c in range(n):
            a = fig.add_axes([0.42 + c * 0.56 / n, 0.7 - r * 0.2, 0.53 / n, 0.19])
            img = (digit, noise)[i] if c == 0 else shown[kind, sizes[c - 1]][i]
            a.imshow(img.reshape(14, 14), cmap="gray", vmin=0, vmax=1)
            a.set_xticks([])
            a.set_yticks([])
            if r == 0:
                a.set_title("input" if c == 0 else f"L = {sizes[c - 1]}", fontsize=9)
            if c == 0:
                a.set_ylabel(f"{kind}\n{('digit', 'noise')[i]}", fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", default=os.path.join("runs", "examples", "bottleneck"))
    p.add_argument("--quick", action="store_true", help="fewer sizes and steps (for tests)")
    args = p.parse_args(argv)
    # One BLAS thread, as `minivae train` uses: OpenBLAS's own threads busy-wait between the
    # products and slow a shared machine down (minivae.engine.threads explains).
    with one_blas_thread():
        run(args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
