"""Train a VAE (or a plain autoencoder) and write metrics, a checkpoint and figures.

Defaults reproduce the classic setup of the PyTorch example on the bundled data: a 784-400-20
VAE with ReLU and a Bernoulli likelihood on grey levels, Adam 1e-3, batch 128, 10 epochs.

  minivae train                               # bundled mnist10k, runs/vae/
  minivae train --epochs 1 --out runs/t       # a quick look
  minivae train --latent 2 --out runs/z2      # adds manifold.png
  minivae train --latent-type categorical --latent 20 --categories 10 --tau 1 \\
      --tau-anneal 10 --out runs/cat          # a discrete VAE (Gumbel-softmax)
  minivae train --data fashion-mnist --data-dir /usr/share/datasets/fashion-mnist
  minivae train --resume --out runs/t --epochs 20    # continue a run (Ctrl-C saves first)
  minivae train --resume --out runs/t --from-epoch 3 --lr 3e-4   # roll back a diverged run

Writes into --out: checkpoint.npz, metrics.json, metrics.csv, reconstructions.png,
samples.png, latent.png, curves.png (and manifold.png when --latent 2).
Exit status: 0 done, 1 the loss diverged (NaN/Inf), 2 a usage error, bad data or a file that
cannot be read or written (one line says which; also --out in use by another minivae train),
130 stopped by Ctrl-C, 143 stopped by SIGTERM (state saved in both).

  mpiexec -n 4 minivae train --out runs/mpi   # data-parallel over 4 MPI ranks (pip install
                                              # 'minivae[mpi]'); rank 0 writes, see README "MPI"
"""
from __future__ import annotations

from pathlib import Path

from ..backend import NAMES as BACKENDS
from ..engine.threads import MAX_THREADS
from ..layers import ACTIVATIONS, INITS
from ..losses import LIKELIHOODS
from ..models import MODELS
from ..optim import OPTIMIZERS
from . import layer_sizes, number, writable_dir

HELP = "train a VAE on MNIST-like data; metrics, checkpoint and figures go to --out"


#: defaults of the flags (argparse defaults are None, so that a resume knows what was given)
DEFAULTS = dict(data="mnist10k", data_dir=None, binarize="none", model="vae", hidden=[400],
                latent=20, activation="relu", likelihood="bernoulli", init=None, beta=1.0,
                warmup=0.0, optimizer="adam", lr=1e-3, weight_decay=0.0, momentum=0.0, epochs=10,
                batch=128,
                seed=0, device="numpy", dtype="float32", log_every=20, keep=3,
                latent_type="gaussian", categories=10, tau=1.0, tau_min=0.5, tau_anneal=0.0,
                straight_through=False)

#: flag -> TrainConfig field, for the flags a run remembers
FIELDS = dict(data="data", data_dir="data_dir", binarize="binarize", model="model",
              hidden="hidden", latent="latent", activation="activation",
              likelihood="likelihood", init="init", beta="beta", warmup="warmup_epochs",
              optimizer="optimizer", lr="lr", weight_decay="weight_decay", momentum="momentum",
              epochs="epochs",
              batch="batch_size", seed="seed", device="backend", dtype="dtype",
              log_every="log_every", keep="keep", latent_type="latent_type",
              categories="categories", tau="tau", tau_min="tau_min", tau_anneal="tau_anneal",
              straight_through="straight_through")
FLAG = {field: "--" + flag.replace("_", "-") for flag, field in FIELDS.items()}


def add_arguments(p):
    pos_int, pos_float = number(1, kind=int), number(0, strict=True)
    nonneg = number(0)
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=["mnist10k", "mnist", "fashion-mnist"],
                   help="mnist10k: bundled MNIST test set, 9000/1000 split (default); mnist, "
                        "fashion-mnist: 60000/10000, read from --data-dir or the cache "
                        "(~/.cache/minivae or $MINIVAE_DATA), downloaded there if missing")
    g.add_argument("--data-dir", metavar="DIR", help="directory with the four IDX files")
    g.add_argument("--binarize", choices=["none", "static", "dynamic"],
                   help="none: grey levels as Bernoulli targets, as the PyTorch example (default); "
                        "static: one fixed 0/1 draw; dynamic: redrawn every epoch")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=[k for k, m in MODELS.items() if m.continuous],
                   help="default vae")
    g.add_argument("--hidden", type=layer_sizes, metavar="H[,H...]",
                   help="hidden layer widths (default 400)")
    g.add_argument("--latent", type=pos_int,
                   help="latent size (default 20); with --latent-type categorical: the number "
                        "of categorical variables")
    g.add_argument("--latent-type", choices=["gaussian", "categorical"],
                   help="gaussian: q(z|x) = N(mu, sigma^2), the reparametrization trick "
                        "(default); categorical: --latent variables of --categories classes, "
                        "a uniform prior, trained through the Gumbel-softmax relaxation "
                        "(Jang et al. 2017); evaluated with exact one-hot samples")
    g.add_argument("--categories", type=number(2, kind=int), metavar="C",
                   help="classes per categorical variable (default 10)")
    g.add_argument("--tau", type=number(0.01),
                   help="Gumbel-softmax temperature, >= 0.01 (default 1.0)")
    g.add_argument("--tau-min", type=number(0.01),
                   help="temperature at the end of the annealing, <= --tau (default 0.5)")
    g.add_argument("--tau-anneal", type=nonneg, metavar="EPOCHS",
                   help="anneal tau exponentially to --tau-min over this many epochs, then "
                        "hold --tau-min (default 0: constant tau)")
    g.add_argument("--straight-through", action="store_const", const=True,
                   help="straight-through Gumbel-softmax: one-hot codes forward, the relaxed "
                        "gradient backward")
    g.add_argument("--activation", choices=list(ACTIVATIONS), help="default relu")
    g.add_argument("--likelihood", choices=list(LIKELIHOODS), help="default bernoulli")
    g.add_argument("--init", choices=list(INITS),
                   help="weight init. torch (the default for ReLU nets): PyTorch nn.Linear's "
                        "default, kaiming_uniform(a=sqrt 5) weights = U(+-1/sqrt(fan_in)), bias "
                        "U(+-1/sqrt(fan_in)); he: He et al. 2015, N(0, 2/fan_in), bias 0; "
                        "glorot: Glorot & Bengio 2010, U(+-sqrt(6/(fan_in+fan_out))), bias 0 "
                        "(the default for other activations). Chosen by benchmarks/quality.py, "
                        "see the README's Quality section")
    g.add_argument("--beta", type=nonneg, help="KL weight (beta-VAE), default 1")
    g.add_argument("--warmup", type=nonneg, metavar="EPOCHS",
                   help="KL warm-up: beta ramps linearly from 0 over this many epochs (default 0)")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS), help="default adam")
    g.add_argument("--lr", type=pos_float, help="learning rate (default 1e-3)")
    g.add_argument("--weight-decay", type=nonneg, help="default 0")
    g.add_argument("--momentum", type=nonneg,
                   help="SGD's heavy-ball momentum in [0, 1) (--optimizer sgd; default 0)")
    g.add_argument("--epochs", type=pos_int,
                   help="default 10; with --resume: the run's own count unless given")
    g.add_argument("--batch", "--batch-size", dest="batch", type=pos_int,
                   help="batch size (default 128)")
    g.add_argument("--seed", type=number(0, kind=int),
                   help="seeds init, shuffling and noise (default 0)")
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=list(BACKENDS),
                   help="array backend: numpy (CPU, default), cupy (NVIDIA GPU), auto "
                        "(cupy if a GPU works, else numpy), strict (array-API test backend)")
    g.add_argument("--dtype", choices=["float32", "float64"], help="default float32")
    g.add_argument("--threads", type=number(1, kind=int, high=MAX_THREADS), metavar="N",
                   help="CPU threads for the NumPy step (default: $MINIVAE_NUM_THREADS, else "
                        "min(cores, 4)); the batch is split over them from 256 rows a "
                        "thread, below that the BLAS splits each matrix product")
    g.add_argument("--out", default="runs/vae", metavar="DIR", help="run directory (default runs/vae)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint. Flags that define the "
                        "run (data, model, --batch, --optimizer, --dtype, --seed) must match it; "
                        "--epochs, --lr, --weight-decay, --momentum, --beta, --warmup, --tau, --tau-min, "
                        "--tau-anneal, --log-every, --keep, --device may change and are "
                        "reported (--threads is the process's)")
    g.add_argument("--from-epoch", type=number(0, kind=int), metavar="E",
                   help="with --resume: restart from the kept checkpoint of epoch E (see --keep), "
                        "discarding the later epochs, e.g. to continue a diverged run with a "
                        "smaller --lr")
    g.add_argument("--keep", type=number(0, kind=int), metavar="N",
                   help="epoch checkpoints to keep beside checkpoint.npz, for --from-epoch "
                        "(default 3; 0: none)")
    g.add_argument("--log-every", type=pos_int, metavar="STEPS",
                   help="steps between progress-bar updates / NaN checks (default 20)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-figures", action="store_true", help="skip the PNG figures")


def run(args) -> int:
    from ..cli import UserError
    from ..engine.mpi import MPIUnavailable, run_on_all_ranks, world

    try:
        comm = world()          # SingleProcess, or every rank of an mpiexec launch
    except MPIUnavailable as e:
        raise UserError(str(e)) from None
    return run_on_all_ranks(comm, "minivae train", lambda: _run(args, comm))


def _everywhere(e):
    """Mark an error that every rank raises at the same point (rank 0 alone prints it)."""
    e.all_ranks = True
    return e


#: flags that mean something only for categorical latents
CATEGORICAL_ONLY = ("categories", "tau", "tau_min", "tau_anneal", "straight_through")


def _categorical_only(given, latent_type):
    """Refuse the categorical-latent flags on a run with Gaussian latents (they would be
    silently ignored)."""
    from ..cli import UserError

    stray = [f for f in CATEGORICAL_ONLY if f in given]
    if stray and latent_type != "categorical":
        raise _everywhere(UserError(
            f"{', '.join(FLAG[FIELDS[f]] for f in stray)} only "
            f"{'applies' if len(stray) == 1 else 'apply'} to categorical latents: "
            f"add --latent-type categorical (this run's latents are {latent_type})"))


def _rollback_hint(out) -> str | None:
    """Where the run's checkpoint.npz is damaged or gone but epoch checkpoints were kept
    (--keep): the command that continues from the newest sound one, or None. The newest
    epoch's checkpoint, when it is a hard link to checkpoint.npz, is damaged alike: left out."""
    import os
    import shlex

    from ..train import epoch_checkpoints

    main = Path(out) / "checkpoint.npz"
    kept = {e: p for e, p in epoch_checkpoints(out).items()
            if not (main.is_file() and os.path.samefile(p, main))}
    if not kept:
        return None
    epochs = sorted(kept)
    listed = ", ".join(map(str, epochs))
    many = len(epochs) > 1
    then = "move it away, then " if main.is_dir() else ""     # else the rollback cannot save
    return (f"the checkpoint{'s' if many else ''} of epoch{'s' if many else ''} {listed} "
            f"{'are' if many else 'is'} kept beside it: {then}minivae train --resume --out "
            f"{shlex.quote(str(out))} --from-epoch {epochs[-1]} continues from "
            f"{'the newest' if many else 'it'}")


def _run(args, comm) -> int:
    import contextlib
    import json
    import shlex
    import sys

    from ..cli import Terminated, UserError
    from ..engine.data_parallel import ReplicasDiffer, share_bytes
    from ..train import (CheckpointError, CheckpointUnreadable, Diverged, ResumeConflict,
                         RunLocked, TrainConfig, Trainer, _missing, epoch_checkpoints,
                         load_checkpoint, remove_made_dirs, run_lock)

    root = comm.rank == 0
    say = print if root else (lambda *a, **k: None)       # rank 0 alone speaks
    given = {flag: v for flag, v in vars(args).items() if flag in FIELDS and v is not None}
    if args.threads:
        from ..engine import set_num_threads

        set_num_threads(args.threads)
    if args.from_epoch is not None and not args.resume:
        raise _everywhere(UserError("--from-epoch needs --resume"))
    if not args.out.strip():
        raise _everywhere(UserError("--out must name a run directory, got ''"))
    out = Path(args.out)
    if not args.resume and given.get("data", "mnist10k") == "mnist10k" and args.data_dir:
        raise _everywhere(UserError("--data-dir needs --data mnist or --data fashion-mnist "
                                    "(mnist10k is bundled)"))
    if not args.resume:
        _categorical_only(given, given.get("latent_type", "gaussian"))
    if "device" in given:             # before --out is made: a missing GPU leaves nothing behind
        from ..backend import get_backend

        get_backend(given["device"])

    lock = contextlib.ExitStack()
    made = []                         # the directories rank 0 made for --out (none elsewhere)

    def look_at_out():
        """Rank 0 alone looks at --out and holds its lock; the others get what it found."""
        # (a rollback reads its epoch's checkpoint: the run's own may be damaged or gone)
        if args.resume and args.from_epoch is None and not (out / "checkpoint.npz").is_file():
            hint = _rollback_hint(out)
            hint = f"; {hint}" if hint else ""
            if (out / "checkpoint.npz").exists():
                raise UserError(f"--resume: {_missing(out / 'checkpoint.npz')}{hint}")
            raise UserError(f"--resume: no checkpoint.npz in {out}{hint}")
        made[:] = writable_dir(out)
        lock.enter_context(run_lock(out, made=made))
        if not args.resume and (out / "checkpoint.npz").exists():
            raise UserError(f"{out} already holds a run: add --resume to continue it, or "
                            f"choose another --out")
        epochs = None
        if args.resume and args.from_epoch is not None and "epochs" not in given:
            saved = None
            # the run's goal: its checkpoint's, or where that is damaged or gone, the newest
            # epoch checkpoint that can be read (a later --resume --epochs may have raised it)
            kept = epoch_checkpoints(out)
            for src in [out] + [kept[e] for e in sorted(kept, reverse=True)]:
                try:
                    saved = load_checkpoint(src)[1]
                    break
                except CheckpointError:
                    continue
            epochs = saved and saved["train_config"]["epochs"]         # a rollback trains to
        return json.dumps({"epochs": epochs}).encode()                 # the run's goal

    with lock:
        found = json.loads(share_bytes(comm, look_at_out,
                                       errors=(UserError, RunLocked, CheckpointError)))
        if args.resume:
            overrides = {FIELDS[f]: v for f, v in given.items()}
            if found["epochs"] is not None:
                overrides["epochs"] = found["epochs"]
            try:
                t = Trainer.resume(out, from_epoch=args.from_epoch,
                                   progress=not args.no_progress, figures=not args.no_figures,
                                   comm=comm, **overrides)
            except CheckpointError as e:
                hint = None if args.from_epoch is not None or isinstance(
                    e, CheckpointUnreadable) else _rollback_hint(out)   # unreadable: intact?
                if hint is None:
                    raise
                advised = CheckpointError(f"{e}; {hint}")
                advised.all_ranks = getattr(e, "all_ranks", False)
                raise advised from None
            except ResumeConflict as e:
                raise _everywhere(UserError(
                    f"{FLAG[e.field]} {_show(e.asked)} differs from this run's "
                    f"{_show(e.run_value, e.effective)}; what defines a run cannot change on --resume: drop "
                    f"the flag, or start a new run with another --out")) from None
            _categorical_only(given, t.cfg.latent_type)
            if t.cfg.epochs < t.epoch:
                raise _everywhere(UserError(
                    f"{out} has completed {t.epoch} epochs; --epochs {t.cfg.epochs} would undo "
                    f"them: give --epochs {t.epoch} or more"))
            where = (f"from its epoch {args.from_epoch} checkpoint"
                     if args.from_epoch is not None else f"at epoch {t.epoch} (step {t.step})")
            say(f"resuming {out} {where}, training to epoch {t.cfg.epochs}{_ranks(comm)}")
            if t.cfg.epochs == t.epoch:
                figures = ("; its figures are drawn again" if not args.no_figures
                           else "")
                say(f"  note: the run has already completed {t.epoch} epochs, so nothing will "
                    f"be trained{figures}: give --epochs {t.epoch + 1} or more to train longer")
            for field, (old, new) in t.changed.items():
                say(f"  changed: {FLAG.get(field, field)} {_show(old)} -> {_show(new)}")
        else:
            a = {**DEFAULTS, **given}
            _categorical_only(given, a["latent_type"])
            try:
                cfg = _config(a, out, args)
            except (ValueError, TypeError) as e:   # from the command line alone: every rank
                raise _everywhere(UserError(str(e))) from None   # finds it, rank 0 says it
            t = Trainer(cfg, comm=comm)
            code = (f"({cfg.latent} x {cfg.categories} categories)"
                    if cfg.latent_type == "categorical" else str(cfg.latent))
            say(f"training {type(t.model).__name__} "
                f"{'-'.join(map(str, [t.ds.dim, *cfg.hidden, code]))} "
                f"({t.model.n_params():,} parameters) on {t.ds.name} "
                f"({t.n_train} train / {t.x_test.shape[0]} test), backend {t.backend.name}"
                f"{_ranks(comm)}")
        try:
            status = t.fit()
        except (Terminated, KeyboardInterrupt) as e:
            # a signal outside the Trainer's handler: while it drew the figures, after the
            # last epoch was saved (a second signal during training aborts: unsaved, as said)
            if t.epoch < t.cfg.epochs or not t.cfg.figures or t.stopped_by:
                raise
            raise type(e)(f"training is done and saved in {out}; the figures may be "
                          f"missing: 'minivae train --resume --out "
                          f"{shlex.quote(str(out))}' draws them") from None
        except Diverged as e:
            if root:                  # an error: on stderr, once
                print(f"minivae train: {e}", file=sys.stderr, flush=True)
                # diverged before its first checkpoint: the --out made for it holds nothing
                # but the lock file and goes, as for any run that failed before writing
                remove_made_dirs(made, litter=(".minivae.lock",))
            return 1
        except ReplicasDiffer as e:
            if root:
                print(f"minivae train: error: {e}", file=sys.stderr, flush=True)
            return 1
    if status == "interrupted":
        return 143 if t.stopped_by == "SIGTERM" else 130
    last = t.history[-1] if t.history else None
    if last:
        say(f"done: test loss {last['test_loss']:.2f} nats/example after epoch {last['epoch']}; "
            f"results in {out}/")
    return 0


def _config(a, out, args):
    """The TrainConfig of a new run from the flags (a: the defaults updated with the given)."""
    from ..train import TrainConfig

    return TrainConfig(
        data=a["data"], data_dir=a["data_dir"], model=a["model"], hidden=a["hidden"],
        latent=a["latent"], activation=a["activation"], likelihood=a["likelihood"],
        init=a["init"], optimizer=a["optimizer"], lr=a["lr"],
        weight_decay=a["weight_decay"], momentum=a["momentum"], epochs=a["epochs"],
        batch_size=a["batch"], backend=a["device"], dtype=a["dtype"], seed=a["seed"],
        binarize=a["binarize"], beta=a["beta"], warmup_epochs=a["warmup"],
        log_every=a["log_every"], keep=a["keep"], latent_type=a["latent_type"],
        categories=a["categories"], tau=a["tau"], tau_min=a["tau_min"],
        tau_anneal=a["tau_anneal"], straight_through=a["straight_through"], out=str(out),
        progress=not args.no_progress, figures=not args.no_figures)


def _ranks(comm) -> str:
    return f", data-parallel on {comm.size} MPI ranks" if comm.size > 1 else ""


def _show(v, effective=None):
    if v is None:
        return "(not set)" if effective is None else f"{_show(effective)} (the default)"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)
