"""Gradient estimators for the ELBO's expectation over q(z|x): pathwise versus score function.

The VAE loss of one example x is

    loss(x) = E_{q(z|x)}[ f(z) ] + KL(q(z|x) || p(z)),      f(z) = -log p(x|z)
    q(z|x)  = N(mu, diag(sigma^2)),  (mu, logvar) = encoder_phi(x),  sigma = exp(logvar / 2)

and minivae minimises its mean over a batch. The expectation cannot be differentiated in closed
form, so it is estimated from S samples z_s per example. Two unbiased estimators of
grad_phi E_q[f(z)] (phi: the encoder parameters, reached through mu and logvar):

pathwise (reparametrization): write z = mu + sigma * eps with eps ~ N(0, I), so the randomness
no longer depends on phi and the gradient moves inside the expectation:
    grad_phi E_q[f(z)] = E_eps[ f'(z) dz/dphi ]
    dL/dmu = f'(z),   dL/dlogvar = f'(z) * eps * sigma / 2        (sampling.sample_backward)
It needs f to be differentiable in z, and uses its slope.

score function (REINFORCE, likelihood ratio): differentiate the density instead of the sample,
    grad_phi E_q[f(z)] = E_q[ f(z) grad_phi log q(z|x) ]
    d log q / d mu     = (z - mu) / sigma^2
    d log q / d logvar = -1/2 + (z - mu)^2 / (2 sigma^2)
It only needs the *values* f(z_s), which is why it works for discrete z, and why it is noisy:
f(z) is hundreds of nats on MNIST, and each sample multiplies that size by a zero-mean score.

score function with a baseline (control variate): since E_q[grad log q] = 0, subtracting any b
that does not depend on z_s keeps it unbiased:  E_q[(f(z_s) - b) grad log q(z_s|x)].
minivae uses the leave-one-out mean of the *other* S - 1 samples of the same example,
    b_s = (sum_{s'} f(z_s') - f(z_s)) / (S - 1)                 (needs S >= 2)
Why this one: it is per example (f differs by tens to hundreds of nats between digits, so one global
running mean would leave most of the offset in), it is independent of z_s, so unbiased with no
correction, and it needs no state or tuning (Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE
samples, get a baseline for free").

The KL term either in closed form (losses.kl_normal: the same for every estimator) or as the
one-sample Monte-Carlo value log q(z_s|x) - log p(z_s) (losses.kl_monte_carlo), folded into the
estimated expectation:
    pathwise:  d/dmu = z,  d/dlogvar = -1/2 + z * eps * sigma / 2  (the sample's path plus the
               partial derivatives, both from kl_monte_carlo_backward)
    score:     the reward becomes f(z) + log q(z|x) - log p(z), plus the partial derivative of
               log q at fixed z, which is the score itself (mean zero, kept so the result is the
               exact gradient of the sampled surrogate).

The decoder parameters theta need none of this: grad_theta E_q[f(z)] = E_q[grad_theta f(z)]
(the distribution does not depend on theta), so every estimator returns the same decoder part
for the same eps; they differ in the encoder part only.

Every estimator returns d mean_B(loss) / d params as a *copy* of a flat (n,) array in the
model's layout (``model.params.layout``), like ``model.params.grad`` after
``model.loss_and_grads``; it overwrites ``model.params.grad`` on the way. The S samples of the
B examples run as one batch of S * B rows (no per-sample loops).
"""
from __future__ import annotations

from . import losses
from .models import check_count
from .sampling import sample, sample_backward

ESTIMATORS = ("pathwise", "score", "score_baseline")
KL_MODES = ("analytic", "mc")


def draw_eps(model, samples: int, batch: int):
    """eps ~ N(0, I) of shape (S, B, L) from the model's RNG, in the model's dtype.
    Raises TypeError/ValueError unless samples and batch are whole numbers >= 1."""
    S = check_count(samples, "samples (S)")
    return model.rng.normal((S, check_count(batch, "batch"), model.latent), model.dtype)


def _noise(model, x, eps, samples, baseline=False):
    """The (S, B, L) noise: eps validated, or drawn (after every argument was checked, so a
    refused call leaves the model's RNG where it was)."""
    if eps is None:
        S = check_count(samples, "samples (S)")
        if baseline and S < 2:
            raise ValueError("the leave-one-out baseline needs at least S = 2 samples per example")
        return draw_eps(model, S, x.shape[0])
    model.check_eps(eps, x.shape[0], stacked=True)
    if baseline and eps.shape[0] < 2:
        raise ValueError("the leave-one-out baseline needs at least S = 2 samples per example")
    return eps


def _stack(xp, a, S):
    """a: (B, K) -> (S * B, K), row s * B + b holding a[b] (matches eps reshaped from (S, B, L))."""
    B, K = a.shape
    return xp.reshape(xp.broadcast_to(a, (S, B, K)), (S * B, K))


def _per_example(xp, a, S):
    """(S * B, L) -> (B, L): the sum over the S samples of each example."""
    return xp.sum(xp.reshape(a, (S, a.shape[0] // S, a.shape[1])), axis=0)


def _forward(model, x, eps):
    """Shared forward and the decoder's backward (identical for every estimator).

    x: (B, D), eps: (S, B, L). Writes the decoder gradient into model.params.grad and returns
    a dict of the pieces the encoder part needs; rows are S * B, scaled for mean_B(mean_S(.)).
    """
    xp, P, L = model.xp, model.params, model.latent
    S, B = eps.shape[0], x.shape[0]
    h, enc_caches = model.encoder.forward(P, x)                   # (B, 2L), once per example
    mu, logvar = h[:, :L], h[:, L:]
    mu_s, logvar_s = _stack(xp, mu, S), _stack(xp, logvar, S)     # (S*B, L)
    z, s_cache = sample(xp, mu_s, logvar_s, xp.reshape(eps, (S * B, L)))
    out, dec_caches = model.decoder.forward(P, z)
    f, r_cache = model.px.nll(out, _stack(xp, x, S))              # f(z_s) = -log p(x|z_s), (S*B,)
    # d mean_B mean_S f / d decoder output: 1 / (S B) per row; then the decoder's backward
    dz, dec_grads = model.decoder.backward(P, model.px.nll_backward(1.0 / (S * B), r_cache),
                                           dec_caches)
    return dict(S=S, B=B, mu=mu, logvar=logvar, mu_s=mu_s, logvar_s=logvar_s, z=z,
                s_cache=s_cache, f=f, dz=dz, enc_caches=enc_caches, dec_grads=dec_grads)


def _encoder_backward(model, dmu, dlogvar, fw):
    """dmu, dlogvar: (B, L) = d mean_B(loss) / d (mu, logvar) -> the whole gradient, written
    into model.params.grad; returns a copy of it."""
    xp, P = model.xp, model.params
    _, enc_grads = model.encoder.backward(P, xp.concat([dmu, dlogvar], axis=1), fw["enc_caches"])
    P.write_grads({**enc_grads, **fw["dec_grads"]})
    return xp.asarray(P.grad, copy=True)


def _analytic_kl_grad(model, fw):
    """dKL/dmu = mu, dKL/dlogvar = (exp(logvar) - 1) / 2, scaled by beta / B -> (B, L) each."""
    xp = model.xp
    _, cache = losses.kl_normal(xp, fw["mu"], fw["logvar"])
    return losses.kl_normal_backward(xp, model.beta / fw["B"], cache)


def pathwise(model, x, eps=None, samples: int = 1, kl: str = "analytic"):
    """Reparametrization gradient of mean_B(loss). x: (B, D); eps: (S, B, L) or None to draw
    ``samples`` of it -> flat gradient (n,).

        dL/dmu     = mean_S dz_s + dKL/dmu
        dL/dlogvar = mean_S dz_s * eps_s * sigma / 2 + dKL/dlogvar
    with dz_s = d f(z_s) / d z_s from the decoder's backward.
    """
    _check(model, kl, x)
    eps = _noise(model, x, eps, samples)
    xp = model.xp
    fw = _forward(model, x, eps)
    S, dz = fw["S"], fw["dz"]
    if kl == "mc":
        # KL_s = log q(z_s|x) - log p(z_s): its z-slope joins f's before the sampler's backward
        _, k_cache = losses.kl_monte_carlo(xp, fw["z"], fw["mu_s"], fw["logvar_s"])
        kz, kmu, klogvar = losses.kl_monte_carlo_backward(xp, model.beta / (S * fw["B"]), k_cache)
        dmu_s, dlogvar_s, _ = sample_backward(dz + kz, fw["s_cache"])
        dmu, dlogvar = _per_example(xp, dmu_s + kmu, S), _per_example(xp, dlogvar_s + klogvar, S)
    else:
        dmu_s, dlogvar_s, _ = sample_backward(dz, fw["s_cache"])
        kmu, klogvar = _analytic_kl_grad(model, fw)
        dmu, dlogvar = _per_example(xp, dmu_s, S) + kmu, _per_example(xp, dlogvar_s, S) + klogvar
    return _encoder_backward(model, dmu, dlogvar, fw)


def score_function(model, x, eps=None, samples: int = 1, kl: str = "analytic",
                   baseline: bool = False):
    """Score-function (REINFORCE) gradient of mean_B(loss). x: (B, D); eps: (S, B, L) or None
    to draw ``samples`` of it -> flat gradient (n,).

        dL/dmu     = mean_S (r_s - b_s) (z_s - mu) / sigma^2                  + dKL/dmu
        dL/dlogvar = mean_S (r_s - b_s) (-1/2 + (z_s - mu)^2 / (2 sigma^2))   + dKL/dlogvar
    with the reward r_s = f(z_s) (analytic KL) or f(z_s) + log q(z_s|x) - log p(z_s) (MC KL),
    and b_s = 0, or with ``baseline=True`` the leave-one-out mean of the other S - 1 rewards of
    the same example (needs S >= 2). The decoder's dz is computed but not used for phi.
    """
    _check(model, kl, x)
    eps = _noise(model, x, eps, samples, baseline)
    xp = model.xp
    fw = _forward(model, x, eps)
    S, B = fw["S"], fw["B"]
    d = fw["z"] - fw["mu_s"]                         # (S*B, L)
    inv_var = xp.exp(-fw["logvar_s"])
    score_mu = d * inv_var                           # d log q / d mu
    score_logvar = 0.5 * d * d * inv_var - 0.5       # d log q / d logvar
    r = fw["f"]                                      # (S*B,)
    if kl == "mc":
        kl_s, k_cache = losses.kl_monte_carlo(xp, fw["z"], fw["mu_s"], fw["logvar_s"])
        r = r + model.beta * kl_s
        # partials of beta * log q at fixed z (= beta * score; zero mean, exact surrogate gradient)
        _, pmu, plogvar = losses.kl_monte_carlo_backward(xp, model.beta / (S * B), k_cache)
    if baseline:
        r3 = xp.reshape(r, (S, B))
        r = xp.reshape((r3 - (xp.sum(r3, axis=0) - r3) / (S - 1)), (S * B,))
    w = xp.expand_dims(r, axis=1) / (S * B)          # each row's share of mean_B mean_S
    dmu_s, dlogvar_s = w * score_mu, w * score_logvar
    if kl == "mc":
        dmu_s, dlogvar_s = dmu_s + pmu, dlogvar_s + plogvar
        dmu, dlogvar = _per_example(xp, dmu_s, S), _per_example(xp, dlogvar_s, S)
    else:
        kmu, klogvar = _analytic_kl_grad(model, fw)
        dmu, dlogvar = _per_example(xp, dmu_s, S) + kmu, _per_example(xp, dlogvar_s, S) + klogvar
    return _encoder_backward(model, dmu, dlogvar, fw)


def estimate(model, x, estimator: str = "pathwise", eps=None, samples: int = 1,
             kl: str = "analytic"):
    """Dispatch by name: "pathwise" | "score" | "score_baseline" -> flat gradient (n,)."""
    if estimator == "pathwise":
        return pathwise(model, x, eps, samples, kl)
    if estimator in ("score", "score_baseline"):
        return score_function(model, x, eps, samples, kl, baseline=estimator == "score_baseline")
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def encoder_slice(model) -> slice:
    """The encoder's parameters in the flat layout (they come first and are contiguous)."""
    L = model.params.layout
    names = [n for n in L.names if n.startswith("enc.")]
    start = L.offsets[names[0]]
    stop = L.slice(names[-1]).stop
    if stop - start != sum(L.slice(n).stop - L.slice(n).start for n in names):
        raise ValueError("the encoder's parameters are not contiguous in the flat layout")
    return slice(start, stop)


def _check(model, kl, x):
    if kl not in KL_MODES:
        raise ValueError(f"kl must be 'analytic' or 'mc', got {kl!r}")
    if not getattr(model, "has_prior", False):
        raise TypeError("gradient estimators need a VAE (a model that samples z)")
    model.check_input(x)
