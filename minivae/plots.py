"""Figures of a trained model, as PNG files (matplotlib, Agg backend: no display needed).

    reconstructions.png   inputs (odd rows) above their reconstructions (even rows)
    samples.png           decoder means at z ~ N(0, I), the prior
    latent.png            test-set codes mu(x) coloured by label (first two principal
                          components when the latent space has more than two dimensions)
    manifold.png          latent = 2 only: decoder means on a grid of z through the Gaussian
                          inverse CDF, as in Kingma & Welling (2014), Fig. 4
    curves.png            train and test loss, reconstruction and KL per epoch

Each function takes host or backend arrays, returns the path it wrote and closes its figure.
The figures with axes also have a ``*_figure`` twin (:func:`latent_figure`,
:func:`manifold_figure`, :func:`curves_figure`) that returns the open matplotlib Figure instead,
to inspect or restyle before saving.
"""
from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display, safe under ssh and CI
    import matplotlib.pyplot as plt

    return plt


def _host(model, a) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else model.backend.to_host(a)


def _dev(model, a):
    return model.backend.asarray(np.asarray(a, dtype=np.float32), dtype=model.dtype)


def tile(images: np.ndarray, shape, cols: int, pad: int = 1) -> np.ndarray:
    """(N, H*W) in [0, 1] -> one (rows*(H+pad)+pad, cols*(W+pad)+pad) mosaic, white gaps."""
    H, W = shape
    n = images.shape[0]
    rows = -(-n // cols)
    out = np.ones((rows * (H + pad) + pad, cols * (W + pad) + pad), dtype=np.float32)
    for idx in range(n):  # a mosaic of at most a few hundred tiles: a loop over tiles, not pixels
        r, c = divmod(idx, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        out[y:y + H, x:x + W] = images[idx].reshape(H, W)
    return out


MAX_MOSAIC_PX = 3000   # a mosaic's longer side in the PNG, beyond which it is not enlarged


def _save_mosaic(mosaic, path, title):
    plt = _plt()
    h, w = mosaic.shape
    # 2.5 figure pixels a mosaic pixel, fewer (never under 1) past MAX_MOSAIC_PX: 10000
    # samples at 2.5 made a 7250-pixel-square PNG and took 27 s to draw
    scale = max(1.0, min(2.5, MAX_MOSAIC_PX / max(h, w))) / 100
    fig, ax = plt.subplots(figsize=(w * scale + 0.2, h * scale + 0.5), dpi=100)
    ax.imshow(mosaic, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def reconstructions(model, x, path, image_shape=(28, 28), n: int = 32, cols: int = 8):
    """First n examples of x and their reconstructions at z = mu, in alternating rows."""
    x = np.asarray(_host(model, x)[:n], dtype=np.float32)
    r = _host(model, model.reconstruct(_dev(model, x)))
    rows = []
    for i in range(0, len(x), cols):
        rows += [x[i:i + cols], r[i:i + cols]]
    return _save_mosaic(tile(np.concatenate(rows), image_shape, cols), path,
                        "inputs (odd rows) and reconstructions (even rows)")


def samples(model, path, image_shape=(28, 28), n: int = 64, cols: int = 8, seed: int = 0):
    """Decoder means p(x|z) at n draws z from the model's prior (N(0, I), or uniform one-hot
    codes for categorical latents)."""
    z = model.draw_code(n, rng=model.backend.rng(seed))
    return _save_mosaic(tile(_host(model, model.decode(z)), image_shape, cols), path,
                        f"samples from the prior, {model.prior_text}")


def class_label(classes) -> str:
    """What the colour bar of a latent scatter names: "digit" for the digit classes 0-9
    (MNIST), else "class" (Fashion-MNIST's classes are named on the ticks)."""
    if classes is None or tuple(str(c) for c in classes) == tuple(str(i) for i in range(10)):
        return "digit"
    return "class"


def latent_figure(model, x, y, classes=None, max_points: int = 5000):
    """The figure of :func:`latent_scatter`, open, for saving or inspecting (close it after)."""
    plt = _plt()
    x, y = np.asarray(_host(model, x)[:max_points]), np.asarray(y[:max_points])
    mu = _host(model, model.code(_dev(model, x))).astype(np.float64)   # VAE: the mean of q(z|x)
    if mu.shape[1] > 2:
        c = mu - mu.mean(axis=0)
        _, s, vt = np.linalg.svd(c, full_matrices=False)
        pts = c @ vt[:2].T
        var = (s[:2] ** 2).sum() / (s ** 2).sum()
        xlabel, ylabel = "PC 1 of the codes", "PC 2 of the codes"
        title = f"test codes, first 2 principal components ({var:.0%} of the variance)"
    else:
        pts = np.column_stack([mu[:, 0], mu[:, 1] if mu.shape[1] > 1 else np.zeros(len(mu))])
        xlabel, ylabel = "z 1", "z 2"
        title = "test codes (mean of q(z|x))"
    fig, ax = plt.subplots(figsize=(6.4, 5.4), dpi=100)
    sc = ax.scatter(pts[:, 0], pts[:, 1], c=y, cmap="tab10", vmin=-0.5, vmax=9.5, s=6, alpha=0.8)
    cb = fig.colorbar(sc, ax=ax, ticks=range(10))
    cb.set_label(class_label(classes))
    if classes is not None:
        cb.ax.set_yticklabels(list(classes)[:10], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def latent_scatter(model, x, y, path, classes=None, max_points: int = 5000):
    """Codes of x coloured by label y (colour bar: the class names); PCA to two dimensions
    when latent > 2. -> the path written."""
    return _save(latent_figure(model, x, y, classes, max_points), path)


def manifold_grid(n: int) -> np.ndarray:
    """The n z values per axis of the manifold figure: Phi^-1(u) at u = (i + 1/2) / n, ascending."""
    u = np.linspace(0.5 / n, 1 - 0.5 / n, n)
    return np.array([NormalDist().inv_cdf(v) for v in u])


def manifold_figure(model, image_shape=(28, 28), n: int = 20):
    """The figure of :func:`manifold`, open, for saving or inspecting (close it after)."""
    if model.latent != 2:
        raise ValueError(f"the manifold figure needs a 2-d latent space, this model has {model.latent}")
    plt = _plt()
    g = manifold_grid(n)
    # rows run from high z2 (top) to low, columns from low z1 to high, as on a plot's axes
    z = np.stack(np.meshgrid(g, g[::-1]), axis=-1).reshape(-1, 2)
    imgs = _host(model, model.decode(_dev(model, z)))
    H, W = image_shape
    mosaic = tile(imgs, image_shape, n, pad=0)
    h, w = mosaic.shape
    fig, ax = plt.subplots(figsize=(w / 40 + 1.0, h / 40 + 1.0), dpi=100)
    ax.imshow(mosaic, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    # a tick at the centre of every k-th tile, labelled with that tile's z (about 7 per axis)
    k = max(1, -(-n // 7))
    idx = list(range(0, n, k))
    ax.set_xticks([i * W + (W - 1) / 2 for i in idx], [f"{g[i]:.2f}" for i in idx], fontsize=8)
    ax.set_yticks([i * H + (H - 1) / 2 for i in idx], [f"{g[::-1][i]:.2f}" for i in idx], fontsize=8)
    ax.set_xlabel("z 1")
    ax.set_ylabel("z 2")
    ax.set_title("learned manifold: decoder mean over a grid of z (inverse-CDF spacing)", fontsize=10)
    fig.tight_layout()
    return fig


def manifold(model, path, image_shape=(28, 28), n: int = 20):
    """latent = 2: decode an n x n grid of z = (Phi^-1(u1), Phi^-1(u2)), u on (0, 1), so the
    grid covers the prior evenly in probability (Kingma & Welling 2014, Fig. 4); the axes
    carry the z values. -> the path written."""
    return _save(manifold_figure(model, image_shape, n), path)


# (history key, panel title, y-axis label) of the curves figure
CURVE_PANELS = (
    ("loss", "loss = -ELBO", "-ELBO (nats per example)"),
    ("recon", "reconstruction -log p(x|z)", "-log p(x|z) (nats per example)"),
    ("kl", "KL(q(z|x) || p(z))", "KL (nats per example)"),
)


def curves_figure(history):
    """The figure of :func:`curves`, open, for saving or inspecting (close it after)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=100)
    for ax, (key, title, ylabel) in zip(axes, CURVE_PANELS):
        for split, style in (("train", "o-"), ("test", "s--")):
            ax.plot(ep, [h[f"{split}_{key}"] for h in history], style, label=split, ms=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def curves(history, path):
    """Loss (= -ELBO), reconstruction and KL per epoch, train and test, in nats per example.
    -> the path written."""
    return _save(curves_figure(history), path)


def _save(fig, path) -> Path:
    """Write ``fig`` to ``path`` atomically (a full disk leaves the previous file intact, and
    the error names the path) and close it."""
    from .fileio import atomic_write

    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png"), "figure")
    finally:
        _plt().close(fig)
    return Path(path)


def save_all(model, ds, history, out, x_test=None) -> list[Path]:
    """Every figure that applies to ``model`` into directory ``out``. -> the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x = ds.x_test if x_test is None else x_test
    paths = [reconstructions(model, x, out / "reconstructions.png", ds.image_shape)]
    if model.has_prior:
        paths.append(samples(model, out / "samples.png", ds.image_shape))
    paths.append(latent_scatter(model, x, ds.y_test, out / "latent.png", ds.classes))
    if model.has_prior and model.continuous and model.latent == 2:
        paths.append(manifold(model, out / "manifold.png", ds.image_shape))
    if history:
        paths.append(curves(history, out / "curves.png"))
    return paths
