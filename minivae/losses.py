"""Likelihoods and KL terms of the ELBO, each a forward/backward pair, per example in nats.

Every forward returns ``(per_example, cache)`` with ``per_example`` of shape (B,): the term for
each example, summed over its dimensions. Every backward takes ``(xp, scale, cache)`` with ``scale``, dL/d(per_example):
a float (e.g. 1/B for a batch mean) or a (B,) array, and returns the input gradients.

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)),  loss = mean_B(-ELBO) = mean_B(recon + KL)
"""
from __future__ import annotations

import math

import numpy as np

from . import kernels

LOG_2PI = math.log(2.0 * math.pi)


def _col(xp, scale):
    """Broadcast a per-example scale (B,) against (B, D); floats pass through."""
    return scale if isinstance(scale, (int, float)) else xp.expand_dims(scale, axis=1)


# -- Bernoulli ---------------------------------------------------------------------------
def bernoulli_nll(xp, logits, x):
    """-log p(x|l) for x in [0, 1] with p = sigmoid(l), from logits (never log(sigmoid)).

    logits, x: (B, D) -> nll: (B,)
        -[x log s(l) + (1-x) log(1 - s(l))] = softplus(l) - x * l
    Exact for any |l|: softplus(l) = max(l, 0) + log1p(e) with e = exp(-|l|) <= 1, and e is
    cached for the backward pass.
    """
    e = xp.exp(-xp.abs(logits))
    nll = xp.sum(xp.maximum(logits, 0.0) + xp.log1p(e) - x * logits, axis=1)
    return nll, (logits, x, e)


def bernoulli_nll_backward(xp, scale, cache):
    """d nll / d logits = sigmoid(l) - x   -> (B, D).

    Written over the common denominator 1 + e, e = exp(-|l|), so that no large numbers cancel:
        l >= 0:  ((1 - x) - x e) / (1 + e)        l < 0:  (e (1 - x) - x) / (1 + e)
    (sigmoid(40) - 1 would round to 0; this gives -exp(-40) / (1 + exp(-40)).)
    """
    logits, x, e = cache
    num = xp.where(logits >= 0.0, (1.0 - x) - x * e, e * (1.0 - x) - x)
    return num / (1.0 + e) * _col(xp, scale)


# NumPy twins of the pair above (the step's largest elementwise work, on (B, D) arrays): the
# same formulas with each operation in place, so no (B, D) temporaries beyond the outputs, and
# no data-dependent branch: NumPy's where= / np.where on a random mask run ~20x slower than
# arithmetic (branch mispredictions), so the two cases are selected by exact arithmetic
# instead. tests/test_fastpath.py checks that they agree with the plain versions.
def bernoulli_nll_numpy(logits, x):
    """NumPy fast path of :func:`bernoulli_nll`: same values, same cache. The arithmetic
    around exp and log1p is one compiled pass where minivae._kernels was built."""
    a = np.abs(logits)
    e = np.negative(a)
    np.exp(e, out=e)                                  # e = exp(-|l|)
    t = np.log1p(e)
    if kernels.enabled() and (views := kernels.flat(logits, x, t)):
        kernels.bernoulli_nll_terms(*views)           # the five lines below, in one pass
        return np.sum(t, axis=1), (logits, x, e)
    a += logits
    a *= 0.5                                          # (l + |l|) / 2 = max(l, 0), exactly
    t += a                                            # softplus(l)
    np.multiply(x, logits, out=a)
    t -= a                                            # softplus(l) - x l
    return np.sum(t, axis=1), (logits, x, e)


def bernoulli_nll_backward_numpy(scale, cache):
    """NumPy fast path of :func:`bernoulli_nll_backward`: the same numerators over 1 + e,
    written as P (1 - x) - Q x with (P, Q) = (1, e) for l >= 0 and (e, 1) for l < 0.
    As e <= 1, P = max(e, [l >= 0]) and Q = max(e, [l < 0]) pick them exactly."""
    logits, x, e = cache
    if (kernels.enabled() and isinstance(scale, (int, float))
            and (views := kernels.flat(logits, x, e))):
        num = np.empty_like(logits)
        kernels.bernoulli_nll_grad(*views, num.reshape(-1), scale)  # the lines below, one pass
        return num
    num = np.subtract(1.0, x)                         # 1 - x
    p = np.maximum(e, logits >= 0.0)
    num *= p                                          # P (1 - x)
    np.maximum(e, logits < 0.0, out=p)
    p *= x                                            # Q x
    num -= p
    np.add(e, 1.0, out=p)
    num /= p
    num *= scale if isinstance(scale, (int, float)) else scale[:, None]
    return num


# -- Gaussian ----------------------------------------------------------------------------
def gaussian_nll(xp, mean, x, logvar=0.0):
    """-log N(x; mean, diag(exp(logvar))).

    mean, x: (B, D); logvar: a float (fixed variance) or (B, D) (learned) -> nll: (B,)
        1/2 * sum_D [ (x - mean)^2 exp(-logvar) + logvar + log(2 pi) ]
    """
    r = x - mean
    if isinstance(logvar, (int, float)):
        inv_var = math.exp(-logvar)
        nll = 0.5 * inv_var * xp.sum(r * r, axis=1) + 0.5 * x.shape[1] * (logvar + LOG_2PI)
    else:
        inv_var = xp.exp(-logvar)
        nll = 0.5 * xp.sum(r * r * inv_var + logvar + LOG_2PI, axis=1)
    return nll, (r, inv_var)


def gaussian_nll_backward(xp, scale, cache):
    """-> (dmean (B, D), dlogvar (B, D) or None for a fixed variance).

        d/dmean   = -(x - mean) exp(-logvar)
        d/dlogvar = 1/2 (1 - (x - mean)^2 exp(-logvar))
    """
    r, inv_var = cache
    s = _col(xp, scale)
    rw = r * inv_var
    dmean = -rw * s
    if isinstance(inv_var, float):
        return dmean, None
    return dmean, 0.5 * (1.0 - r * rw) * s


# -- KL(q || p), analytic ------------------------------------------------------------------
def kl_normal(xp, mu, logvar):
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) in closed form.

    mu, logvar: (B, L) -> kl: (B,)
        1/2 * sum_L (mu^2 + exp(logvar) - 1 - logvar)
    """
    var = xp.exp(logvar)
    kl = 0.5 * xp.sum(mu * mu + var - 1.0 - logvar, axis=1)
    return kl, (mu, var)


def kl_normal_backward(xp, scale, cache):
    """-> (dmu, dlogvar), each (B, L):  dKL/dmu = mu,  dKL/dlogvar = (exp(logvar) - 1) / 2."""
    mu, var = cache
    s = _col(xp, scale)
    return mu * s, 0.5 * (var - 1.0) * s


# -- KL, single-sample Monte-Carlo estimate (for study) ------------------------------------
def kl_monte_carlo(xp, z, mu, logvar):
    """log q(z|x) - log p(z) at one sample z: an unbiased estimate of the analytic KL.

    z, mu, logvar: (B, L) -> (B,)
        sum_L [ -logvar/2 - (z - mu)^2 exp(-logvar) / 2 + z^2 / 2 ]   (the log 2 pi cancel)
    """
    inv_var = xp.exp(-logvar)
    d = z - mu
    kl = xp.sum(-0.5 * logvar - 0.5 * d * d * inv_var + 0.5 * z * z, axis=1)
    return kl, (z, d, inv_var)


def kl_monte_carlo_backward(xp, scale, cache):
    """Partial derivatives, holding the other arguments fixed -> (dz, dmu, dlogvar):

        d/dz      = z - (z - mu) exp(-logvar)
        d/dmu     = (z - mu) exp(-logvar)
        d/dlogvar = -1/2 + (z - mu)^2 exp(-logvar) / 2

    The pathwise gradient adds dz's path through the sampler (sampling.sample_backward).
    """
    z, d, inv_var = cache
    s = _col(xp, scale)
    dw = d * inv_var
    return (z - dw) * s, dw * s, (0.5 * d * dw - 0.5) * s

