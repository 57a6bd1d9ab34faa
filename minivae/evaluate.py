"""How good is a trained model? The ELBO and the importance-weighted bound on log p(x).

For one example x, with q = q(z|x) = N(mu, diag(exp(logvar))) from the encoder:

    ELBO(x)   = E_q[log p(x|z)] - KL(q || p(z))                     one z per example, as the
                                                                     PyTorch example evaluates
    IWAE_k(x) = E[ log (1/k) sum_i p(x, z_i) / q(z_i|x) ],  z_i ~ q   (Burda et al., 2016)

    ELBO = IWAE_1 <= IWAE_k <= IWAE_{k+1} <= log p(x)   (in expectation; -> log p(x) as k grows)

Losses are reported as positive nats per example: ``loss = -ELBO`` (the number the PyTorch
example prints) and ``nll_k = -IWAE_k``, an upper bound on -log p(x).

Everything accumulates on the model's backend and is read back to the host once per call.
Memory stays bounded: at most ``max_rows`` decoder rows (examples x samples) exist at a time,
and the k samples of IWAE are folded in chunks with a running log-sum-exp.
"""
from __future__ import annotations

import math
import sys

import numpy as np

from .backend import RNG
from .models import check_count, dtype_name



def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield i, min(i + size, n)


def _to_backend(model, x, check=True):
    """Host or backend array -> backend array of the model's dtype, validated unless the
    caller already did (the trainer validates its test set once, not every epoch). Floating
    host data of another precision is converted; anything else gets the model's own errors."""
    be = model.backend
    if check and not be.is_array(x) and not isinstance(x, np.ndarray):
        try:                      # a list of rows: one array, or one line saying why not
            x = np.asarray(x)
        except ValueError as e:
            raise ValueError(f"x must be a (N, D) array; the rows given do not make one "
                             f"({str(e).split('.')[0]})") from None
    if check:
        floating = (be.xp.isdtype(x.dtype, "real floating") if be.is_array(x)
                    else np.issubdtype(np.asarray(x).dtype, np.floating))
        if not floating:
            model.check_input(x if be.is_array(x) else be.asarray(np.asarray(x)))  # raises
        _check_fits(model, x)
    x = be.asarray(x, dtype=model.dtype)
    if check:
        model.check_input(x)
    return x


def _check_fits(model, x) -> None:
    """ValueError if finite data would overflow the model's narrower float dtype (1e300 into
    float32), which the check after the conversion would only see as "NaN or Inf"."""
    be = model.backend
    xp, a = (be.xp, x) if be.is_array(x) else (np, np.asarray(x))
    limit = float(be.xp.finfo(model.dtype).max)
    if a.size == 0 or float(xp.finfo(a.dtype).max) <= limit:
        return
    big = float(xp.max(xp.abs(a)))
    if math.isfinite(big) and big > limit:
        raise ValueError(f"x has values too large for the model's {dtype_name(model.dtype)} "
                         f"(largest magnitude {big:.3g})")


def _rng(model, rng, seed):
    """A backend RNG on the model's backend: the one given, or a fresh one seeded ``seed``."""
    if rng is None:
        return model.backend.rng(seed)
    if not isinstance(rng, RNG) or rng.backend is not model.backend:
        raise TypeError(f"rng must be a minivae RNG on the model's backend "
                        f"(model.backend.rng(seed)), got {type(rng).__name__}")
    return rng


def elbo(model, x, batch_size: int = 1000, rng=None, check: bool = True) -> dict:
    """Mean test loss in nats per example, one sampled z per example.

    x: (N, D) host or backend array -> {"loss": -ELBO, "recon": E[-log p(x|z)], "kl": KL}
    (host floats; for an Autoencoder "kl" is 0 and "loss" is the reconstruction term).
    ``rng``: a backend RNG for eps; default a fresh one seeded 0, so that evaluating the same
    model twice gives the same number and epoch-to-epoch changes are the model's, not noise's.
    """
    xp = model.xp
    batch_size = check_count(batch_size, "batch_size")
    rng = _rng(model, rng, 0)
    x = _to_backend(model, x, check)
    n = x.shape[0]
    recon_sum = xp.zeros((), dtype=model.dtype)
    kl_sum = xp.zeros((), dtype=model.dtype)
    for i, j in _batches(n, batch_size):
        recon, kl = model.loss_terms(x[i:j, :], rng, check=False)   # one z per example
        recon_sum = recon_sum + xp.sum(recon)
        kl_sum = kl_sum + xp.sum(kl)
    recon, kl = float(recon_sum) / n, float(kl_sum) / n   # the one read-back
    return {"loss": recon + kl, "recon": recon, "kl": kl}


def iwae(model, x, k: int = 100, max_rows: int = 4096, rng=None, progress: bool = False) -> float:
    """Mean importance-weighted bound IWAE_k over the examples, nats (a negative number).

    x: (N, D). For each example, k draws z_i ~ q(z|x) and log weights
    log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x); IWAE_k = logsumexp_i(log w_i) - log k.
    Examples go through in blocks of B = max(1, max_rows // k) and the samples in chunks of
    k_c = max(1, max_rows // B), so one pass holds at most max(max_rows, B) decoder rows.
    ``progress``: a tqdm bar over the examples on stderr when it is a terminal (a large k
    takes minutes).
    """
    if not model.has_prior:
        raise ValueError("the importance-weighted bound needs a VAE (an Autoencoder has no q(z|x))")
    k = check_count(k, "k")
    max_rows = check_count(max_rows, "max_rows")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    rng = _rng(model, rng, 0)
    xp = model.xp
    x = _to_backend(model, x)
    n = x.shape[0]
    B = max(1, max_rows // k)
    kc = max(1, max_rows // B)
    total = xp.zeros((), dtype=model.dtype)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=f"IWAE k={k}", unit="ex", leave=False, file=sys.stderr,
                   disable=None)                    # None: no bar where stderr is no TTY
    try:
        for i, j in _batches(n, B):
            total = _iwae_block(model, x[i:j, :], k, kc, rng, total)
            if bar is not None:
                bar.update(j - i)
    finally:
        if bar is not None:
            bar.close()
    return float(total) / n - math.log(k)


def _iwae_block(model, xb, k, kc, rng, total):
    """total + sum over the block's examples of logsumexp_i(log w_i), k samples in chunks of
    kc (a running max and sum: the whole (k, b) never exists at once)."""
    xp = model.xp
    m = None                                                        # running max  (b,)
    s = None                                                        # running sum  (b,)
    for c0, c1 in _batches(k, kc):
        log_w = model.importance_log_weights(xb, c1 - c0, rng, check=False)   # (kk, b)
        cmax = xp.max(log_w, axis=0)
        if m is None:
            m, s = cmax, xp.sum(xp.exp(log_w - cmax), axis=0)
        else:
            m_new = xp.maximum(m, cmax)
            s = s * xp.exp(m - m_new) + xp.sum(xp.exp(log_w - m_new), axis=0)
            m = m_new
    return total + xp.sum(m + xp.log(s))


def evaluate(model, x, k: int = 0, batch_size: int = 1000, seed: int = 0,
             progress: bool = False) -> dict:
    """The ELBO terms and, when k > 0, the IWAE_k bound: a dict of host floats (nats/example).
    An Autoencoder has no IWAE bound: k must be 0 for it (ValueError otherwise). ``progress``:
    a tqdm bar on stderr for the IWAE pass."""
    k = check_count(k, "k", low=0)
    seed = check_count(seed, "seed", low=0)
    if k and not model.has_prior:
        raise ValueError("the importance-weighted bound needs a VAE (an Autoencoder has no "
                         "q(z|x)): pass k=0")
    out = elbo(model, x, batch_size, rng=model.backend.rng(seed))
    if k:
        out[f"iwae_{k}"] = iwae(model, x, k, rng=model.backend.rng(seed + 1), progress=progress)
        out[f"nll_{k}"] = -out[f"iwae_{k}"]
    return out
