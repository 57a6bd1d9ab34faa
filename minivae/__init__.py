"""minivae: a from-scratch variational autoencoder with hand-written backward passes.

    from minivae import VAE, Adam
    model = VAE(backend="numpy")              # 784-400-20, ReLU, Bernoulli
    opt = Adam(model.params, lr=1e-3)
    r = model.loss_and_grads(x)               # x: (B, 784) floats in [0, 1]; the reference
    opt.step()                                # uses model.params.grad
    r = train_step(model, opt, x)             # the same step, fast (minivae.engine)
"""
__version__ = "0.1.0"

# The names below are imported on first use (PEP 562), not with the package: `minivae`
# on the command line then installs its signal handlers before NumPy and the rest load,
# so that Ctrl-C in its first quarter second is one line, not a traceback. The engine
# registers its twins when anything imports it (train_step, DataParallel, the trainer).
_LAZY = {
    "Backend": "backend", "BackendUnavailable": "backend", "get_backend": "backend",
    "VAE": "models", "Autoencoder": "models", "DiscreteVAE": "models", "LossResult": "models",
    "build_model": "models", "SGD": "optim", "Adam": "optim", "Adagrad": "optim",
    "make_optimizer": "optim", "Layout": "params", "Params": "params",
    "DataParallel": "engine", "NonFiniteStep": "engine", "get_num_threads": "engine",
    "set_num_threads": "engine", "train_step": "engine", "gradcheck": None,
}

__all__ = [
    "Backend", "BackendUnavailable", "get_backend", "VAE", "Autoencoder", "DiscreteVAE", "LossResult",
    "build_model", "SGD", "Adam", "Adagrad", "make_optimizer", "Layout", "Params",
    "get_num_threads", "set_num_threads", "train_step", "NonFiniteStep", "DataParallel", "gradcheck",
]


def __getattr__(name):
    import importlib

    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
        value = module if _LAZY[name] is None else getattr(module, name)
    elif not name.startswith("__"):
        try:                                  # a submodule: minivae.engine, minivae.data, ...
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
