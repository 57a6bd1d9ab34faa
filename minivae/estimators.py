"""Gradient estimators for the ELBO's expectation over q(z|x): pathwise, score function (plain,
leave-one-out baseline, delta-method control variate) and measure valued.

The VAE loss of one example x is

    loss(x) = E_{q(z|x)}[ f(z) ] + KL(q(z|x) || p(z)),      f(z) = -log p(x|z)
    q(z|x)  = N(mu, diag(sigma^2)),  (mu, logvar) = encoder_phi(x),  sigma = exp(logvar / 2)

and minivae minimises its mean over a batch. The expectation cannot be differentiated in closed
form, so it is estimated from S samples z_s per example. Unbiased estimators of
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

score function with the delta-method control variate ("score_delta"): subtract a function h
whose expectation is known and add that expectation's gradient back, here the first-order
Taylor expansion of f around the mean (mu^ = mu held constant),
    h(z) = f(mu^) + f'(mu^) . (z - mu^),   grad_mu E_q[h] = f'(mu),   grad_logvar E_q[h] = 0
    g = mean_S (f(z_s) - h(z_s)) grad log q(z_s|x) + grad E_q[h]
Unbiased for any h; the residual f - h is second order in z - mu, so the variance is small where
f is nearly linear over q's spread. Costs one more decoder forward and backward at z = mu per
example (Mohamed et al. 2020, section 7; Paisley, Blei & Jordan 2012).

measure valued (weak derivative, "measure_valued"): write the derivative of q's density with
respect to a parameter as a constant times the difference of two densities, and estimate each
part by sampling from it (Mohamed et al. 2020, section 6). For N(mu, sigma^2), per dimension l,
    d/dmu_l    E[f] = 1/(sigma_l sqrt(2 pi)) (E f(z_l = mu_l + sigma_l W)
                                              - E f(z_l = mu_l - sigma_l W))
    d/dsigma_l E[f] = 1/sigma_l (E f(z_l = mu_l + sigma_l M) - E f(z_l = mu_l + sigma_l M U))
W ~ Weibull(2, sqrt 2) (Rayleigh), M ~ double-sided Maxwell, U ~ U(0, 1), with the same W and M
on both sides (common random numbers), the other coordinates at the base sample. Uses only
values of f, like the score function, but 4 L extra decoder forwards per sample; its variance
on the linear-Gaussian test model is below even the pathwise estimator's
(tests/test_estimators_gaussian.py). Cost per estimator: :func:`decoder_evaluations`.

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

import math

from . import losses
from .models import check_count
from .sampling import sample, sample_backward

#: estimators that are deterministic functions of eps and support both KL modes
#: every estimator name ``estimate`` accepts (measure_valued also takes its coupling noise)
ESTIMATORS = ("pathwise", "score", "score_baseline", "score_delta", "measure_valued")
ALL_ESTIMATORS = ESTIMATORS
CONTROL_VARIATES = (None, "delta")
KL_MODES = ("analytic", "mc")


def draw_eps(model, samples: int, batch: int):
    """eps ~ N(0, I) of shape (S, B, L) from the model's RNG, in the model's dtype.
    Raises TypeError/ValueError unless samples and batch are whole numbers >= 1."""
    S = check_count(samples, "samples (S)")
    return model.rng.normal((S, check_count(batch, "batch"), model.latent), model.dtype)


def _noise(model, x, eps, samples, baseline=False, draw=None):
    """The (S, B, L) noise: eps validated (``model.check_eps``), or drawn with ``draw`` (default
    :func:`draw_eps`; minivae.discrete passes its Gumbel draw) after every argument was checked,
    so a refused call leaves the model's RNG where it was."""
    if eps is None:
        S = check_count(samples, "samples (S)")
        if baseline and S < 2:
            raise ValueError("the leave-one-out baseline needs at least S = 2 samples per example")
        return (draw or draw_eps)(model, S, x.shape[0])
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
                   baseline: bool = False, control_variate: str | None = None):
    """Score-function (REINFORCE) gradient of mean_B(loss). x: (B, D); eps: (S, B, L) or None
    to draw ``samples`` of it -> flat gradient (n,).

        dL/dmu     = mean_S (r_s - b_s) (z_s - mu) / sigma^2                  + dKL/dmu
        dL/dlogvar = mean_S (r_s - b_s) (-1/2 + (z_s - mu)^2 / (2 sigma^2))   + dKL/dlogvar
    with the reward r_s = f(z_s) (analytic KL) or f(z_s) + log q(z_s|x) - log p(z_s) (MC KL),
    and b_s = 0, or with ``baseline=True`` the leave-one-out mean of the other S - 1 rewards of
    the same example (needs S >= 2). The decoder's dz is computed but not used for phi.

    control_variate="delta" (estimator name "score_delta"; not combined with ``baseline``):
    the delta-method control variate, a first-order Taylor expansion of f around the mean,
        h(z) = f(mu^) + f'(mu^) . (z - mu^),   mu^ = mu held constant,
    whose expectation is known: E_q[h] = f(mu^) + f'(mu^) . (mu - mu^), so
    d E_q[h] / d mu = f'(mu) and d E_q[h] / d logvar = 0. The estimator
        dL/dmu     = mean_S (r_s - h(z_s)) (z_s - mu) / sigma^2            + f'(mu) + dKL/dmu
        dL/dlogvar = mean_S (r_s - h(z_s)) (-1/2 + (z_s - mu)^2 / (2 sigma^2))      + dKL/dlogvar
    is unbiased for any h, and its variance is small where f is close to linear over q's
    spread (exact for linear f). f(mu) and f'(mu) cost one more decoder forward and backward
    of B rows per call (1/S per sample per example), whose parameter gradients are discarded.
    With kl="mc", h expands f only (the reward's log q - log p part is left as it is).
    Sources: Mohamed, Rosca, Figurnov & Mnih, "Monte Carlo Gradient Estimation in Machine
    Learning", JMLR 2020, section 7 (control variates, the delta method); Paisley, Blei &
    Jordan, "Variational Bayesian Inference with Stochastic Search", ICML 2012.

    Raises ValueError for an unknown control_variate or one combined with baseline=True.
    """
    _check(model, kl, x)
    if control_variate not in CONTROL_VARIATES:
        raise ValueError(f"control_variate must be None or 'delta', got {control_variate!r}")
    if control_variate is not None and baseline:
        raise ValueError("choose one of baseline=True (leave-one-out) and control_variate='delta'")
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
    if control_variate == "delta":
        f0, df0 = _delta_control_variate(model, x, fw)             # (B,), (B, L)
        h = _stack(xp, xp.reshape(f0, (B, 1)), S)[:, 0] + xp.sum(_stack(xp, df0, S) * d, axis=1)
        r = r - h
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
    if control_variate == "delta":
        dmu = dmu + _delta_mean_grad(df0, B)                     # h's expectation added back
    return _encoder_backward(model, dmu, dlogvar, fw)


# -- measure-valued gradient and the delta-method control variate (issue 16) ------------------
MVD_NOISE = ("W", "M", "U")


def draw_mvd_noise(model, samples: int, batch: int) -> dict:
    """The measure-valued estimator's noise from the model's RNG: a dict of three (S, B, L)
    arrays in the model's dtype,

        W ~ Rayleigh(1) = Weibull(k=2, scale=sqrt 2):   W = sqrt(-2 log(1 - U1)),  U1 ~ U[0, 1)
        M ~ double-sided Maxwell(0, 1):                 M = sign * sqrt(n1^2 + n2^2 + n3^2)
        U ~ Uniform[0, 1)

    drawn in that order (U1; n1..n3 as one (3, S, B, L) normal draw; the sign's uniform; U).
    Raises TypeError/ValueError unless samples and batch are whole numbers >= 1."""
    S = check_count(samples, "samples (S)")
    shape = (S, check_count(batch, "batch"), model.latent)
    xp, dt = model.xp, model.dtype
    W = xp.sqrt(-2.0 * xp.log1p(-model.rng.uniform(shape, dt)))
    chi3 = xp.sqrt(xp.sum(model.rng.normal((3,) + shape, dt) ** 2, axis=0))
    M = xp.where(model.rng.uniform(shape, dt) < 0.5, -chi3, chi3)
    U = model.rng.uniform(shape, dt)
    return {"W": W, "M": M, "U": U}


def _check_mvd_noise(model, noise, S, B):
    """noise: dict with keys W, M, U or a (W, M, U) sequence -> (W, M, U) validated: arrays of
    the model's dtype, each (S, B, L) (S = None: any S >= 1, the same for the three), finite,
    W >= 0 and U in [0, 1]."""
    if isinstance(noise, dict):
        if set(noise) != set(MVD_NOISE):
            raise ValueError(f"noise must have exactly the keys W, M, U, got {sorted(noise)}")
        parts = [noise[k] for k in MVD_NOISE]
    elif isinstance(noise, (tuple, list)) and len(noise) == 3:
        parts = list(noise)
    else:
        raise TypeError("noise must be None, a dict {'W', 'M', 'U'} or a (W, M, U) tuple of "
                        f"(S, B, L) arrays, got {type(noise).__name__}")
    L = model.latent
    for k, a in zip(MVD_NOISE, parts):
        model._check_array(a, f"noise {k}")
    if S is None and parts[0].ndim == 3:
        S = parts[0].shape[0]
    for k, a in zip(MVD_NOISE, parts):
        if a.ndim != 3 or S is None or S < 1 or tuple(a.shape) != (S, B, L):
            raise ValueError(f"noise {k} has shape {tuple(a.shape)}; expected "
                             f"({'S' if S is None else S}, {B}, {L}) (samples, batch size, "
                             "latent size), the same for W, M and U and as eps")
        model._check_values(a, f"noise {k}", "noise")
    W, M, U = parts
    xp = model.xp
    if not bool(xp.all(W >= 0)):
        raise ValueError("noise W (Rayleigh / Weibull(2, sqrt 2) draws) must be >= 0")
    if not bool(xp.all((U >= 0) & (U <= 1))):
        raise ValueError("noise U (uniform draws) must lie in [0, 1]")
    return W, M, U


def _mvd_noise(model, x, eps, noise, samples):
    """(eps, (W, M, U)): the given ones validated, the missing ones drawn (eps first) only after
    everything was checked, so a refused call leaves the model's RNG where it was."""
    B = x.shape[0]
    if eps is not None:
        model.check_eps(eps, B, stacked=True)
        S = eps.shape[0]
    else:
        S = None if noise is not None else check_count(samples, "samples (S)")
    if noise is not None:
        noise = _check_mvd_noise(model, noise, S, B)
        S = noise[0].shape[0]
    if eps is None:
        eps = draw_eps(model, S, B)
    if noise is None:
        noise = tuple(draw_mvd_noise(model, S, B)[k] for k in MVD_NOISE)
    return eps, noise


def measure_valued(model, x, eps=None, samples: int = 1, kl: str = "analytic", noise=None):
    """Measure-valued (weak-derivative) gradient of mean_B(loss), nats per example.
    x: (B, D); eps: (S, B, L) base noise or None to draw ``samples`` of it; noise: the coupling
    noise (see below) or None to draw it (after eps) -> flat gradient (n,), a copy, in the
    layout and scaling of :func:`pathwise`.

    The derivative of a density with respect to a parameter is a signed measure, which splits
    into a constant times the difference of two probability densities (Mohamed, Rosca, Figurnov
    & Mnih, "Monte Carlo Gradient Estimation in Machine Learning", JMLR 2020, section 6 and its
    table of weak derivatives). For N(mu, sigma^2), per latent dimension l:

        d/dmu_l    E[f] = 1/(sigma_l sqrt(2 pi)) ( E f(z_l = mu_l + sigma_l W)
                                                  - E f(z_l = mu_l - sigma_l W) )
        d/dsigma_l E[f] = 1/sigma_l ( E f(z_l = mu_l + sigma_l M) - E f(z_l = mu_l + sigma_l M U) )

    with W ~ Weibull(k=2, scale=sqrt 2) (= Rayleigh(1)), M ~ double-sided Maxwell(0, 1)
    (density m^2 exp(-m^2/2) / sqrt(2 pi)) and U ~ Uniform(0, 1) (M U ~ N(0, 1)). Common random
    numbers couple the two parts of each difference: the same W on both sides, and the
    negative part of d/dsigma is M U from the same M. The other dimensions z_{-l} stay at the
    base sample z = mu + sigma * eps. Then dL/dlogvar = dL/dsigma * sigma / 2 =
    (f(+M) - f(M U)) / 2. Only values of f are used (no slope), as for the score function.

    kl: "analytic" adds dKL/d(mu, logvar) in closed form, as the other estimators. "mc" puts
    beta * (log q(z|x) - log p(z)) into f (evaluated at every perturbed z with the current mu,
    logvar) and adds its partial derivatives at the fixed base sample (the score, mean zero),
    as :func:`score_function` does.

    noise: None, a dict {"W", "M", "U"} or a (W, M, U) tuple of (S, B, L) arrays of the model's
    dtype (see :func:`draw_mvd_noise`), S the same as eps's (with eps None, the noise fixes S
    and ``samples`` is ignored, as eps fixes it). W >= 0, U in [0, 1], all finite.

    Cost: besides the base pass (1 decoder forward and backward per sample per example, which
    gives the decoder's gradient, identical to the other estimators' for the same eps), 4 L
    decoder forwards per sample per example, run as one decoder forward of S * B * 4 L rows
    (memory: that many rows of every decoder activation).

    Raises ValueError/TypeError for a bad kl, x, eps, samples or noise (shape, dtype, NaN/Inf,
    range), before drawing anything.
    """
    _check(model, kl, x)
    eps, (W, M, U) = _mvd_noise(model, x, eps, noise, samples)
    xp, P, L = model.xp, model.params, model.latent
    fw = _forward(model, x, eps)
    S, B = fw["S"], fw["B"]
    N, D = S * B, x.shape[1]
    mu, logvar, z = fw["mu_s"], fw["logvar_s"], fw["z"]            # (N, L)
    sigma = xp.exp(0.5 * logvar)
    W, M, U = (xp.reshape(a, (N, L)) for a in (W, M, U))
    # the 4 replacement values of every coordinate: mu +- sigma W, mu + sigma M, mu + sigma M U
    vals = xp.stack([mu + sigma * W, mu - sigma * W, mu + sigma * M, mu + sigma * (M * U)],
                    axis=1)                                        # (N, 4, L)
    diag = xp.eye(L, dtype=model.dtype) == 1                       # (L, L)
    # row (n, k, l) = the base z_n with its coordinate l replaced by vals[n, k, l]
    Z = xp.where(diag, xp.expand_dims(vals, axis=3),
                 xp.expand_dims(xp.expand_dims(z, axis=1), axis=1))  # (N, 4, L, L)
    Z = xp.reshape(Z, (N * 4 * L, L))
    out, _ = model.decoder.forward(P, Z)
    xr = xp.reshape(xp.broadcast_to(xp.reshape(x, (1, B, 1, D)), (S, B, 4 * L, D)),
                    (N * 4 * L, D))
    f, _ = model.px.nll(out, xr)                                   # (N * 4 L,)
    if kl == "mc":
        rep = lambda a: xp.reshape(xp.broadcast_to(xp.expand_dims(a, axis=1), (N, 4 * L, L)),
                                   (N * 4 * L, L))
        kl_z, _ = losses.kl_monte_carlo(xp, Z, rep(mu), rep(logvar))
        f = f + model.beta * kl_z
    f = xp.reshape(f, (N, 4, L))
    scale = 1.0 / N                                                # mean_B mean_S
    dmu_s = (f[:, 0, :] - f[:, 1, :]) * scale / (sigma * math.sqrt(2.0 * math.pi))
    dlogvar_s = (f[:, 2, :] - f[:, 3, :]) * (0.5 * scale)         # dsigma * sigma / 2
    if kl == "mc":
        _, k_cache = losses.kl_monte_carlo(xp, z, mu, logvar)
        _, pmu, plogvar = losses.kl_monte_carlo_backward(xp, model.beta * scale, k_cache)
        dmu, dlogvar = _per_example(xp, dmu_s + pmu, S), _per_example(xp, dlogvar_s + plogvar, S)
    else:
        kmu, klogvar = _analytic_kl_grad(model, fw)
        dmu, dlogvar = _per_example(xp, dmu_s, S) + kmu, _per_example(xp, dlogvar_s, S) + klogvar
    return _encoder_backward(model, dmu, dlogvar, fw)


def _delta_control_variate(model, x, fw):
    """f(mu) (B,) and f'(mu) = d f / dz at z = mu (B, L): one decoder forward and backward of B
    rows (the decoder's parameter gradients of this pass are discarded)."""
    P = model.params
    out, caches = model.decoder.forward(P, fw["mu"])
    f0, r_cache = model.px.nll(out, x)
    df0, _ = model.decoder.backward(P, model.px.nll_backward(1.0, r_cache), caches)
    return f0, df0


def _delta_mean_grad(df0, B):
    """d mean_B E_q[h] / d mu = f'(mu) / B (B, L); its d/dlogvar is 0 (h is linear in z)."""
    return df0 / B


def decoder_evaluations(estimator: str, latent: int, samples: int = 1) -> float:
    """Decoder *forward* evaluations per example per sample (the cost unit of the estimator
    tables): total decoder rows run by one call / (B * S).

        pathwise, score, score_baseline    1
        score_delta                        1 + 1/S   (the extra pass at z = mu, once per example)
        measure_valued                     1 + 4 L   (4 perturbed copies of each coordinate)

    Every estimator also runs one decoder backward per sample per example (the decoder's
    parameter gradient; pathwise also uses its dz); score_delta adds one backward per example
    (1/S per sample) for f'(mu). Raises ValueError for an unknown name, TypeError/ValueError
    unless latent and samples are whole numbers >= 1."""
    L, S = check_count(latent, "latent"), check_count(samples, "samples (S)")
    if estimator in ("pathwise", "score", "score_baseline"):
        return 1.0
    if estimator == "score_delta":
        return 1.0 + 1.0 / S
    if estimator == "measure_valued":
        return 1.0 + 4.0 * L
    raise ValueError(f"unknown estimator {estimator!r}; choose one of "
                     f"{', '.join(ALL_ESTIMATORS)}")


def estimate(model, x, estimator: str = "pathwise", eps=None, samples: int = 1,
             kl: str = "analytic", noise=None):
    """Dispatch by name: "pathwise" | "score" | "score_baseline" | "score_delta" |
    "measure_valued" -> flat gradient (n,). noise: the measure-valued estimator's coupling noise
    (see :func:`measure_valued`); ValueError if given to another estimator or for an unknown
    name."""
    if estimator not in ALL_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of "
                         f"{', '.join(ALL_ESTIMATORS)}")
    if noise is not None and estimator != "measure_valued":
        raise ValueError(f"noise is the measure-valued estimator's; {estimator!r} takes eps only")
    if estimator == "pathwise":
        return pathwise(model, x, eps, samples, kl)
    if estimator == "measure_valued":
        return measure_valued(model, x, eps, samples, kl, noise)
    return score_function(model, x, eps, samples, kl, baseline=estimator == "score_baseline",
                          control_variate="delta" if estimator == "score_delta" else None)


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
    if not getattr(model, "continuous", True):
        raise TypeError("these estimators are for a Gaussian q(z|x); for categorical latents "
                        "use minivae.discrete (REINFORCE, Gumbel-softmax, straight-through)")
    model.check_input(x)
