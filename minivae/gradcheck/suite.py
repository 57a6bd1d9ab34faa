"""The suite behind ``minivae gradcheck``: every hand-written backward in minivae, checked in
float64 against finite differences.

Each layer (Dense and every activation), the reparametrized sampler, the Bernoulli and Gaussian
likelihoods, the analytic and Monte-Carlo KL, and whole models end to end through the sampling
step with eps held fixed (a Bernoulli VAE, a Gaussian-learned-variance tanh VAE with beta 0.5,
an Autoencoder; with ``full=True`` also the default 784-400-20 VAE).

    from minivae.gradcheck import run_all, check_model
    report = run_all("numpy")           # a Report; report.passed, print(report)
"""
from __future__ import annotations

import numpy as np

from .core import check_gradients
from .layer import check_backward_properties, check_layer
from .report import Report


def run_all(backend="numpy", seed=0, full=False) -> Report:
    """Every check of minivae's own gradients as one Report (float64, inputs from ``seed``).

    backend: "numpy", "strict" or "cupy" (raises BackendUnavailable where it cannot run).
    full: also the default-size 784-400-20 VAE (random directions, bisected if one fails).
    """
    from .. import layers, losses, sampling
    from ..backend import get_backend
    from ..models import VAE, Autoencoder, DiscreteVAE

    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    if not isinstance(full, bool):
        raise ValueError(f"full must be True or False; got {full!r}")

    be = get_backend(backend)
    xp = be.xp
    rng = np.random.default_rng(seed)
    f64 = lambda a: be.asarray(np.asarray(a, dtype=np.float64))  # noqa: E731
    report = Report(f"minivae gradcheck (backend {be.name}, float64)")
    B, D, L = 4, 6, 3

    # Layers. Inputs are kept at least 0.1 away from 0 so ReLU's kink is not straddled.
    x = rng.standard_normal((B, D))
    x = f64(np.sign(x) * (0.1 + np.abs(x)))
    dense = layers.Dense(D, 5, backend=be)
    P = {"W": f64(rng.standard_normal((D, 5)) * 0.5), "b": f64(rng.standard_normal(5))}
    report += check_layer(dense, P, x, seed=seed, name="Dense")
    for name, cls in layers.ACTIVATIONS.items():
        report += check_layer(cls(backend=be), {}, x, seed=seed, name=cls.__name__)

    # Scalar-valued pieces: f = sum(w * per_example) or sum(G * out) with fixed random weights.
    def piece(name, forward, backward, tensors, out_shape):
        G = f64(rng.standard_normal(out_shape) + 0.5)

        def f():
            return float(xp.sum(forward() * G))

        analytic = backward(G)
        r = check_gradients(f, tensors, analytic, seed=seed, name=name)
        for c in r.checks:
            c.name = f"{name}.{c.name}"
        return r

    mu, logvar, eps = (f64(rng.standard_normal((B, L))) for _ in range(3))
    report += piece(
        "sample", lambda: sampling.sample(xp, mu, logvar, eps)[0],
        lambda G: dict(zip(("mu", "logvar", "eps"),
                           sampling.sample_backward(G, sampling.sample(xp, mu, logvar, eps)[1]))),
        {"mu": mu, "logvar": logvar, "eps": eps}, (B, L))
    report += check_backward_properties(
        lambda G: dict(zip(("mu", "logvar", "eps"),
                           sampling.sample_backward(G, sampling.sample(xp, mu, logvar, eps)[1]))),
        (B, L), np.float64, [mu, logvar, eps], "sample", rng)

    # Logits span large magnitudes to exercise the stable softplus/sigmoid branches.
    logits = f64(rng.standard_normal((B, D)) * np.array([0.5, 2, 5, 10, 20, 30]))
    xdata = f64(rng.uniform(size=(B, D)))
    report += piece("bernoulli_nll", lambda: losses.bernoulli_nll(xp, logits, xdata)[0],
                    lambda w: {"logits": losses.bernoulli_nll_backward(
                        xp, w, losses.bernoulli_nll(xp, logits, xdata)[1])},
                    {"logits": logits}, (B,))
    mean, lv = f64(rng.standard_normal((B, D))), f64(rng.standard_normal((B, D)) * 0.5)
    report += piece("gaussian_nll(fixed var)", lambda: losses.gaussian_nll(xp, mean, xdata, 0.3)[0],
                    lambda w: {"mean": losses.gaussian_nll_backward(
                        xp, w, losses.gaussian_nll(xp, mean, xdata, 0.3)[1])[0]},
                    {"mean": mean}, (B,))
    report += piece("gaussian_nll(learned var)", lambda: losses.gaussian_nll(xp, mean, xdata, lv)[0],
                    lambda w: dict(zip(("mean", "logvar"), losses.gaussian_nll_backward(
                        xp, w, losses.gaussian_nll(xp, mean, xdata, lv)[1]))),
                    {"mean": mean, "logvar": lv}, (B,))
    report += piece("kl_normal", lambda: losses.kl_normal(xp, mu, logvar)[0],
                    lambda w: dict(zip(("mu", "logvar"), losses.kl_normal_backward(
                        xp, w, losses.kl_normal(xp, mu, logvar)[1]))),
                    {"mu": mu, "logvar": logvar}, (B,))
    z = f64(rng.standard_normal((B, L)))
    report += piece("kl_monte_carlo", lambda: losses.kl_monte_carlo(xp, z, mu, logvar)[0],
                    lambda w: dict(zip(("z", "mu", "logvar"), losses.kl_monte_carlo_backward(
                        xp, w, losses.kl_monte_carlo(xp, z, mu, logvar)[1]))),
                    {"z": z, "mu": mu, "logvar": logvar}, (B,))

    # Categorical latents: the Gumbel-softmax relaxation (noise g held fixed, as eps is) and
    # the KL against a uniform prior, on (B, K, C) = (4, 2, 3) logits of several magnitudes.
    cat_logits = f64(rng.standard_normal((B, 2, 3)) * np.array([0.5, 2.0, 4.0]))
    g = f64(-np.log(-np.log(rng.uniform(0.05, 0.95, size=(B, 2, 3)))))
    report += piece("gumbel_softmax(tau=0.7)",
                    lambda: sampling.gumbel_softmax(xp, cat_logits, g, 0.7)[0],
                    lambda G: {name: sampling.gumbel_softmax_backward(
                        xp, G, sampling.gumbel_softmax(xp, cat_logits, g, 0.7)[1])
                        for name in ("logits", "g")},          # y depends on l + g alone
                    {"logits": cat_logits, "g": g}, (B, 2, 3))
    report += piece("kl_categorical", lambda: losses.kl_categorical(xp, cat_logits)[0],
                    lambda w: {"logits": losses.kl_categorical_backward(
                        xp, w, losses.kl_categorical(xp, cat_logits)[1])},
                    {"logits": cat_logits}, (B,))

    # Whole models, end to end through the sampling step with eps (or g) held fixed.
    data = f64(rng.uniform(size=(5, 12)))
    for label, model in [
        ("VAE", VAE(12, (10,), 3, backend=be, dtype="float64", seed=seed)),
        ("VAE(gaussian_learned, tanh, beta=0.5)",
         VAE(12, (10, 7), 3, activation="tanh", likelihood="gaussian_learned", beta=0.5,
             backend=be, dtype="float64", seed=seed)),
        ("Autoencoder", Autoencoder(12, (10,), 3, backend=be, dtype="float64", seed=seed)),
        ("DiscreteVAE(K=3, C=4, tau=0.8, relaxed)",
         DiscreteVAE(12, (10,), 3, categories=4, tau=0.8, beta=0.7, backend=be,
                     dtype="float64", seed=seed)),
    ]:
        report += check_model(model, data, seed=seed, name=label)
    if full:
        big = VAE(backend=be, dtype="float64", seed=seed)
        report += check_model(big, f64(rng.uniform(size=(4, 784))), seed=seed,
                              name="VAE 784-400-20")
    return report


def check_model(model, x, *, seed=0, name="model", mode="auto", **kwargs) -> Report:
    """Gradient-check ``model.loss_and_grads(x, eps)`` (the analytic side) against finite
    differences of ``model.loss(x, eps)`` (the forward pass alone) with respect to every
    parameter tensor, with eps drawn once and held fixed (so the loss is a deterministic function of the
    parameters: the reparametrization trick). x: (B, D) on the model's backend. Rows are named
    ``<name>.<tensor>`` (e.g. ``VAE.enc.0.W``). Other keyword arguments go to
    :func:`check_gradients`."""

    from .numeric import GradcheckError

    if not (hasattr(model, "loss_and_grads") and hasattr(model, "params")):
        raise GradcheckError(f"check_model needs a minivae VAE or Autoencoder; got "
                             f"{type(model).__name__}")
    if not model.backend.is_array(x):
        raise GradcheckError(f"x must be a (B, D) array on the model's backend "
                             f"({model.backend.name}); got {type(x).__name__}: convert it with "
                             f"model.backend.asarray(x)")
    model.check_input(x)          # before eps is drawn: a refused x leaves the RNG as it was
    eps = model.draw_eps(x.shape[0]) if model.has_prior else None
    model.loss_and_grads(x, eps)
    analytic = {k: model.xp.asarray(v, copy=True) for k, v in model.params.grad_views.items()}

    def f():                  # the forward pass alone: the numeric side never runs a backward
        return float(model.loss(x, eps, check=False))

    rep = check_gradients(f, model.params.views, analytic, seed=seed, name=name, mode=mode,
                          **kwargs)
    for c in rep.checks:
        c.name = f"{name}.{c.name}"
    return rep

