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
