"""Measuring the gradient estimators of minivae.estimators on a real VAE (`minivae study`).

The quantity: for a fixed batch x of B images, an estimator with S samples per image is a
random vector g (the gradient of mean_B(loss), randomness from eps only). Its per-coordinate
variance Var[g_i], estimated from R independent replicates of g, averaged over the encoder's
coordinates i (the decoder's part is the same for every estimator, see estimators.py):

    mean_variance = mean_i  1/(R-1) sum_r (g_i^(r) - mean_r g_i)^2

Lower is better: it is the noise an optimizer has to average away. For estimators built from S
independent samples it falls as 1/S; the ratio between two estimators at the same S is the
number of samples one needs to match the other.

Threads: the work here is many small matrix products (a batch of S * B rows at a time), run
with one BLAS thread (:func:`minivae.engine.threads.one_blas_thread`), the policy training uses:
OpenBLAS's own threads busy-wait between products and, on a shared machine, slow the whole run
many times over instead of speeding it up.
"""
from __future__ import annotations

import numbers
import time

from . import estimators as est
from .engine.threads import one_blas_thread
from .optim import Adam

# (label, estimator, kl): what the table and the figure compare
CONFIGS = (
    ("pathwise", "pathwise", "analytic"),
    ("pathwise, MC KL", "pathwise", "mc"),
    ("score", "score", "analytic"),
    ("score, MC KL", "score", "mc"),
    ("score + LOO baseline", "score_baseline", "analytic"),
    ("score + LOO baseline, MC KL", "score_baseline", "mc"),
    ("score + delta-method CV", "score_delta", "analytic"),
    ("measure-valued", "measure_valued", "analytic"),
)
#: the measure-valued estimator costs 1 + 4L decoder rows per sample: its sweep stops here
MVD_MAX_SAMPLES = 4


@one_blas_thread()
def encoder_variance(model, x, estimator, kl="analytic", samples=1, replicates=100,
                     comm=None) -> float:
    """Mean over encoder coordinates of the estimator's variance. x: (B, D) backend array.

    Loops over the R *replicates* (each one batched call of S * B rows). Sums are shifted by
    the first replicate and kept in float64, so the variance does not cancel catastrophically.

    comm: a :class:`~minivae.engine.Communicator` (default: one process). With N ranks,
    replicate r is computed by rank r % N: every rank draws every replicate's eps (so the
    model's noise stream advances exactly as in one process), computes its own, and the N
    gradients of each round are broadcast from their ranks and summed in replicate order on
    every rank: the result is the one-process result bit for bit (``tests/test_mpi.py``).
    """
    if isinstance(replicates, bool) or not isinstance(replicates, numbers.Integral):
        raise TypeError(f"replicates must be a whole number, got {replicates!r}")
    if replicates < 2:
        raise ValueError("a variance needs at least 2 replicates")
    xp = model.xp
    enc = est.encoder_slice(model)
    shift = s1 = s2 = None
    for g in _replicates(model, x, estimator, kl, samples, replicates, enc, comm):
        if shift is None:
            shift, s1, s2 = g, xp.zeros_like(g), xp.zeros_like(g)
        d = g - shift
        s1 += d
        s2 += d * d
    var = (s2 - s1 * s1 / replicates) / (replicates - 1)
    return float(xp.mean(var))


def _replicates(model, x, estimator, kl, samples, replicates, enc, comm):
    """Yield the R replicates' encoder gradients (float64) in order, split over comm's ranks."""
    xp = model.xp
    size, rank = (1, 0) if comm is None else (comm.size, comm.rank)
    for first in range(0, replicates, size):
        rounds, mine = range(first, min(first + size, replicates)), None
        for r in rounds:
            eps = est.draw_eps(model, samples, x.shape[0])        # every rank draws every one
            noise = (est.draw_mvd_noise(model, samples, x.shape[0])
                     if estimator == "measure_valued" else None)
            if r % size == rank:
                g = est.estimate(model, x, estimator, eps=eps, samples=samples, kl=kl,
                                 noise=noise)
                mine = xp.astype(g[enc], xp.float64)
        if size == 1:
            yield mine
            continue
        for r in rounds:                                          # in replicate order
            g = mine if r % size == rank else xp.empty(enc.stop - enc.start, dtype=xp.float64)
            comm.broadcast(g, root=r % size)
            yield g


@one_blas_thread()
def train(model, x_train, steps=300, batch=100, lr=1e-3, seed=0) -> list:
    """A short Adam run on host data x_train (N, D) -> the loss every step (host floats,
    read once at the end)."""
    if not hasattr(x_train, "shape") or len(x_train.shape) != 2:
        raise TypeError(f"x_train must be a (N, D) host array, got {type(x_train).__name__}")
    if x_train.shape[0] < batch:
        raise ValueError(f"x_train has {x_train.shape[0]} rows, fewer than the batch of {batch}")
    opt = Adam(model.params, lr=lr)
    rng = model.backend.rng(seed)
    losses = []
    order = rng.permutation(x_train.shape[0])
    for t in range(steps):
        i = (t * batch) % (x_train.shape[0] - batch + 1)
        xb = model.backend.asarray(x_train[order[i:i + batch]], dtype=model.dtype)
        losses.append(model.loss_and_grads(xb, check=False).loss)
        opt.step()
    return [float(v) for v in losses]


@one_blas_thread()
def measure(model, x, samples=4, sweep=(1, 2, 4, 8, 16), replicates=50, comm=None):
    """Variance of every configuration against S (the figure); the table is the S = ``samples``
    column of the same sweep. ``comm``: split the replicates over ranks (:func:`encoder_variance`).

    -> {"table": {label: mean_variance}, "sweep": {label: {S: mean_variance}}, "seconds": t}
    The leave-one-out baseline needs S >= 2, so its sweep starts there; the measure-valued
    estimator's stops at max(samples, MVD_MAX_SAMPLES) (it runs 1 + 4L decoder rows per sample).
    """
    t0 = time.perf_counter()
    sweep = sorted(set(sweep) | {samples})

    def runs(e, S):
        return not ((e == "score_baseline" and S < 2)
                    or (e == "measure_valued" and S > max(samples, MVD_MAX_SAMPLES)))

    curves = {label: {S: encoder_variance(model, x, e, kl, S, replicates, comm)
                      for S in sweep if runs(e, S)}
              for label, e, kl in CONFIGS}
    table = {label: curve[samples] for label, curve in curves.items()}
    return {"table": table, "sweep": curves, "seconds": time.perf_counter() - t0}


def plot_sweeps(stages: dict, path) -> None:
    """stages: {"at initialisation": measure(...), "after training": ...} -> a log-log PNG of
    variance against S, one panel per stage, with a 1/S guide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"pathwise": ("C0", "-"), "score": ("C3", "-"), "score + LOO baseline": ("C2", "-"),
              "score + delta-method CV": ("C1", "-"), "measure-valued": ("C4", "-")}
    fig, axes = plt.subplots(1, len(stages), figsize=(5.2 * len(stages), 4.2), sharey=True)
    axes = axes if len(stages) > 1 else [axes]
    for ax, (title, res) in zip(axes, stages.items()):
        for label, curve in res["sweep"].items():
            base = label.split(",")[0]
            color, _ = styles[base]
            ls = "--" if "MC KL" in label else "-"
            S = sorted(curve)
            ax.loglog(S, [curve[s] for s in S], ls, color=color, marker="o", ms=4, label=label)
        p = res["sweep"]["pathwise"]
        S = sorted(p)
        ax.loglog(S, [p[S[0]] * S[0] / s for s in S], ":", color="0.5", lw=1, label="1/S")
        ax.set_title(title)
        ax.set_xlabel("samples S per example")
        ax.set_xticks(S, [str(s) for s in S])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("encoder gradient variance\n(mean over coordinates)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Backprop through sampling: pathwise vs score-function gradient noise")
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- discrete latents: bias and variance against the exact gradient ------------------------------
#: the temperatures of the Gumbel-softmax and straight-through rows
DISCRETE_TAUS = (0.1, 0.3, 1.0, 3.0)
DISCRETE_LABELS = {"reinforce": "REINFORCE", "reinforce_baseline": "REINFORCE + LOO baseline",
                   "gumbel_softmax": "Gumbel-softmax", "straight_through": "straight-through"}


@one_blas_thread()
def discrete_measure(model, x, samples=4, replicates=200, taus=DISCRETE_TAUS) -> dict:
    """Every discrete estimator of :mod:`minivae.discrete` on a DiscreteVAE and a fixed batch x,
    against the exact gradient by enumeration: relative bias ||mean - exact|| / ||exact||, the
    noise floor of that number (what an unbiased estimator shows with R replicates), the mean
    per-coordinate variance and the largest |z| of mean - exact (encoder coordinates).

    -> {"exact_loss": nats per example, "rows": {label: {"estimator", "tau", "bias", "noise",
    "variance", "max_z"}}, "seconds"}. Every rank of an MPI run computes the same numbers.
    """
    from . import discrete as D

    t0 = time.perf_counter()
    loss, exact = D.exact(model, x)
    rows = {}
    for name in ("reinforce", "reinforce_baseline"):
        rows[DISCRETE_LABELS[name]] = {"estimator": name, "tau": None, **D.bias_and_variance(
            model, x, name, exact, samples=samples, replicates=replicates)}
    for name in ("gumbel_softmax", "straight_through"):
        for tau in taus:
            rows[f"{DISCRETE_LABELS[name]}, tau {tau:g}"] = {
                "estimator": name, "tau": tau, **D.bias_and_variance(
                    model, x, name, exact, samples=samples, replicates=replicates, tau=tau)}
    return {"exact_loss": loss, "rows": rows, "seconds": time.perf_counter() - t0}


def plot_tau(stages: dict, path) -> None:
    """stages: {"at initialisation": discrete_measure(...), ...} -> a PNG of relative bias and
    variance against tau for Gumbel-softmax and straight-through, with REINFORCE's (unbiased:
    its bias is the noise floor) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.2))
    colors = {"gumbel_softmax": "C0", "straight_through": "C1", "reinforce": "C3",
              "reinforce_baseline": "C2"}
    for (title, res), alpha in zip(stages.items(), (0.35, 1.0) if len(stages) > 1 else (1.0,)):
        rows = res["rows"]
        for key, ax in (("bias", axes[0]), ("variance", axes[1])):
            for name in ("gumbel_softmax", "straight_through"):
                pts = sorted((r["tau"], r[key]) for r in rows.values() if r["estimator"] == name)
                ax.loglog([t for t, _ in pts], [v for _, v in pts], "o-", color=colors[name],
                          alpha=alpha, ms=4, label=f"{DISCRETE_LABELS[name]} ({title})")
            for name in ("reinforce", "reinforce_baseline"):
                v = next(r[key] for r in rows.values() if r["estimator"] == name)
                ax.axhline(v, color=colors[name], ls="--", lw=1, alpha=alpha,
                           label=f"{DISCRETE_LABELS[name]} ({title})")
    axes[0].set_ylabel("relative bias ||E[g] - exact|| / ||exact||")
    axes[1].set_ylabel("variance (mean over encoder coordinates)")
    for ax in axes:
        ax.set_xlabel("temperature tau")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle("Discrete latents: the relaxation trades bias (left) for variance (right); "
                 "REINFORCE's bias is only its noise floor")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
