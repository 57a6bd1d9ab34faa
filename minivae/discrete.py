"""Gradients through discrete samples, and their exact ground truth (a :class:`DiscreteVAE`).

For one example x with K categorical variables of C classes, q(z|x) = prod_k Cat(z_k;
softmax(l_k)), l = encoder_phi(x), uniform prior p(z) = C^-K:

    loss(x) = E_{q(z|x)}[ f(z) ] + beta * KL(q || p),      f(z) = -log p(x|z)

There is no z = mu + sigma * eps here: a one-hot z does not move when l moves a little, so the
pathwise gradient of E_q[f] is not available. Three ways to a gradient (Mohamed et al. 2020,
"Monte Carlo Gradient Estimation in Machine Learning", JMLR; sections 4-5):

exact (ground truth, small models only): enumerate all C^K configurations,
    E_q[f]          = sum_z q(z|x) f(z)
    d E_q[f] / d l_k = sum_z q(z|x) f(z) (onehot(z_k) - q_k)      (d log q(z|x)/d l_k)
    d E_q[f] / d theta = sum_z q(z|x) d f(z) / d theta              (decoder)

REINFORCE (score function; Williams 1992): z_s = one_hot(argmax(l + g_s)), g_s ~ Gumbel(0, 1)
(an exact sample: the Gumbel-max trick), S samples per example,
    d/d l_k  ~  mean_S (f(z_s) - b_s) (onehot(z_s,k) - q_k)
unbiased for any b_s that does not depend on z_s; ``baseline=True`` uses the leave-one-out
mean of the other S - 1 samples' f (Kool et al. 2019), as minivae.estimators does.

Gumbel-softmax / Concrete (Jang et al. 2017; Maddison et al. 2017): replace z_s by the
relaxed y_s = softmax((l + g_s) / tau) and differentiate f(y_s) by backprop (the model's own
forward_backward). *Biased*: it is the exact gradient of a different objective, E[f(y)], which
approaches E_q[f(z)] as tau -> 0, while its variance grows. Straight-through: f is evaluated at
the one-hot z_s, the backward pass is the relaxed one; biased too.

Every estimator returns d mean_B(loss) / d params as a copy of a flat (n,) array in the
model's layout (``model.params.layout``), like minivae.estimators; it overwrites
``model.params.grad`` on the way. The KL term is the analytic one (losses.kl_categorical) for
all of them. ``g``: Gumbel noise of shape (S, B, K*C), given (as eps is for the Gaussian
estimators) or drawn from the model's RNG.
"""
from __future__ import annotations

import itertools

import numpy as np

from . import losses
from .estimators import _noise as _gaussian_noise
from .models import DiscreteVAE, check_count
from .sampling import gumbel, one_hot

ESTIMATORS = ("reinforce", "reinforce_baseline", "gumbel_softmax", "straight_through")

#: enumeration is refused beyond this many latent configurations (C^K)
MAX_CONFIGS = 4096


def _check(model, x):
    if not isinstance(model, DiscreteVAE):
        raise TypeError(f"these estimators need a DiscreteVAE, got {type(model).__name__}")
    model.check_input(x)


def draw_g(model, samples: int, batch: int):
    """Gumbel(0, 1) noise (S, B, K*C) from the model's RNG, in the model's dtype."""
    S, B = check_count(samples, "samples (S)"), check_count(batch, "batch")
    return gumbel(model.xp, model.rng.uniform((S, B, model.latent), model.dtype))


def _noise(model, x, g, samples, baseline=False):
    """g validated, or drawn (:func:`draw_g`) once every argument was checked."""
    return _gaussian_noise(model, x, g, samples, baseline, draw=draw_g)


def _log_softmax(xp, logits):
    a = logits - xp.max(logits, axis=-1, keepdims=True)
    return a - xp.log(xp.sum(xp.exp(a), axis=-1, keepdims=True))


def _stack(xp, a, S):
    """a: (B, ...) -> (S * B, ...), row s * B + b holding a[b]."""
    return xp.reshape(xp.broadcast_to(xp.expand_dims(a, axis=0), (S, *a.shape)),
                      (S * a.shape[0], *a.shape[1:]))


def _kl_grad(model, logits, B):
    _, cache = losses.kl_categorical(model.xp, logits)
    return losses.kl_categorical_backward(model.xp, model.beta / B, cache)


def _finish(model, dlogits, enc_caches, dec_grads):
    """dlogits (B, K, C) = d mean_B(loss) / d l -> the whole flat gradient (a copy)."""
    xp, P = model.xp, model.params
    _, enc_grads = model.encoder.backward(P, xp.reshape(dlogits, (dlogits.shape[0], model.latent)),
                                          enc_caches)
    P.write_grads({**enc_grads, **dec_grads})
    return xp.asarray(P.grad, copy=True)


def _decoder_pass(model, z_rows, x_rows, weights):
    """f at (z_rows, x_rows) and the decoder's gradient of sum(weights * f). z_rows: (R, K*C)."""
    P = model.params
    out, dec_caches = model.decoder.forward(P, z_rows)
    f, r_cache = model.px.nll(out, x_rows)
    _, dec_grads = model.decoder.backward(P, model.px.nll_backward(weights, r_cache), dec_caches)
    return f, dec_grads


# -- exact, by enumeration --------------------------------------------------------------------------
def configurations(model):
    """Every latent configuration as one-hot rows, (C^K, K*C) host float64; ValueError beyond
    :data:`MAX_CONFIGS`."""
    K, C = model.variables, model.categories
    if C ** K > MAX_CONFIGS:
        raise ValueError(f"exact enumeration of {C}^{K} = {C ** K:,} configurations is refused "
                         f"(at most {MAX_CONFIGS:,}); use a smaller K or C")
    idx = np.array(list(itertools.product(range(C), repeat=K)), dtype=np.int64)   # (N, K)
    return np.eye(C)[idx].reshape(len(idx), K * C)


def exact(model, x):
    """The exact loss and gradient of mean_B(E_q[f(z)] + beta KL) by enumerating all C^K
    configurations. x: (B, D) -> (loss: host float, nats per example; flat gradient (n,))."""
    _check(model, x)
    xp, P, B = model.xp, model.params, x.shape[0]
    K, C = model.variables, model.categories
    Z = model.backend.asarray(configurations(model), dtype=model.dtype)       # (N, K*C)
    N = Z.shape[0]
    h, enc_caches = model.encoder.forward(P, x)
    logits = model._grid(h)                                                  # (B, K, C)
    logq = _log_softmax(xp, logits)
    Zg = xp.reshape(Z, (N, 1, K, C))
    q_z = xp.exp(xp.sum(Zg * xp.expand_dims(logq, axis=0), axis=(2, 3)))     # (N, B)
    z_rows = xp.reshape(xp.broadcast_to(xp.reshape(Z, (N, 1, K * C)), (N, B, K * C)),
                        (N * B, K * C))
    x_rows = _stack(xp, x, N)
    f, dec_grads = _decoder_pass(model, z_rows, x_rows, xp.reshape(q_z, (N * B,)) / B)
    f = xp.reshape(f, (N, B))
    kl, _ = losses.kl_categorical(xp, logits)
    loss = float(xp.mean(xp.sum(q_z * f, axis=0) + model.beta * kl))
    # d E_q[f] / d l[b, k, :] = sum_z q(z) f(z) (onehot(z_k) - q[b, k])
    wf = xp.reshape(q_z * f, (N, B, 1, 1))
    q = xp.exp(logq)
    dlogits = (xp.sum(wf * Zg, axis=0) - xp.sum(wf, axis=0) * q) / B + _kl_grad(model, logits, B)
    return loss, _finish(model, dlogits, enc_caches, dec_grads)


# -- REINFORCE ------------------------------------------------------------------------------------
def reinforce(model, x, g=None, samples: int = 1, baseline: bool = False):
    """Score-function gradient of mean_B(loss) at exact samples z_s = one_hot(argmax(l + g_s)).
    x: (B, D); g: (S, B, K*C) or None to draw ``samples`` -> flat gradient (n,). Unbiased.
    ``baseline=True``: the leave-one-out baseline (needs S >= 2)."""
    _check(model, x)
    g = _noise(model, x, g, samples, baseline)
    xp, P = model.xp, model.params
    S, B, K, C = g.shape[0], x.shape[0], model.variables, model.categories
    h, enc_caches = model.encoder.forward(P, x)
    logits = model._grid(h)                                                  # (B, K, C)
    z = one_hot(xp, xp.argmax(xp.expand_dims(logits, axis=0)
                              + xp.reshape(g, (S, B, K, C)), axis=-1), C, model.dtype)
    f, dec_grads = _decoder_pass(model, xp.reshape(z, (S * B, K * C)), _stack(xp, x, S),
                                 1.0 / (S * B))
    r = xp.reshape(f, (S, B))
    if baseline:
        r = r - (xp.sum(r, axis=0) - r) / (S - 1)
    q = xp.exp(_log_softmax(xp, logits))
    w = xp.reshape(r, (S, B, 1, 1)) / (S * B)
    dlogits = xp.sum(w * (z - q), axis=0) + _kl_grad(model, logits, B)
    return _finish(model, dlogits, enc_caches, dec_grads)


# -- the relaxation -------------------------------------------------------------------------------
def relaxed(model, x, g=None, samples: int = 1, tau: float = 1.0,
            straight_through: bool = False):
    """The Gumbel-softmax (or straight-through) gradient of mean_B(loss) at temperature tau:
    backprop through y_s = softmax((l + g_s) / tau), S samples per example. x: (B, D);
    g: (S, B, K*C) or None -> flat gradient (n,). Biased (see the module docstring). Runs the
    model's own forward_backward on the S * B rows; the model's tau and straight_through are
    left as they were."""
    _check(model, x)
    g = _noise(model, x, g, samples)
    xp, S, B = model.xp, g.shape[0], x.shape[0]
    saved = model.tau, model.straight_through
    try:
        model.tau, model.straight_through = tau, bool(straight_through)
        model.forward_backward(model.params, _stack(xp, x, S),
                               xp.reshape(g, (S * B, model.latent)), S * B)
    finally:
        model.tau, model.straight_through = saved
    return xp.asarray(model.params.grad, copy=True)


def estimate(model, x, estimator: str = "reinforce_baseline", g=None, samples: int = 1,
             tau: float = 1.0):
    """Dispatch by name (:data:`ESTIMATORS`) -> flat gradient (n,)."""
    if estimator in ("reinforce", "reinforce_baseline"):
        return reinforce(model, x, g, samples, baseline=estimator == "reinforce_baseline")
    if estimator in ("gumbel_softmax", "straight_through"):
        return relaxed(model, x, g, samples, tau, straight_through=estimator == "straight_through")
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def encoder_slice(model) -> slice:
    """The encoder's parameters in the flat layout (they come first)."""
    from .estimators import encoder_slice as gaussian_encoder_slice

    return gaussian_encoder_slice(model)


def bias_and_variance(model, x, estimator, exact_grad, samples=1, replicates=1000, tau=1.0):
    """Mean and spread of an estimator over R replicates, on the encoder's coordinates:

        bias     = ||mean_R(g) - exact|| / ||exact||           (relative, 0 for unbiased, up
                                                                to the noise of the mean)
        noise    = sqrt(mean_i Var(g_i)) / sqrt(R) / ||exact|| * sqrt(n_enc)   (the bias an
                                                                unbiased estimator shows)
        variance = mean_i Var(g_i)                             (per coordinate)
        max_z    = max_i |mean_R(g_i) - exact_i| / SE_i        (the unbiasedness statistic;
                   SE_i floored at 1e-10 max|exact|, the exact gradient's own round-off, so a
                   coordinate the estimator gets exactly right every time does not divide 0/0)

    -> dict of host floats. exact_grad: the flat (n,) exact gradient (:func:`exact`)."""
    R = check_count(replicates, "replicates", low=2)
    xp = model.xp
    enc = encoder_slice(model)
    if tuple(getattr(exact_grad, "shape", ())) != tuple(model.params.grad.shape):
        raise ValueError(f"exact_grad must be the flat {tuple(model.params.grad.shape)} "
                         f"gradient (discrete.exact), got shape "
                         f"{tuple(getattr(exact_grad, 'shape', ())) or type(exact_grad).__name__}")
    truth = np.asarray(model.backend.to_host(exact_grad[enc]), dtype=np.float64)
    gs = np.stack([np.asarray(model.backend.to_host(
        estimate(model, x, estimator, samples=samples, tau=tau)[enc]), dtype=np.float64)
        for _ in range(R)])
    mean, var = gs.mean(axis=0), gs.var(axis=0, ddof=1)
    se = np.maximum(np.sqrt(var / R), 1e-10 * float(np.abs(truth).max()))
    norm = float(np.linalg.norm(truth))
    return {"bias": float(np.linalg.norm(mean - truth)) / norm,
            "noise": float(np.sqrt(var.sum() / R)) / norm,
            "variance": float(var.mean()),
            "max_z": float(np.max(np.abs(mean - truth) / se))}
