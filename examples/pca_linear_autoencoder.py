"""A linear autoencoder trained with squared error learns PCA's subspace (not PCA's basis).

Background (Baldi & Hornik 1989; Bourlard & Kamp 1988): an autoencoder with linear encoder and
decoder and a k-unit code, minimising squared reconstruction error, has no local minima other
than the global ones, and at the global minimum its decoder spans the top-k principal subspace
of the (centred) data. It does *not* recover the principal directions one by one: any
invertible k x k matrix M gives the same reconstruction x We M M^-1 Wd, so the learned basis is
an arbitrary mix of the components. Principal angles compare subspaces regardless of basis.

This script
  1. computes PCA of the bundled MNIST training set (eigenvectors of the covariance),
  2. trains minivae's Autoencoder(hidden=(), activation=None, likelihood="gaussian") with
     Adam (a Gaussian likelihood with fixed sigma = 1 *is* squared error, up to 1/2 and a
     constant),
  3. tracks the principal angles between span(decoder rows) and the top-k PCA subspace, and
     the reconstruction error against PCA's optimum (the sum of the discarded eigenvalues).

Run:  python examples/pca_linear_autoencoder.py [OUT_DIR] [--quick]
Writes OUT_DIR/pca_angles.png, OUT_DIR/pca_basis.png and OUT_DIR/metrics.json
(default OUT_DIR: runs/examples/pca_linear_autoencoder).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from minivae import Adam, Autoencoder, train_step
from minivae.data import load_dataset
from minivae.engine.threads import one_blas_thread

K = 10  # code size = number of principal components


def principal_angles(A, B):
    """Principal angles (degrees, ascending) between span(columns of A) and span(columns of B).

    A: (D, k), B: (D, k). With orthonormal bases Qa, Qb the cosines of the angles are the
    singular values of Qa^T Qb (Bjorck & Golub 1973).
    """
    Qa, _ = np.linalg.qr(np.asarray(A, dtype=np.float64))
    Qb, _ = np.linalg.qr(np.asarray(B, dtype=np.float64))
    cos = np.linalg.svd(Qa.T @ Qb, compute_uv=False)
    return np.sort(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def run(out_dir, quick=False, seed=0):
    t0 = time.perf_counter()
    X = load_dataset("mnist10k").x_train                      # (9000, 784) in [0, 1]

    # 1. PCA: eigenvectors of the covariance, largest eigenvalue first
    Xc = X.astype(np.float64) - X.mean(axis=0)
    evals, evecs = np.linalg.eigh(Xc.T @ Xc / len(X))
    evals, evecs = evals[::-1], evecs[:, ::-1]
    U = evecs[:, :K]                                          # (784, K) principal subspace
    pca_sse = float(evals[K:].sum())                          # PCA's optimal squared error/image
    print(f"top {K} eigenvalues: {np.round(evals[:K], 2)}  (next: {evals[K]:.2f})")
    print(f"PCA's squared reconstruction error per image: {pca_sse:.2f}")

    # 2. the linear autoencoder: x -> x We + be (K) -> code Wd + bd (784), no activation
    model = Autoencoder(hidden=(), latent=K, activation=None, likelihood="gaussian",
                        x_sigma=1.0, seed=seed)
    steps = 2500 if quick else 4000
    opt = Adam(model.params, lr=3e-3)
    rng = np.random.default_rng(seed)
    log = {"step": [], "max_angle": [], "sse": []}
    Wd = model.params.views["dec.0.W"]                        # (K, 784): rows span the subspace
    for t in range(1, steps + 1):
        # a smaller step late, so that minibatch noise does not keep it wobbling off the optimum
        opt.lr = 3e-3 if t < 0.6 * steps else (1e-3 if t < 0.8 * steps else 3e-4)
        xb = X[rng.integers(0, len(X), 256)]
        train_step(model, opt, xb, check=False)   # loss_and_grads + opt.step, fast
        if t in (1, 2, 5) or t % 50 == 0:
            # loss = sum of squares / 2 + const; measure the squared error directly instead
            r = X[:2000] - model.reconstruct(X[:2000])
            log["step"].append(t)
            log["max_angle"].append(float(principal_angles(Wd.T, U)[-1]))
            log["sse"].append(float(np.mean(np.sum(r.astype(np.float64) ** 2, axis=1))))

    angles = principal_angles(Wd.T, U)
    # for scale: a random K-dimensional subspace of R^784 is almost orthogonal to U
    random_angles = principal_angles(rng.normal(size=(784, K)), U)
    # the learned *basis* is a mix: how far is each decoder row from its nearest eigenvector?
    rows = Wd.T / np.linalg.norm(Wd.T, axis=0)
    row_angles = np.degrees(np.arccos(np.clip(np.max(np.abs(U.T @ rows), axis=0), 0, 1)))
    print(f"principal angles AE vs PCA (deg): {np.round(angles, 2)}")
    print(f"random subspace vs PCA (deg):     {np.round(random_angles, 1)}")
    print(f"each decoder row to its nearest single eigenvector (deg): {np.round(row_angles, 0)}")
    print(f"AE squared error {log['sse'][-1]:.2f} vs PCA's {pca_sse:.2f} (on 2000 training images)")

    os.makedirs(out_dir, exist_ok=True)
    _plot_angles(log, angles, random_angles, pca_sse, os.path.join(out_dir, "pca_angles.png"))
    _plot_basis(U, Wd.T, os.path.join(out_dir, "pca_basis.png"))
    metrics = {"principal_angles_deg": angles.tolist(),
               "random_subspace_angles_deg": random_angles.tolist(),
               "row_to_nearest_eigenvector_deg": row_angles.tolist(),
               "ae_squared_error": log["sse"][-1], "pca_squared_error": pca_sse, "steps": steps}
    with open(os.path.join(out_dir, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=1)
    print(f"figures and metrics.json in {out_dir} ({time.perf_counter() - t0:.1f} s)")
    return metrics


def _plot_angles(log, angles, random_angles, pca_sse, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].semilogx(log["step"], log["max_angle"], color="C0")
    ax[0].set(xlabel="Adam step", ylabel="largest principal angle (deg)",
              title="AE subspace converges to PCA's", ylim=(0, 92))
    ax[1].semilogx(log["step"], log["sse"], color="C0", label="linear AE")
    ax[1].axhline(pca_sse, color="C3", ls="--", label=f"PCA optimum {pca_sse:.1f}")
    ax[1].set(xlabel="Adam step", ylabel="squared error per image",
              title="reconstruction error", ylim=(pca_sse * 0.95, pca_sse * 1.6))
    ax[1].legend()
    i = np.arange(1, len(angles) + 1)
    ax[2].bar(i - 0.2, random_angles, width=0.4, color="0.7", label="random subspace")
    ax[2].bar(i + 0.2, angles, width=0.4, color="C0", label="trained linear AE")
    ax[2].set(xlabel="principal angle index", ylabel="degrees", ylim=(0, 95),
              title=f"final angles (max {angles[-1]:.1f} deg)")
    ax[2].set_xticks(i)
    ax[2].legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_basis(U, V, path):
    """Row 1: PCA components. Row 2: the AE's decoder rows (a mixed basis). Row 3: each PCA
    component projected onto the AE's subspace (unchanged if the subspace is PCA's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Q, _ = np.linalg.qr(V.astype(np.float64))
    rows = [("PCA components", U.T), ("AE decoder rows", V.T),
            ("PCA projected on AE span", (Q @ (Q.T @ U)).T)]
    k = U.shape[1]
    fig, axes = plt.subplots(3, k, figsize=(k * 0.95, 3.3))
    for r, (title, imgs) in enumerate(rows):
        for c in range(k):
            a = axes[r, c]
            m = np.abs(imgs[c]).max()
            a.imshow(imgs[c].reshape(28, 28), cmap="RdBu_r", vmin=-m, vmax=m)
            a.set_xticks([])
            a.set_yticks([])
        axes[r, 0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(w_pad=0.1, h_pad=0.2)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", default=os.path.join("runs", "examples", "pca_linear_autoencoder"))
    p.add_argument("--quick", action="store_true", help="fewer steps (for tests)")
    args = p.parse_args(argv)
    # One BLAS thread, as `minivae train` uses: OpenBLAS's own threads busy-wait between the
    # products and slow a shared machine down (minivae.engine.threads explains).
    with one_blas_thread():
        run(args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
