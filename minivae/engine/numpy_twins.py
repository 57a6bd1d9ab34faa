"""NumPy twins of the reference layers, likelihood and model passes: the same formulas with
each operation in place or straight into the flat gradient buffer, so a training step
allocates few (B, D) temporaries and copies no gradient.

Each twin is registered against the reference function it replaces (:mod:`.registry`), with a
case that runs both; ``tests/test_engine.py`` checks every pair. What they save:

- Dense backward: ``np.matmul(x.T, G, out=grad view)``: no dW/db temporaries, no copy into the
  flat buffer, and no dL/dx for the first layer (nobody needs it).
- ReLU after a Dense works in place on the Dense output (a fresh array nothing else holds);
  its backward works in place on a dout the pass made itself.
- The Bernoulli likelihood: in place and branch-free (NumPy's ``where`` on a random mask runs
  ~20x slower than arithmetic, from branch mispredictions), one compiled pass where
  :mod:`.kernels` was built.
- The model pass writes dL/dh into one preallocated (B, 2L) array instead of a concat.

Layer twins share one signature so that a pass can call any of them:

    forward twin:   (layer, params, x, overwrite) -> (out, cache)
    backward twin:  (layer, params, dout, cache, grads, need_dx, overwrite) -> dx or None

``overwrite``: the caller owns ``x`` / ``dout`` and will not read it again, so the twin may
write over it; ``grads``: the layer's views into the flat gradient buffer.
"""
from __future__ import annotations

import numpy as np

from .. import losses
from ..backend import get_backend
from ..layers import Dense, ReLU, Sequential, mlp
from ..models import VAE, Autoencoder
from ..params import Layout, Params
from ..sampling import sample, sample_backward
from . import kernels
from . import plan as _plan
from .registry import pick, twin_of

NP = get_backend("numpy")


# -- cases: how the registry test runs a twin and its reference ------------------------------
def _host(be, *arrays):
    return [be.to_host(a) for a in arrays]


def _params(be, layout, rng):
    P = Params(layout, be, "float64")
    P.set_flat(rng.standard_normal(layout.size))
    return P


def _dense_case(impl, be, rng):
    layer = Dense(7, 5, backend=be)
    P = _params(be, Layout([("d.W", (7, 5)), ("d.b", (5,))]), rng)
    x, G = be.asarray(rng.standard_normal((4, 7))), be.asarray(rng.standard_normal((4, 5)))
    _, cache = layer.forward(P.group("d"), x)
    if impl is Dense.backward:
        dx, g = impl(layer, P.group("d"), G, cache)
        return _host(be, dx, g["W"], g["b"])
    dx = impl(layer, P.group("d"), G, cache, P.group("d", grad=True), True, True)
    return _host(be, dx, P.grad_views["d.W"], P.grad_views["d.b"])


def _relu_input(be, rng):
    a = rng.standard_normal((6, 9))
    a[0, :3] = [0.0, -0.0, 1e-300]                    # the kink takes the 0 branch
    return be.asarray(a)


def _relu_forward_case(impl, be, rng):
    layer, x = ReLU(backend=be), _relu_input(be, rng)
    out, cache = impl(layer, {}, x) if impl is ReLU.forward else impl(layer, {}, x, True)
    return _host(be, out, cache)


def _relu_backward_case(impl, be, rng):
    layer = ReLU(backend=be)
    _, cache = layer.forward({}, _relu_input(be, rng))
    G = be.asarray(rng.standard_normal((6, 9)))
    if impl is ReLU.backward:
        return _host(be, impl(layer, {}, G, cache)[0])
    return _host(be, impl(layer, {}, G, cache, {}, True, True))


def _net(be, rng):
    net = mlp([5, 8, 8, 3], "relu", prefix="n", backend=be)
    return net, _params(be, Layout(net.param_entries()), rng)


def _sequential_forward_case(impl, be, rng):
    net, P = _net(be, rng)
    out, _ = impl(net, P, be.asarray(rng.standard_normal((4, 5))))
    return _host(be, out)


def _sequential_backward_case(impl, be, rng):
    net, P = _net(be, rng)
    x, G = be.asarray(rng.standard_normal((4, 5))), be.asarray(rng.standard_normal((4, 3)))
    _, caches = net.forward(P, x)
    if impl is Sequential.backward:
        dx, grads = impl(net, P, G, caches)
        P.write_grads(grads)
    else:
        dx = impl(net, P, G, caches)
    return _host(be, dx, P.grad)


def _bernoulli_inputs(be, rng):
    logits = rng.standard_normal((5, 40)) * 30.0
    logits[0, :4] = [0.0, -0.0, 800.0, -800.0]
    x = rng.random((5, 40))
    x[1] = rng.random(40) < 0.5
    return losses.Bernoulli(be.xp, 40), be.asarray(logits), be.asarray(x)


def _bernoulli_nll_case(impl, be, rng):
    px, logits, x = _bernoulli_inputs(be, rng)
    nll, (_, _, e) = impl(px, logits, x)
    return _host(be, nll, e)


def _bernoulli_backward_case(impl, be, rng):
    px, logits, x = _bernoulli_inputs(be, rng)
    _, cache = px.nll(logits, x)
    per_example = be.asarray(rng.random(5))
    return _host(be, impl(px, 0.25, cache), impl(px, per_example, cache))


def _model_case(cls):
    def case(impl, be, rng):
        out = []
        for likelihood in ("bernoulli", "gaussian_learned"):
            m = cls(d_in=12, hidden=(10, 6), latent=3, likelihood=likelihood, backend=be,
                    dtype="float64", seed=2, **({"beta": 0.7} if cls is VAE else {}))
            x = rng.random((7, 12))
            if likelihood == "bernoulli":
                x = (x < 0.4).astype(np.float64)
            eps = be.asarray(rng.standard_normal((7, 3))) if cls is VAE else None
            terms = impl(m, m.params, be.asarray(x), eps, 9)       # as one of two row blocks
            out += _host(be, *terms, m.params.grad)
        return out
    return case


# -- layers -----------------------------------------------------------------------------------
FUSE = True     # the fused Dense+ReLU passes (False: the layer-by-layer twins, to compare)
matmul = np.matmul   # the twins' products, by this name so that a profiler can time them
SMALL_ROWS, LONG_INNER = 32, 256     # where input_grad takes the transposed form


def input_grad(G, W):
    """A Dense layer's input gradient G W^T: (rows, out) x (in, out) -> (rows, in).

    In float32 with few rows and a long inner dimension, NumPy's OpenBLAS computes the same
    product 1.4-2x faster as (W G^T)^T, copied back to C order (measured on 2 cores, OpenBLAS
    0.3.31 SkylakeX kernels: rows 8-32, inner dimension 400-784, on 1 and 2 BLAS threads; the
    numbers were equal to the bit). With more rows, in float64, or with an inner dimension
    like 40, it is not faster, so the plain form runs there. Each element is the same dot
    product either way; ``tests/test_engine.py`` holds both forms to each other."""
    if (G.dtype == np.float32 and G.shape[0] <= SMALL_ROWS and G.shape[1] >= LONG_INNER
            and G.flags.c_contiguous):
        return np.ascontiguousarray(np.matmul(W, G.T).T)
    return np.matmul(G, W.T)


def weight_and_input_grad(x, G, W, gW, need_dx):
    """A Dense layer's dW = x^T G into ``gW`` (its view into the flat gradient buffer), then
    -> dL/dx = G W^T (:func:`input_grad`), or None when nobody needs it. The bias gradient is
    the caller's: a sum here, or part of a fused pass."""
    matmul(x.T, G, out=gW)
    return input_grad(G, W) if need_dx else None


@twin_of(Dense.backward, exact=True, case=_dense_case)
def dense_backward(layer, params, dout, cache, grads, need_dx, overwrite):
    """dW = x^T G and db = sum_B G straight into the gradient views; dx = G W^T if needed."""
    np.sum(dout, axis=0, out=grads["b"])
    return weight_and_input_grad(cache, dout, params["W"], grads["W"], need_dx)


@twin_of(ReLU.forward, exact=True, case=_relu_forward_case)
def relu_forward(layer, params, x, overwrite):
    """max(x, 0) into x itself when the caller owns it."""
    if not overwrite:
        return layer.forward(params, x)
    np.maximum(x, 0.0, out=x)
    return x, x


@twin_of(ReLU.backward, exact=True, case=_relu_backward_case)
def relu_backward(layer, params, dout, cache, grads, need_dx, overwrite):
    """dout * [out > 0] into dout itself when the caller owns it."""
    if not overwrite:
        return layer.backward(params, dout, cache)[0]
    np.multiply(dout, cache > 0.0, out=dout)
    return dout


def _forward_twin(layer):
    ref = type(layer).forward
    fast = pick(ref, NP)
    return None if fast is ref else fast


def _backward_twin(layer):
    ref = type(layer).backward
    fast = pick(ref, NP)
    return None if fast is ref else fast


def _fusable(net, i) -> bool:
    """Layer i is a Dense and layer i + 1 the ReLU on its output (exactly these classes), so
    the bias and the ReLU can run as one compiled pass (kernels.bias_relu / relu_grad_bias)."""
    return (FUSE and i + 1 < len(net.layers) and type(net.layers[i]) is Dense
            and type(net.layers[i + 1]) is ReLU and kernels.enabled())


@twin_of(Sequential.forward, exact=True, case=_sequential_forward_case)
def sequential_forward(net, P, x, last_bias=True):
    """Sequential.forward where a layer right after a Dense works in place on its output
    (a fresh array nothing else holds); the caller's x is never written to. A Dense followed
    by a ReLU adds its bias and applies the ReLU in one compiled pass where the kernels were
    built: max(x W + b, 0), the same numbers. ``last_bias=False``: a last Dense layer leaves
    its bias for the caller to add (the likelihood folds it into its own first pass)."""
    caches = []
    i, n = 0, len(net.layers)
    while i < n:
        name, layer = net.names[i], net.layers[i]
        if i == n - 1 and not last_bias and type(layer) is Dense:
            caches.append(x)
            return matmul(x, P.group(name)["W"]), caches
        if _fusable(net, i):
            g = P.group(name)
            out = matmul(x, g["W"])
            if (views := kernels.flat(out, g["b"])) is not None:
                kernels.bias_relu(views[0], views[1], *out.shape)
                caches += [x, out]                    # Dense caches x, ReLU its output
                x, i = out, i + 2
                continue
            out += g["b"]                             # a dtype the kernels do not take
            caches.append(x)
            x, i = out, i + 1
            continue
        fast = _forward_twin(layer)
        if fast is None:
            x, c = layer.forward(P.group(name), x)
        else:
            x, c = fast(layer, P.group(name), x, i > 0 and isinstance(net.layers[i - 1], Dense))
        caches.append(c)
        i += 1
    return x, caches


@twin_of(Sequential.backward, exact=True, case=_sequential_backward_case)
def sequential_backward(net, P, dout, caches, need_dx=True, overwrite_dout=False,
                        last_bias_done=False):
    """Sequential.backward writing every gradient into ``P.grad`` -> dL/dx (None if not
    need_dx). ``overwrite_dout``: the caller hands over dout as scratch; below the last layer
    dout is always a temporary made here, so those layers may work in place. A ReLU and the
    Dense below it run their elementwise work as one compiled pass where the kernels were
    built (the mask and the Dense's bias gradient: kernels.relu_grad_bias), the same numbers.
    ``last_bias_done``: the caller has written a last Dense layer's bias gradient already."""
    n = len(net.layers)
    i = n - 1
    if last_bias_done and type(net.layers[-1]) is Dense:
        name = net.names[-1]
        dout = weight_and_input_grad(caches[-1], dout, P.group(name)["W"],
                                     P.group(name, grad=True)["W"], need_dx or n > 1)
        i = n - 2
    while i >= 0:
        name, layer = net.names[i], net.layers[i]
        if i >= 1 and _fusable(net, i - 1):
            below, out = net.names[i - 1], caches[i]  # the ReLU's output, (rows, cols)
            g = P.group(below, grad=True)
            G = dout if (overwrite_dout or i < n - 1) else np.empty_like(out)
            views = kernels.flat(dout, out, G, g["b"])
            if views is not None:
                kernels.relu_grad_bias(*views, *out.shape)            # G and db
                dout = weight_and_input_grad(caches[i - 1], G, P.group(below)["W"], g["W"],
                                             need_dx or i - 1 > 0)
                i -= 2
                continue
        fast = _backward_twin(layer)
        if fast is None:
            dout, gr = layer.backward(P.group(name), dout, caches[i])
            P.write_grads({f"{name}.{k}": v for k, v in gr.items()})
        else:
            dout = fast(layer, P.group(name), dout, caches[i], P.group(name, grad=True),
                        need_dx or i > 0, overwrite_dout or i < n - 1)
        i -= 1
    return dout


# -- the Bernoulli likelihood --------------------------------------------------------------------
@twin_of(losses.Bernoulli.nll, exact=True, case=_bernoulli_nll_case)
def bernoulli_nll(px, logits, x):
    """softplus(l) - x l summed over D, in place: the same values and cache as the reference.
    Where the kernels were built, the whole pass is one team job (kernels.bernoulli_nll_rows,
    with NumPy's own exp, log1p and add loops), or else the arithmetic around exp and log1p is
    one compiled pass."""
    out = _nll_rows(logits, None, x)
    if out is not None:
        return out
    a = np.abs(logits)
    e = np.negative(a)
    np.exp(e, out=e)                                  # e = exp(-|l|)
    t = np.log1p(e)
    if kernels.enabled() and (views := kernels.flat(logits, x, t)):
        kernels.bernoulli_nll_terms(*views)           # the five lines below, in one pass
        return np.sum(t, axis=1), (logits, x, e)
    np.maximum(logits, 0.0, out=a)
    t += a                                            # softplus(l) = max(l, 0) + log1p(e)
    np.multiply(x, logits, out=a)
    t -= a                                            # softplus(l) - x l
    return np.sum(t, axis=1), (logits, x, e)


@twin_of(losses.Bernoulli.nll_backward, exact=False, case=_bernoulli_backward_case)
def bernoulli_nll_backward(px, dout, cache):
    """(sigmoid(l) - x) * dout over the reference's common denominator 1 + e, written as
    P (1 - x) - Q x with (P, Q) = (1, e) for l >= 0 and (e, 1) for l < 0. As e <= 1,
    P = max(e, [l >= 0]) and Q = max(e, [l < 0]) pick them exactly, with no branch."""
    logits, x, e = cache
    if (kernels.enabled() and isinstance(dout, (int, float))
            and (views := kernels.flat(logits, x, e))):
        num = np.empty_like(logits)
        kernels.bernoulli_nll_grad(*views, num.reshape(-1), dout)  # the lines below, one pass
        return num
    num = np.subtract(1.0, x)                         # 1 - x
    p = np.maximum(e, logits >= 0.0)
    num *= p                                          # P (1 - x)
    np.maximum(e, logits < 0.0, out=p)
    p *= x                                            # Q x
    num -= p
    np.add(e, 1.0, out=p)
    num /= p
    num *= dout if isinstance(dout, (int, float)) else dout[:, None]
    return num


def _nll(px):
    return pick(type(px).nll, NP)


def _nll_backward(px):
    return pick(type(px).nll_backward, NP)


# -- the model passes ------------------------------------------------------------------------------
def _decode(model, P, code, x):
    """The decoder's forward and the likelihood -> (recon (B,), its cache, the decoder's
    caches, whether the decoder's last bias went into the likelihood). Where the kernels were
    built, a Bernoulli likelihood after a Dense layer takes that layer's bias into its first
    pass (l + b and -|l + b| at once) and, backward, its bias gradient into its last."""
    px, dec = model.px, model.decoder
    if (FUSE and kernels.enabled() and type(px) is losses.Bernoulli
            and type(dec.layers[-1]) is Dense):
        logits, caches = sequential_forward(dec, P, code, last_bias=False)
        b = P.group(dec.names[-1])["b"]
        out = bernoulli_nll_bias(logits, b, x)
        if out is not None:
            return *out, caches, True
        logits += b                                   # a dtype or layout the kernels refuse
        return *_nll(px)(px, logits, x), caches, False
    out, caches = sequential_forward(dec, P, code)
    return *_nll(px)(px, out, x), caches, False


def bernoulli_nll_bias(logits, b, x):
    """Bernoulli.nll(logits + b, x), with ``logits += b`` done in the likelihood's first
    compiled pass: -> (nll (B,), cache) as :func:`bernoulli_nll`, or None (nothing written)
    when the kernels cannot take these arrays."""
    out = _nll_rows(logits, b, x)
    if out is not None:
        return out
    views = kernels.flat(logits, x, b)                # e and t are made like logits
    if views is None:
        return None
    e = np.empty_like(logits)
    kernels.bernoulli_bias_negabs(views[0], views[2], e.reshape(-1), *logits.shape)
    np.exp(e, out=e)                                  # e = exp(-|l|)
    t = np.log1p(e)
    kernels.bernoulli_nll_terms(views[0], views[1], t.reshape(-1))
    return np.sum(t, axis=1), (logits, x, e)


def _nll_rows(logits, b, x):
    """The likelihood's forward (with the bias b, or None) as one compiled team job ->
    (nll (B,), cache), or None (nothing written) where the kernels or NumPy's loops are not at
    hand, or the arrays are not C-contiguous (B, D) of one dtype."""
    if not (kernels.enabled() and logits.ndim == 2 and kernels.numpy_loops()):
        return None
    views = kernels.flat(logits, x) if b is None else kernels.flat(logits, x, b)
    if views is None or x.shape != logits.shape:
        return None
    e, t = np.empty_like(logits), np.empty_like(logits)
    nll = np.empty(logits.shape[0], dtype=logits.dtype)
    kernels.bernoulli_nll_rows(views[0], b if b is None else views[2], views[1], e.reshape(-1),
                               t.reshape(-1), nll, *logits.shape)
    return nll, (logits, x, e)


def bernoulli_nll_grad_bias(cache, scale, db):
    """Bernoulli.nll_backward(scale, cache), and the decoder's last bias gradient
    db = sum over rows, in one compiled pass. -> dL/dlogits (B, D)."""
    logits, x, e = cache
    dout = np.empty_like(logits)
    kernels.bernoulli_nll_grad_db(*kernels.flat(logits, x, e, dout), scale, db, *logits.shape)
    return dout


def _decode_backward(model, P, n, r_cache, dec_caches, bias_fused):
    """The likelihood's gradient (scaled by 1/n) and the decoder's backward -> dL/dcode."""
    px, dec = model.px, model.decoder
    if bias_fused:
        dout = bernoulli_nll_grad_bias(r_cache, 1.0 / n, P.group(dec.names[-1], grad=True)["b"])
        return sequential_backward(dec, P, dout, dec_caches, overwrite_dout=True,
                                   last_bias_done=True)
    dout = _nll_backward(px)(px, 1.0 / n, r_cache)
    return sequential_backward(dec, P, dout, dec_caches, overwrite_dout=True)


@twin_of(VAE.forward_backward, exact=False, case=_model_case(VAE))
def vae_forward_backward(model, P, x, eps, batch_size=None):
    """VAE.forward_backward with the twins above: the same steps, in the same order. Where a
    step plan applies (:mod:`.plan`: buffers made once per batch size, the same calls without
    the walking), it runs instead, with the same numbers to the bit."""
    xp, L = model.xp, model.latent
    b = x.shape[0]
    n = b if batch_size is None else batch_size
    if FUSE and (out := _plan.forward_backward(model, P, x, eps, n, SMALL_ROWS,
                                               LONG_INNER)) is not None:
        return out
    h, enc_caches = sequential_forward(model.encoder, P, x)
    s = model.beta / n
    latent = gaussian_latent(h, eps, L, s)
    if latent is not None:                            # the five steps below, in two calls
        z, kl, cache = latent
    else:
        mu, logvar = h[:, :L], h[:, L:]
        z, s_cache = sample(xp, mu, logvar, eps)
    recon, r_cache, dec_caches, fused = _decode(model, P, z, x)
    if latent is None:
        kl, k_cache = losses.kl_normal(xp, mu, logvar)
    loss_b = recon + model.beta * kl

    dz = _decode_backward(model, P, n, r_cache, dec_caches, fused)
    dh = np.empty((b, 2 * L), dtype=model.dtype)      # written in halves: no concat copy
    if latent is not None:
        gaussian_latent_backward(dz, cache, s, dh)
    else:
        dmu, dlogvar, _ = sample_backward(dz, s_cache)
        kmu, klogvar = losses.kl_normal_backward(xp, s, k_cache)
        np.add(dmu, kmu, out=dh[:, :L])
        np.add(dlogvar, klogvar, out=dh[:, L:])
    sequential_backward(model.encoder, P, dh, enc_caches, need_dx=False, overwrite_dout=True)
    return loss_b, recon, kl


def gaussian_latent(h, eps, L, s):
    """sampling.sample and losses.kl_normal on h = [mu | logvar] (B, 2L) in one compiled call
    -> (z (B, L), kl (B,), cache for :func:`gaussian_latent_backward`), or None (nothing
    computed) where the kernels or NumPy's loops are not at hand, the arrays are not
    C-contiguous float arrays of one dtype and the right shapes, or s (beta / n) is not a
    Python float (a NumPy scalar could change the result's dtype). The same numbers as the
    reference's NumPy expressions, to the bit."""
    if not (kernels.enabled() and type(s) is float and kernels.numpy_loops()
            and h.ndim == 2 and eps.ndim == 2 and h.shape[1] == 2 * L
            and eps.shape == (h.shape[0], L) and eps.dtype == h.dtype
            and h.dtype in (np.float32, np.float64)
            and h.flags.c_contiguous and eps.flags.c_contiguous):
        return None
    B = h.shape[0]
    z, sigma, var = (np.empty((B, L), dtype=h.dtype) for _ in range(3))
    kl = np.empty(B, dtype=h.dtype)
    kernels.gaussian_latent(h.reshape(-1), eps.reshape(-1), z.reshape(-1), sigma.reshape(-1),
                            var.reshape(-1), kl, B, L)
    return z, kl, (h, eps, sigma, var)


def gaussian_latent_backward(dz, cache, s, dh):
    """sampling.sample_backward and losses.kl_normal_backward (scale s = beta / n) into
    dh (B, 2L), in one compiled pass; dz (B, L) made C-contiguous first if it is not (a dz
    of another dtype than h is a TypeError)."""
    h, eps, sigma, var = cache
    B, L = sigma.shape
    dz = np.ascontiguousarray(dz)
    kernels.gaussian_latent_backward(dz.reshape(-1), h.reshape(-1), sigma.reshape(-1),
                                     eps.reshape(-1), var.reshape(-1), s, dh.reshape(-1), B, L)


@twin_of(Autoencoder.forward_backward, exact=False, case=_model_case(Autoencoder))
def autoencoder_forward_backward(model, P, x, eps=None, batch_size=None):
    """Autoencoder.forward_backward with the twins above (or its step plan: see
    :func:`vae_forward_backward`)."""
    n = x.shape[0] if batch_size is None else batch_size
    if FUSE and (out := _plan.forward_backward(model, P, x, eps, n, SMALL_ROWS,
                                               LONG_INNER)) is not None:
        return out
    code, enc_caches = sequential_forward(model.encoder, P, x)
    recon, r_cache, dec_caches, fused = _decode(model, P, code, x)
    dcode = _decode_backward(model, P, n, r_cache, dec_caches, fused)
    sequential_backward(model.encoder, P, dcode, enc_caches, need_dx=False, overwrite_dout=True)
    return recon, recon, np.zeros_like(recon)
