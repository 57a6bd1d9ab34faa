"""The step plan: the NumPy twins' forward/backward pass with its arrays made once per batch size
and its work done by straight calls to the compiled kernels.

:func:`minivae.engine.numpy_twins.vae_forward_backward` (and the autoencoder's) walk the model's
layers at every step: they look each twin up, ask whether a Dense and the ReLU after it can
fuse, test every array's layout, and allocate every activation and gradient temporary again.
At batch 128 on the default 784-400-20 VAE that Python is about 0.1 ms of a 2.4 ms step
(measured on 2 cores; ``benchmarks/profile_step.py``). A plan does the walking once: for one
Params, batch size and dtype it records the model's layers, makes every buffer the pass needs,
and from then on a step is the same products and kernel calls, in the same order, on the same
numbers, with none of the deciding in between.

It is a twin of a twin, with the same rule: the same numbers to the bit as the pass it
replaces (``tests/test_plan.py`` holds them together on many shapes, batch sizes, dtypes and
thread counts, and through training). It applies only where that pass would take its fastest
route anyway, and otherwise returns None, having written nothing, so that the generic pass
runs:

- the compiled kernels built and on, with NumPy's own exp/log1p/add loops found
  (:func:`kernels.numpy_loops`), and ``numpy_twins.FUSE`` on;
- a VAE (Gaussian latent) or an Autoencoder, of exactly those classes, with a Bernoulli
  likelihood, whose encoder and decoder are Dense layers each followed by at most one ReLU,
  and end with a Dense;
- x a C-contiguous (B, D) array of the model's dtype (float32 or float64), eps (VAE) a
  C-contiguous (B, L) array of it, B >= 1, and ``beta / n`` a Python float;
- a plan's buffers at most :data:`MAX_BYTES` (bigger batches spend a smaller share of their
  step in Python, and a plan would hold their memory between steps);
- nobody else running the same plan right now (two threads on one Params: the second one
  takes the generic pass rather than share buffers).

Where it can, a plan runs its pass as one compiled call (:meth:`Plan.compiled`,
``_kernels.run_plan``): the same products through the cblas_?gemm that NumPy's matmul calls,
with the arguments NumPy gives it, and the same kernels, in the same order, on the same arrays,
so the same numbers to the bit again (``tests/test_plan.py`` runs every case both ways). What
that saves is the Python between the ~25 calls, which after each product runs with cold caches:
at batch 128 on the default VAE, 2 cores, the step went from 3.13 to 2.92 ms (interleaved A/B,
``benchmarks/ab_step_time.py``). :meth:`Plan.run_python`, the calls one by one, is its twin and
runs wherever a product is not one NumPy would give to gemm as it stands (a layer 1 wide, batch
1).

A plan is made again when the model it was made for has changed since: another likelihood
(``model.px = ...``) or other layer objects, or other parameter and gradient buffers.

What a plan keeps between steps is scratch only: every array the pass returns (the per-row
loss, reconstruction and KL) is made fresh at each call, so that no caller's result is
overwritten by the next step. At most :data:`MAX_PLANS` plans are kept per Params (one batch
size for training, one for the last short batch of an epoch), the oldest dropped first.
"""
from __future__ import annotations

import os
import threading
import weakref

import numpy as np

from .. import losses
from ..layers import Dense, ReLU
from ..models import VAE, Autoencoder
from . import kernels

ENABLED = True              # False: every step takes the generic pass (tests compare the two)
COMPILED = True             # False: a plan runs its calls from Python (Plan.run), not in one
                            # compiled call (Plan.compiled); tests compare the two
MAX_BYTES = 32 * 2**20      # a plan's buffers at most (32 MiB: batch ~2000 on the default VAE)
MAX_PLANS = 2               # plans kept per Params

_plans: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # Params -> {key: Plan}
_plans_lock = threading.Lock()


def forward_backward(model, P, x, eps, n, small_rows, long_inner):
    """The pass through a plan -> (loss_b, recon, kl), each a fresh (B,) array, with the
    gradient written into ``P.grad``; or None, with nothing written, where no plan applies
    (see the module's docstring). ``small_rows`` and ``long_inner``: where
    :func:`numpy_twins.input_grad` takes its transposed form (passed in, so that the two can
    never disagree)."""
    if not (ENABLED and kernels.enabled() and kernels.numpy_loops()):
        return None
    if type(x) is not np.ndarray or x.ndim != 2 or not x.flags.c_contiguous or x.shape[0] < 1:
        return None
    if type(model) is VAE and not (type(eps) is np.ndarray and eps.dtype == x.dtype
                                   and eps.shape == (x.shape[0], model.latent)
                                   and eps.flags.c_contiguous
                                   and type(model.beta / n) is float):
        return None                   # before any plan is made: it could never run on these
    key = (type(model), x.shape, x.dtype)
    with _plans_lock:
        table = _plans.get(P)
        if table is None:
            table = _plans[P] = {}
        plan = table.get(key)
    if plan is None or plan.model() is not model or plan.data is not P.data or \
            plan.grad is not P.grad or plan.structure != _structure(model):
        plan = Plan.build(model, P, x.shape[0], x.dtype, small_rows, long_inner)
        if plan is None:
            return None
        with _plans_lock:
            table.pop(key, None)
            while len(table) >= MAX_PLANS:
                table.pop(next(iter(table)))
            table[key] = plan
    if not plan.lock.acquire(blocking=False):
        return None
    try:
        return plan.run(model, x, eps, n)
    finally:
        plan.lock.release()


def _after_fork_in_child() -> None:
    """A forked child starts with no plans: a plan's lock may have been held by a thread of
    the parent, which does not exist here, and would stay held for good."""
    global _plans, _plans_lock
    _plans, _plans_lock = weakref.WeakKeyDictionary(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _structure(model) -> tuple:
    """What a plan was made from and must find again at every call: the likelihood and the
    layers (objects a user may replace: ``model.px = ...``), and the latent width."""
    enc, dec = model.encoder, model.decoder
    return (model.px, enc, tuple(enc.layers), tuple(enc.names), dec, tuple(dec.layers),
            tuple(dec.names), getattr(model, "latent", None))


def _stack(net):
    """[(name, relu)] for a Sequential of Dense layers each followed by at most one ReLU and
    ending with a Dense, or None for any other net."""
    out, layers, names = [], net.layers, net.names
    i = 0
    while i < len(layers):
        if type(layers[i]) is not Dense:
            return None
        relu = i + 1 < len(layers) and type(layers[i + 1]) is ReLU
        out.append((names[i], relu))
        i += 2 if relu else 1
    return out if out and not out[-1][1] else None


class _Layer:
    """One Dense (and its ReLU): its parameter and gradient views, and its output buffer."""

    __slots__ = ("W", "b", "gW", "gb", "relu", "out", "flat", "rows", "cols", "dx", "dxT")

    def __init__(self, P, name, relu, B, dtype):
        g, gg = P.group(name), P.group(name, grad=True)
        self.W, self.b, self.gW, self.gb, self.relu = g["W"], g["b"], gg["W"], gg["b"], relu
        self.rows, self.cols = B, self.W.shape[1]
        self.out = np.empty((B, self.cols), dtype=dtype)
        self.flat = self.out.reshape(-1)
        self.dx = self.dxT = None         # dL/d(input) buffers, where a pass needs them


class Plan:
    """One model's pass for one Params, batch size and dtype: its layers and buffers."""

    @classmethod
    def build(cls, model, P, B, dtype, small_rows, long_inner):
        """A plan, or None where the module's conditions do not hold (nothing is kept)."""
        kind = type(model)
        if kind not in (VAE, Autoencoder) or type(model.px) is not losses.Bernoulli:
            return None
        if dtype not in (np.float32, np.float64) or np.dtype(dtype) != P.dtype:
            return None
        enc, dec = _stack(model.encoder), _stack(model.decoder)
        if enc is None or dec is None:
            return None
        self = cls()
        # the model weakly: it holds P, and the table's values must not keep its keys alive
        self.model = weakref.ref(model)
        self.structure = _structure(model)
        self.data, self.grad, self.B, self.dtype = P.data, P.grad, B, dtype
        self.lock = threading.Lock()
        self._program = _UNBUILT      # the compiled pass, or None (Plan.compiled)
        self.enc = [_Layer(P, name, relu, B, dtype) for name, relu in enc]
        self.dec = [_Layer(P, name, relu, B, dtype) for name, relu in dec]
        self.D = self.dec[-1].cols
        if self.enc[0].W.shape[0] != self.D:
            return None
        self.vae = kind is VAE
        if self.vae:
            L = self.L = model.latent
            if self.enc[-1].cols != 2 * L or self.dec[0].W.shape[0] != L:
                return None
            self.z, self.sigma, self.var = (np.empty((B, L), dtype=dtype) for _ in range(3))
            self.dh = np.empty((B, 2 * L), dtype=dtype)
            self.dec_in = self.z
        else:
            self.dec_in = self.enc[-1].out
        self.e, self.t, self.dl = (np.empty((B, self.D), dtype=dtype) for _ in range(3))
        # input gradients: every decoder layer (the first one's is dL/dz, or dL/dcode), every
        # encoder layer but the first (nobody needs dL/dx)
        transposed = dtype == np.float32 and B <= small_rows
        for layer in self.dec + self.enc[1:]:
            d_in = layer.W.shape[0]
            layer.dx = np.empty((B, d_in), dtype=dtype)
            if transposed and layer.cols >= long_inner:
                layer.dxT = np.empty((d_in, B), dtype=dtype)
        if self.nbytes() > MAX_BYTES:
            return None
        return self

    def nbytes(self) -> int:
        arrays = [self.e, self.t, self.dl] + [
            a for layer in self.enc + self.dec for a in (layer.out, layer.dx, layer.dxT)
            if a is not None]
        if self.vae:
            arrays += [self.z, self.sigma, self.var, self.dh]
        return sum(a.nbytes for a in arrays)

    # -- the pass ---------------------------------------------------------------------------
    def _forward(self, layers, a, parts, last_bias=True):
        """Dense (+ ReLU) layers from input a; the last layer's bias is left to the caller
        when ``last_bias`` is False. -> the layers' inputs, in order (their caches)."""
        inputs, c, mm = [], kernels._c, np.matmul
        for k, layer in enumerate(layers):
            inputs.append(a)
            mm(a, layer.W, out=layer.out)
            if layer.relu:
                c.bias_relu(layer.flat, layer.b, layer.rows, layer.cols, parts)
            elif last_bias or k < len(layers) - 1:
                layer.out += layer.b                    # Dense.forward's own in-place add
            a = layer.out
        return inputs

    def _backward(self, layers, inputs, G, parts, need_dx, last_bias_done=False):
        """Down the Dense (+ ReLU) layers from G = dL/d(last output), which the pass owns and
        may write over -> dL/d(first input) (None without ``need_dx``)."""
        c, mm = kernels._c, np.matmul
        for k in range(len(layers) - 1, -1, -1):
            layer = layers[k]
            if layer.relu:                              # the ReLU's mask and this bias, fused
                c.relu_grad_bias(G.reshape(-1), layer.flat, G.reshape(-1), layer.gb,
                                 layer.rows, layer.cols, parts)
            elif not (last_bias_done and k == len(layers) - 1):
                np.sum(G, axis=0, out=layer.gb)
            mm(inputs[k].T, G, out=layer.gW)
            if k == 0 and not need_dx:
                return None
            if layer.dxT is not None:                   # numpy_twins.input_grad's other form
                mm(layer.W, G.T, out=layer.dxT)
                np.copyto(layer.dx, layer.dxT.T)
            else:
                mm(G, layer.W.T, out=layer.dx)
            G = layer.dx
        return G

    def run(self, model, x, eps, n):
        """-> (loss_b, recon, kl); the gradient written into the Params' grad buffer. In one
        compiled call where it can (:meth:`compiled`), else the calls below from Python."""
        program = self.compiled() if COMPILED else None
        if program is not None and x.flags.aligned:   # NumPy's matmul copies an unaligned
            # operand before it calls gemm (and x.T then goes to gemm untransposed): run_python
            return self._run_compiled(program, model, x, eps, n, kernels.current_parts())
        return self.run_python(model, x, eps, n)

    def run_python(self, model, x, eps, n):
        """The pass, call by call: the reference for :meth:`compiled`."""
        B, c = self.B, kernels._c
        if self.vae:                  # eps and beta / n were checked by forward_backward
            L, s = self.L, model.beta / n
        parts = kernels.current_parts()
        enc_in = self._forward(self.enc, x, parts)
        h = self.enc[-1].out
        if self.vae:
            kl = np.empty(B, dtype=self.dtype)
            c.gaussian_latent(h.reshape(-1), eps.reshape(-1), self.z.reshape(-1),
                              self.sigma.reshape(-1), self.var.reshape(-1), kl, B, L)
        dec_in = self._forward(self.dec, self.dec_in, parts, last_bias=False)
        last = self.dec[-1]
        recon = np.empty(B, dtype=self.dtype)
        xf, ef = x.reshape(-1), self.e.reshape(-1)
        c.bernoulli_nll_rows(last.flat, last.b, xf, ef, self.t.reshape(-1), recon, B, self.D,
                             parts)
        if self.vae:
            loss_b = recon + model.beta * kl
        else:
            loss_b, kl = recon, np.zeros_like(recon)
        c.bernoulli_nll_grad_db(last.flat, xf, ef, self.dl.reshape(-1), 1.0 / n, last.gb, B,
                                self.D, parts)
        d = self._backward(self.dec, dec_in, self.dl, parts, True, last_bias_done=True)
        if self.vae:
            c.gaussian_latent_backward(d.reshape(-1), h.reshape(-1), self.sigma.reshape(-1),
                                       eps.reshape(-1), self.var.reshape(-1), s,
                                       self.dh.reshape(-1), B, L)
            d = self.dh
        self._backward(self.enc, enc_in, d, parts, False)
        return loss_b, recon, kl

    # -- the same pass as one compiled call ------------------------------------------------
    def compiled(self):
        """The pass of :meth:`run_python` as a program for ``_kernels.run_plan``: the same
        products, through the cblas_?gemm NumPy's matmul calls, with the arguments NumPy
        gives it, and the same kernels, in the same order, on the same arrays (the number of
        team threads is given at each call, as run_python reads it). Made once; None where a
        product is not one NumPy sends to gemm as it stands (a dimension of 1 or 0, an
        operand it would copy first, or A @ A.T) or NumPy's OpenBLAS is not found:
        run_python then runs. -> (program, sizes) or None."""
        if self._program is _UNBUILT:
            try:
                self._program = self._build() if _gemm_ready() else None
            except _NotGemm:
                self._program = None
        return self._program

    def _build(self):
        ops, B, dtype, vae = [], self.B, self.dtype, self.vae
        f32 = int(np.dtype(dtype) == np.float32)
        X = _Slot(0, (B, self.D), dtype)

        def op(code, *words):
            row = [code, f32, *words]
            ops.append(row + [0] * (_WORDS - len(row)))

        def forward(layers, a, last_bias=True):
            inputs = []
            for k, layer in enumerate(layers):
                inputs.append(a)
                ops.append(_gemm(f32, a, layer.W, layer.out))
                if layer.relu:
                    op(_PR["bias_relu"], _addr(layer.out), _addr(layer.b), layer.rows,
                       layer.cols)
                elif last_bias or k < len(layers) - 1:
                    op(_PR["bias_add"], _addr(layer.out), _addr(layer.b), layer.rows,
                       layer.cols)
                a = layer.out
            return inputs

        def backward(layers, inputs, G, need_dx, last_bias_done=False):
            for k in range(len(layers) - 1, -1, -1):
                layer = layers[k]
                if layer.relu:
                    op(_PR["relu_grad_bias"], _addr(G), _addr(layer.out), _addr(G),
                       _addr(layer.gb), layer.rows, layer.cols)
                elif not (last_bias_done and k == len(layers) - 1):
                    op(_PR["col_sum"], _addr(G), _addr(layer.gb), layer.rows, layer.cols)
                ops.append(_gemm(f32, inputs[k].T, G, layer.gW))
                if k == 0 and not need_dx:
                    return None
                if layer.dxT is not None:
                    ops.append(_gemm(f32, layer.W, G.T, layer.dxT))
                    op(_PR["copy_t"], _addr(layer.dx), _addr(layer.dxT), B, layer.W.shape[0])
                else:
                    ops.append(_gemm(f32, G, layer.W.T, layer.dx))
                G = layer.dx
            return G

        enc_in = forward(self.enc, X)
        h = self.enc[-1].out
        if vae:
            L = self.L
            self._row = np.empty(L, dtype=dtype)      # the KL's row sum's scratch
            op(_PR["latent"], _addr(h), _slot(1), _addr(self.z), _addr(self.sigma),
               _addr(self.var), _slot(2), _addr(self._row), B, L)
        dec_in = forward(self.dec, self.dec_in, last_bias=False)
        last = self.dec[-1]
        op(_PR["nll_rows"], _addr(last.out), _addr(last.b), _slot(0), _addr(self.e),
           _addr(self.t), _slot(3), B, self.D)
        if vae:
            op(_PR["loss"], _slot(4), _slot(3), _slot(2), B)
        op(_PR["nll_grad_db"], _addr(last.out), _slot(0), _addr(self.e), _addr(self.dl),
           _addr(last.gb), B, self.D)
        d = backward(self.dec, dec_in, self.dl, True, last_bias_done=True)
        if vae:
            op(_PR["latent_back"], _addr(d), _addr(h), _addr(self.sigma), _slot(1),
               _addr(self.var), _addr(self.dh), B, L)
            d = self.dh
        backward(self.enc, enc_in, d, False)
        itemsize = np.dtype(dtype).itemsize
        sizes = np.array([itemsize, B * self.D, B * self.L if vae else 0, B if vae else 0, B,
                          B if vae else 0], dtype=np.int64)
        return np.array(ops, dtype=np.int64), sizes

    def _run_compiled(self, program, model, x, eps, n, parts):
        prog, sizes = program
        B, dtype = self.B, self.dtype
        recon = np.empty(B, dtype=dtype)
        if self.vae:
            kl, loss_b = np.empty(B, dtype=dtype), np.empty(B, dtype=dtype)
            kernels._c.run_plan(prog, sizes, x.reshape(-1), eps.reshape(-1), kl, recon, loss_b,
                                1.0 / n, model.beta / n, model.beta, parts)
            return loss_b, recon, kl
        kernels._c.run_plan(prog, sizes, x.reshape(-1), None, None, recon, None, 1.0 / n, 0.0,
                            0.0, parts)
        return recon, recon, np.zeros_like(recon)


# -- the compiled program's words (engine/_kernels.c: run_plan) -----------------------------------
_WORDS = 16
_PR = dict(gemm=1, bias_relu=2, bias_add=3, col_sum=4, relu_grad_bias=5, nll_rows=6,
           nll_grad_db=7, latent=8, latent_back=9, copy_t=10, loss=11)
_NO_TRANS, _TRANS = 111, 112          # CBLAS_TRANSPOSE
_gemm_state = [None]                  # None: not tried; then whether run_plan can call gemm
_UNBUILT = object()                   # a plan's program before Plan.compiled first runs


class _NotGemm(Exception):
    """A product that NumPy's matmul would not send to gemm as it stands."""


class _Slot:
    """One of the step's own arrays, in the program: its slot, and its shape and strides."""

    def __init__(self, slot, shape, dtype, strides=None):
        self.slot, self.shape, self.dtype = slot, shape, np.dtype(dtype)
        self.strides = strides or (shape[1] * self.dtype.itemsize, self.dtype.itemsize)

    @property
    def T(self):
        return _Slot(self.slot, self.shape[::-1], self.dtype, self.strides[::-1])


def _addr(a) -> int:
    return int(a.ctypes.data)


def _slot(i: int) -> int:
    return -1 - i


def _operand(a, sz):
    """(address word, CBLAS transpose, leading dimension) of a matmul operand as NumPy's
    matmul gives it to gemm (numpy/_core/src/umath/matmul.c.src: is_blasable2d)."""
    (m, n), (s_m, s_n) = a.shape, a.strides
    word = _slot(a.slot) if type(a) is _Slot else _addr(a)
    if s_n == sz and s_m % sz == 0 and s_m // sz >= n:
        return word, _NO_TRANS, s_m // sz
    if s_m == sz and s_n % sz == 0 and s_n // sz >= m:
        return word, _TRANS, s_n // sz
    raise _NotGemm


def _gemm(f32, a, b, out):
    """The words of out = a @ b as one cblas gemm call, as NumPy's matmul makes it."""
    sz = out.dtype.itemsize
    (m, n), p = a.shape, b.shape[1]
    if min(m, n, p) < 2:                          # NumPy: gemv, a dot, or no BLAS at all
        raise _NotGemm
    wa, ta, lda = _operand(a, sz)
    wb, tb, ldb = _operand(b, sz)
    if wa == wb:                                  # NumPy's A @ A.T goes to syrk
        raise _NotGemm
    if out.strides != (p * sz, sz):
        raise _NotGemm
    return [_PR["gemm"], f32, ta, tb, m, p, n, wa, lda, wb, ldb, _addr(out), p] + [0] * 3


def _gemm_ready() -> bool:
    """Whether run_plan has NumPy's gemm (handed to it once per process)."""
    if _gemm_state[0] is None:
        from . import blas
        found = blas.gemm_addresses() if hasattr(kernels._c, "plan_blas") else None
        if found is not None:
            kernels._c.plan_blas(*found)
        _gemm_state[0] = found is not None
    return _gemm_state[0]
