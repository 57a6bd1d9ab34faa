"""Likelihoods and KL terms of the ELBO, each a forward/backward pair, per example in nats.

Every forward returns ``(per_example, cache)`` with ``per_example`` of shape (B,): the term for
each example, summed over its dimensions. Every backward takes ``(xp, dout, cache)`` with
``dout`` = dL/d(per_example), the upstream gradient: a (B,) array, or one number for all
examples (e.g. 1/B for a batch mean), and returns the input gradients.

The likelihoods are also wrapped as small objects (:class:`Bernoulli`, :class:`Gaussian`,
:class:`GaussianLearned`, by name in :data:`LIKELIHOODS`) that know the decoder's output width,
the mean of p(x|z) and the data they accept, so the models never branch on a likelihood's name.
The faster NumPy forms of the Bernoulli pair (in place, one compiled pass) live in
:mod:`minivae.engine`; nothing here imports them.

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)),  loss = mean_B(-ELBO) = mean_B(recon + KL)
"""
from __future__ import annotations

import math
import numbers

from .backend import Picklable
from .layers import sigmoid

LOG_2PI = math.log(2.0 * math.pi)


def _col(xp, dout):
    """Broadcast a per-example upstream gradient (B,) against (B, D); numbers pass through."""
    return dout if isinstance(dout, (int, float)) else xp.expand_dims(dout, axis=1)


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


def bernoulli_nll_backward(xp, dout, cache):
    """d nll / d logits = sigmoid(l) - x   -> (B, D).

    Written over the common denominator 1 + e, e = exp(-|l|), so that no large numbers cancel:
        l >= 0:  ((1 - x) - x e) / (1 + e)        l < 0:  (e (1 - x) - x) / (1 + e)
    (sigmoid(40) - 1 would round to 0; this gives -exp(-40) / (1 + exp(-40)).)
    """
    logits, x, e = cache
    num = xp.where(logits >= 0.0, (1.0 - x) - x * e, e * (1.0 - x) - x)
    return num / (1.0 + e) * _col(xp, dout)


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


def gaussian_nll_backward(xp, dout, cache):
    """-> (dmean (B, D), dlogvar (B, D) or None for a fixed variance).

        d/dmean   = -(x - mean) exp(-logvar)
        d/dlogvar = 1/2 (1 - (x - mean)^2 exp(-logvar))
    """
    r, inv_var = cache
    s = _col(xp, dout)
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


def kl_normal_backward(xp, dout, cache):
    """-> (dmu, dlogvar), each (B, L):  dKL/dmu = mu,  dKL/dlogvar = (exp(logvar) - 1) / 2."""
    mu, var = cache
    s = _col(xp, dout)
    return mu * s, 0.5 * (var - 1.0) * s


# -- KL of categorical latents against a uniform prior --------------------------------------
def kl_categorical(xp, logits):
    """KL(Cat(softmax(l)) || Uniform(C)) in closed form, summed over K independent variables.

    logits: (B, K, C) -> kl: (B,) nats
        KL = sum_K [ sum_C q log q + log C ],   log q = l - logsumexp_C(l)   (stable: shifted
    by the row maximum). Zero when q is uniform; at most K log C (q one-hot).
    """
    a = logits - xp.max(logits, axis=-1, keepdims=True)
    logq = a - xp.log(xp.sum(xp.exp(a), axis=-1, keepdims=True))
    q = xp.exp(logq)
    neg_entropy = xp.sum(q * logq, axis=-1)                          # (B, K)
    kl = xp.sum(neg_entropy + math.log(logits.shape[-1]), axis=-1)
    return kl, (q, logq, neg_entropy)


def kl_categorical_backward(xp, dout, cache):
    """-> dL/dlogits (B, K, C):  dKL/dl_j = q_j (log q_j - sum_C q log q)  per variable
    (the softmax Jacobian applied to dKL/dq = log q + 1; the +1 cancels)."""
    q, logq, neg_entropy = cache
    s = dout if isinstance(dout, (int, float)) else xp.reshape(dout, (-1, 1, 1))
    return q * (logq - xp.expand_dims(neg_entropy, axis=-1)) * s


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


def kl_monte_carlo_backward(xp, dout, cache):
    """Partial derivatives, holding the other arguments fixed -> (dz, dmu, dlogvar):

        d/dz      = z - (z - mu) exp(-logvar)
        d/dmu     = (z - mu) exp(-logvar)
        d/dlogvar = -1/2 + (z - mu)^2 exp(-logvar) / 2

    The pathwise gradient adds dz's path through the sampler (sampling.sample_backward).
    """
    z, d, inv_var = cache
    s = _col(xp, dout)
    dw = d * inv_var
    return (z - dw) * s, dw * s, (0.5 * d * dw - 0.5) * s



# -- likelihoods as objects: what a model needs to know about p(x|z) ------------------------
class Bernoulli(Picklable):
    """p(x|z) = prod_D Bernoulli(x_d; sigmoid(l_d)); the decoder outputs logits l: (B, D).

    Data must lie in [0, 1] (grey levels are read as probabilities, as the PyTorch example
    does). Source: Kingma & Welling 2014, appendix C.1.
    """

    data_range = (0.0, 1.0)

    def __init__(self, xp, d: int):
        self.xp, self.d = xp, int(d)

    @property
    def out_width(self) -> int:
        return self.d

    def nll(self, out, x):
        """out: logits (B, D), x: (B, D) -> (-log p(x|z) (B,), cache)."""
        return bernoulli_nll(self.xp, out, x)

    def nll_backward(self, dout, cache):
        """dout: dL/d nll, (B,) or a number -> dL/d logits (B, D)."""
        return bernoulli_nll_backward(self.xp, dout, cache)

    def mean(self, out):
        """E[x|z] = sigmoid(logits), (B, D)."""
        return sigmoid(self.xp, out)


class Gaussian(Picklable):
    """p(x|z) = N(x; mean, sigma^2 I) with a fixed sigma; the decoder outputs the mean (B, D)."""

    data_range = None

    def __init__(self, xp, d: int, x_sigma: float = 1.0):
        self.xp, self.d = xp, int(d)
        self.logvar = 2.0 * math.log(x_sigma)

    @property
    def out_width(self) -> int:
        return self.d

    def nll(self, out, x):
        return gaussian_nll(self.xp, out, x, self.logvar)

    def nll_backward(self, dout, cache):
        return gaussian_nll_backward(self.xp, dout, cache)[0]

    def mean(self, out):
        return out


class GaussianLearned(Picklable):
    """p(x|z) = N(x; mean, diag(exp(logvar))), both from the decoder: out (B, 2D) = mean | logvar."""

    data_range = None

    def __init__(self, xp, d: int):
        self.xp, self.d = xp, int(d)

    @property
    def out_width(self) -> int:
        return 2 * self.d

    def nll(self, out, x):
        D = self.d
        return gaussian_nll(self.xp, out[:, :D], x, out[:, D:])

    def nll_backward(self, dout, cache):
        """-> dL/d out (B, 2D): the mean's and the log variance's gradients side by side."""
        dmean, dlogvar = gaussian_nll_backward(self.xp, dout, cache)
        return self.xp.concat([dmean, dlogvar], axis=1)

    def mean(self, out):
        return out[:, : self.d]


#: likelihood name -> class (the CLI's --likelihood choices)
LIKELIHOODS = {"bernoulli": Bernoulli, "gaussian": Gaussian, "gaussian_learned": GaussianLearned}


def make_likelihood(name: str, xp, d: int, x_sigma: float = 1.0):
    """The observation model called ``name`` for data of width d. Raises ValueError for an
    unknown name or a sigma that is not a positive finite number."""
    if not isinstance(name, str) or name not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {name!r}")
    if name == "gaussian":
        if isinstance(x_sigma, bool) or not (isinstance(x_sigma, numbers.Real)
                                             and math.isfinite(x_sigma) and x_sigma > 0):
            raise ValueError(f"x_sigma must be a positive finite number, got {x_sigma!r}")
        return Gaussian(xp, d, float(x_sigma))
    return LIKELIHOODS[name](xp, d)
