"""Dense layers and activations, each a forward/backward pair (the reference maths).

The contract (CS231n's assignment layers, made explicit):

    out, cache = layer.forward(params, x)             # cache: exactly what backward needs
    dx, grads  = layer.backward(params, dout, cache)  # never mutates its inputs

``params`` is a dict of named arrays (``{"W": ..., "b": ...}``; ``{}`` for activations);
``dout`` = dL/dout, the upstream gradient, has the shape of ``out``; ``grads`` is a dict of new
arrays shaped like ``params`` (``{}`` for activations). Shapes: ``B`` is the batch size. A Dense
layer stores ``W`` as (D_in, D_out), so the forward is ``x @ W + b`` with no transpose.

Everything here is written against the array API (``self.xp``): it runs unchanged on NumPy,
CuPy and array-api-strict. The faster NumPy forms of these functions (in place, straight into
the flat gradient buffer) live in :mod:`minivae.engine`, each tied to the function here by a
test; nothing here imports them.
"""
from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod

from .backend import Picklable, resolve


class Layer(Picklable, ABC):
    """Base: holds the array namespace; no parameters, no hidden state between calls."""

    def __init__(self, backend="numpy"):
        self.backend = resolve(backend)
        self.xp = self.backend.xp

    def param_shapes(self) -> dict:
        return {}

    def init(self, params: dict, rng) -> None:
        """Fill the parameter views in place (no-op for activations)."""

    @abstractmethod
    def forward(self, params, x):
        """x: (B, D_in) -> (out (B, D_out), cache)."""

    @abstractmethod
    def backward(self, params, dout, cache):
        """dout: dL/dout (B, D_out) -> (dL/dx (B, D_in), {name: dL/dparam})."""

    def __repr__(self):
        return type(self).__name__ + "()"


INITS = ("he", "glorot", "torch")
"""The weight initialisations (``init=`` of :class:`Dense`, :func:`mlp`, the models, ``--init``):

- ``"torch"``: PyTorch's ``nn.Linear`` default, ``kaiming_uniform_(W, a=sqrt(5))``, which is
  W ~ U(+-1/sqrt(D_in)), and b ~ U(+-1/sqrt(D_in)). minivae's default for ReLU nets, chosen by
  benchmarks/quality.py (README "Quality"): with it minivae matches the PyTorch example VAE on
  mnist10k and on full Fashion-MNIST, where He trails it by 1.5 nats (5 seeds).
- ``"he"``: He et al. 2015, "Delving deep into rectifiers": W ~ N(0, 2/D_in), b = 0.
- ``"glorot"``: Glorot & Bengio 2010, "Understanding the difficulty of training deep
  feedforward neural networks": W ~ U(+-sqrt(6/(D_in + D_out))), b = 0. The default for nets
  without a ReLU-like activation (tanh, sigmoid, softplus, linear).
"""


def default_init(activation) -> str:
    """The init used when none is named: "torch" for ReLU-like nets, "glorot" otherwise."""
    return "torch" if activation in ("relu", "leaky_relu") else "glorot"


class Dense(Layer):
    """Affine map ``out = x @ W + b``.

    x: (B, D_in) -> out: (B, D_out);  W: (D_in, D_out), b: (D_out,)

    Backward, with G = dL/dout (B, D_out):
        dL/dx = G @ W.T          (B, D_in)
        dL/dW = x.T @ G          (D_in, D_out)
        dL/db = sum_B G          (D_out,)
    """

    def __init__(self, d_in: int, d_out: int, init: str = "torch", backend="numpy"):
        super().__init__(backend)
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        self.d_in, self.d_out, self.init_scheme = _width(d_in, "d_in"), _width(d_out, "d_out"), init

    def __repr__(self):
        return f"Dense({self.d_in}, {self.d_out}, init={self.init_scheme!r})"

    def param_shapes(self) -> dict:
        return {"W": (self.d_in, self.d_out), "b": (self.d_out,)}

    def init(self, params, rng):
        """Torch (the default): W, b ~ U(+-1/sqrt(D_in)), PyTorch's nn.Linear default
        (kaiming_uniform_ with a = sqrt(5)). He (He et al. 2015): W ~ N(0, 2/D_in), b = 0.
        Glorot (Glorot & Bengio 2010): W ~ U(+-sqrt(6/(D_in+D_out))), b = 0. See INITS."""
        W, b = params["W"], params["b"]
        if self.init_scheme == "he":
            W[...] = rng.normal(W.shape, W.dtype) * math.sqrt(2.0 / self.d_in)
            b[...] = 0.0
        elif self.init_scheme == "glorot":
            a = math.sqrt(6.0 / (self.d_in + self.d_out))
            W[...] = (rng.uniform(W.shape, W.dtype) * 2.0 - 1.0) * a
            b[...] = 0.0
        else:
            a = 1.0 / math.sqrt(self.d_in)
            W[...] = (rng.uniform(W.shape, W.dtype) * 2.0 - 1.0) * a
            b[...] = (rng.uniform(b.shape, b.dtype) * 2.0 - 1.0) * a

    def forward(self, params, x):
        out = self.xp.matmul(x, params["W"])
        out += params["b"]  # in place: no second (B, D_out) temporary
        return out, x

    def backward(self, params, dout, cache):
        xp, x = self.xp, cache
        dx = xp.matmul(dout, xp.matrix_transpose(params["W"]))     # G W^T   (B, D_in)
        dW = xp.matmul(xp.matrix_transpose(x), dout)                # x^T G   (D_in, D_out)
        db = xp.sum(dout, axis=0)                                   # sum_B G (D_out,)
        return dx, {"W": dW, "b": db}


class Activation(Layer):
    """Elementwise ``out = f(x)``, x: (B, D) -> out: (B, D); no parameters, so backward
    returns dL/dx = dout * f'(x) and no gradients ({})."""


class ReLU(Activation):
    """f(x) = max(x, 0);  f'(x) = 1 if x > 0 else 0 (the kink at 0 takes the 0 branch)."""

    def forward(self, params, x):
        out = self.xp.maximum(x, 0.0)
        return out, out  # out > 0 exactly where x > 0

    def backward(self, params, dout, out):
        return dout * self.xp.astype(out > 0.0, dout.dtype), {}


class LeakyReLU(Activation):
    """f(x) = x if x > 0 else a*x;  f'(x) = 1 or a."""

    def __init__(self, alpha: float = 0.01, backend="numpy"):
        super().__init__(backend)
        self.alpha = float(alpha)

    def __repr__(self):
        return f"LeakyReLU({self.alpha})"

    def forward(self, params, x):
        out = self.xp.where(x > 0.0, x, x * self.alpha)
        return out, x

    def backward(self, params, dout, x):
        return self.xp.where(x > 0.0, dout, dout * self.alpha), {}


class Tanh(Activation):
    """f(x) = tanh(x);  f'(x) = 1 - tanh(x)^2 (from the cached output)."""

    def forward(self, params, x):
        out = self.xp.tanh(x)
        return out, out

    def backward(self, params, dout, out):
        return dout * (1.0 - out * out), {}


class Sigmoid(Activation):
    """f(x) = 1 / (1 + exp(-x));  f'(x) = f(x) (1 - f(x))."""

    def forward(self, params, x):
        out = sigmoid(self.xp, x)
        return out, out

    def backward(self, params, dout, out):
        return dout * out * (1.0 - out), {}


class Softplus(Activation):
    """f(x) = log(1 + exp(x));  f'(x) = sigmoid(x)."""

    def forward(self, params, x):
        return softplus(self.xp, x), x

    def backward(self, params, dout, x):
        return dout * sigmoid(self.xp, x), {}


def sigmoid(xp, x):
    """Overflow-free logistic: exp only ever sees -|x|."""
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


def softplus(xp, x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), exact for large |x|."""
    return xp.maximum(x, 0.0) + xp.log1p(xp.exp(-xp.abs(x)))


ACTIVATIONS = {
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "tanh": Tanh,
    "sigmoid": Sigmoid,
    "softplus": Softplus,
}


def make_activation(name: str, backend="numpy") -> Activation:
    try:
        return ACTIVATIONS[name](backend=backend)
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}") from None


class Sequential:
    """Named layers applied in order. ``names[i]`` prefixes layer i's parameters.

    forward: (params_by_name, x) -> (out, caches); backward walks the caches in reverse.
    """

    def __init__(self, named_layers):
        self.names = [n for n, _ in named_layers]
        self.layers = [l for _, l in named_layers]

    def __iter__(self):
        return iter(zip(self.names, self.layers))

    def param_entries(self):
        """(full_name, shape) for every parameter, in order (feeds params.Layout)."""
        return [(f"{n}.{p}", s) for n, l in self for p, s in l.param_shapes().items()]

    def forward(self, P, x):
        """P: Params. x: (B, D_in) -> (out (B, D_out), caches: one per layer)."""
        caches = []
        for name, layer in self:
            x, cache = layer.forward(P.group(name), x)
            caches.append(cache)
        return x, caches

    def backward(self, P, dout, caches):
        """dout: dL/dout (B, D_out) -> (dL/dx (B, D_in), {full parameter name: gradient}).

        The chain rule, layer by layer from the last: each layer turns dL/d(its output) into
        dL/d(its input), which is the previous layer's dL/d(output).
        """
        grads = {}
        for (name, layer), cache in reversed(list(zip(self, caches))):
            dout, g = layer.backward(P.group(name), dout, cache)
            grads.update({f"{name}.{p}": v for p, v in g.items()})
        return dout, grads


def _width(n, name) -> int:
    """A layer width: a whole number >= 1 (2.7, True and "400" are refused, not truncated)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be a whole number, got {n!r}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return int(n)


def mlp(sizes, activation="relu", out_activation=None, prefix="mlp", init=None, backend="numpy"):
    """Dense layers between consecutive ``sizes`` with ``activation`` between them.

    mlp([784, 400, 40]) -> Dense(784,400), ReLU, Dense(400,40). Parameter names are
    ``{prefix}.{i}.W`` / ``.b`` with i the layer index. ``activation=None`` gives a purely
    linear map. Init: ``init``, else :func:`default_init` (PyTorch's nn.Linear default for
    ReLU-like, Glorot otherwise).
    """
    if not isinstance(sizes, (list, tuple)) or len(sizes) < 2:
        raise ValueError(f"mlp needs a list of at least an input and an output size, got "
                         f"{sizes!r}")
    sizes = [_width(n, "each layer size") for n in sizes]
    init = init or default_init(activation)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append((f"{prefix}.{len(layers)}", Dense(a, b, init=init, backend=backend)))
        last = i == len(sizes) - 2
        act = out_activation if last else activation
        if act is not None:
            layers.append((f"{prefix}.{len(layers)}", make_activation(act, backend)))
    return Sequential(layers)
