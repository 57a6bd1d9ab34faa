"""Train a VAE (or a plain autoencoder) and write metrics, a checkpoint and figures.

Defaults reproduce the classic setup of the PyTorch example on the bundled data: a 784-400-20
VAE with ReLU and a Bernoulli likelihood on grey levels, Adam 1e-3, batch 128, 10 epochs.

  minivae train                               # bundled mnist10k, runs/vae/
  minivae train --epochs 1 --out runs/t       # a quick look
  minivae train --latent 2 --out runs/z2      # adds manifold.png
  minivae train --data fashion-mnist --data-dir /usr/share/datasets/fashion-mnist
  minivae train --resume --out runs/t --epochs 20    # continue a run (Ctrl-C saves first)

Writes into --out: checkpoint.npz, metrics.json, metrics.csv, reconstructions.png,
samples.png, latent.png, curves.png (and manifold.png when --latent 2).
Exit status: 0 done, 1 the loss diverged (NaN/Inf), 2 a usage error, 130 interrupted (saved).
"""
from __future__ import annotations

from pathlib import Path

from ..backend import NAMES as BACKENDS
from ..layers import ACTIVATIONS, INITS
from ..losses import LIKELIHOODS
from ..models import MODELS
from ..optim import OPTIMIZERS
from . import layer_sizes

HELP = "train a VAE on MNIST-like data; metrics, checkpoint and figures go to --out"


def _positive(kind):
    import argparse

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v

    return parse


def add_arguments(p):
    g = p.add_argument_group("data")
    g.add_argument("--data", default="mnist10k", choices=["mnist10k", "mnist", "fashion-mnist"],
                   help="mnist10k: bundled MNIST test set, 9000/1000 split (default); mnist, "
                        "fashion-mnist: 60000/10000, read from --data-dir or the cache "
                        "(~/.cache/minivae or $MINIVAE_DATA), downloaded there if missing")
    g.add_argument("--data-dir", metavar="DIR", help="directory with the four IDX files")
    g.add_argument("--binarize", default="none", choices=["none", "static", "dynamic"],
                   help="none: grey levels as Bernoulli targets, as the PyTorch example (default); "
                        "static: one fixed 0/1 draw; dynamic: redrawn every epoch")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vae", choices=list(MODELS))
    g.add_argument("--hidden", type=layer_sizes, default=[400], metavar="H[,H...]",
                   help="hidden layer widths (default 400)")
    g.add_argument("--latent", type=_positive(int), default=20, help="latent size (default 20)")
    g.add_argument("--activation", default="relu",
                   choices=list(ACTIVATIONS))
    g.add_argument("--likelihood", default="bernoulli",
                   choices=list(LIKELIHOODS))
    g.add_argument("--init", default=None, choices=list(INITS),
                   help="weight init (default: He for ReLU; 'torch' = PyTorch nn.Linear's)")
    g.add_argument("--beta", type=float, default=1.0, help="KL weight (beta-VAE), default 1")
    g.add_argument("--warmup", type=float, default=0.0, metavar="EPOCHS",
                   help="KL warm-up: beta ramps linearly from 0 over this many epochs (default 0)")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", default="adam", choices=list(OPTIMIZERS))
    g.add_argument("--lr", type=_positive(float), default=1e-3, help="learning rate (default 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--epochs", type=_positive(int), default=None,
                   help="default 10; with --resume: the run's own count unless given")
    g.add_argument("--batch", type=_positive(int), default=128, help="batch size (default 128)")
    g.add_argument("--seed", type=int, default=0, help="seeds init, shuffling and noise (default 0)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, choices=list(BACKENDS),
                   help="array backend: numpy (CPU, default), cupy (NVIDIA GPU), auto "
                        "(cupy if a GPU works, else numpy), strict (array-API test backend); "
                        "with --resume: the run's own unless given")
    g.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    g.add_argument("--threads", type=_positive(int), default=None, metavar="N",
                   help="CPU threads for the NumPy step (default: $MINIVAE_NUM_THREADS, else "
                        "min(cores, 4)); the batch is split over them")
    g.add_argument("--out", default="runs/vae", metavar="DIR", help="run directory (default runs/vae)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (flags given here that "
                        "differ from the run's: only --epochs, --device, --no-progress, "
                        "--no-figures apply)")
    g.add_argument("--log-every", type=_positive(int), default=20, metavar="STEPS",
                   help="steps between progress-bar updates / NaN checks (default 20)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-figures", action="store_true", help="skip the PNG figures")


def run(args) -> int:
    from ..cli import UserError
    from ..train import Diverged, TrainConfig, Trainer

    if args.threads:
        from ..engine import set_num_threads

        set_num_threads(args.threads)
    out = Path(args.out)
    if args.resume:
        if not (out / "checkpoint.npz").is_file():
            raise UserError(f"--resume: no checkpoint.npz in {out}")
        given = {k: v for k, v in (("epochs", args.epochs), ("backend", args.device)) if v}
        t = Trainer.resume(out, progress=not args.no_progress, figures=not args.no_figures,
                           **given)
        if t.cfg.epochs < t.epoch:
            raise UserError(f"{out} has completed {t.epoch} epochs; --epochs {t.cfg.epochs} would "
                            f"undo them: give --epochs {t.epoch} or more")
        print(f"resuming {out} at epoch {t.epoch} (step {t.step}), training to epoch {t.cfg.epochs}")
    else:
        if args.data == "mnist10k" and args.data_dir:
            raise UserError("--data-dir needs --data mnist or --data fashion-mnist "
                            "(mnist10k is bundled)")
        if (out / "checkpoint.npz").exists():
            raise UserError(f"{out} already holds a run: add --resume to continue it, or "
                            f"choose another --out")
        cfg = TrainConfig(
            data=args.data, data_dir=args.data_dir, model=args.model, hidden=args.hidden,
            latent=args.latent, activation=args.activation, likelihood=args.likelihood,
            init=args.init, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
            epochs=args.epochs or 10, batch_size=args.batch, backend=args.device or "numpy",
            dtype=args.dtype,
            seed=args.seed, binarize=args.binarize, beta=args.beta, warmup_epochs=args.warmup,
            log_every=args.log_every, out=str(out), progress=not args.no_progress,
            figures=not args.no_figures)
        t = Trainer(cfg)
        print(f"training {type(t.model).__name__} {t.ds.dim}-{'-'.join(map(str, cfg.hidden))}-"
              f"{cfg.latent} ({t.model.n_params():,} parameters) on {t.ds.name} "
              f"({t.n_train} train / {t.x_test.shape[0]} test), backend {t.backend.name}")
    try:
        status = t.fit()
    except Diverged as e:
        print(f"minivae train: {e}")
        return 1
    if status == "interrupted":
        return 130
    last = t.history[-1] if t.history else None
    if last:
        print(f"done: test loss {last['test_loss']:.2f} nats/example after epoch {last['epoch']}; "
              f"results in {out}/")
    return 0
