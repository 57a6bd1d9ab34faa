"""minivae.evaluate: the ELBO and the importance-weighted bound IWAE_k.

The anchor is a model whose log p(x) is known in closed form: a linear-Gaussian VAE
(probabilistic PCA). With decoder x = z W + b + N(0, s^2 I), z ~ N(0, I):

    p(x)    = N(x; b, W^T W + s^2 I)
    p(z|x)  = N(P^-1 W (x - b)^T / s^2,  P^-1),   P = I + W W^T / s^2

When W has orthogonal rows, P is diagonal, so a linear encoder with a diagonal Gaussian can be
the exact posterior; then every importance weight equals p(x) and ELBO = IWAE_k = log p(x).
"""
from __future__ import annotations

import numpy as np
import pytest

from minivae import VAE, Autoencoder
from minivae.evaluate import elbo, evaluate, iwae

BACKENDS = ["numpy", "strict"]
D, L, S = 6, 2, 0.5


def linear_gaussian(backend, exact_posterior: bool):
    m = VAE(d_in=D, hidden=(), latent=L, likelihood="gaussian", x_sigma=S, backend=backend,
            dtype="float64", seed=3)
    rng = np.random.default_rng(1)
    W = np.linalg.qr(rng.standard_normal((D, L)))[0].T * np.array([[2.0], [0.7]])  # (L, D)
    b = rng.standard_normal(D)
    m.params.views["dec.0.W"][...] = m.backend.asarray(W)
    m.params.views["dec.0.b"][...] = m.backend.asarray(b)
    if exact_posterior:
        prec = 1.0 + (W * W).sum(axis=1) / S**2                      # diagonal of P, (L,)
        A = W.T / S**2 / prec                                        # mu = (x - b) @ A
        enc_W = np.concatenate([A, np.zeros((D, L))], axis=1)
        enc_b = np.concatenate([-b @ A, -np.log(prec)])
        m.params.views["enc.0.W"][...] = m.backend.asarray(enc_W)
        m.params.views["enc.0.b"][...] = m.backend.asarray(enc_b)
    x = rng.standard_normal((40, D)) * 1.5
    C = W.T @ W + S**2 * np.eye(D)
    d = x - b
    log_px = -0.5 * (np.einsum("ij,jk,ik->i", d, np.linalg.inv(C), d)
                     + np.linalg.slogdet(C)[1] + D * np.log(2 * np.pi))
    return m, x, log_px.mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_the_exact_posterior_every_bound_is_log_px(backend):
    m, x, log_px = linear_gaussian(backend, exact_posterior=True)
    for k in (1, 7, 50):
        # every log weight log p(x, z) - log q(z|x) is log p(x) itself, whatever z is drawn;
        # max_rows=64 forces both example blocks and sample chunks
        assert iwae(m, x, k, max_rows=64) == pytest.approx(log_px, abs=1e-9)
    # the ELBO uses the analytic KL, so only its expectation is log p(x): average many draws
    assert -elbo(m, np.tile(x, (500, 1)))["loss"] == pytest.approx(log_px, abs=0.02)


@pytest.mark.parametrize("backend", BACKENDS)
def test_iwae_rises_with_k_towards_log_px(backend):
    m, x, log_px = linear_gaussian(backend, exact_posterior=False)   # a poor, random encoder
    bounds = [iwae(m, x, k, max_rows=256, rng=m.backend.rng(5)) for k in (1, 10, 100, 1000)]
    assert all(a < b for a, b in zip(bounds, bounds[1:])), bounds
    assert bounds[-1] < log_px
    assert log_px - bounds[-1] < 0.2 * (log_px - bounds[0])    # most of the gap is closed


def test_iwae_1_and_the_elbo_estimate_the_same_bound():
    # IWAE_1 = log p(x|z) + log p(z) - log q(z|x) at one z: the Monte-Carlo-KL form of the ELBO
    m = VAE(d_in=16, hidden=(8,), latent=3, seed=0, dtype="float64")
    x = np.tile(np.random.default_rng(0).random((30, 16)), (300, 1))
    e = -elbo(m, x)["loss"]
    assert iwae(m, x, 1) == pytest.approx(e, abs=0.05)
    assert iwae(m, x, 2) > e + 0.1


def test_iwae_is_above_the_elbo_on_average_for_a_bernoulli_vae():
    m = VAE(d_in=16, hidden=(8,), latent=3, seed=0)
    x = (np.random.default_rng(0).random((200, 16)) < 0.3).astype(np.float32)
    e = -evaluate(m, x)["loss"]
    assert e < iwae(m, x, 5) < iwae(m, x, 50)


def test_log_mean_exp_survives_tiny_weights():
    # x_sigma = 1e-3 makes log w about -1e5: exp underflows to 0 without the running max
    m = VAE(d_in=8, hidden=(4,), latent=2, likelihood="gaussian", x_sigma=1e-3, seed=0,
            dtype="float64")
    x = np.random.default_rng(0).random((10, 8))
    v = iwae(m, x, 20, max_rows=16)
    assert np.isfinite(v) and v < -1e4
    assert v >= -elbo(m, x)["loss"] - 1.0


def test_decoder_never_sees_more_than_max_rows():
    m = VAE(d_in=16, hidden=(8,), latent=3, seed=0)
    rows = []
    orig = m._decode_out
    m._decode_out = lambda z: (rows.append(z.shape[0]), orig(z))[1]
    iwae(m, np.full((50, 16), 0.5, np.float32), k=300, max_rows=128)
    assert max(rows) <= 128 and sum(rows) == 50 * 300


def test_elbo_parts_and_inputs():
    m = VAE(d_in=16, hidden=(8,), latent=3, seed=0)
    x = np.random.default_rng(0).random((30, 16)).astype(np.float32)
    r = elbo(m, x, batch_size=7)
    assert r["loss"] == pytest.approx(r["recon"] + r["kl"]) and r["kl"] > 0
    assert elbo(m, x)["loss"] == elbo(m, x)["loss"], "evaluation must be repeatable"
    with pytest.raises(ValueError, match="outside"):
        elbo(m, x * 3)
    with pytest.raises(ValueError, match="k must be"):
        iwae(m, x, 0)


def test_autoencoder_gets_reconstruction_only():
    ae = Autoencoder(d_in=16, hidden=(8,), latent=3, seed=0)
    x = np.random.default_rng(0).random((30, 16)).astype(np.float32)
    r = evaluate(ae, x)
    assert r["kl"] == 0 and r["loss"] == r["recon"] > 0 and "iwae_10" not in r
    with pytest.raises(ValueError, match="needs a VAE.*pass k=0"):    # not silently dropped
        evaluate(ae, x, k=10)
    with pytest.raises(ValueError, match="needs a VAE"):
        iwae(ae, x, 10)


def test_the_iwae_progress_bar_counts_every_example_and_changes_no_number(monkeypatch):
    """progress=True: a tqdm bar (here forced on, as on a terminal) whose count reaches every
    example; the bound is the same as without it."""
    import tqdm.auto
    seen = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *a, **kw):
            kw["disable"] = False
            super().__init__(*a, **kw)
            seen.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    m = VAE(d_in=16, hidden=(8,), latent=3, seed=0)
    x = np.full((50, 16), 0.5, np.float32)
    with_bar = iwae(m, x, k=300, max_rows=128, rng=m.backend.rng(5), progress=True)
    without = iwae(m, x, k=300, max_rows=128, rng=m.backend.rng(5))
    assert with_bar == without
    assert len(seen) == 1 and seen[0].n == 50


def test_finite_data_too_large_for_the_models_dtype_is_named_as_such():
    m = VAE(d_in=4, hidden=(3,), latent=2, likelihood="gaussian", seed=0)   # float32
    x = np.full((2, 4), 1e300)                                             # finite float64
    with pytest.raises(ValueError, match=r"too large for the model's float32 .*1e\+300"):
        elbo(m, x)
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        elbo(m, np.full((2, 4), np.nan))
    with pytest.raises(TypeError, match="progress must be True or False"):
        iwae(m, np.zeros((2, 4)), k=2, progress="no")
