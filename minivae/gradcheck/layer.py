"""Checking a layer: its gradients, plus two properties every backward pass must have.

A layer here is anything with the CS231n-shaped contract

    out, cache = layer.forward(params, x)            # or forward(params, x1, x2, ...)
    dx, grads  = layer.backward(params, dout, cache) # dx: one array per input

with ``params`` a dict of arrays. ``out`` may be one array or a tuple of arrays (then ``dout``
is a tuple too); inputs may be one array, a tuple of arrays (passed positionally, dx a tuple)
or a dict (passed by keyword, dx a dict).
"""
from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace

from .core import check_gradients
from .numeric import FLOAT_DTYPES, GradcheckError, dtype_name, to_host
from .report import Check, Report


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_layer(layer, params: dict, x, *, seed: int = 0, rtol=None, mode="auto", name=None,
                kink_check=True, **kwargs) -> Report:
    """Gradient-check ``layer`` at inputs ``x`` and ``params``, and check its backward's
    linearity and repeatability.

    The scalar is L = sum_k sum(G_k * out_k) for fixed random G_k (one per output), so
    dL/dout = G and the analytic gradients are ``backward(params, G, cache)``. Rows are named
    ``<name>.<input>`` (``x`` for one input, ``x0, x1, ...`` for a tuple, the keys of a dict)
    and ``<name>.<param>``. Other keyword arguments go to :func:`check_gradients`.

    Raises GradcheckError (ValueError) when backward returns the wrong number of input
    gradients, or when a name appears both as an input and a parameter.
    """
    if name is None:
        name = repr(layer)
        if name.startswith("<"):            # the default object repr: use the class name
            name = type(layer).__name__
    for meth in ("forward", "backward"):
        if not callable(getattr(layer, meth, None)):
            raise GradcheckError(f"{name}: a layer needs forward(params, x) and "
                                 f"backward(params, dout, cache); it has no {meth}")
    if not isinstance(params, dict):
        raise GradcheckError(f"{name}: params must be a dict name -> array; got "
                             f"{type(params).__name__}")
    if isinstance(x, dict):
        inputs, call = dict(x), (lambda p, xs: layer.forward(p, **xs))
    elif isinstance(x, (tuple, list)):
        inputs = {f"x{i}": xi for i, xi in enumerate(x)}
        call = lambda p, xs: layer.forward(p, *xs.values())  # noqa: E731
    else:
        inputs, call = {"x": x}, (lambda p, xs: layer.forward(p, xs["x"]))
    clash = set(inputs) & set(params)
    if clash:
        raise GradcheckError(f"{name}: {sorted(clash)} name both an input and a parameter")
    if not inputs:
        raise GradcheckError(f"{name}: no inputs given; x is one array, a tuple or a dict")
    for k, v in inputs.items():
        if not hasattr(v, "shape"):
            hint = (" (a list is taken as a list of inputs: pass one input as an array, "
                    "np.asarray(x), or several as a tuple of arrays)"
                    if isinstance(x, list) else "")
            raise GradcheckError(f"{name}: input {k!r} is a {type(v).__name__}, not an "
                                 f"array{hint}")
    xp = array_namespace(next(iter(inputs.values())))
    # G's stream is derived from the seed, not equal to default_rng(seed): a user's own inputs
    # drawn from default_rng(0) would otherwise be G itself.
    rng = np.random.default_rng([seed, 0x6C61796572])

    def forward():
        res = call(params, inputs)
        if not (isinstance(res, tuple) and len(res) == 2):
            raise GradcheckError(f"{name}: forward must return (out, cache); it returned "
                                 f"{type(res).__name__}")
        return res

    out, cache = forward()
    outs = _as_tuple(out)
    if not all(hasattr(o, "shape") and hasattr(o, "dtype") for o in outs):
        raise GradcheckError(f"{name}: forward's out must be an array or a tuple of arrays; got "
                             f"{type(out).__name__}")
    if not all(dtype_name(o) in FLOAT_DTYPES for o in outs):
        raise GradcheckError(f"{name}: forward's out has dtype "
                             f"{', '.join(dtype_name(o) for o in outs)}; a differentiable output "
                             f"is float32 or float64")
    dtypes = [dtype_name(o) for o in outs]
    G = tuple(xp.asarray(np.asarray(rng.standard_normal(tuple(o.shape)),
                                    dtype=FLOAT_DTYPES.get(d, np.float64)))
              for o, d in zip(outs, dtypes))
    dout = G if isinstance(out, (tuple, list)) else G[0]

    def f():
        o = _as_tuple(forward()[0])
        return float(sum(float(xp.sum(ok * gk)) for ok, gk in zip(o, G)))

    def backward(D):
        res = layer.backward(params, D, cache)
        if not (isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], dict)):
            raise GradcheckError(f"{name}: backward must return (dx, grads) with grads a dict "
                                 f"name -> array; it returned {type(res).__name__}")
        dx, grads = res
        if isinstance(x, dict):
            if not isinstance(dx, dict) or set(dx) != set(inputs):
                raise GradcheckError(f"{name}: inputs were a dict {sorted(inputs)}, so backward "
                                     f"must return dx as a dict with the same keys")
            dxs = dict(dx)
        else:
            many = _as_tuple(dx) if isinstance(x, (tuple, list)) else (dx,)
            if len(many) != len(inputs):
                raise GradcheckError(f"{name}: backward returned {len(many)} input gradients "
                                     f"for {len(inputs)} inputs")
            dxs = dict(zip(inputs, many))
        return {**dxs, **grads}

    analytic = backward(dout)
    first = {k: to_host(v).copy() for k, v in analytic.items()}
    report = check_gradients(f, {**inputs, **params}, analytic, mode=mode, rtol=rtol, seed=seed,
                             name=name, kink_check=kink_check, **kwargs)
    for c in report.checks:
        c.name = f"{name}.{c.name}"
    many = isinstance(out, (tuple, list))
    shapes = [tuple(o.shape) for o in outs]
    report += check_backward_properties(backward, shapes if many else shapes[0],
                                        dtypes if many else dtypes[0],
                                        [*inputs.values(), *G, *params.values()], name, rng,
                                        tuple_out=many, first=(dout, first))
    return report


def check_backward_properties(backward, out_shape, dtype, inputs, name, rng,
                              tuple_out=False, first=None) -> list:
    """Linearity (b(alpha G1 + gamma G2) = alpha b(G1) + gamma b(G2)) and repeatability (b(G)
    twice is identical, and nothing in ``inputs`` changes).

    backward: dout -> dict of arrays. ``out_shape``/``dtype``: one shape and dtype, or lists of
    them for a layer with several outputs (then ``tuple_out=True`` and dout is a tuple).
    ``first``: (dout, result) of an earlier call, which a repeat must reproduce too.
    Every result is copied to the host as it is returned, so a backward that reuses and
    accumulates into its output buffers is caught. Returns two :class:`Check` rows (kind
    "linearity" and "repeatability").
    """
    xp = array_namespace(inputs[0])
    shapes = list(out_shape) if tuple_out else [out_shape]
    dtypes = list(dtype) if tuple_out else [dtype]
    dts = [FLOAT_DTYPES.get(str(getattr(d, "name", d)), np.float64) for d in dtypes]

    def mk():
        G = tuple(xp.asarray(np.asarray(rng.standard_normal(s), dtype=d)) for s, d in zip(shapes, dts))
        return G if tuple_out else G[0]

    def comb(A, B):
        if tuple_out:
            return tuple(a * alpha + b * gamma for a, b in zip(A, B))
        return A * alpha + B * gamma

    G1, G2 = mk(), mk()
    alpha, gamma = 0.75, -1.25
    before = [to_host(t).copy() for t in inputs]

    def call(G):
        return {k: to_host(v).astype(np.float64) for k, v in backward(G).items()}

    b1, b2 = call(G1), call(G2)
    b12 = call(comb(G1, G2))
    b1_again = call(G1)
    pairs = [(b1_again, b1)]
    if first is not None:
        pairs.append((call(first[0]), {k: v.astype(np.float64) for k, v in first[1].items()}))
    lin_err, lin_rel, rep_err = 0.0, 0.0, 0.0
    for k in b1:
        u = b12[k]
        w = alpha * b1[k] + gamma * b2[k]
        if not u.size:
            continue
        e = float(np.max(np.abs(u - w)))
        s = float(max(np.max(np.abs(u)), np.max(np.abs(w))))
        lin_err, lin_rel = max(lin_err, e), max(lin_rel, e / s if s else 0.0)
        for again, once in pairs:
            rep_err = max(rep_err, float(np.max(np.abs(again[k] - once[k]))))
    mutated = [i for i, (t, t0) in enumerate(zip(inputs, before))
               if not np.array_equal(to_host(t), t0)]
    eps = max(float(np.finfo(d).eps) for d in dts)
    lin_tol = 64 * eps
    dname = np.dtype(max(dts, key=lambda d: np.finfo(d).eps)).name
    return [
        Check(f"{name}: backward linear in dout", bool(b1) and lin_rel <= lin_tol, lin_err,
              lin_rel, kind="linearity", mode="G1, G2", n_checked=len(b1), dtype=dname,
              note="" if lin_rel <= lin_tol else f"relative deviation {lin_rel:.2e} > {lin_tol:.1e}"),
        Check(f"{name}: backward repeatable, inputs untouched", bool(b1) and rep_err == 0.0 and
              not mutated, rep_err, 0.0, kind="repeatability", mode="twice", n_checked=len(b1),
              dtype=dname,
              note=("" if not mutated else f"backward modified input #{mutated}")),
    ]
