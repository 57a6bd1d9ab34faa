"""A linear-Gaussian VAE whose ELBO and its gradient have a closed form: ground truth for
the Monte-Carlo gradient estimators (minivae.estimators).

The model is an ordinary minivae VAE with no hidden layer and a fixed-variance Gaussian
likelihood, so the estimators run on it unchanged:

    p(z)   = N(0, I_L)
    p(x|z) = N(z Wd + bd, s^2 I_D)                       Wd: (L, D), bd: (D,)
    q(z|x) = N(mu, diag(exp(logvar))),  [mu, logvar] = x We + be     We: (D, 2L), be: (2L,)

(The textbook form q = N(Ax + c, diag(exp(l))) is the special case where the logvar columns of
We are zero and l is the logvar part of be.)

Closed form, per example, with r = x - mu Wd - bd (D,), var = exp(logvar) (L,), and
w_l = ||Wd[l, :]||^2:

    E_q[-log p(x|z)] = ( ||r||^2 + sum_l var_l w_l ) / (2 s^2) + D/2 log(2 pi s^2)
    KL               = 1/2 sum_l (mu_l^2 + var_l - 1 - logvar_l)
    loss             = mean_B( E_q[-log p(x|z)] + beta * KL )   (= mean_B(-ELBO) when beta = 1)

because E_q ||x - z Wd - bd||^2 = ||r||^2 + tr(Wd^T diag(var) Wd). Its gradient, per example
and then divided by B:

    dloss/dmu     = -r Wd^T / s^2 + beta * mu
    dloss/dlogvar = var * w / (2 s^2) + beta * (var - 1) / 2
    dloss/dWd     = ( -mu^T r + diag(sum_B var) Wd ) / s^2      (summed over the batch)
    dloss/dbd     = -sum_B r / s^2
    dloss/dWe     = x^T [dmu, dlogvar],   dloss/dbe = sum_B [dmu, dlogvar]
"""
from __future__ import annotations

import math

from .models import VAE


def make_model(d_in: int = 5, latent: int = 3, x_sigma: float = 0.8, logvar: float = -1.0,
               seed: int = 0, backend="numpy") -> VAE:
    """A float64 linear-Gaussian VAE with random weights and q's log-variances near ``logvar``
    (away from 0, so that a sampler using exp(logvar) instead of exp(logvar / 2) differs)."""
    model = VAE(d_in=d_in, hidden=(), latent=latent, likelihood="gaussian", x_sigma=x_sigma,
                init="glorot", backend=backend, dtype="float64", seed=seed)
    be = model.params.views["enc.0.b"]
    be[latent:] = logvar
    bd = model.params.views["dec.0.b"]
    bd[...] = 0.3
    return model


def _check(model):
    names = set(model.params.layout.names)
    if not model.has_prior or names != {"enc.0.W", "enc.0.b", "dec.0.W", "dec.0.b"} \
            or model.likelihood != "gaussian":
        raise ValueError("linear_gaussian needs a VAE with hidden=() and likelihood='gaussian' "
                         "(see make_model)")


def loss(model, x):
    """Exact mean_B(E_q[-log p(x|z)] + beta * KL) of the linear-Gaussian VAE. x: (B, D) -> ()."""
    _check(model)
    xp, V, L = model.xp, model.params.views, model.latent
    s2 = math.exp(model.x_logvar)
    h = xp.matmul(x, V["enc.0.W"]) + V["enc.0.b"]
    mu, logvar = h[:, :L], h[:, L:]
    var = xp.exp(logvar)
    Wd = V["dec.0.W"]
    r = x - xp.matmul(mu, Wd) - V["dec.0.b"]
    w = xp.sum(Wd * Wd, axis=1)                                   # (L,)
    D = x.shape[1]
    recon = (xp.sum(r * r, axis=1) + xp.sum(var * w, axis=1)) / (2.0 * s2) \
        + 0.5 * D * (math.log(2.0 * math.pi) + model.x_logvar)
    kl = 0.5 * xp.sum(mu * mu + var - 1.0 - logvar, axis=1)
    return xp.mean(recon + model.beta * kl)


def loss_and_grad(model, x):
    """-> (loss (), gradient (n,) in the model's flat layout), both exact."""
    _check(model)
    xp, V, L = model.xp, model.params.views, model.latent
    B = x.shape[0]
    s2 = math.exp(model.x_logvar)
    h = xp.matmul(x, V["enc.0.W"]) + V["enc.0.b"]
    mu, logvar = h[:, :L], h[:, L:]
    var = xp.exp(logvar)
    Wd = V["dec.0.W"]
    r = x - xp.matmul(mu, Wd) - V["dec.0.b"]                      # (B, D)
    w = xp.sum(Wd * Wd, axis=1)                                   # (L,)
    beta = model.beta

    dmu = (-xp.matmul(r, xp.matrix_transpose(Wd)) / s2 + beta * mu) / B
    dlogvar = (var * w / (2.0 * s2) + beta * 0.5 * (var - 1.0)) / B
    dh = xp.concat([dmu, dlogvar], axis=1)                        # (B, 2L)
    grads = {
        "enc.0.W": xp.matmul(xp.matrix_transpose(x), dh),
        "enc.0.b": xp.sum(dh, axis=0),
        "dec.0.W": (-xp.matmul(xp.matrix_transpose(mu), r)
                    + xp.expand_dims(xp.sum(var, axis=0), axis=1) * Wd) / (s2 * B),
        "dec.0.b": -xp.sum(r, axis=0) / (s2 * B),
    }
    flat = xp.concat([xp.reshape(grads[n], (-1,)) for n in model.params.layout.names])
    return loss(model, x), flat
