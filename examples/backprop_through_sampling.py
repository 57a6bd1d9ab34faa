"""Backpropagation through a random sample, one example, one local gradient at a time.

A VAE's loss for one image x, with the noise eps drawn once and then held fixed:

    [mu, logvar] = encoder(x)                     (L,) each
    sigma        = exp(logvar / 2)
    z            = mu + sigma * eps               the reparametrization: eps ~ N(0, I) given
    l            = decoder(z)                     logits, (784,)
    recon        = sum softplus(l) - x * l        -log p(x|z), Bernoulli
    KL           = 1/2 sum (mu^2 + exp(logvar) - 1 - logvar)
    loss         = recon + KL

With eps fixed, every step is an ordinary differentiable function, so the chain rule runs
straight through the sample:

    dL/dl      = sigmoid(l) - x                               (784,)
    dL/dz      = decoder backward of dL/dl                    (L,)
    dL/dmu     = dL/dz * dz/dmu + dKL/dmu
               = dL/dz + mu
    dL/dlogvar = dL/dz * dz/dsigma * dsigma/dlogvar + dKL/dlogvar
               = dL/dz * eps * sigma / 2 + (exp(logvar) - 1) / 2
    dL/d(encoder weights) = encoder backward of [dL/dmu, dL/dlogvar]

This script prints each of those next to its formula for one MNIST image, and checks every one
against central finite differences (minivae.gradcheck) in float64. It also shows why this is a
*random* gradient: the same image with another eps gives another dL/dlogvar.

Run:  python examples/backprop_through_sampling.py [OUT_DIR] [--quick]
Writes OUT_DIR/backprop_through_sampling.png and OUT_DIR/metrics.json
(default OUT_DIR: runs/examples/backprop_through_sampling).
"""
import argparse
import json
import os
import sys

import numpy as np

from minivae import VAE, Adam, losses
from minivae.data import load_dataset
from minivae.engine.threads import one_blas_thread
from minivae.gradcheck import check_gradients
from minivae.sampling import sample, sample_backward

np.set_printoptions(precision=4, suppress=True, linewidth=110)


def run(out_dir, quick=False, seed=0):
    ds = load_dataset("mnist10k")
    # float64 so that finite differences are accurate to ~1e-9
    model = VAE(dtype="float64", seed=seed)
    # a short training first, so that mu and logvar are no longer at their initial values
    opt = Adam(model.params, lr=1e-3)
    rng = np.random.default_rng(seed)
    for _ in range(20 if quick else 300):
        model.loss_and_grads(ds.x_train[rng.integers(0, 9000, 100)].astype(np.float64),
                             check=False)
        opt.step()

    xp, P, L = model.xp, model.params, model.latent
    x = ds.x_test[:1].astype(np.float64)                      # (1, 784), one image
    eps = rng.normal(size=(1, L))                              # (1, L), drawn once, then fixed

    # ---- forward, keeping every intermediate -------------------------------------------
    h, enc_caches = model.encoder.forward(P, x)
    mu, logvar = h[:, :L].copy(), h[:, L:].copy()              # copies: we will perturb them
    z, s_cache = sample(xp, mu, logvar, eps)
    logits, dec_caches = model.decoder.forward(P, z)
    recon, r_cache = losses.bernoulli_nll(xp, logits, x)
    kl, k_cache = losses.kl_normal(xp, mu, logvar)
    loss = float(recon[0] + kl[0])
    sigma = np.exp(logvar / 2)
    print(f"one test image (digit {ds.y_test[0]}), latent size L = {L}, one eps ~ N(0, I) held fixed")
    print(f"loss = recon + KL = {float(recon[0]):.3f} + {float(kl[0]):.3f} = {loss:.3f} nats\n")

    # ---- backward, one local gradient at a time ------------------------------------------
    dlogits = losses.bernoulli_nll_backward(xp, 1.0, r_cache)            # sigmoid(l) - x
    dz, _ = model.decoder.backward(P, dlogits, dec_caches)               # (1, L), grads
    dmu_recon, dlogvar_recon, _ = sample_backward(dz, s_cache)           # dz, dz*eps*sigma/2
    dmu_kl, dlogvar_kl = losses.kl_normal_backward(xp, 1.0, k_cache)     # mu, (exp(lv)-1)/2
    dmu, dlogvar = dmu_recon + dmu_kl, dlogvar_recon + dlogvar_kl

    show = slice(0, 6)
    print("dL/dlogits  = sigmoid(l) - x          ", dlogits[0, 200:206], "... (784 values)")
    print("dL/dz       = decoder backward         ", dz[0, show], "...")
    print("eps                                    ", eps[0, show])
    print("sigma       = exp(logvar / 2)          ", sigma[0, show])
    print("dL/dmu      = dL/dz        + mu        ", dmu[0, show])
    print("              recon part  (dL/dz)      ", dmu_recon[0, show])
    print("              KL part     (mu)         ", dmu_kl[0, show])
    print("dL/dlogvar  = dL/dz*eps*sigma/2 + (exp(logvar)-1)/2")
    print("                                       ", dlogvar[0, show])
    print("              recon part               ", dlogvar_recon[0, show])
    print("              KL part                  ", dlogvar_kl[0, show])

    # ---- finite differences, eps fixed -----------------------------------------------------
    def loss_from_mu_logvar():
        zz, _ = sample(xp, mu, logvar, eps)                    # reads the current mu, logvar
        r, _ = losses.bernoulli_nll(xp, model.decoder.forward(P, zz)[0], x)
        k, _ = losses.kl_normal(xp, mu, logvar)
        return float(r[0] + k[0])

    zfix = z.copy()

    def loss_from_z():                                         # only recon depends on z
        r, _ = losses.bernoulli_nll(xp, model.decoder.forward(P, zfix)[0], x)
        return float(r[0])

    lfix = logits.copy()

    def loss_from_logits():
        return float(losses.bernoulli_nll(xp, lfix, x)[0][0])

    report = check_gradients(loss_from_logits, {"logits": lfix}, {"logits": dlogits},
                             name="backprop through sampling, eps fixed")
    report += check_gradients(loss_from_z, {"z": zfix}, {"z": dz})
    report += check_gradients(loss_from_mu_logvar, {"mu": mu, "logvar": logvar},
                              {"mu": dmu, "logvar": dlogvar})
    # the last link: the encoder's weights, through the whole model (its own backward pass)
    model.loss_and_grads(x, eps=eps)
    enc = {n: P.views[n] for n in P.layout.names if n.startswith("enc.")}
    report += check_gradients(lambda: float(model.loss_and_grads(x, eps=eps).loss), enc,
                              {n: P.grad_views[n].copy() for n in enc}, mode="directions")
    print("\nfinite-difference check (central differences, float64):")
    print(report)

    # ---- the randomness: same image, other eps ----------------------------------------------
    n = 200                                                    # 200 eps at once, as a batch
    E = rng.normal(size=(n, L))
    zz, sc = sample(xp, np.repeat(mu, n, axis=0), np.repeat(logvar, n, axis=0), E)
    out, dc = model.decoder.forward(P, zz)
    _, rc = losses.bernoulli_nll(xp, out, np.repeat(x, n, axis=0))
    dzz, _ = model.decoder.backward(P, losses.bernoulli_nll_backward(xp, 1.0, rc), dc)
    m_, lv_, _ = sample_backward(dzz, sc)
    others = np.concatenate([m_ + dmu_kl, lv_ + dlogvar_kl], axis=1)
    print("dL/dlogvar[0] over 200 other eps: mean %.3f, std %.3f (this eps: %.3f)"
          % (others[:, L].mean(), others[:, L].std(), dlogvar[0, 0]))

    os.makedirs(out_dir, exist_ok=True)
    _plot(dict(dmu_recon=dmu_recon[0], dmu_kl=dmu_kl[0], dlogvar_recon=dlogvar_recon[0],
               dlogvar_kl=dlogvar_kl[0], others=others, L=L), report,
          os.path.join(out_dir, "backprop_through_sampling.png"))
    with open(os.path.join(out_dir, "metrics.json"), "w") as fh:
        json.dump({"loss": loss, "gradcheck": report.to_dict()}, fh, indent=1, default=str)
    print(f"figure and metrics.json in {out_dir}")
    return {"report": report, "loss": loss}


def _plot(d, report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = d["L"]
    numeric = {c.name: c for c in report.checks}
    j = np.arange(L)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, (name, rec, kl, col) in zip(axes, (
            ("mu", d["dmu_recon"], d["dmu_kl"], slice(0, L)),
            ("logvar", d["dlogvar_recon"], d["dlogvar_kl"], slice(L, 2 * L)))):
        # the spread of this gradient over other eps (same image): the estimator's noise
        ax.violinplot(d["others"][:, col], positions=j, widths=0.8, showextrema=False)
        ax.bar(j - 0.2, rec, width=0.4, color="C0", label="recon part (through z)")
        ax.bar(j + 0.2, kl, width=0.4, color="C1", label="KL part (closed form)")
        ax.plot(j, rec + kl, "k_", ms=14, mew=2, label="total dL/d" + name)
        ax.axhline(0, color="0.5", lw=0.8)
        lo, hi = np.quantile(d["others"][:, col], [0.02, 0.98])
        lo, hi = min(lo, (rec + kl).min(), rec.min(), kl.min()), max(hi, (rec + kl).max(), rec.max(), kl.max())
        ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        ax.set(xlabel="latent coordinate", title=f"dL/d{name} for one image "
               f"(finite differences: {'ok' if numeric[name].passed else 'FAIL'}, "
               f"max rel err {numeric[name].max_rel_error:.0e})")
        ax.set_xticks(j)
    axes[0].legend(fontsize=8)
    axes[1].text(0.01, 0.02, "shaded: spread over 200 other eps", transform=axes[1].transAxes,
                 fontsize=8, color="C0")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?",
                   default=os.path.join("runs", "examples", "backprop_through_sampling"))
    p.add_argument("--quick", action="store_true", help="a shorter warm-up training (for tests)")
    args = p.parse_args(argv)
    # One BLAS thread, as `minivae train` uses: OpenBLAS's own threads busy-wait between the
    # products and slow a shared machine down (minivae.engine.threads explains).
    with one_blas_thread():
        report = run(args.out, args.quick)["report"]
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
