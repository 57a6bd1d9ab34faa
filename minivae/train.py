"""The training loop: minibatches, KL warm-up, evaluation, metrics, checkpoints, resume.

    from minivae.train import TrainConfig, Trainer
    t = Trainer(TrainConfig(epochs=10, out="runs/vae"))
    t.fit()                      # -> "done" | "interrupted"; raises Diverged on NaN/Inf
    t = Trainer.resume("runs/vae", epochs=20)   # continue, bit for bit on numpy

One step, on the model's backend, with nothing read back to the host:

    x_b   = X[perm[i:i+B]]                                   (B, D)  X lives on the device
    x_b   = 1[u < x_b], u ~ U(0, 1)                          only for dynamic binarization
    model.beta = beta * min(1, step / warm-up steps)          KL warm-up
    r     = train_step(model, opt, x_b, check=False)         = model.loss_and_grads(x_b) then
                                                             opt.step(), in one parallel section
    sums += (B * r.recon, B * r.kl)                          0-d device arrays

Every ``log_every`` steps the sums are read once (a GPU sync), checked for NaN/Inf and shown on
the progress bar. The whole data set is validated once, up front, instead of every step.

Run directory (``config.out``):
    checkpoint.npz   latest state, replaced atomically every epoch (and on Ctrl-C)
    metrics.json     {"epochs": [{"epoch", "train_loss", ..., "test_loss", ...}], "config": ...}
    metrics.csv      the same rows as a table
    *.png            figures (minivae.plots), written when training ends
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .backend import get_backend, jsonable
from .data import BINARIZE, binarize, load_dataset
from .evaluate import elbo
from .engine import threads, train_step
from .models import MODELS, build_model
from .optim import make_optimizer
from .params import Layout

CHECKPOINT = "checkpoint.npz"
FORMAT = "minivae-checkpoint-1"


class Diverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept (the message says where)."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or does not fit (the message says why)."""


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in the checkpoint and in metrics.json."""

    data: str = "mnist10k"            # mnist10k | mnist | fashion-mnist
    data_dir: str | None = None       # directory with the four IDX files (mnist, fashion-mnist)
    model: str = "vae"                # vae | autoencoder
    hidden: list = field(default_factory=lambda: [400])
    latent: int = 20
    activation: str = "relu"
    likelihood: str = "bernoulli"     # bernoulli | gaussian | gaussian_learned
    init: str | None = None           # None: He for ReLU (minivae's default) | glorot | torch
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 128
    backend: str = "numpy"            # numpy | cupy | strict | auto
    dtype: str = "float32"
    seed: int = 0
    binarize: str = "none"            # none (grey levels) | static | dynamic
    beta: float = 1.0                 # weight of the KL term (beta-VAE)
    warmup_epochs: float = 0.0        # KL warm-up: beta ramps linearly from 0 over this many epochs
    log_every: int = 20               # steps between host read-backs (progress bar, NaN check)
    eval_batch: int = 1000
    out: str = "runs/vae"
    progress: bool = True             # tqdm bar on stderr
    figures: bool = True              # PNGs into ``out`` when training ends

    def __post_init__(self):
        self.hidden = [int(h) for h in (self.hidden if isinstance(self.hidden, (list, tuple))
                                        else [self.hidden])]
        if self.binarize not in BINARIZE:
            raise ValueError(f"binarize must be one of {', '.join(BINARIZE)}, got {self.binarize!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        for name in ("epochs", "batch_size", "latent", "log_every", "eval_batch"):
            if int(getattr(self, name)) < (0 if name == "epochs" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("beta", "warmup_epochs", "lr", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# -- data preparation ----------------------------------------------------------------------------
def prepare_data(cfg: TrainConfig, dataset=None):
    """-> (dataset, x_train, x_test) as host float32; binarized as ``cfg.binarize`` says.

    static: both splits drawn once (train seed 0, test seed 1). dynamic: the test split drawn
    once exactly as under static (so the two modes are scored on the same binary test set);
    the training split stays grey and is redrawn on the device at every step.
    """
    ds = dataset if dataset is not None else load_dataset(cfg.data, path=cfg.data_dir)
    x_tr, x_te = ds.x_train, ds.x_test
    if cfg.binarize == "static":
        x_tr = binarize(x_tr, seed=0)
    if cfg.binarize in ("static", "dynamic"):
        x_te = binarize(x_te, seed=1)
    return ds, x_tr, x_te


# -- checkpoints -------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path, arrays: dict, meta: dict) -> None:
    """Write host arrays + a JSON header to ``path`` atomically (temp file, fsync, rename).

    A crash mid-write leaves the previous checkpoint intact: ``os.replace`` is atomic.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    payload = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    payload["meta"] = np.array(json.dumps(meta))          # a unicode array: no pickle needed
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)   # never leave half a checkpoint lying about
        raise
    _fsync_dir(path.parent)


def load_checkpoint(path) -> tuple[dict, dict]:
    """-> (arrays, meta). Raises :class:`CheckpointError` if the file is not a sound checkpoint.

    The zip container checks a CRC-32 per array, so flipped or missing bytes are caught here.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, zlib.error) as e:
        if "pickle" in str(e):        # an .npz/.npy of Python objects, or not a zip at all
            raise CheckpointError(f"{path} is not a minivae checkpoint (a checkpoint holds "
                                  f"only arrays and a JSON header)") from None
        raise CheckpointError(f"{path} is not a readable minivae checkpoint: corrupt or "
                              f"truncated ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a minivae checkpoint (format {meta.get('format')!r})")
    layout = Layout.from_json(meta["layout"])
    p = arrays.get("params")
    if p is None or p.shape != (layout.size,):
        raise CheckpointError(f"{path}: parameter array has shape "
                              f"{None if p is None else p.shape}, layout needs ({layout.size},)")
    if not np.all(np.isfinite(p)):
        raise CheckpointError(f"{path}: parameters contain NaN or Inf")
    return arrays, meta


def load_model(path, backend="numpy"):
    """A trained model from a checkpoint (file or run directory), on any backend."""
    arrays, meta = load_checkpoint(path)
    model = build_model(meta["model"], backend=backend, dtype=meta["dtype"])
    model.params.load_state_dict({"layout": meta["layout"], "data": arrays["params"]})
    return model, meta


# -- the trainer -------------------------------------------------------------------------------------
class Trainer:
    """Owns the model, optimizer, data on the device, RNGs and the run directory."""

    def __init__(self, config: TrainConfig, dataset=None, log=None):
        self.cfg = cfg = config
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.out = Path(cfg.out)
        self.backend = get_backend(cfg.backend)
        self.ds, x_tr, x_te = prepare_data(cfg, dataset)
        mk = dict(d_in=self.ds.dim, hidden=cfg.hidden, latent=cfg.latent,
                  activation=cfg.activation, likelihood=cfg.likelihood, init=cfg.init)
        if MODELS[cfg.model].has_prior:                 # a KL term, weighted by beta
            mk["beta"] = cfg.beta
        self.model = build_model({"kind": cfg.model, **mk}, backend=self.backend,
                                 dtype=cfg.dtype, seed=cfg.seed)
        self.opt = make_optimizer(cfg.optimizer, self.model.params, lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
        be, dt = self.backend, self.model.dtype
        self.x_train = be.asarray(x_tr, dtype=dt)       # the whole set on the device, once
        self.x_test = be.asarray(x_te, dtype=dt)
        self.model.check_input(self.x_train, "training data")   # validated once: the hot
        self.model.check_input(self.x_test, "test data")        # loop uses check=False
        self.shuffle = np.random.default_rng(cfg.seed)  # host: permutations index host-built ids
        self.history: list[dict] = []
        self.epoch = 0          # completed epochs
        self.step = 0           # optimizer steps taken
        self.perm = None        # this epoch's order (host int64) while an epoch is under way
        self.pos = 0            # next batch's start in perm
        self.sums = np.zeros(3, dtype=np.float32)   # mid-epoch (n, recon sum, kl sum), host
        self._stop = False

    # -- sizes and schedules ------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.cfg.batch_size)

    def beta_at(self, step: int) -> float:
        """KL weight for optimizer step ``step`` (0-based): linear warm-up to cfg.beta."""
        w = self.cfg.warmup_epochs * self.steps_per_epoch
        return self.cfg.beta if w <= 0 else self.cfg.beta * min(1.0, (step + 1) / w)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> str:
        """Train until ``cfg.epochs``. -> "done", or "interrupted" after Ctrl-C (state saved).

        Raises :class:`Diverged` if a loss turns NaN/Inf (the last good checkpoint stays).
        """
        self.out.mkdir(parents=True, exist_ok=True)
        self._stop = False
        with self._catch_sigint():
            while self.epoch < self.cfg.epochs:
                row = self._train_epoch()
                if row is None:
                    self.save()
                    self.log(f"interrupted in epoch {self.epoch + 1} at step {self.step}: "
                             f"state saved to {self.out / CHECKPOINT}; continue with --resume")
                    return "interrupted"
                self.history.append(row)
                self.save()
                self.write_metrics()
                self.log(f"epoch {row['epoch']}: train loss {row['train_loss']:.2f}  "
                         f"test loss {row['test_loss']:.2f} (recon {row['test_recon']:.2f}, "
                         f"KL {row['test_kl']:.2f})  {row['seconds']:.1f} s")
        self.write_metrics()
        if self.cfg.figures:
            from . import plots

            plots.save_all(self.model, self.ds, self.history, self.out,
                           x_test=self.backend.to_host(self.x_test))
        return "done"

    def _train_epoch(self):
        """One epoch from (perm, pos). -> its metrics row, or None if stopped by Ctrl-C."""
        model, be = self.model, self.backend
        if self.perm is None:
            self.perm = self.shuffle.permutation(self.n_train)
            self.pos = 0
            self.sums[:] = 0.0
        perm_dev = be.asarray(self.perm)               # one transfer per epoch
        # device accumulators, seeded with what an interrupted run had gathered
        acc_recon = be.asarray(self.sums[1:2], dtype=model.dtype)[0]
        acc_kl = be.asarray(self.sums[2:3], dtype=model.dtype)[0]
        n_seen = int(self.sums[0])
        bar = self._bar()
        try:
            return self._run_batches(bar, perm_dev, acc_recon, acc_kl, n_seen)
        finally:
            bar.close()

    def _run_batches(self, bar, perm_dev, acc_recon, acc_kl, n_seen):
        """The inner loop of :meth:`_train_epoch`, from ``self.pos`` to the end of the epoch."""
        cfg, model, xp = self.cfg, self.model, self.backend.xp
        bar.update(self.pos)
        t0, seen0 = time.perf_counter(), n_seen
        B, N, k = cfg.batch_size, self.n_train, 0
        while self.pos < N:
            j = min(self.pos + B, N)
            xb = xp.take(self.x_train, perm_dev[self.pos:j], axis=0)
            if cfg.binarize == "dynamic":
                xb = xp.astype(model.rng.uniform(tuple(xb.shape), model.dtype) < xb, model.dtype)
            if model.has_prior:                        # a KL term to warm up
                model.beta = self.beta_at(self.step)
            r = train_step(model, self.opt, xb, check=False)
            b = j - self.pos
            acc_recon = acc_recon + r.recon * b
            acc_kl = acc_kl + r.kl * b
            n_seen += b
            self.pos, self.step, k = j, self.step + 1, k + 1
            bar.update(b)
            if k % cfg.log_every == 0 or self.pos >= N or self._stop:
                self.sums[:] = (n_seen, float(acc_recon), float(acc_kl))   # the read-back
                self._check_finite(self.sums)
                now = time.perf_counter()
                bar.set_postfix(loss=f"{(self.sums[1] + self.sums[2]) / n_seen:.2f}",
                                recon=f"{self.sums[1] / n_seen:.2f}",
                                kl=f"{self.sums[2] / n_seen:.2f}",
                                rate=f"{(n_seen - seen0) / max(now - t0, 1e-9):.0f}/s",
                                refresh=False)
            if self._stop:
                return None
        seconds = time.perf_counter() - t0
        n, rec, kl = float(self.sums[0]), float(self.sums[1]), float(self.sums[2])
        # One BLAS thread here too: OpenBLAS's own workers would busy-wait ~0.1 s after the
        # evaluation's products, right when the next epoch's threads need the cores
        # (measured: 10 epochs of the default run 3.2 s -> 2.6-2.9 s on 2 cores).
        with threads.one_blas_thread():
            test = elbo(model, self.x_test, cfg.eval_batch, check=False)
        self._check_finite([test["loss"]], where="test loss")
        self.epoch += 1
        self.perm, self.pos = None, 0
        return {"epoch": self.epoch, "step": self.step,
                "train_loss": (rec + kl) / n, "train_recon": rec / n, "train_kl": kl / n,
                "test_loss": test["loss"], "test_recon": test["recon"], "test_kl": test["kl"],
                "beta": self.beta_at(self.step - 1), "seconds": seconds,
                "samples_per_s": (n - seen0) / max(seconds, 1e-9)}

    def _bar(self):
        from tqdm.auto import tqdm

        return tqdm(total=self.n_train, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                    unit="ex", unit_scale=True, leave=False,
                    disable=None if self.cfg.progress else True,  # None: off when not a TTY
                    dynamic_ncols=True, mininterval=0.5)

    def _check_finite(self, values, where="training loss"):
        if not all(math.isfinite(float(v)) for v in values):
            have = (f"the last good checkpoint is {self.out / CHECKPOINT} "
                    f"(epoch {self.epoch})" if (self.out / CHECKPOINT).exists()
                    else "no checkpoint was written yet")
            raise Diverged(f"{where} became NaN/Inf near step {self.step} of epoch "
                           f"{self.epoch + 1}; stopped without saving the bad state: {have}. "
                           f"Try a smaller --lr or a KL warm-up (--warmup)")

    @contextlib.contextmanager
    def _catch_sigint(self):
        """First Ctrl-C: finish the current step, save, return. Second Ctrl-C: the usual
        KeyboardInterrupt. (Only the main thread may install signal handlers.)"""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop:
                raise KeyboardInterrupt
            self._stop = True
            self.log("\nCtrl-C: saving a checkpoint after this step (press again to abort)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    # -- persistence --------------------------------------------------------------------------------
    def save(self) -> Path:
        """Atomically write the whole training state to ``out/checkpoint.npz``."""
        be = self.backend
        o = self.opt.state_dict()
        arrays = {"params": be.to_host(self.model.params.data),
                  "perm": self.perm if self.perm is not None else np.zeros(0, np.int64),
                  "sums": self.sums.copy()}
        arrays.update({f"opt.{n}": v for n, v in o["buffers"].items()})
        meta = {"format": FORMAT, "minivae": __version__, "backend": be.name,
                "dtype": str(np.dtype(arrays["params"].dtype)),
                "model": self.model.config, "layout": self.model.params.layout.to_json(),
                "optimizer": {"name": o["name"], "t": o["t"], "hyper": o["hyper"],
                              "buffers": sorted(o["buffers"])},
                "train_config": self.cfg.to_json(), "epoch": self.epoch, "step": self.step,
                "pos": self.pos, "in_epoch": self.perm is not None,
                "rng": {"model": self.model.rng.get_state(),
                        "shuffle": jsonable(self.shuffle.bit_generator.state)},
                "history": self.history}
        path = self.out / CHECKPOINT
        save_checkpoint(path, arrays, meta)
        return path

    @classmethod
    def resume(cls, run_dir, dataset=None, log=None, **overrides) -> "Trainer":
        """Rebuild a Trainer from ``run_dir/checkpoint.npz``; ``overrides`` may change e.g.
        ``epochs`` (to train longer), ``backend``, ``progress``, ``figures``, ``out``."""
        run_dir = Path(run_dir)
        arrays, meta = load_checkpoint(run_dir)
        cfg_d = {**meta["train_config"], "out": str(run_dir), **overrides}
        t = cls(TrainConfig.from_json(cfg_d), dataset=dataset, log=log)
        if t.model.params.layout.to_json() != meta["layout"]:
            raise CheckpointError(f"{run_dir}: the checkpoint's parameter layout does not match "
                                  f"the configured model")
        t.model.params.load_state_dict({"layout": meta["layout"], "data": arrays["params"]})
        o = meta["optimizer"]
        try:
            bufs = {n: arrays[f"opt.{n}"] for n in o["buffers"]}
        except KeyError as e:
            raise CheckpointError(f"{run_dir}: optimizer buffer {e} is missing") from None
        t.opt.load_state_dict({"name": o["name"], "t": o["t"], "buffers": bufs})
        if not t.model.rng.set_state(meta["rng"]["model"]):
            t.log(f"note: the {meta['backend']} noise stream of this run cannot be restored on "
                  f"backend {t.backend.name}; training continues with a fresh stream from the seed")
        t.shuffle.bit_generator.state = meta["rng"]["shuffle"]
        t.epoch, t.step, t.history = int(meta["epoch"]), int(meta["step"]), list(meta["history"])
        if meta["in_epoch"]:
            perm = arrays["perm"]
            if perm.shape != (t.n_train,):
                raise CheckpointError(f"{run_dir}: saved epoch order has {perm.shape[0]} entries "
                                      f"but the data set has {t.n_train} examples")
            t.perm, t.pos = perm.astype(np.int64), int(meta["pos"])
        t.sums[:] = arrays["sums"]
        return t

    def write_metrics(self) -> None:
        """metrics.json (history + config) and metrics.csv, each replaced atomically."""
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {"epochs": self.history, "config": self.cfg.to_json(), "model": self.model.config,
               "n_params": self.model.n_params(), "backend": self.backend.name,
               "dataset": {"name": self.ds.name, "n_train": self.n_train,
                           "n_test": int(self.x_test.shape[0])},
               "minivae": __version__}
        _atomic_text(self.out / "metrics.json", json.dumps(doc, indent=1))
        if self.history:
            cols = list(self.history[0])
            tmp = self.out / "metrics.csv.tmp"
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                w.writerows(self.history)
            os.replace(tmp, self.out / "metrics.csv")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def train(config: TrainConfig | None = None, **kw) -> Trainer:
    """Convenience: ``train(epochs=1, out="runs/t")`` -> the finished Trainer."""
    cfg = config or TrainConfig(**kw)
    t = Trainer(cfg)
    t.fit()
    return t
