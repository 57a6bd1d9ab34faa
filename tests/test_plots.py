"""minivae.plots: every axis says what it shows, in which unit; the public functions still write PNGs.

The figures are built with the ``*_figure`` functions (matplotlib's Agg backend) and their axes
read back before anything is saved.
"""
from __future__ import annotations

import numpy as np
import pytest

from minivae import VAE, Autoencoder
from minivae import plots
from minivae.data import FASHION_CLASSES, Dataset

HISTORY = [{"epoch": e, **{f"{s}_{k}": 100.0 / e + i for i, k in enumerate(("loss", "recon", "kl"))
                           for s in ("train", "test")}} for e in (1, 2, 3)]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.random((40, 784), dtype=np.float32), rng.integers(0, 10, 40)


def _close(fig):
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_curve_panels_name_their_quantity_and_unit():
    fig = plots.curves_figure(HISTORY)
    try:
        axes = fig.axes
        assert len(axes) == 3
        for ax in axes:
            assert ax.get_xlabel() == "epoch"
            assert ax.get_ylabel().endswith("(nats per example)"), ax.get_ylabel()
        assert [ax.get_ylabel().split(" (")[0] for ax in axes] == ["-ELBO", "-log p(x|z)", "KL"]
        # the plotted numbers are the history's, train and test per panel
        for ax, key in zip(axes, ("loss", "recon", "kl")):
            lines = {ln.get_label(): ln.get_ydata() for ln in ax.get_lines()}
            np.testing.assert_allclose(lines["test"], [h[f"test_{key}"] for h in HISTORY])
    finally:
        _close(fig)


@pytest.mark.parametrize("classes, label, first_tick", [
    (None, "digit", "0"),
    (tuple(str(i) for i in range(10)), "digit", "0"),
    (FASHION_CLASSES, "class", "T-shirt/top"),
])
def test_latent_colour_bar_is_labelled(data, classes, label, first_tick):
    x, y = data
    fig = plots.latent_figure(VAE(hidden=[16], latent=2, seed=0), x, y, classes)
    try:
        ax, cbar = fig.axes
        assert cbar.get_ylabel() == label
        assert cbar.get_yticklabels()[0].get_text() == first_tick
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("z 1", "z 2")
    finally:
        _close(fig)


def test_latent_axes_say_principal_components_above_two_dimensions(data):
    x, y = data
    fig = plots.latent_figure(VAE(hidden=[16], latent=5, seed=0), x, y)
    try:
        assert fig.axes[0].get_xlabel() == "PC 1 of the codes"
        assert fig.axes[1].get_ylabel() == "digit"
    finally:
        _close(fig)


def test_manifold_axes_carry_the_z_values_of_the_grid():
    n, H = 10, 28
    fig = plots.manifold_figure(VAE(hidden=[16], latent=2, seed=0), (28, 28), n=n)
    try:
        (ax,) = fig.axes
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("z 1", "z 2")
        g = plots.manifold_grid(n)
        assert g[0] < 0 < g[-1] and np.allclose(g, -g[::-1])
        xt, yt = ax.get_xticks(), ax.get_yticks()
        assert len(xt) >= 5 and len(yt) >= 5
        # each tick sits at the centre of a tile and reads that tile's z (z 2 decreasing downwards)
        cols = (xt - (H - 1) / 2) / H
        assert np.allclose(cols, np.round(cols))
        xz = [float(t.get_text()) for t in ax.get_xticklabels()]
        yz = [float(t.get_text()) for t in ax.get_yticklabels()]
        np.testing.assert_allclose(xz, g[np.round(cols).astype(int)], atol=0.005)
        np.testing.assert_allclose(yz, g[::-1][np.round((yt - (H - 1) / 2) / H).astype(int)], atol=0.005)
        assert xz == sorted(xz) and yz == sorted(yz, reverse=True)
    finally:
        _close(fig)


def test_manifold_needs_two_latent_dimensions():
    with pytest.raises(ValueError, match="needs a 2-d latent space, this model has 3"):
        plots.manifold_figure(VAE(hidden=[16], latent=3, seed=0))


@pytest.mark.parametrize("model", [VAE(hidden=[16], latent=2, seed=0),
                                   Autoencoder(hidden=[16], latent=3, seed=0)])
def test_save_all_still_writes_every_figure_that_applies(tmp_path, data, model):
    x, y = data
    ds = Dataset("fake", x, y, x, y)
    paths = plots.save_all(model, ds, HISTORY, tmp_path / "figs")
    expected = {"reconstructions.png", "latent.png", "curves.png"}
    if model.has_prior:
        expected |= {"samples.png", "manifold.png"}
    assert {p.name for p in paths} == expected
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == [], "a figure was left open"


def test_a_large_sample_mosaic_is_not_enlarged_past_its_cap(tmp_path):
    """64 samples keep their 2.5 figure pixels a mosaic pixel (the figures in examples/ are
    unchanged); 2500 samples (a 1451-pixel mosaic) are drawn at no more than MAX_MOSAIC_PX
    and never below one figure pixel a mosaic pixel (10000 samples took 27 s at 2.5)."""
    from PIL import Image

    model = VAE(seed=0)
    small, large = tmp_path / "s64.png", tmp_path / "s2500.png"
    plots.samples(model, small, n=64, cols=8)
    plots.samples(model, large, n=2500, cols=50)
    assert Image.open(small).size == (602, 632)          # 233-pixel mosaic: 233 * 2.5 + margins
    w, h = Image.open(large).size
    mosaic = 50 * 29 + 1
    assert mosaic <= w <= plots.MAX_MOSAIC_PX + 50, (w, h)
    assert plots.MAX_MOSAIC_PX / mosaic < 2.5          # so the cap, not the 2.5, applied
