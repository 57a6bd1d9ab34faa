"""Dense layers and activations, each a forward/backward pair.

The contract (see DESIGN.md):

    out, cache = layer.forward(params, x)            # cache: exactly what backward needs
    dx, grads  = layer.backward(params, dout, cache) # never mutates its inputs

``params`` is a dict of named views (``{"W": ..., "b": ...}``; ``{}`` for activations).
``backward(..., grads=g)`` writes the parameter gradients into the given views ``g`` (views of
the model's flat gradient buffer) instead of allocating; ``need_dx=False`` skips the input
gradient (the first layer of a network does not need it).

In-place variants ``forward_`` / ``backward_`` (torch's trailing-underscore convention) may
overwrite their array argument (``x`` / ``dout``); :class:`Sequential` uses them only on
temporaries it made itself. By default they are the plain methods; ReLU overrides them with a
NumPy fast path (``np.maximum(x, 0, out=x)``), tested against the plain twin in
``tests/test_fastpath.py``. Dense writes its gradients straight into the flat buffer views with
``np.matmul(..., out=view)`` on NumPy.

Shapes: ``B`` is the batch size. A Dense layer stores ``W`` as (D_in, D_out) so the forward is
``x @ W + b`` with no transpose.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import resolve


class Layer:
    """Base: holds the array namespace; no parameters, no hidden state between calls."""

    def __init__(self, backend="numpy"):
        self.backend = resolve(backend)
        self.xp = self.backend.xp

    def param_shapes(self) -> dict:
        return {}

    def init(self, params: dict, rng) -> None:
        """Fill the parameter views in place (no-op for activations)."""

    def forward_(self, params, x):
        """``forward`` that may overwrite ``x`` (a temporary the caller will not reuse)."""
        return self.forward(params, x)

    def backward_(self, params, dout, cache, grads=None, need_dx=True):
        """``backward`` that may overwrite ``dout`` (a temporary the caller will not reuse)."""
        return self.backward(params, dout, cache, grads=grads, need_dx=need_dx)

    def __repr__(self):
        return type(self).__name__ + "()"


INITS = ("he", "glorot", "torch")


class Dense(Layer):
    """Affine map ``out = x @ W + b``.

    x: (B, D_in) -> out: (B, D_out);  W: (D_in, D_out), b: (D_out,)

    Backward, with G = dL/dout (B, D_out):
        dL/dx = G @ W.T          (B, D_in)
        dL/dW = x.T @ G          (D_in, D_out)
        dL/db = sum_B G          (D_out,)
    """

    def __init__(self, d_in: int, d_out: int, init: str = "he", backend="numpy"):
        super().__init__(backend)
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        self.d_in, self.d_out, self.init_scheme = int(d_in), int(d_out), init

    def __repr__(self):
        return f"Dense({self.d_in}, {self.d_out}, init={self.init_scheme!r})"

    def param_shapes(self) -> dict:
        return {"W": (self.d_in, self.d_out), "b": (self.d_out,)}

    def init(self, params, rng):
        """He: W ~ N(0, 2/D_in), b = 0 (for ReLU nets). Glorot: W ~ U(+-sqrt(6/(D_in+D_out))),
        b = 0. Torch: W, b ~ U(+-1/sqrt(D_in)), PyTorch's nn.Linear default."""
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

    def backward(self, params, dout, cache, grads=None, need_dx=True):
        xp, x = self.xp, cache
        if grads is not None and self.backend.name == "numpy":
            return _dense_backward_numpy(params, dout, x, grads, need_dx)
        dW = xp.matmul(xp.matrix_transpose(x), dout)
        db = xp.sum(dout, axis=0)
        if grads is None:
            grads = {"W": dW, "b": db}
        else:
            grads["W"][...] = dW
            grads["b"][...] = db
        dx = xp.matmul(dout, xp.matrix_transpose(params["W"])) if need_dx else None
        return dx, grads


def _dense_backward_numpy(params, dout, x, grads, need_dx):
    """NumPy twin of Dense.backward: the products land straight in the gradient views."""
    np.matmul(x.T, dout, out=grads["W"])
    np.sum(dout, axis=0, out=grads["b"])
    dx = np.matmul(dout, params["W"].T) if need_dx else None
    return dx, grads


class Activation(Layer):
    """Elementwise ``out = f(x)``, x: (B, D) -> out: (B, D); no parameters."""

    def backward(self, params, dout, cache, grads=None, need_dx=True):
        return self._dx(dout, cache), ({} if grads is None else grads)


class ReLU(Activation):
    """f(x) = max(x, 0);  f'(x) = 1 if x > 0 else 0 (the kink at 0 takes the 0 branch)."""

    def forward(self, params, x):
        out = self.xp.maximum(x, 0.0)
        return out, out  # out > 0 exactly where x > 0

    def _dx(self, dout, out):
        return dout * self.xp.astype(out > 0.0, dout.dtype)

    # NumPy fast path: no new (B, D) arrays at all
    def forward_(self, params, x):
        if self.backend.name != "numpy":
            return self.forward(params, x)
        np.maximum(x, 0.0, out=x)
        return x, x

    def backward_(self, params, dout, cache, grads=None, need_dx=True):
        if self.backend.name != "numpy":
            return self.backward(params, dout, cache, grads=grads, need_dx=need_dx)
        np.multiply(dout, cache > 0.0, out=dout)
        return dout, ({} if grads is None else grads)


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

    def _dx(self, dout, x):
        return self.xp.where(x > 0.0, dout, dout * self.alpha)


class Tanh(Activation):
    """f(x) = tanh(x);  f'(x) = 1 - tanh(x)^2 (from the cached output)."""

    def forward(self, params, x):
        out = self.xp.tanh(x)
        return out, out

    def _dx(self, dout, out):
        return dout * (1.0 - out * out)


class Sigmoid(Activation):
    """f(x) = 1 / (1 + exp(-x));  f'(x) = f(x) (1 - f(x))."""

    def forward(self, params, x):
        out = sigmoid(self.xp, x)
        return out, out

    def _dx(self, dout, out):
        return dout * out * (1.0 - out)


class Softplus(Activation):
    """f(x) = log(1 + exp(x));  f'(x) = sigmoid(x)."""

    def forward(self, params, x):
        return softplus(self.xp, x), x

    def _dx(self, dout, x):
        return dout * sigmoid(self.xp, x)


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
        """P: Params. x: (B, D_in) -> out: (B, D_out), caches: list.

        A layer right after a Dense gets the Dense output, a fresh array nothing else holds,
        so it may work in place (``forward_``); the caller's ``x`` is never written to.
        """
        caches = []
        for i, (name, layer) in enumerate(self):
            owned = i > 0 and isinstance(self.layers[i - 1], Dense)
            fwd = layer.forward_ if owned else layer.forward
            x, c = fwd(P.group(name), x)
            caches.append(c)
        return x, caches

    def backward(self, P, dout, caches, need_dx=True, overwrite_dout=False):
        """Writes every parameter gradient into P.grad; returns dL/dx (or None).

        ``overwrite_dout=True``: the caller hands over ``dout`` as scratch space. Below the
        last layer dout is always a temporary made here, so those layers may work in place.
        """
        for i in reversed(range(len(self.layers))):
            name, layer = self.names[i], self.layers[i]
            first, last = i == 0, i == len(self.layers) - 1
            bwd = layer.backward_ if overwrite_dout or not last else layer.backward
            dout, _ = bwd(
                P.group(name), dout, caches[i], grads=P.group(name, grad=True),
                need_dx=need_dx or not first,
            )
        return dout


def mlp(sizes, activation="relu", out_activation=None, prefix="mlp", init=None, backend="numpy"):
    """Dense layers between consecutive ``sizes`` with ``activation`` between them.

    mlp([784, 400, 40]) -> Dense(784,400), ReLU, Dense(400,40). Parameter names are
    ``{prefix}.{i}.W`` / ``.b`` with i the layer index. ``activation=None`` gives a purely
    linear map. He init for ReLU-like, Glorot otherwise, unless ``init`` says.
    """
    if len(sizes) < 2:
        raise ValueError("mlp needs at least an input and an output size")
    if any(int(s) < 1 for s in sizes):
        raise ValueError(f"layer sizes must be positive, got {list(sizes)}")
    init = init or ("he" if activation in ("relu", "leaky_relu") else "glorot")
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append((f"{prefix}.{len(layers)}", Dense(a, b, init=init, backend=backend)))
        last = i == len(sizes) - 2
        act = out_activation if last else activation
        if act is not None:
            layers.append((f"{prefix}.{len(layers)}", make_activation(act, backend)))
    return Sequential(layers)
