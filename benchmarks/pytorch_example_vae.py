"""The PyTorch example VAE (pytorch/examples, vae/main.py) and minivae, trained on the same data.

Both see the bundled mnist10k split (9,000 train / 1,000 test MNIST digits, grey levels in
[0, 1] as Bernoulli targets), 784-400-20 with ReLU, sigmoid + summed BCE, Adam 1e-3, batch 128,
shuffled every epoch, 10 epochs. The loss printed per epoch is the example's: the summed
(BCE + KLD) over the split divided by its size, i.e. -ELBO in nats per example, with one z per
test example.

    python benchmarks/pytorch_example_vae.py                 # 3 seeds each; prints, writes nothing
    python benchmarks/pytorch_example_vae.py --seeds 0 --skip-minivae
    python benchmarks/pytorch_example_vae.py --save          # also writes the results (below)

With --save, writes benchmarks/results/pytorch_example_mnist10k.json and minivae_mnist10k.json.
minivae's runs go to a temporary directory, deleted at the end, unless --runs names one.
minivae runs twice per seed: with init="he" (He normal, its default until issue 18) and with
init="torch" (nn.Linear's uniform(+-1/sqrt(fan_in)) for weights and biases), the like-for-like one
and minivae's default now. benchmarks/quality.py is the fuller comparison (more data sets, every
init, -IWAE_100, mean ± sd); this script is kept for its mnist10k result files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


# -- the PyTorch example, verbatim in substance ------------------------------------------------------
def example_model():
    """-> (VAE class, loss_function), as in pytorch/examples vae/main.py."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(784, 400)
            self.fc21 = nn.Linear(400, 20)
            self.fc22 = nn.Linear(400, 20)
            self.fc3 = nn.Linear(20, 400)
            self.fc4 = nn.Linear(400, 784)

        def encode(self, x):
            h1 = F.relu(self.fc1(x))
            return self.fc21(h1), self.fc22(h1)

        def reparameterize(self, mu, logvar):
            std = torch.exp(0.5 * logvar)
            eps = torch.randn_like(std)
            return mu + eps * std

        def decode(self, z):
            h3 = F.relu(self.fc3(z))
            return torch.sigmoid(self.fc4(h3))

        def forward(self, x):
            mu, logvar = self.encode(x.view(-1, 784))
            z = self.reparameterize(mu, logvar)
            return self.decode(z), mu, logvar

    def loss_function(recon_x, x, mu, logvar):
        BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
        KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return BCE + KLD

    return VAE, loss_function


def pytorch_run(ds, seed: int, epochs: int, batch: int = 128, lr: float = 1e-3,
                keep_model: bool = False, quiet: bool = False) -> dict:
    """Train the example's VAE; -> {"seed", "epochs": per-epoch rows}, plus "model" (the trained
    nn.Module, for :func:`pytorch_iwae`) when ``keep_model``."""
    import torch
    from torch import optim
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    VAE, loss_function = example_model()
    train = DataLoader(TensorDataset(torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)),
                       batch_size=batch, shuffle=True)
    test = DataLoader(TensorDataset(torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)),
                      batch_size=batch, shuffle=False)
    model = VAE()
    opt = optim.Adam(model.parameters(), lr=lr)
    rows = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        train_loss = 0.0
        for data, _ in train:
            opt.zero_grad()
            recon, mu, logvar = model(data)
            loss = loss_function(recon, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            opt.step()
        seconds = time.perf_counter() - t0
        model.eval()
        test_loss = 0.0
        with torch.no_grad():
            for data, _ in test:
                recon, mu, logvar = model(data)
                test_loss += loss_function(recon, data, mu, logvar).item()
        rows.append({"epoch": epoch, "train_loss": train_loss / len(train.dataset),
                     "test_loss": test_loss / len(test.dataset), "train_seconds": seconds})
        if not quiet:
            print(f"  torch seed {seed} epoch {epoch}: train {rows[-1]['train_loss']:.2f} "
                  f"test {rows[-1]['test_loss']:.2f} ({seconds:.1f} s)")
    out = {"seed": seed, "epochs": rows}
    if keep_model:
        out["model"] = model
    return out


def pytorch_iwae(model, x, k: int = 100, seed: int = 0, max_rows: int = 4096) -> float:
    """IWAE_k of the example's model, the estimator of minivae.evaluate.iwae (Burda et al. 2016):
    per example k draws z_i ~ q(z|x), log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x),
    IWAE_k = logsumexp_i log w_i - log k, averaged over the examples (nats, negative).
    log p(x|z) is the example's own likelihood, -BCE(decode(z), x) summed over pixels (sigmoid
    then binary_cross_entropy, as its loss_function), so that E[IWAE_1] is its ELBO.
    x: (N, 784) float32 host array; eps from torch.Generator seeded ``seed``."""
    import math

    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(int(seed))
    xt = torch.from_numpy(x)
    n, d = xt.shape
    B = max(1, max_rows // k)
    total = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, B):
            xb = xt[i:i + B]
            b = xb.shape[0]
            mu, logvar = model.encode(xb)                                   # (b, L)
            eps = torch.randn((k, b, mu.shape[1]), generator=gen, dtype=mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * eps                          # (k, b, L)
            recon = model.decode(z.reshape(k * b, -1))
            xr = xb.unsqueeze(0).expand(k, b, d).reshape(k * b, d)
            log_px = -F.binary_cross_entropy(recon, xr, reduction="none").sum(1).reshape(k, b)
            log_pz = -0.5 * (z * z + math.log(2 * math.pi)).sum(-1)
            log_qz = -0.5 * (eps * eps + math.log(2 * math.pi)).sum(-1) - 0.5 * logvar.sum(-1)
            total += float(torch.logsumexp(log_px + log_pz - log_qz, dim=0).sum())
    return total / n - math.log(k)


def minivae_run(ds, seed: int, epochs: int, init, out: Path) -> dict:
    from minivae.train import TrainConfig, Trainer

    cfg = TrainConfig(epochs=epochs, seed=seed, init=init, out=str(out), progress=False,
                      figures=False)
    t = Trainer(cfg, dataset=ds, log=lambda m: None)
    t.fit()
    for r in t.history:
        print(f"  minivae init={init} seed {seed} epoch {r['epoch']}: "
              f"train {r['train_loss']:.2f} test {r['test_loss']:.2f} ({r['seconds']:.1f} s)")
    return {"seed": seed, "init": init, "epochs": t.history}


def summary(runs) -> dict:
    final = np.array([r["epochs"][-1]["test_loss"] for r in runs])
    return {"final_test_loss_mean": float(final.mean()),
            "final_test_loss_min": float(final.min()), "final_test_loss_max": float(final.max()),
            "final_test_loss_per_seed": final.tolist()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--skip-minivae", action="store_true")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--runs", default=None,
                   help="keep minivae's run directories here (default: a temporary directory, deleted)")
    p.add_argument("--save", action="store_true",
                   help="also write benchmarks/results/{pytorch_example,minivae}_mnist10k.json")
    args = p.parse_args(argv)
    if args.runs is None:
        with tempfile.TemporaryDirectory(prefix="minivae-bench-") as tmp:
            return _main(args, Path(tmp))
    return _main(args, Path(args.runs))


def _main(args, run_dir: Path):
    from minivae.data import load_dataset

    ds = load_dataset("mnist10k")
    common = {"data": "mnist10k (MNIST test set, 9000 train / 1000 test, grey levels)",
              "model": "784-400-20, ReLU, sigmoid/Bernoulli (BCE summed), Adam 1e-3, batch 128",
              "loss": "-ELBO in nats per example, one z per example (the PyTorch example's number)",
              "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "cpus": os.cpu_count(),
              "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
              "epochs_trained": args.epochs}
    if not args.skip_torch:
        import torch

        runs = [pytorch_run(ds, s, args.epochs) for s in args.seeds]
        doc = {**common, "framework": f"torch {torch.__version__}",
               "threads": torch.get_num_threads(), "runs": runs, "summary": summary(runs)}
        _save(args, "pytorch_example_mnist10k.json", doc)
        print("pytorch example:", doc["summary"])
    if not args.skip_minivae:
        import minivae

        runs = {init: [minivae_run(ds, s, args.epochs, init, run_dir / f"{init}-{s}")
                       for s in args.seeds] for init in ("he", "torch")}
        doc = {**common, "framework": f"minivae {minivae.__version__} (numpy backend)",
               "runs": runs, "summary": {k: summary(v) for k, v in runs.items()}}
        _save(args, "minivae_mnist10k.json", doc)
        print("minivae:", doc["summary"])
    return 0


def _save(args, name: str, doc: dict) -> None:
    """benchmarks/results/name, only under --save."""
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / name).write_text(json.dumps(doc, indent=1))
        print(f"# wrote {RESULTS / name}")


if __name__ == "__main__":
    sys.exit(main())
