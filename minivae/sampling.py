"""The reparametrization step: a random sample that gradients can pass through.

    z = mu + sigma * eps,   sigma = exp(logvar / 2),   eps ~ N(0, I) given from outside

q(z|x) = N(mu, diag(exp(logvar))): ``logvar`` is the log *variance*, so the standard deviation
is exp(logvar / 2). (Using exp(logvar) as the scale silently optimises a different, wrong
bound; ``tests/test_sampling.py`` pins the sample standard deviation.)

Because eps is an argument, z is a deterministic, differentiable function of (mu, logvar):
that is the whole trick, and it is what makes the VAE gradient-checkable.

Backward, with G = dL/dz:
    dL/dmu     = G
    dL/dlogvar = G * eps * sigma / 2      (d sigma / d logvar = sigma / 2)
    dL/deps    = G * sigma                (for study; the model never needs it)
"""
from __future__ import annotations


def sample(xp, mu, logvar, eps):
    """mu, logvar, eps: (B, L) -> z: (B, L), cache = (sigma, eps)."""
    if tuple(eps.shape) != tuple(mu.shape):
        raise ValueError(f"eps has shape {tuple(eps.shape)} but mu has shape {tuple(mu.shape)}")
    sigma = xp.exp(logvar * 0.5)
    z = mu + sigma * eps
    return z, (sigma, eps)


def sample_backward(dz, cache):
    """dz: (B, L) -> (dmu, dlogvar, deps), each (B, L)."""
    sigma, eps = cache
    ds = dz * sigma
    return dz, ds * eps * 0.5, ds


# -- categorical latents: the Gumbel-softmax (Concrete) relaxation ---------------------------------
#
# A categorical sample has no z = mu + sigma * eps: its value jumps between one-hot vectors, and
# the gradient of a one-hot sample with respect to the logits is zero almost everywhere. The
# Gumbel-max trick writes the sample as a deterministic function of the logits and outside noise,
#     c = argmax_C(logits + g),   g ~ Gumbel(0, 1) i.i.d. (g = -log(-log u), u ~ U(0, 1)),
# which is an exact draw from Cat(softmax(logits)); the relaxation replaces the argmax by a
# softmax at temperature tau, a point inside the simplex that is differentiable in the logits:
#     y = softmax((logits + g) / tau)        -> one_hot(c) as tau -> 0
# (Jang, Gu & Poole 2017, "Categorical Reparameterization with Gumbel-Softmax"; Maddison, Mnih &
# Teh 2017, "The Concrete Distribution"). The gradient through y is a *biased* estimator of the
# gradient of the discrete objective: less biased as tau falls, and noisier.
#
# Backward, with G = dL/dy and the softmax Jacobian dy_i/da_j = y_i (delta_ij - y_j), a = (l+g)/tau:
#     dL/dlogits = y * (G - sum_C(G * y)) / tau


def gumbel_softmax(xp, logits, g, tau):
    """logits, g: (B, K, C) (K categorical variables of C classes), tau > 0 -> y: (B, K, C),
    each y[b, k] a point of the simplex; cache = (y, tau). g is Gumbel(0, 1) noise given from
    outside (as eps is for the Gaussian sampler), so the relaxed sample is a deterministic,
    gradient-checkable function of the logits."""
    if tuple(g.shape) != tuple(logits.shape):
        raise ValueError(f"g has shape {tuple(g.shape)} but the logits have shape "
                         f"{tuple(logits.shape)}")
    a = (logits + g) / tau
    a = a - xp.max(a, axis=-1, keepdims=True)        # softmax is shift-invariant: no overflow
    e = xp.exp(a)
    y = e / xp.sum(e, axis=-1, keepdims=True)
    return y, (y, tau)


def gumbel_softmax_backward(xp, dy, cache):
    """dy: (B, K, C) = dL/dy -> dL/dlogits: (B, K, C) = y * (dy - sum_C(dy * y)) / tau."""
    y, tau = cache
    return y * (dy - xp.sum(dy * y, axis=-1, keepdims=True)) / tau


def straight_through(xp, logits, g, tau):
    """The straight-through Gumbel-softmax (Jang et al. 2017, section 2.2): the forward value is
    the exact one-hot sample one_hot(argmax(logits + g)), (B, K, C); the backward pass is the
    relaxed one, :func:`gumbel_softmax_backward` with this cache. Biased, like the relaxation,
    but the decoder only ever sees one-hot codes."""
    y, cache = gumbel_softmax(xp, logits, g, tau)
    return one_hot(xp, xp.argmax(y, axis=-1), logits.shape[-1], logits.dtype), cache


def one_hot(xp, index, classes, dtype):
    """index: (...) integer classes -> (..., classes) one-hot rows of ``dtype``."""
    return xp.astype(xp.expand_dims(index, axis=-1) == xp.arange(classes), dtype)


def gumbel(xp, u):
    """Uniform draws u in [0, 1) -> Gumbel(0, 1) noise -log(-log u) (u = 0 maps to the
    smallest positive float first, so the noise stays finite)."""
    tiny = float(xp.finfo(u.dtype).smallest_normal)
    return -xp.log(-xp.log(xp.maximum(u, tiny)))
