"""One flat parameter buffer, one flat gradient buffer, and named views into each.

Why flat: the optimizer becomes a handful of whole-buffer operations (one fused kernel on a
GPU), a checkpoint is one array plus its layout, and data-parallel training would need one
all-reduce per step. Each layer only ever sees its own named views (``W``, ``b``), so layer
code does not know the buffer exists.

    layout = Layout([("enc.0.W", (784, 400)), ("enc.0.b", (400,)), ...])
    P = Params(layout, backend, "float32")
    P.data                  # (n,) all parameters
    P.grad                  # (n,) all gradients, same layout
    P.group("enc.0")        # {"W": view (784, 400), "b": view (400,)} into P.data
    P.group("enc.0", grad=True)   # the matching views into P.grad
"""
from __future__ import annotations

import math

from .backend import real_values, resolve


class Layout:
    """Ordered names, shapes and offsets of tensors packed end to end in a flat buffer."""

    def __init__(self, entries):
        self.names: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.offsets: dict[str, int] = {}
        off = 0
        for name, shape in entries:
            if name in self.shapes:
                raise ValueError(f"duplicate parameter name {name!r}")
            shape = tuple(int(s) for s in shape)
            self.names.append(name)
            self.shapes[name] = shape
            self.offsets[name] = off
            off += math.prod(shape)
        self.size = off

    def slice(self, name: str) -> slice:
        off = self.offsets[name]
        return slice(off, off + math.prod(self.shapes[name]))

    def to_json(self) -> list:
        return [[n, list(self.shapes[n])] for n in self.names]

    @classmethod
    def from_json(cls, entries) -> "Layout":
        return cls([(n, tuple(s)) for n, s in entries])

    def __eq__(self, other):
        return isinstance(other, Layout) and self.to_json() == other.to_json()

    def __repr__(self):
        return f"Layout({len(self.names)} tensors, {self.size} numbers)"


class Params:
    """The flat ``data`` and ``grad`` buffers of a model and named views into them.

    ``data``: (n,) parameters. ``grad``: (n,) gradients, overwritten by each backward pass.
    ``views[name]`` / ``grad_views[name]``: the tensor ``name`` reshaped, sharing memory.
    """

    def __init__(self, layout: Layout, backend="numpy", dtype="float32"):
        self.layout = layout
        self.backend = resolve(backend)
        xp = self.backend.xp
        self.dtype = self.backend.dtype(dtype)
        need = 2 * layout.size * (8 if "64" in str(self.dtype) else 4)      # data + grad
        have = self.backend.memory_bytes()
        if have is not None and need > have:
            raise ValueError(f"a model of {layout.size:,} parameters needs {need / 2**30:,.1f} GiB "
                             f"for its parameter and gradient buffers alone, more than the "
                             f"{have / 2**30:,.1f} GiB this machine has")
        self.data = xp.zeros((layout.size,), dtype=self.dtype)
        self.grad = xp.zeros((layout.size,), dtype=self.dtype)
        self._make_views()

    def __getstate__(self):
        # the views are rebuilt on the copy: copied as arrays of their own, they would no
        # longer share memory with its data and grad
        return {k: v for k, v in self.__dict__.items()
                if k not in ("views", "grad_views", "_groups")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._make_views()

    def _make_views(self):
        xp = self.backend.xp
        L = self.layout
        self.views = {n: xp.reshape(self.data[L.slice(n)], L.shapes[n]) for n in L.names}
        self.grad_views = {n: xp.reshape(self.grad[L.slice(n)], L.shapes[n]) for n in L.names}
        self._groups = {}  # (prefix, grad) -> dict of views; the buffers never move

    def group(self, prefix: str, grad: bool = False) -> dict:
        """Views of all tensors named ``prefix.<short>``, keyed by ``<short>`` (e.g. W, b)."""
        key = (prefix, grad)
        if key not in self._groups:
            src = self.grad_views if grad else self.views
            p = prefix + "."
            self._groups[key] = {n[len(p):]: v for n, v in src.items() if n.startswith(p)}
        return self._groups[key]

    def write_grads(self, grads: dict) -> None:
        """Copy each gradient ``{full name: array}`` into its view of ``grad``."""
        views = self.grad_views
        for name, g in grads.items():
            views[name][...] = g

    def with_own_grad(self) -> "Params":
        """A Params that shares these parameters (``data`` and its views) but has its own
        gradient buffer: what one thread of a data-parallel step writes into."""
        other = object.__new__(Params)
        other.layout, other.backend, other.dtype = self.layout, self.backend, self.dtype
        other.data = self.data
        other.grad = self.backend.xp.zeros_like(self.grad)
        other._make_views()
        return other

    def set_flat(self, values) -> None:
        """Copy a flat array (host or backend) of shape (n,) into ``data``; the views follow.
        ValueError, with nothing written, for another shape, values that are not real numbers
        (complex, strings), NaN/Inf, or numbers the dtype cannot hold (1e300 in float32)."""
        values = real_values(self.backend, values, self.dtype, "flat parameter array")
        if tuple(values.shape) != (self.layout.size,):
            raise ValueError(
                f"flat parameter array has shape {tuple(values.shape)}, expected ({self.layout.size},)"
            )
        self.data[...] = values

    def state_dict(self) -> dict:
        """Host copy of the parameters and their layout (for checkpoints)."""
        return {"layout": self.layout.to_json(), "data": self.backend.to_host(self.data).copy()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned ({"layout", "data"}); ValueError for another
        layout, a state that is not such a dict, or data :meth:`set_flat` refuses."""
        if not isinstance(state, dict) or not {"layout", "data"} <= set(state):
            raise ValueError(f"a parameter state must be a dict with 'layout' and 'data' (what "
                             f"state_dict() returns), got "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        try:
            layout = Layout.from_json(state["layout"])
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise ValueError(f"a parameter state's layout is not valid ({e})") from None
        if layout != self.layout:
            raise ValueError("checkpoint parameter layout does not match this model's layout")
        self.set_flat(state["data"])

    def __len__(self):
        return self.layout.size
