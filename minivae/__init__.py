"""minivae: a from-scratch variational autoencoder with hand-written backward passes.

    from minivae import VAE, Adam
    model = VAE(backend="numpy")              # 784-400-20, ReLU, Bernoulli
    opt = Adam(model.params, lr=1e-3)
    r = model.loss_and_grads(x)               # x: (B, 784) floats in [0, 1]; the reference
    opt.step()                                # uses model.params.grad
    r = train_step(model, opt, x)             # the same step, fast (minivae.engine)

``import minivae`` imports no submodule: the names below load on first use (see
:mod:`minivae._lazy` for why).
"""
import typing as _typing

from ._lazy import lazy_names as _lazy_names

__version__ = "0.1.0"

__all__ = [
    "Backend", "BackendUnavailable", "get_backend", "VAE", "Autoencoder", "DiscreteVAE", "LossResult",
    "build_model", "SGD", "Adam", "Adagrad", "make_optimizer", "Layout", "Params",
    "get_num_threads", "set_num_threads", "train_step", "NonFiniteStep", "DataParallel", "gradcheck",
]

__getattr__, __dir__ = _lazy_names(__name__, {
    "Backend": "backend", "BackendUnavailable": "backend", "get_backend": "backend",
    "VAE": "models", "Autoencoder": "models", "DiscreteVAE": "models", "LossResult": "models",
    "build_model": "models",
    "SGD": "optim", "Adagrad": "optim", "Adam": "optim", "make_optimizer": "optim",
    "Layout": "params", "Params": "params",
    "DataParallel": "engine", "NonFiniteStep": "engine", "get_num_threads": "engine",
    "set_num_threads": "engine", "train_step": "engine",
    "gradcheck": "gradcheck",        # minivae.gradcheck.check_gradients, check_layer, ...
})

if _typing.TYPE_CHECKING:                    # what the names are, for type checkers and editors
    from . import gradcheck
    from .backend import Backend, BackendUnavailable, get_backend
    from .engine import (DataParallel, NonFiniteStep, get_num_threads, set_num_threads,
                         train_step)
    from .models import VAE, Autoencoder, DiscreteVAE, LossResult, build_model
    from .optim import SGD, Adagrad, Adam, make_optimizer
    from .params import Layout, Params
