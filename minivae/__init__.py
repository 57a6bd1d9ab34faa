"""minivae: a from-scratch variational autoencoder with hand-written backward passes.

    from minivae import VAE, Adam
    model = VAE(backend="numpy")              # 784-400-20, ReLU, Bernoulli
    opt = Adam(model.params, lr=1e-3)
    r = model.loss_and_grads(x)               # x: (B, 784) floats in [0, 1]; the reference
    opt.step()                                # uses model.params.grad
    r = train_step(model, opt, x)             # the same step, fast (minivae.engine)
"""
__version__ = "0.1.0"

from .backend import Backend, BackendUnavailable, get_backend  # noqa: E402
from .models import VAE, Autoencoder, DiscreteVAE, LossResult, build_model  # noqa: E402
from .optim import SGD, Adagrad, Adam, make_optimizer  # noqa: E402
from .params import Layout, Params  # noqa: E402
from .engine import (DataParallel, NonFiniteStep, get_num_threads, set_num_threads,  # noqa: E402
                     train_step)
from . import gradcheck  # noqa: E402  (minivae.gradcheck.check_gradients, check_layer, ...)

__all__ = [
    "Backend", "BackendUnavailable", "get_backend", "VAE", "Autoencoder", "DiscreteVAE", "LossResult",
    "build_model", "SGD", "Adam", "Adagrad", "make_optimizer", "Layout", "Params",
    "get_num_threads", "set_num_threads", "train_step", "NonFiniteStep", "DataParallel", "gradcheck",
]
