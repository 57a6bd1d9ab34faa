"""Quality: minivae against the PyTorch example VAE, several seeds, on every data set at hand.

Both models are 784-400-20 ReLU VAEs with a sigmoid/Bernoulli decoder on grey levels (summed
BCE), Adam 1e-3, batch 128, shuffled every epoch, the same train/test split and epochs. For each
data set, model and seed it reports the test loss per epoch and, after the last epoch:

    -ELBO      nats per example, one z per test example (the number the PyTorch example prints)
    -IWAE_k    k = 100 importance samples per test example (Burda et al. 2016), the same
               estimator for both models: minivae.evaluate.iwae and
               benchmarks/pytorch_example_vae.pytorch_iwae

as mean +- standard deviation over the seeds, side by side, with the wall time of each run.
minivae runs once per --init option asked for (default: he, torch, glorot), through its own
Trainer in this process; the PyTorch side is benchmarks/pytorch_example_vae.py's pytorch_run.

Data sets: mnist10k (bundled: 9,000 / 1,000 MNIST test digits), fashion-mnist (60,000 / 10,000)
and mnist (60,000 / 10,000). A full set is read from --fashion-dir / --mnist-dir, else from the
first of its usual places that holds the four IDX files (minivae's cache, /usr/share/datasets);
where none does, it is skipped with the reason (nothing is downloaded).

Threads: OpenBLAS one thread (always); minivae and torch the same --threads (default 2).

    python benchmarks/quality.py                         # the full table; prints, writes nothing
    python benchmarks/quality.py --save                  # + results/quality.json, quality.png
    python benchmarks/quality.py --quick                 # CI's short version (seconds)
    python benchmarks/quality.py --data mnist10k --seeds 0 --inits torch
"""
from __future__ import annotations

import os
import sys

os.environ["OPENBLAS_NUM_THREADS"] = "1"          # before NumPy loads: minivae's thread policy

import argparse
import math
import platform
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FULL = ("fashion-mnist", "mnist")
DATASETS = ("mnist10k", *FULL)
INITS = ("he", "torch", "glorot")
TORCH = "pytorch-example"
QUICK = {"epochs": 3, "n_train": 3000, "n_test": 500, "seeds": [0, 1], "data": ["mnist10k"],
         "k": 100, "threads": 1}
# CI's tolerance (tests/test_quality.py): in quick mode minivae's mean -ELBO and -IWAE_100 over
# the seeds are within this many nats of the PyTorch example's.
QUICK_TOLERANCE_NATS = 4.0


def default_init() -> str:
    """The init minivae uses when none is named (a ReLU MLP), read from minivae itself."""
    from minivae.layers import mlp

    return mlp([2, 2], "relu").layers[0].init_scheme


def places(name: str, given: str | None) -> list[Path]:
    from minivae.data import cache_dir

    if given:
        return [Path(given)]
    return [cache_dir() / name, Path("/usr/share/datasets") / name,
            Path("/tmp/fmnist/usr/share/datasets") / name]


def find_data(name: str, given: str | None):
    """-> (Dataset, where) or (None, reason it is skipped)."""
    from minivae.data import FILES, _find, load_dataset

    if name == "mnist10k":
        return load_dataset("mnist10k"), "bundled"
    tried = places(name, given)
    for d in tried:
        if d.is_dir() and all(_find(d, f) for f in FILES):
            return load_dataset(name, path=d), str(d)
    return None, (f"the four IDX files of full {name} (60,000 training images) are not on this "
                  f"machine (looked in {', '.join(map(str, tried))}); skipped")


def subset(ds, n_train: int | None, n_test: int | None):
    import dataclasses

    if not n_train and not n_test:
        return ds
    return dataclasses.replace(ds, x_train=ds.x_train[:n_train], y_train=ds.y_train[:n_train],
                               x_test=ds.x_test[:n_test], y_test=ds.y_test[:n_test])


def run_minivae(ds, seed, init, args, tmp: Path) -> dict:
    from minivae.evaluate import iwae
    from minivae.train import TrainConfig, Trainer

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch, seed=seed, init=init,
                      out=str(tmp / f"{ds.name}-{init}-{seed}"), progress=False, figures=False)
    t0 = time.perf_counter()
    t = Trainer(cfg, dataset=ds, log=lambda m: None)
    t.fit()
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    iw = iwae(t.model, ds.x_test, k=args.k, rng=t.model.backend.rng(seed + 1))
    eval_s = time.perf_counter() - t1
    return {"seed": seed, "test_loss": [r["test_loss"] for r in t.history],
            "train_loss": [r["train_loss"] for r in t.history],
            "elbo_loss": t.history[-1]["test_loss"], f"nll_{args.k}": -iw,
            "train_seconds": train_s, "iwae_seconds": eval_s}


def run_torch(ds, seed, args) -> dict:
    from pytorch_example_vae import pytorch_iwae, pytorch_run

    t0 = time.perf_counter()
    r = pytorch_run(ds, seed, args.epochs, batch=args.batch, keep_model=True, quiet=True)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    iw = pytorch_iwae(r["model"], ds.x_test, k=args.k, seed=seed + 1)
    eval_s = time.perf_counter() - t1
    rows = r["epochs"]
    return {"seed": seed, "test_loss": [row["test_loss"] for row in rows],
            "train_loss": [row["train_loss"] for row in rows],
            "elbo_loss": rows[-1]["test_loss"], f"nll_{args.k}": -iw,
            "train_seconds": train_s, "iwae_seconds": eval_s}


def mean_sd(v) -> tuple[float, float]:
    import numpy as np

    a = np.asarray(v, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarize(runs: list, k: int) -> dict:
    out = {}
    for key in ("elbo_loss", f"nll_{k}", "train_seconds", "iwae_seconds"):
        m, s = mean_sd([r[key] for r in runs])
        out[key] = {"mean": m, "sd": s}
    out["seeds"] = [r["seed"] for r in runs]
    return out


def models(args) -> list[str]:
    return [f"minivae:{i}" for i in args.inits] + ([] if args.skip_torch else [TORCH])


def print_table(doc: dict) -> None:
    k, dflt = doc["config"]["k"], default_init()
    print(f"\n{'data':<14} {'model':<24} {'-ELBO (nats)':>16} {f'-IWAE_{k}':>16} "
          f"{'train s':>8} {'iwae s':>7}  seeds")
    for name, d in doc["datasets"].items():
        if "skipped" in d:
            print(f"{name:<14} skipped: {d['skipped']}")
            continue
        for model, s in d["summary"].items():
            label = model + (" (default)" if model == f"minivae:{dflt}" else "")
            e, n = s["elbo_loss"], s[f"nll_{k}"]
            print(f"{name:<14} {label:<24} {e['mean']:8.2f} ± {e['sd']:5.2f} "
                  f"{n['mean']:8.2f} ± {n['sd']:5.2f} {s['train_seconds']['mean']:8.1f} "
                  f"{s['iwae_seconds']['mean']:7.1f}  {s['seeds']}")
        if TORCH in d["summary"]:
            ref = d["summary"][TORCH]["elbo_loss"]["mean"]
            diffs = ", ".join(f"{m}: {s['elbo_loss']['mean'] - ref:+.2f}"
                              for m, s in d["summary"].items() if m != TORCH)
            print(f"{'':<14} -ELBO minus the PyTorch example's: {diffs}")


def markdown(doc: dict, default: str | None = None) -> str:
    """The README's Quality table from a results document: one row per data set and model,
    -ELBO and -IWAE_k as mean ± sd over the seeds, and the mean training time per run.
    "(default)" marks ``default`` (minivae's default init now, :func:`default_init`; the
    document's ``minivae_default_init`` is the default when it was measured)."""
    k, dflt = doc["config"]["k"], default or default_init()
    import numpy as np

    lines = [f"| data set | model | -ELBO (nats) | -IWAE_{k} (nats) | seeds | "
             f"train s / run, median (min) |", "|---|---|---|---|---|---|"]
    for name, d in doc["datasets"].items():
        if "skipped" in d:
            lines.append(f"| {name} | not run: {d['skipped'].removesuffix('; skipped')} "
                         f"| | | | |")
            continue
        for model, s in d["summary"].items():
            label = model + (" **(default)**" if model == f"minivae:{dflt}" else "")
            e, n = s["elbo_loss"], s[f"nll_{k}"]
            t = [r["train_seconds"] for r in d["runs"][model]]
            lines.append(f"| {name} | {label} | {e['mean']:.2f} ± {e['sd']:.2f} | "
                         f"{n['mean']:.2f} ± {n['sd']:.2f} | {len(s['seeds'])} | "
                         f"{np.median(t):.1f} ({min(t):.1f}) |")
    return "\n".join(lines)


def figure(doc: dict, path: Path) -> None:
    """Test loss per epoch, one panel per data set, every model: mean over seeds, band = min-max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sets = [(n, d) for n, d in doc["datasets"].items() if "runs" in d]
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(5.5 * max(1, len(sets)), 4),
                             squeeze=False)
    for ax, (name, d) in zip(axes[0], sets):
        lo_all = []
        for model, runs in d["runs"].items():
            y = np.array([r["test_loss"] for r in runs])
            ep = np.arange(1, y.shape[1] + 1)
            line, = ax.plot(ep, y.mean(0), marker="o", ms=3, label=f"{model} ({len(runs)} seeds)")
            ax.fill_between(ep, y.min(0), y.max(0), color=line.get_color(), alpha=0.2)
            lo_all.append(y[:, min(1, y.shape[1] - 1):])
        lo = np.concatenate([a.ravel() for a in lo_all])
        ax.set_ylim(lo.min() - 1, np.percentile(lo, 95) + 2)
        ax.set_title(f"{name} ({d['n_train']} train / {d['n_test']} test)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test loss = -ELBO (nats per example)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("minivae vs the PyTorch example VAE: mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--k", type=int, default=100, help="importance samples for -IWAE_k (100)")
    p.add_argument("--inits", nargs="+", choices=INITS, default=None,
                   help="minivae --init options to run (default: all; with --quick: minivae's "
                        "default and torch)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--threads", type=int, default=2,
                   help="threads for minivae and for torch, the same count (default 2)")
    p.add_argument("--fashion-dir", default=None, help="directory with full Fashion-MNIST")
    p.add_argument("--mnist-dir", default=None, help="directory with full MNIST")
    p.add_argument("--n-train", type=int, default=None, help="first N training images only")
    p.add_argument("--n-test", type=int, default=None, help="first N test images only")
    p.add_argument("--quick", action="store_true",
                   help=f"CI's short version: {QUICK['epochs']} epochs, {QUICK['n_train']} / "
                        f"{QUICK['n_test']} images of mnist10k, seeds {QUICK['seeds']}, one "
                        f"thread")
    p.add_argument("--save", action="store_true",
                   help="write benchmarks/results/quality[_quick].json and .png")
    p.add_argument("--markdown", metavar="RESULTS_JSON", default=None,
                   help="only print the README table of a saved results file (runs nothing)")
    args = p.parse_args(argv)
    if args.markdown:
        import json

        doc = json.loads(Path(args.markdown).read_text())
        print(markdown(doc))
        return doc
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        for key, v in QUICK.items():
            setattr(args, key, v)
        args.inits = args.inits or list(dict.fromkeys([default_init(), "torch"]))
    args.inits = args.inits or list(INITS)
    return run(args)


def run(args) -> dict:
    """Run the benchmark on args.threads threads for minivae and torch alike; the caller's
    thread settings (environment, minivae, torch) are restored afterwards."""
    import torch

    from minivae.engine import threads

    saved = (os.environ.get("MINIVAE_NUM_THREADS"), threads._threads, torch.get_num_threads())
    os.environ["MINIVAE_NUM_THREADS"] = str(args.threads)
    threads.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        if saved[0] is None:
            os.environ.pop("MINIVAE_NUM_THREADS", None)
        else:
            os.environ["MINIVAE_NUM_THREADS"] = saved[0]
        threads.set_num_threads(saved[1])
        torch.set_num_threads(saved[2])


def _run(args) -> dict:
    import _machine
    from _machine import machine_info, print_machine, save

    info = machine_info()
    print_machine(info)
    started = time.perf_counter()
    doc = {"benchmark": "benchmarks/quality.py",
           "command": "python benchmarks/quality.py " + " ".join(args.argv),
           "date": time.strftime("%Y-%m-%d %H:%M"),
           "config": {"epochs": args.epochs, "batch": args.batch, "k": args.k,
                      "seeds": args.seeds, "inits": args.inits, "threads": args.threads,
                      "quick": bool(args.quick), "n_train": args.n_train, "n_test": args.n_test,
                      "minivae_default_init": default_init(),
                      "model": "784-400-20 ReLU VAE, sigmoid/Bernoulli decoder on grey levels "
                               "(BCE summed over pixels), Adam lr 1e-3, shuffled every epoch",
                      "elbo_loss": "-ELBO nats per test example, one z per example, after the "
                                   "last epoch",
                      f"nll_{args.k}": f"-IWAE_{args.k}, nats per test example (Burda et al. "
                                       f"2016), same estimator for both models"},
           "machine": info, "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
           "datasets": {}}
    with tempfile.TemporaryDirectory(prefix="minivae-quality-") as tmp:
        for name in args.data:
            given = args.fashion_dir if name == "fashion-mnist" else args.mnist_dir
            ds, where = find_data(name, given)
            if ds is None:
                print(f"# {name}: {where}")
                doc["datasets"][name] = {"skipped": where}
                continue
            ds = subset(ds, args.n_train, args.n_test)
            d = {"source": where, "n_train": len(ds.x_train), "n_test": len(ds.x_test),
                 "runs": {}}
            print(f"# {name}: {d['n_train']} train / {d['n_test']} test from {where}")
            for model in models(args):
                d["runs"][model] = []
                for seed in args.seeds:
                    r = (run_torch(ds, seed, args) if model == TORCH
                         else run_minivae(ds, seed, model.split(":")[1], args, Path(tmp)))
                    d["runs"][model].append(r)
                    print(f"  {name} {model} seed {seed}: -ELBO {r['elbo_loss']:.2f}, "
                          f"-IWAE_{args.k} {r[f'nll_{args.k}']:.2f} "
                          f"(train {r['train_seconds']:.1f} s, iwae {r['iwae_seconds']:.1f} s)",
                          flush=True)
            d["summary"] = {m: summarize(runs, args.k) for m, runs in d["runs"].items()}
            doc["datasets"][name] = d
    doc["wall_seconds"] = time.perf_counter() - started
    doc["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print_table(doc)
    print(f"# wall time {doc['wall_seconds']:.0f} s on {args.threads} threads "
          f"(OpenBLAS 1 thread; minivae and torch {args.threads} each)")
    if args.save:
        stem = "quality_quick" if args.quick else "quality"
        print(f"# wrote {save(stem + '.json', doc)}")
        png = _machine.RESULTS / (stem + ".png")
        figure(doc, png)
        print(f"# wrote {png}")
    return doc


if __name__ == "__main__":
    main()
    sys.exit(0)
