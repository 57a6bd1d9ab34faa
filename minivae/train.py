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
import io
import json
import math
import numbers
import os
import signal
import sys
import threading
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .backend import NAMES as BACKEND_NAMES
from .backend import (all_finite, get_backend, jsonable, pcg64_state_ok, rng_state_ok,
                      strict_json)
from .fileio import atomic_write
from .data import BINARIZE, binarize, fingerprint, load_dataset
from .evaluate import elbo
from .engine import NonFiniteStep, threads, train_step
from .engine.data_parallel import DataParallel, ReplicasDiffer, check_same, share_bytes
from .models import MODELS, build_model, layout_of
from .optim import NONNEGATIVE, OPTIMIZERS, make_optimizer
from .params import Layout

CHECKPOINT = "checkpoint.npz"
LATENT_TYPES = ("gaussian", "categorical")
#: the lowest Gumbel-softmax temperature accepted: below it the relaxed gradient (~1/tau) and
#: the softmax overflow float32 long before the relaxation is any closer to the discrete sample
MIN_TAU = 0.01
FORMAT = "minivae-checkpoint-1"


class Diverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept (the message says where).
    Under MPI every rank raises it at the same step (the losses it checks are all-reduced)."""

    all_ranks = True


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or does not fit (the message says why)."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint file that exists but cannot be read (permissions, I/O): not damage."""


class DataChanged(ValueError):
    """A run was resumed on other data than it was trained on (the message names both)."""


def data_source(cfg: "TrainConfig") -> str:
    """The data a configuration reads, for messages: the bundled set, or its directory."""
    if cfg.data == "mnist10k":
        return "the bundled mnist10k"
    if not cfg.data_dir:
        return f"{cfg.data} (cached download)"
    where = Path(cfg.data_dir)
    real = where.expanduser().resolve()         # as the reader finds it (data.load_dir)
    return f"{cfg.data} from {where}" + ("" if str(real) == str(where) else f" ({real})")


def data_mismatch(cfg: "TrainConfig", ds, meta: dict, what: str,
                  splits=("train", "test"), source: str | None = None,
                  now=None) -> str | None:
    """Why ``ds`` is not the data of the run whose checkpoint header is ``meta`` (other image
    sizes, or other images in one of ``splits``: their fingerprints), or None. ``what``
    names the run in the message, ``source`` the data (default: :func:`data_source`);
    ``now``: ``ds``'s fingerprint where the caller has it already."""
    d_in = meta["model"].get("d_in")
    if isinstance(d_in, int) and d_in != ds.dim:
        return (f"{source or data_source(cfg)} has {ds.dim} pixels an image, but {what} was "
                f"trained on {d_in}: the data changed since")
    saved = meta.get("data_fingerprint")
    if isinstance(saved, dict):
        now = fingerprint(ds) if now is None else now
        changed = [k for k in splits if k in saved and saved[k] != now[k]]
        if changed:
            return (f"{source or data_source(cfg)} is not the data {what} was trained on (the "
                    f"images of its {' and '.join(changed)} split"
                    f"{'s differ' if len(changed) > 1 else ' differ'}: fingerprint "
                    f"{now[changed[0]][:12]}, the run's {saved[changed[0]][:12]}): the data "
                    f"changed since")
    return None


class ResumeConflict(ValueError):
    """A resumed run was asked to change what defines it (``field``: the TrainConfig name)."""

    def __init__(self, field, run_value, asked, effective=None):
        self.field, self.run_value, self.asked = field, run_value, asked
        #: what run_value means where it was left unset (init None: the default init's name)
        self.effective = effective
        shown = (f"{effective!r} (the default)" if run_value is None and effective is not None
                 else repr(run_value))
        super().__init__(f"{field} is {shown} in this run and cannot change on resume "
                         f"(asked: {asked!r})")


# Steps between checks of the parameters and the optimizer's state for NaN/Inf (an update
# that overflowed from a finite gradient, e.g. Adam's v = g^2): before, only each checkpoint
# looked, and an epoch of zero-size steps could run first. ~0.6 ms a check for the default
# model (a min and a max of three 653k arrays), under 0.01 ms a step.
STATE_CHECK_EVERY = 100


class RunLocked(RuntimeError):
    """Another process is writing to the same run directory."""


_locks: dict = {}


@contextlib.contextmanager
def run_lock(out, made=()):
    """Hold ``out/.minivae.lock`` (an advisory file lock, filelock) for the block, so that two
    trainers never write one run directory. Re-entrant within a process. Raises
    :class:`RunLocked` at once if another process holds it.

    ``made``: the directories this process made for ``out`` (:func:`make_run_dir`). If the
    block fails and ``out`` then holds nothing but the lock file, the lock file and those
    directories are removed while the lock is still held: a run that failed before writing
    leaves nothing behind, and a directory anyone else made is never removed. In a directory
    that existed before, a failed block that made the lock file and nothing else removes the
    lock file: the directory is left as it was found."""
    from filelock import FileLock, Timeout

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = str((out / ".minivae.lock").resolve())
    lock = _locks.setdefault(path, FileLock(path))
    before = _entries(out) if lock.lock_counter == 0 else None   # before the lock file
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunLocked(f"{out} is in use by another minivae train (lock {path}); wait for it to "
                        f"finish, or choose another --out") from None
    try:
        yield
    except BaseException:
        if made and lock.lock_counter == 1:      # the outermost block: nobody else holds it
            remove_made_dirs(made, litter=(".minivae.lock",))
        elif lock.lock_counter == 1 and before is not None and ".minivae.lock" not in before \
                and _entries(out) == before | {".minivae.lock"}:
            try:
                os.unlink(path)                  # still held: no other run can be using it
            except OSError:
                pass
        raise
    finally:
        lock.release()


def _entries(d) -> set | None:
    """The names in directory d, or None if it cannot be listed."""
    try:
        return set(os.listdir(d))
    except OSError:
        return None


def make_run_dir(out) -> list:
    """``mkdir -p out`` -> the directories this call made, outermost first. Each is made by
    one mkdir that fails if the directory exists, so one that another process made at the same
    moment is never counted as ours."""
    out = Path(out)
    missing, p = [], out
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    made = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        made.append(d)
    return made


def remove_made_dirs(made, litter=()) -> None:
    """Remove the directories of ``made`` (:func:`make_run_dir`'s list), innermost first,
    each only if it holds nothing but files named in ``litter`` (removed with it); stop at the
    first that holds anything else or cannot be removed."""
    for d in reversed(list(made)):
        try:
            names = [p.name for p in d.iterdir()]
            if any(n not in litter for n in names):
                return
            for n in names:
                (d / n).unlink()
            d.rmdir()
        except OSError:
            return


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
    init: str | None = None           # None: default_init (torch for ReLU) | he | glorot | torch
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0             # SGD's heavy-ball momentum (optimizer sgd only)
    epochs: int = 10
    batch_size: int = 128
    backend: str = "numpy"            # numpy | cupy | strict | auto
    dtype: str = "float32"
    seed: int = 0
    binarize: str = "none"            # none (grey levels) | static | dynamic
    beta: float = 1.0                 # weight of the KL term (beta-VAE)
    warmup_epochs: float = 0.0        # KL warm-up: beta ramps linearly from 0 over this many epochs
    latent_type: str = "gaussian"     # gaussian (VAE) | categorical (DiscreteVAE: latent
                                      #   categorical variables of `categories` classes each)
    categories: int = 10              # classes per categorical variable
    tau: float = 1.0                  # Gumbel-softmax temperature at the start
    tau_min: float = 0.5              # ... annealed exponentially to this over tau_anneal epochs
    tau_anneal: float = 0.0           # epochs of temperature annealing (0: tau stays constant)
    straight_through: bool = False    # straight-through Gumbel-softmax instead of the relaxation
    log_every: int = 20               # steps between host read-backs (progress bar, NaN check)
    eval_batch: int = 1000
    out: str = "runs/vae"
    progress: bool = True             # tqdm bar on stderr
    figures: bool = True              # PNGs into ``out`` when training ends
    keep: int = 3                     # epoch checkpoints kept (checkpoint-epoch0007.npz, ...)

    def __post_init__(self):
        hidden = self.hidden if isinstance(self.hidden, (list, tuple)) else [self.hidden]
        # whole numbers only: int(400.7) was 400, int(True) 1 and int("400") 400, silently
        if not hidden or any(isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 1
                             for h in hidden):
            raise ValueError(f"hidden must be a list of layer widths, whole numbers >= 1, got "
                             f"{self.hidden!r}")
        self.hidden = [int(h) for h in hidden]
        if not isinstance(self.dtype, str) and str(getattr(self.dtype, "name", "")) in (
                "float32", "float64"):
            self.dtype = self.dtype.name      # np.dtype("float64"): its name (JSON-able)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if not isinstance(self.out, (str, os.PathLike)):
            raise ValueError(f"out must be a directory path, got {self.out!r}")
        if self.binarize not in BINARIZE:
            raise ValueError(f"binarize must be one of {', '.join(BINARIZE)}, got {self.binarize!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.latent_type not in LATENT_TYPES:
            raise ValueError(f"latent_type must be one of {', '.join(LATENT_TYPES)}, got "
                             f"{self.latent_type!r}")
        if self.latent_type == "categorical" and not MODELS[self.model].has_prior:
            raise ValueError("categorical latents need a VAE: an autoencoder has no latent "
                             "distribution to sample")
        if not isinstance(self.straight_through, bool):
            raise ValueError(f"straight_through must be true or false, got "
                             f"{self.straight_through!r}")
        for name in ("epochs", "batch_size", "latent", "log_every", "eval_batch", "keep", "seed",
                     "categories"):
            v, low = getattr(self, name), (0 if name in ("epochs", "keep", "seed") else
                                           2 if name == "categories" else 1)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {v!r}")
        for name in ("beta", "warmup_epochs", "lr", "weight_decay", "tau_anneal", "tau",
                     "tau_min"):
            v = getattr(self, name)
            low = MIN_TAU if name in ("tau", "tau_min") else 0.0
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < low:
                raise ValueError(f"{name} must be a finite number >= {low:g}, got {v!r}")
        from .optim import OPTIMIZERS
        if not isinstance(self.optimizer, str) or self.optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of "
                             f"{', '.join(OPTIMIZERS)}")
        self.optimizer = self.optimizer.lower()   # 'SGD' and 'sgd' are one run
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or m != m:
            raise ValueError(f"momentum must be a number in [0, 1), got {m!r}")
        if m and self.optimizer != "sgd":     # first: whatever its value, it has no place here
            raise ValueError(f"momentum applies to the sgd optimizer only (this run uses "
                             f"{self.optimizer})")
        if not 0 <= m < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {m!r}")
        if self.tau_anneal > 0 and self.tau_min > self.tau:
            raise ValueError(f"tau_min ({self.tau_min:g}) is above tau ({self.tau:g}): annealing "
                             f"lowers the temperature")

    #: what defines the model and its data: a resumed run may not change these
    FIXED = ("data", "data_dir", "model", "hidden", "latent", "activation", "likelihood", "init",
             "optimizer", "batch_size", "dtype", "seed", "binarize", "latent_type", "categories",
             "straight_through")

    @property
    def kind(self) -> str:
        """The model kind (a key of models.MODELS) this configuration builds."""
        return "discrete_vae" if self.latent_type == "categorical" else self.model

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
def save_checkpoint(path, arrays: dict, meta: dict) -> None:
    """Write host arrays + a JSON header to ``path`` atomically (:func:`atomic_write`).

    A crash mid-write leaves the previous checkpoint intact: ``os.replace`` is atomic.
    """
    payload = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    payload["meta"] = np.array(strict_json(meta))        # a unicode array: no pickle needed
    atomic_write(path, lambda f: np.savez(f, **payload), "checkpoint")


def load_checkpoint(path, data: bytes | None = None) -> tuple[dict, dict]:
    """-> (arrays, meta). Raises :class:`CheckpointError` if the file is not a sound checkpoint.

    The zip container checks a CRC-32 per array, so flipped or missing bytes are caught here.
    ``data``: the file's bytes, already read (by rank 0 under MPI); ``path`` then only names
    it in messages.
    """
    path = Path(path)
    if data is None and path.is_dir():
        path = path / CHECKPOINT
    if data is None:
        data = _checkpoint_bytes(path)
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):     # an .npy array: no header, no state
            raise CheckpointError(f"{path} is not a minivae checkpoint (a single NumPy array, "
                                  f"not an .npz archive of arrays and a JSON header)")
        with z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")), parse_constant=_no_constant)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, zlib.error) as e:
        if "not valid JSON" in str(e):
            raise CheckpointError(f"{path}: its header holds {e}") from None
        if "pickle" in str(e):        # an .npz/.npy of Python objects, or not a zip at all
            raise CheckpointError(f"{path} is not a minivae checkpoint (a checkpoint holds "
                                  f"only arrays and a JSON header)") from None
        raise CheckpointError(f"{path} is not a readable minivae checkpoint: corrupt or "
                              f"truncated ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path} is not a minivae checkpoint (format {got!r})")
    _check_meta(meta, path)
    try:
        layout = Layout.from_json(meta["layout"])
    except ValueError as e:                   # a name twice
        raise CheckpointError(f"{path}: checkpoint header field 'layout' is not valid ({e})") \
            from None
    try:
        implied = layout_of(meta["model"])
        # its fields and values too (foo, beta -1): built once, where its size is the layout's
        if implied == layout:
            build_model(meta["model"], dtype=meta["dtype"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its model config is not valid ({e})") from None
    if implied != layout:
        theirs = [f"{n} {list(s)}" for n, s in implied.to_json()]
        ours = [f"{n} {list(s)}" for n, s in layout.to_json()]
        first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), None)
        raise CheckpointError(
            f"{path}: its model config implies {implied.size:,} parameters in "
            f"{len(implied.names)} tensors, but its layout holds {layout.size:,} in "
            f"{len(layout.names)}" + (f" (tensor {first}: {theirs[first]} against {ours[first]})"
                                      if first is not None else ""))
    p = arrays.get("params")
    if p is None or p.shape != (layout.size,):
        raise CheckpointError(f"{path}: parameter array has shape "
                              f"{None if p is None else p.shape}, layout needs ({layout.size},)")
    if p.dtype != np.dtype(meta["dtype"]):
        raise CheckpointError(f"{path}: parameters are {p.dtype}, but the header says "
                              f"{meta['dtype']}")
    if not np.all(np.isfinite(p)):
        raise CheckpointError(f"{path}: parameters contain NaN or Inf")
    _check_state(arrays, meta, path)
    return arrays, meta


def _check_state(arrays: dict, meta: dict, path) -> None:
    """The training state must be whole and consistent before anything uses it (resume also
    checks the saved order against the data set)."""
    def bad(what):
        raise CheckpointError(f"{path}: {what}")

    o, p = meta["optimizer"], arrays["params"]
    # the buffers the named optimizer keeps >= 0 (Adam's v, Adagrad's s), as it checks them
    nonnegative = next((c.nonnegative_state for c in OPTIMIZERS.values()
                        if c.__name__ == o["name"]), ())
    for n in o["buffers"]:
        b = arrays.get(f"opt.{n}")
        if b is None or b.shape != p.shape or b.dtype != p.dtype or not np.all(np.isfinite(b)):
            bad(f"optimizer buffer {n!r} is missing, of the wrong shape or type, or not finite")
        if n in nonnegative and np.any(b < 0):
            bad(f"optimizer buffer {n!r} holds negative numbers; {NONNEGATIVE}")
    if o["t"] != meta["step"]:
        bad(f"the optimizer has taken {o['t']} steps but the run {meta['step']}")
    if meta["epoch"] > meta["step"] or len(meta["history"]) != meta["epoch"]:
        bad(f"epoch {meta['epoch']}, step {meta['step']} and {len(meta['history'])} epochs of "
            f"history do not agree")
    sums = arrays.get("sums")
    if sums is None or sums.shape != (3,) or not np.all(np.isfinite(sums)) or sums[0] < 0:
        bad("the saved running sums are damaged")
    perm = arrays.get("perm")
    if perm is None or perm.ndim != 1 or not np.issubdtype(perm.dtype, np.integer):
        bad("the saved epoch order must be a 1-D integer array")
    if meta["in_epoch"] and not (perm.size and 0 <= meta["pos"] <= perm.size
                                 and perm.min() >= 0):
        bad(f"saved position {meta['pos']} or order is outside the epoch")


def _no_constant(name):
    raise ValueError(f"{name}, which is not valid JSON")


# the checkpoint header's schema: key -> (type(s), description); checked before anything is used
_META = {
    "format": (str, "a string"), "minivae": (str, "a string"), "backend": (str, "a string"),
    "dtype": (str, '"float32" or "float64"'), "model": (dict, "an object"),
    "layout": (list, "a list"), "optimizer": (dict, "an object"),
    "train_config": (dict, "an object"), "epoch": (int, "a whole number >= 0"),
    "step": (int, "a whole number >= 0"), "pos": (int, "a whole number >= 0"),
    "in_epoch": (bool, "true or false"), "rng": (dict, "an object"), "history": (list, "a list"),
}


_NEWER_FIELDS = ("keep", "latent_type", "categories", "tau", "tau_min", "tau_anneal",
                 "straight_through", "momentum")   # TrainConfig fields a checkpoint from an earlier minivae may lack


def _finite_value(v) -> bool:
    if isinstance(v, bool):
        return True
    if isinstance(v, (int, float)):
        return math.isfinite(v) and v >= 0
    if isinstance(v, list):
        return all(_finite_value(x) for x in v)
    return False


def _check_meta(meta: dict, path) -> None:
    """Raise CheckpointError naming the first key of the header that is missing or mistyped."""
    def bad(key, what):
        raise CheckpointError(f"{path}: checkpoint header field {key!r} must be {what}")

    for key, (typ, what) in _META.items():
        v = meta.get(key)
        if not isinstance(v, typ) or (typ is int and (isinstance(v, bool) or v < 0)):
            bad(key, what)
    if "data_fingerprint" in meta:         # absent in checkpoints of an earlier minivae
        fp = meta["data_fingerprint"]
        if not (isinstance(fp, dict) and sorted(fp) == ["test", "train"] and all(
                isinstance(v, str) and len(v) == 32 and set(v) <= set("0123456789abcdef")
                for v in fp.values())):
            bad("data_fingerprint", 'an object {"train": ..., "test": ...} of 32 hex digits '
                                    'each')
    if meta["dtype"] not in ("float32", "float64"):
        bad("dtype", _META["dtype"][1])
    if meta["backend"] not in BACKEND_NAMES:
        bad("backend", '"numpy", "cupy" or "strict"')
    missing = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in meta["train_config"] and f.name not in _NEWER_FIELDS]
    if missing:
        bad("train_config", f"a complete training configuration (missing {', '.join(missing)})")
    try:
        TrainConfig.from_json(meta["train_config"])
    except (TypeError, ValueError) as e:
        bad("train_config", f"a valid training configuration ({e})")
    for entry in meta["layout"]:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], list)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                        for n in entry[1])):
            bad("layout", "a list of [name, [sizes >= 1]]")
    o = meta["optimizer"]
    if not (isinstance(o.get("name"), str) and isinstance(o.get("t"), int) and o["t"] >= 0
            and isinstance(o.get("buffers"), list)
            and all(isinstance(b, str) for b in o["buffers"])):
        bad("optimizer", "an object with name, t >= 0 and a list of buffer names")
    hyper = o.get("hyper")
    if not isinstance(hyper, dict) or not all(_finite_value(v) for v in hyper.values()):
        bad("optimizer", "an object whose hyper holds finite numbers")
    rng = meta["rng"]
    if not (isinstance(rng.get("model"), dict) and isinstance(rng.get("shuffle"), dict)):
        bad("rng", "an object with the model's and the shuffle's generator states")
    if not rng_state_ok(rng["model"]):
        bad("rng", "an object whose model state is a NumPy PCG64 state or a CuPy seed")
    if not pcg64_state_ok(rng["shuffle"]):
        bad("rng", "an object whose shuffle state is a NumPy PCG64 state")
    if not all(isinstance(row, dict) for row in meta["history"]):
        bad("history", "a list of objects (one per epoch)")
    for i, row in enumerate(meta["history"]):
        if row.get("epoch") != i + 1 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in row.values()):
            bad("history", f"one object of numbers per epoch, numbered from 1 (entry {i} is "
                           f"{json.dumps(row)[:80]})")


def load_model(path, backend="numpy"):
    """A trained model from a checkpoint (file or run directory), on any backend."""
    arrays, meta = load_checkpoint(path)
    model = build_model(meta["model"], backend=backend, dtype=meta["dtype"])   # checked there
    model.params.load_state_dict({"layout": meta["layout"], "data": arrays["params"]})
    return model, meta


# -- the trainer -------------------------------------------------------------------------------------
class Trainer:
    """Owns the model, optimizer, data on the device, RNGs and the run directory.

    ``comm``: a :class:`~minivae.engine.Communicator`; default :func:`minivae.engine.mpi.world`
    (one process, or every rank of an ``mpiexec`` launch). With more than one rank the steps
    run data-parallel over the ranks (see ``minivae/engine/mpi.py``): every rank loads the data
    and holds the same state; rank 0 alone writes files, logs and shows progress; the data
    (at the start) and the parameters and optimizer state (after every epoch) are compared
    across ranks by checksum (:class:`~minivae.engine.data_parallel.ReplicasDiffer`).
    """

    def __init__(self, config: TrainConfig, dataset=None, log=None, comm=None):
        self.cfg = cfg = config
        if comm is None:
            from .engine.mpi import world

            comm = world()
        self.comm = comm
        self.root = comm.rank == 0
        log = log or (lambda msg: print(msg, file=sys.stderr))
        self.log = log if self.root else (lambda msg: None)
        self.out = Path(cfg.out)
        if comm.size > 1 and cfg.batch_size < comm.size:
            raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {comm.size} ranks: "
                             f"each rank needs rows of every batch")
        self.backend = get_backend(cfg.backend)
        if comm.size > 1 and hasattr(comm, "use_local_device"):
            comm.use_local_device(self.backend)          # GPU ranks: before any array is made
        self.ds, x_tr, x_te = prepare_data(cfg, dataset)
        self._fingerprint = None
        check_same(comm, {"training data": x_tr, "test data": x_te}, "at the start")
        mk = dict(d_in=self.ds.dim, hidden=cfg.hidden, latent=cfg.latent,
                  activation=cfg.activation, likelihood=cfg.likelihood, init=cfg.init)
        if MODELS[cfg.kind].has_prior:                  # a KL term, weighted by beta
            mk["beta"] = cfg.beta
        if not MODELS[cfg.kind].continuous:             # categorical latents
            mk.update(categories=cfg.categories, tau=cfg.tau,
                      straight_through=cfg.straight_through)
        self.model = build_model({"kind": cfg.kind, **mk}, backend=self.backend,
                                 dtype=cfg.dtype, seed=cfg.seed)
        extra = {"momentum": cfg.momentum} if cfg.momentum else {}
        self.opt = make_optimizer(cfg.optimizer, self.model.params, lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, **extra)
        be, dt = self.backend, self.model.dtype
        self.x_train = be.asarray(x_tr, dtype=dt)       # the whole set on the device, once
        self.x_test = be.asarray(x_te, dtype=dt)
        self.model.check_input(self.x_train, "training data")   # validated once: the hot
        self.model.check_input(self.x_test, "test data")        # loop uses check=False
        if cfg.batch_size > self.n_train:   # legitimate (full-batch training), but say so
            self.log(f"note: the batch size ({cfg.batch_size}) is larger than the {self.n_train} "
                     f"training examples: each epoch is one step on the whole training set")
        self.shuffle = np.random.default_rng(cfg.seed)  # host: permutations index host-built ids
        self.history: list[dict] = []
        self.epoch = 0          # completed epochs
        self.step = 0           # optimizer steps taken
        self.perm = None        # this epoch's order (host int64) while an epoch is under way
        self.pos = 0            # next batch's start in perm
        # mid-epoch (n, recon sum, kl sum) on the host, at the model's precision (exact resume)
        self.sums = np.zeros(3, dtype=np.dtype(cfg.dtype))
        self._stop = None       # the signal's name once one asked training to stop
        self.changed: dict = {}  # resume: settings changed from the saved run
        self._saved_epoch = None  # completed epochs in the last checkpoint written or resumed
        self.rolled_back = False
        # more than one rank: the step through the communicator (rank 0's weights broadcast);
        # one process keeps minivae.train_step, the wrapper cached with the model
        self._dp = DataParallel(self.model, comm=comm) if comm.size > 1 else None

    # -- sizes and schedules ------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.cfg.batch_size)

    def tau_at(self, step: int) -> float:
        """Gumbel-softmax temperature for step ``step``: exponential annealing from cfg.tau to
        cfg.tau_min over cfg.tau_anneal epochs, then constant (Jang et al. 2017 anneal
        tau = max(0.5, exp(-r t)); this form names its end points instead of a rate r)."""
        c, T = self.cfg, self.cfg.tau_anneal * self.steps_per_epoch
        if T <= 0:
            return c.tau
        return c.tau * (c.tau_min / c.tau) ** min(1.0, step / T)

    def beta_at(self, step: int) -> float:
        """KL weight for optimizer step ``step`` (0-based): linear warm-up to cfg.beta."""
        w = self.cfg.warmup_epochs * self.steps_per_epoch
        return self.cfg.beta if w <= 0 else self.cfg.beta * min(1.0, (step + 1) / w)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> str:
        """Train until ``cfg.epochs``. -> "done", or "interrupted" after Ctrl-C or SIGTERM
        (state saved; ``self.stopped_by`` says which). A signal that arrives after the last
        step, while the last epoch is evaluated and saved, leaves the run complete and saved,
        and skips the figures (a later ``resume`` + ``fit`` draws them): "interrupted" too.

        Holds the run directory's lock (:func:`run_lock`) throughout. Raises :class:`Diverged`
        if a loss turns NaN/Inf (the last good checkpoint stays), :class:`RunLocked` if another
        process trains into the same directory.
        """
        self._stop = None
        lock = run_lock(self.out) if self.root else contextlib.nullcontext()   # one writer
        with lock, self._catch_signals(), np.errstate(all="ignore"), \
                warnings.catch_warnings():
            # A diverging loss is reported once, as Diverged, not as NumPy's RuntimeWarnings
            # (errstate covers this thread; the filter the step's worker threads too).
            warnings.simplefilter("ignore", RuntimeWarning)
            self.check_replicas("at the start of training")
            if self.changed and not self.rolled_back and self.epoch >= self.cfg.epochs:
                # nothing to train: record the new settings now (else the next save does)
                self.save()
                self.write_metrics()
            if self.rolled_back:          # resumed from an earlier epoch: that branch is now it
                self.save()
                for e, path in (self.epoch_checkpoints() if self.root else {}).items():
                    if e > self.epoch:
                        path.unlink(missing_ok=True)
                self.write_metrics()
                self.rolled_back = False
            while self.epoch < self.cfg.epochs:
                row = self._train_epoch()
                self.check_replicas(f"after epoch {self.epoch}" if row else
                                    f"at step {self.step}")
                if row is None:
                    self.save()
                    self.log(f"{self._stop}: interrupted in epoch {self.epoch + 1} at step "
                             f"{self.step}: state saved to {self.out / CHECKPOINT}; continue "
                             f"with --resume")
                    return "interrupted"
                self.history.append(row)
                self.save()
                self._keep_epoch_checkpoint()
                self.write_metrics()
                self.log(f"epoch {row['epoch']}: train loss {row['train_loss']:.2f}  "
                         f"test loss {row['test_loss']:.2f} (recon {row['test_recon']:.2f}, "
                         f"KL {row['test_kl']:.2f})  {row['seconds']:.1f} s")
            if self._stop and self.root:
                # the signal came after the last step, while the last epoch was evaluated and
                # saved: the run is complete; stop before the figures, as it asked
                self.write_metrics()
                figures = ("; the figures were not drawn: --resume draws them"
                           if self.cfg.figures else "")
                self.log(f"{self._stop}: training is done and saved in {self.out}{figures}")
                return "interrupted"
        self.write_metrics()
        if self.cfg.figures and self.root:
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
            if hasattr(model, "tau"):                  # a Gumbel-softmax temperature to anneal
                model.tau = self.tau_at(self.step)
            try:
                if self._dp is None:
                    r = train_step(model, self.opt, xb, check=False)
                else:                                  # this rank's rows, one all-reduce
                    r = self._dp.train_step(self.opt, xb, check=False)
            except NonFiniteStep:                      # refused, nothing updated (every
                self._check_finite([math.nan], step=self.step + 1)   # rank alike): Diverged
            b = j - self.pos
            acc_recon = acc_recon + r.recon * b
            acc_kl = acc_kl + r.kl * b
            n_seen += b
            self.pos, self.step, k = j, self.step + 1, k + 1
            bar.update(b)
            if self.step % STATE_CHECK_EVERY == 0:     # every rank alike (same step count)
                self._check_state_finite()
            if k % cfg.log_every == 0 or self.pos >= N or self._stop:
                self.sums[:] = (n_seen, float(acc_recon), float(acc_kl))   # the read-back
                self._check_finite(self.sums)
                now = time.perf_counter()
                bar.set_postfix(loss=f"{(self.sums[1] + self.sums[2]) / n_seen:.2f}",
                                recon=f"{self.sums[1] / n_seen:.2f}",
                                kl=f"{self.sums[2] / n_seen:.2f}",
                                rate=f"{(n_seen - seen0) / max(now - t0, 1e-9):.0f}/s",
                                refresh=False)
            if self._dp is not None:      # ranks stop together, at a step they agree on
                if k % cfg.log_every == 0 or self.pos >= N:
                    if self._agree_stop():
                        return None
            elif self._stop:
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
                "beta": self.beta_at(self.step - 1),
                **({"tau": self.tau_at(self.step - 1)} if hasattr(model, "tau") else {}),
                "seconds": seconds,
                "samples_per_s": (n - seen0) / max(seconds, 1e-9)}

    def _agree_stop(self):
        """Every rank learns whether a signal reached any rank (one all-reduce of two counts,
        every ``log_every`` steps and at the epoch's end), so that all stop after the same
        step and rank 0 saves. -> the signal's name, or None."""
        flags = np.array([self._stop == "SIGINT", self._stop == "SIGTERM"], np.float64)
        self.comm.allreduce_sum(flags)
        if flags.any():
            self._stop = "SIGTERM" if flags[1] else "SIGINT"
        return self._stop if flags.any() else None

    def _bar(self):
        from tqdm.auto import tqdm

        return tqdm(total=self.n_train, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                    unit="ex", unit_scale=True, leave=False,
                    disable=None if self.cfg.progress and self.root else True,  # None: off
                    # when not a TTY
                    dynamic_ncols=True, mininterval=0.1)

    def _check_state_finite(self):
        """Raise :class:`Diverged` (nothing saved) if the parameters or the optimizer's buffers
        hold NaN or Inf: a finite gradient whose update overflowed (Adam's v = g^2 is Inf for
        |g| > ~1.8e19 in float32; SGD's p - lr g for a huge lr), which the step's own checks
        (its loss and gradient) cannot see. A checkpoint of such a state is one that
        load_checkpoint would refuse."""
        xp = self.backend.xp
        state = {"the parameters": self.model.params.data,
                 **{f"the optimizer's {n}": getattr(self.opt, n) for n in self.opt.state_names}}
        # no temporaries: cheap enough to run every STATE_CHECK_EVERY steps
        bad = [name for name, a in state.items() if not all_finite(xp, a)]
        if bad:
            # (called after the epoch's count moved on: the step belongs to the epoch before)
            epoch = self.epoch if self.perm is None else self.epoch + 1
            self._check_finite([math.nan], where=" and ".join(bad) + " (an update overflowed)",
                               epoch=epoch, by=True)

    def _check_finite(self, values, where="training loss", step=None, epoch=None, by=False):
        """Raise :class:`Diverged` (its advice included) unless every value is finite; the
        message names ``step`` (default: the steps taken) of ``epoch`` (default: the one
        under way): "near" it, or "by" it for a state found bad only at the checkpoint."""
        step = self.step if step is None else step
        epoch = self.epoch + 1 if epoch is None else epoch
        if not all(math.isfinite(float(v)) for v in values):
            saved = self._saved_epoch if self._saved_epoch is not None else epoch - 1
            have = (f"the last good checkpoint is {self.out / CHECKPOINT} "
                    f"(epoch {saved})" if (self.out / CHECKPOINT).exists()
                    else "no checkpoint was written yet")
            kept = sorted(self.epoch_checkpoints())
            how = (f"continue from it with a smaller learning rate: minivae train --resume "
                   f"--out {self.out} --epochs {self.cfg.epochs} --lr {self.cfg.lr / 10:g}"
                   if (self.out / CHECKPOINT).exists()
                   else f"start again with a smaller --lr (now {self.cfg.lr:g})")
            back = (f" (or go back further with --from-epoch E, kept epochs: "
                    f"{', '.join(map(str, kept))})" if kept else "")
            tau = (f"; or raise the Gumbel-softmax temperature (--tau, --tau-min; now "
                   f"{self.model.tau:g})" if hasattr(self.model, "tau") else "")
            warm = "; or add a KL warm-up (--warmup)" if self.model.has_prior else ""
            raise Diverged(f"{where} became NaN/Inf {'by' if by else 'near'} step {step} of "
                           f"epoch {epoch}; stopped without saving the bad state: {have}. "
                           f"What to do: {how}{back}{warm}{tau}")

    @contextlib.contextmanager
    def _catch_signals(self):
        """First Ctrl-C (SIGINT) or SIGTERM (what ``timeout`` and schedulers send): finish the
        current step, save, return "interrupted". A second one aborts: KeyboardInterrupt, or
        for SIGTERM the CLI's ``Terminated`` (exit 143, as the signal says). (Only the main
        thread may install signal handlers.)"""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop:              # the second signal aborts, as the one it is
                if signum == signal.SIGTERM:
                    from .cli import Terminated   # (a light module: argparse and the like)

                    raise Terminated()
                raise KeyboardInterrupt
            self._stop = signal.Signals(signum).name
            what = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            self.log(f"\n{what}: saving a checkpoint after this step (press Ctrl-C again to "
                     f"abort)")

        wanted = [s for s in (signal.SIGINT, signal.SIGTERM)      # not one set to be ignored
                  if signal.getsignal(s) is not signal.SIG_IGN]       # (a background job's)
        previous = {s: signal.signal(s, handler) for s in wanted}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    @property
    def stopped_by(self):
        """"SIGINT" or "SIGTERM" after an interrupted fit, else None."""
        return self._stop or None

    def check_replicas(self, when: str) -> None:
        """With more than one rank: compare checksums of the parameters and the optimizer
        buffers across the ranks; :class:`ReplicasDiffer` on every rank if any differ."""
        if self.comm.size > 1:
            bufs = self.opt.state_dict()["buffers"]
            check_same(self.comm, {"parameters": self.model.params.data,
                                   **{f"optimizer buffer {n!r}": b for n, b in bufs.items()}},
                       when)

    # -- persistence --------------------------------------------------------------------------------
    def save(self) -> Path:
        """Atomically write the whole training state to ``out/checkpoint.npz`` (on rank 0
        alone under MPI; the other ranks hold the same state and write nothing)."""
        self._check_state_finite()    # every rank: they hold the same state, and stop alike
        if not self.root:
            return self.out / CHECKPOINT
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
                "history": self.history, "data_fingerprint": self.data_fingerprint}
        path = self.out / CHECKPOINT
        save_checkpoint(path, arrays, meta)
        self._saved_epoch = self.epoch
        return path

    @property
    def data_fingerprint(self) -> dict:
        """:func:`minivae.data.fingerprint` of the run's data (once), saved with each
        checkpoint."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.ds)
        return self._fingerprint

    @classmethod
    def resume(cls, run_dir, dataset=None, log=None, from_epoch=None, comm=None,
               **overrides) -> "Trainer":
        """Rebuild a Trainer from ``run_dir/checkpoint.npz`` (or, with ``from_epoch=E``, from the
        kept checkpoint of epoch E: a rollback, which discards the later epochs when fit starts).

        ``overrides``: TrainConfig fields to change. Those that define the run
        (``TrainConfig.FIXED``: data, architecture, optimizer, batch size, dtype, seed,
        binarization) may only be given their saved value, else :class:`ResumeConflict`; the
        others (epochs, lr, weight_decay, momentum, beta, warmup_epochs, log_every, keep, backend,
        progress, figures, ...) apply, and ``trainer.changed`` lists them as
        {field: (old, new)}. Raises :class:`CheckpointError` for a checkpoint that is missing,
        damaged, or does not fit.

        ``comm``: as for :class:`Trainer`. Under MPI rank 0 alone reads the run directory and
        sends the checkpoint's bytes to the others (no shared file system needed); a
        checkpoint it refuses is refused on every rank with the same message.
        """
        if comm is None:
            from .engine.mpi import world

            comm = world()
        run_dir = Path(run_dir)
        src = run_dir if run_dir.is_file() else run_dir / CHECKPOINT
        if from_epoch is not None:
            kept = epoch_checkpoints(run_dir) if comm.rank == 0 else {}
            src = kept.get(from_epoch, src)

        def read_on_root():
            if from_epoch is not None and from_epoch not in kept:
                have = ", ".join(map(str, sorted(kept))) or "none"
                raise CheckpointError(f"{run_dir} keeps no checkpoint of epoch {from_epoch} "
                                      f"(kept epochs: {have})")
            return _checkpoint_bytes(src)

        data = share_bytes(comm, read_on_root, errors=(CheckpointError,))
        try:
            return cls._resume_state(src, data, run_dir, dataset, log, from_epoch, comm,
                                     overrides)
        except (CheckpointError, ResumeConflict, DataChanged) as e:
            e.all_ranks = comm.size > 1   # refused on every rank alike: the same bytes were read
            raise

    @classmethod
    def _resume_state(cls, src, data, run_dir, dataset, log, from_epoch, comm, overrides):
        """The rest of :meth:`resume`, from the checkpoint's bytes."""
        arrays, meta = load_checkpoint(src, data=data)   # the saved config is validated there
        saved = meta["train_config"]
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        for k, v in overrides.items():
            if k not in known:
                raise TypeError(f"resume() got an unknown setting {k!r}")
            if k in TrainConfig.FIXED:
                ran = _effective(k, saved.get(k), saved)
                if _effective(k, v, saved) != ran:
                    raise ResumeConflict(k, saved.get(k), v, ran)
        overrides = {k: v for k, v in overrides.items() if k not in TrainConfig.FIXED}
        try:
            TrainConfig.from_json({**saved, "out": str(run_dir)})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{src}: its training configuration is not valid ({e})") from None
        # an override that makes it invalid (say momentum with Adam) is the caller's ValueError
        cfg = TrainConfig.from_json({**saved, "out": str(run_dir), **overrides})
        t = cls(cfg, dataset=dataset, log=log, comm=comm)
        why = data_mismatch(cfg, t.ds, meta, f"the run in {run_dir}",
                            source="the dataset given" if dataset is not None else None,
                            now=t.data_fingerprint)       # computed once: the saves need it
        if why:
            raise DataChanged(f"{why}. Resume it on the data it was trained on, or start a "
                              f"new run (another --out)")
        # the model the training configuration builds must be the saved one (beta and tau
        # are the trainer's to set at every step: the KL warm-up, the temperature schedule)
        built = json.loads(strict_json(t.model.config))
        differ = [k for k, v in meta["model"].items()
                  if k not in ("beta", "tau") and built.get(k, v) != v]
        if differ or meta["dtype"] != cfg.dtype:
            saved_model = meta["model"]
            what = (f"model config ({', '.join(f'{k} {saved_model[k]!r}' for k in differ)})"
                    if differ else f"dtype {meta['dtype']}")
            raise CheckpointError(f"{src}: its {what} does not match its training "
                                  f"configuration")
        if t.model.params.layout.to_json() != meta["layout"]:
            raise CheckpointError(f"{src}: the checkpoint's parameter layout does not match "
                                  f"the configured model")
        t.model.params.load_state_dict({"layout": meta["layout"], "data": arrays["params"]})
        o = meta["optimizer"]
        try:
            bufs = {n: arrays[f"opt.{n}"] for n in o["buffers"]}
            t.opt.load_state_dict({"name": o["name"], "t": o["t"], "buffers": bufs})
        except KeyError as e:
            raise CheckpointError(f"{src}: optimizer buffer {e} is missing") from None
        except ValueError as e:
            raise CheckpointError(f"{src}: {e}") from None
        if not t.model.rng.set_state(meta["rng"]["model"]):   # checked by load_checkpoint
            t.log(f"note: the {meta['backend']} noise stream of this run cannot be restored on "
                  f"backend {t.backend.name}; training continues with a fresh stream from the seed")
        try:
            t.shuffle.bit_generator.state = meta["rng"]["shuffle"]
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{src}: the saved shuffling state is damaged ({e})") from None
        t.epoch, t.step, t.history = int(meta["epoch"]), int(meta["step"]), list(meta["history"])
        if meta["in_epoch"]:
            perm, pos = arrays["perm"], int(meta["pos"])
            if perm.shape != (t.n_train,) or not np.array_equal(np.sort(perm),
                                                                 np.arange(t.n_train)):
                raise CheckpointError(f"{src}: the saved epoch order is not a permutation of the "
                                      f"{t.n_train} training examples")
            if not 0 <= pos <= t.n_train:
                raise CheckpointError(f"{src}: saved position {pos} is outside the epoch "
                                      f"(0..{t.n_train})")
            t.perm, t.pos = perm.astype(np.int64), pos
        # each step takes at least one example: more steps than examples seen is damage
        seen = t.epoch * t.n_train + (t.pos if meta["in_epoch"] else 0)
        if t.step > seen:
            raise CheckpointError(f"{src}: step {t.step} is more steps than the {seen} training "
                                  f"examples its {t.epoch} epochs saw")
        t.sums[:] = arrays["sums"]           # checked by load_checkpoint, as history and epoch
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                    if f.name in _NEWER_FIELDS}        # what an older checkpoint ran with
        was = {k: saved.get(k, defaults.get(k)) for k in overrides}
        t.changed = {k: (was[k], v) for k, v in overrides.items()   # progress and figures
                     if k not in ("out", "progress", "figures")      # are this invocation's
                     and _norm(v) != _norm(was[k])}                   # display, not the run
        # a rollback writes the run's checkpoint from the epoch's at once and drops the later
        # epochs (fit): also onto the newest epoch, whose copy may be all that is sound
        t.rolled_back = from_epoch is not None
        t._saved_epoch = int(meta["epoch"])
        return t

    def write_metrics(self) -> None:
        """metrics.json (history + config) and metrics.csv, each replaced atomically (rank 0)."""
        if not self.root:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {"epochs": self.history, "config": self.cfg.to_json(), "model": self.model.config,
               "n_params": self.model.n_params(), "backend": self.backend.name,
               "dataset": {"name": self.ds.name, "n_train": self.n_train,
                           "n_test": int(self.x_test.shape[0])},
               "minivae": __version__}
        text = strict_json(doc, indent=1).encode()
        atomic_write(self.out / "metrics.json", lambda f: f.write(text), "metrics.json")
        if self.history:
            buf = io.StringIO(newline="")
            columns = list(dict.fromkeys(k for row in self.history for k in row))  # all, in order
            w = csv.DictWriter(buf, fieldnames=columns, restval="")
            w.writeheader()
            w.writerows(self.history)
            data = buf.getvalue().encode()
            atomic_write(self.out / "metrics.csv", lambda f: f.write(data), "metrics.csv")

    # -- epoch checkpoints: roll back a diverged run -------------------------------------------
    def epoch_checkpoints(self) -> dict:
        """{epoch: path} of the kept epoch checkpoints in ``out``."""
        return epoch_checkpoints(self.out)

    def _keep_epoch_checkpoint(self) -> None:
        """After an epoch's save: keep it as checkpoint-epochNNNN.npz (a hard link to the file
        just written, or a copy), and delete all but the last ``cfg.keep``. Rank 0 alone."""
        if self.cfg.keep < 1 or not self.root:
            return
        src, dst = self.out / CHECKPOINT, self.out / EPOCH_CHECKPOINT.format(self.epoch)
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)            # checkpoint.npz is replaced by rename, never rewritten
        except OSError:
            atomic_write(dst, lambda f: f.write(src.read_bytes()), "checkpoint")
        for e, path in sorted(self.epoch_checkpoints().items())[:-self.cfg.keep]:
            path.unlink(missing_ok=True)


EPOCH_CHECKPOINT = "checkpoint-epoch{:04d}.npz"


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _checkpoint_bytes(path: Path) -> bytes:
    """The bytes of the checkpoint file ``path``: CheckpointError where there is none, and
    CheckpointUnreadable where it exists but cannot be read (read first: a file that cannot
    be read is not a damaged checkpoint)."""
    if not path.is_file():
        raise CheckpointError(_missing(path))
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointUnreadable(f"{path}: cannot be read ({e.strerror or e})") from None


def _missing(path: Path) -> str:
    """Why there is no checkpoint file at ``path``, in a few words."""
    if path.is_dir():
        return f"no checkpoint at {path}: it is a directory, not a checkpoint file"
    if path.exists():
        return f"no checkpoint at {path}: it is not a regular file (a FIFO, socket or device)"
    return f"no checkpoint at {path}"


def _effective(field, value, saved):
    """What a setting means for the run: init None is layers.default_init (PyTorch's nn.Linear
    init for ReLU nets, else Glorot), and a data directory means nothing for the bundled
    mnist10k."""
    if field == "init" and value is None:
        from .layers import default_init

        if saved.get("latent_type") == "categorical" and \
                saved.get("activation") in ("relu", "leaky_relu"):
            return "he"                          # models.DiscreteVAE's default
        return default_init(saved.get("activation"))
    if field == "data_dir" and saved.get("data") == "mnist10k":
        return None
    if field == "optimizer" and isinstance(value, str):
        return value.lower()                     # any case names one optimizer
    return _norm(value)


def epoch_checkpoints(out) -> dict:
    """{epoch: path} of the epoch checkpoints kept in run directory ``out``: regular files
    named checkpoint-epochNNNN.npz with ASCII digits (not a directory of that name, nor
    '²', which str.isdigit takes and int() refuses)."""
    found = {}
    for p in Path(out).glob("checkpoint-epoch*.npz"):
        digits = p.name[len("checkpoint-epoch"):-len(".npz")]
        if digits.isascii() and digits.isdigit() and p.is_file():
            found[int(digits)] = p
    return found


def train(config: TrainConfig | None = None, **kw) -> Trainer:
    """Convenience: ``train(epochs=1, out="runs/t")`` -> the finished Trainer."""
    cfg = config or TrainConfig(**kw)
    t = Trainer(cfg)
    t.fit()
    return t
