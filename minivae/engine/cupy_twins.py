"""CuPy twins: fused GPU kernels for the elementwise work around the matrix products.

On the GPU every array operation is one kernel launch (a few microseconds of host time each),
and at small batches a step is mostly launches. Counted in the reference code: the Adam update
is 15 launches, the sampler and KL 11 forward and 10 backward, the Bernoulli likelihood 9
forward and 11 backward. Each twin here does the same arithmetic in one ``cupy.ElementwiseKernel`` (plus one
row sum where the reference sums over a row):

- :func:`adam_update`            m, v and p updated in one pass over the flat buffers
                                 (Kingma & Ba 2015, in torch's bias-corrected form);
- :func:`sample_kl_forward`      z = mu + sigma * eps, sigma = exp(logvar / 2), and the KL terms
                                 mu^2 + exp(logvar) - 1 - logvar, in one pass;
- :func:`sample_kl_backward`     dL/dmu and dL/dlogvar of the sample and the KL together,
                                 written straight into the two halves of dL/dh (no concat);
- :func:`bernoulli_nll`,         softplus(l) - x l and exp(-|l|) in one pass;
  :func:`bernoulli_nll_backward` (sigmoid(l) - x) * dout over the common denominator 1 + e.

Their plain twins are the reference functions they are registered against
(:mod:`minivae.optim`, :mod:`minivae.sampling` with :mod:`minivae.losses`); the registry case
runs both, and ``tests/test_gpu.py`` holds every kernel to its reference on a GPU, in float64
(round-off: the GPU may fuse a multiply-add) and float32. Without a GPU nothing here runs, and
importing this module does not import CuPy: the kernels are compiled on first use.
"""
from __future__ import annotations

import functools

from .. import losses
from ..models import VAE, Autoencoder
from ..optim import Adam, sum_into_first
from ..sampling import sample, sample_backward
from .numpy_twins import _bernoulli_backward_case, _bernoulli_nll_case, _model_case
from .optim import _case as _optimizer_case
from .registry import pick, twin_of

GPU = ("cupy",)


#: The kernels: name -> (input parameters, output parameters, body, kernel name), the arguments
#: of ``cupy.ElementwiseKernel``. ``T`` is the arrays' dtype; outputs given by the caller are
#: read-write (Adam updates p, m, v in place). tests/test_cupy_kernels.py also compiles these
#: bodies as C++ on the CPU and runs them against the reference, so a GPU run is not their
#: first test.
KERNELS = {
    "adam": (
        "T g, float64 b1, float64 b2, float64 step_size, float64 inv_sqrt_bc2, float64 eps, "
        "float64 decay",
        "T p, T m, T v",
        """
        T m1 = (T)b1 * m + (T)(1.0 - b1) * g;            // m <- b1 m + (1 - b1) g
        T v1 = (T)b2 * v + (T)(1.0 - b2) * (g * g);      // v <- b2 v + (1 - b2) g^2
        m = m1;
        v = v1;
        p = p * (T)decay - (T)step_size * m1 / (sqrt(v1) * (T)inv_sqrt_bc2 + (T)eps);
        """,
        "minivae_adam"),
    "sample_kl": (
        "T mu, T logvar, T eps",
        "T z, T sigma, T var, T kl_terms",
        """
        sigma = exp(logvar * (T)0.5);                     // sigma = exp(logvar / 2)
        z = mu + sigma * eps;                              // the reparametrized sample
        var = exp(logvar);
        kl_terms = mu * mu + var - (T)1 - logvar;          // 2 KL, per latent dimension
        """,
        "minivae_sample_kl"),
    "sample_kl_backward": (
        "T dz, T sigma, T eps, T mu, T var, T kl_scale",
        "T dmu, T dlogvar",
        """
        dmu = dz + mu * kl_scale;                          // G + (beta / n) mu
        dlogvar = dz * sigma * eps * (T)0.5 + (T)0.5 * (var - (T)1) * kl_scale;
        """,
        "minivae_sample_kl_backward"),
    "bernoulli": (
        "T l, T x",
        "T terms, T e",
        """
        e = exp(-fabs(l));                                 // e = exp(-|l|) <= 1
        terms = (l > (T)0 ? l : (T)0) + log1p(e) - x * l;  // softplus(l) - x l
        """,
        "minivae_bernoulli_nll"),
    "bernoulli_backward": (
        "T l, T x, T e, T dout",
        "T dl",
        """
        T num = l >= (T)0 ? ((T)1 - x) - x * e : e * ((T)1 - x) - x;
        dl = num / ((T)1 + e) * dout;                      // (sigmoid(l) - x) dout
        """,
        "minivae_bernoulli_nll_backward"),
}


@functools.lru_cache(maxsize=None)
def _kernels():
    """name -> cupy.ElementwiseKernel; CuPy compiles each (NVRTC) on its first call per dtype."""
    import cupy

    return {name: cupy.ElementwiseKernel(*spec) for name, spec in KERNELS.items()}


# -- Adam ------------------------------------------------------------------------------------------
@twin_of(Adam.update, exact=False, backends=GPU, case=_optimizer_case([
    lambda P: Adam(P, lr=0.01), lambda P: Adam(P, lr=0.01, weight_decay=0.1, decoupled=True),
    lambda P: Adam(P, lr=0.01, weight_decay=0.1)]))
def adam_update(opt, lo, hi, grads):
    """Adam.update in one kernel over the slice [lo, hi) of the flat buffers (L2 weight decay,
    which changes the gradient, runs the reference)."""
    if opt.weight_decay and not opt.decoupled:
        return Adam.update(opt, lo, hi, grads)
    g = sum_into_first(grads)
    step_size, inv_sqrt_bc2 = opt.coefficients()
    decay = 1.0 - opt.lr * opt.weight_decay if opt.weight_decay else 1.0
    _kernels()["adam"](g, opt.b1, opt.b2, step_size, inv_sqrt_bc2, opt.eps, decay,
                       opt.params.data[lo:hi], opt.m[lo:hi], opt.v[lo:hi])


# -- the sampler with its KL -------------------------------------------------------------------------
def sample_kl_forward(xp, mu, logvar, eps):
    """mu, logvar, eps: (b, L) -> (z, kl, cache): the reparametrized sample z (b, L) and
    KL(q || N(0, I)) per row (b,) in nats; the same as

        z, _ = sampling.sample(xp, mu, logvar, eps); kl, _ = losses.kl_normal(xp, mu, logvar)
    """
    z, sigma, var, terms = _kernels()["sample_kl"](mu, logvar, eps)
    kl = xp.sum(terms, axis=1) * 0.5
    return z, kl, (sigma, eps, mu, var)


def sample_kl_backward(xp, dz, kl_scale, cache):
    """dz: (b, L), kl_scale = dL/dKL_i (a number: beta / n) -> dL/dh: (b, 2L) = [dmu, dlogvar],
    the sample's and the KL's gradients summed; the same as sampling.sample_backward and
    losses.kl_normal_backward added and concatenated."""
    sigma, eps, mu, var = cache
    b, L = dz.shape
    dh = xp.empty((b, 2 * L), dtype=dz.dtype)
    _kernels()["sample_kl_backward"](dz, sigma, eps, mu, var, kl_scale, dh[:, :L], dh[:, L:])
    return dh


def sample_kl_reference(xp, mu, logvar, eps, dz, kl_scale):
    """The plain twin of the two kernels above, from the reference functions: -> (z, kl, dh)."""
    z, s_cache = sample(xp, mu, logvar, eps)
    kl, k_cache = losses.kl_normal(xp, mu, logvar)
    dmu, dlogvar, _ = sample_backward(dz, s_cache)
    kmu, klogvar = losses.kl_normal_backward(xp, kl_scale, k_cache)
    return z, kl, xp.concat([dmu + kmu, dlogvar + klogvar], axis=1)


def sample_kl_fused(xp, mu, logvar, eps, dz, kl_scale):
    """:func:`sample_kl_reference` through the two kernels: -> (z, kl, dh)."""
    z, kl, cache = sample_kl_forward(xp, mu, logvar, eps)
    return z, kl, sample_kl_backward(xp, dz, kl_scale, cache)


# -- the Bernoulli likelihood -------------------------------------------------------------------------
@twin_of(losses.Bernoulli.nll, exact=False, backends=GPU, case=_bernoulli_nll_case)
def bernoulli_nll(px, logits, x):
    """Bernoulli.nll in one kernel and a row sum: the same values and cache (l, x, e)."""
    terms, e = _kernels()["bernoulli"](logits, x)
    return px.xp.sum(terms, axis=1), (logits, x, e)


@twin_of(losses.Bernoulli.nll_backward, exact=False, backends=GPU, case=_bernoulli_backward_case)
def bernoulli_nll_backward(px, dout, cache):
    """Bernoulli.nll_backward in one kernel; dout a number or (b,) per row."""
    logits, x, e = cache
    if not isinstance(dout, (int, float)):
        dout = px.xp.expand_dims(dout, axis=1)
    return _kernels()["bernoulli_backward"](logits, x, e, dout)


# -- the model passes ---------------------------------------------------------------------------------
@twin_of(VAE.forward_backward, exact=False, backends=GPU, case=_model_case(VAE))
def vae_forward_backward(model, P, x, eps, batch_size=None):
    """VAE.forward_backward with the fused sampler+KL and likelihood kernels; the layers are
    the reference's (their products are cuBLAS calls already)."""
    xp, L = model.xp, model.latent
    n = x.shape[0] if batch_size is None else batch_size
    h, enc_caches = model.encoder.forward(P, x)
    z, kl, sk_cache = sample_kl_forward(xp, h[:, :L], h[:, L:], eps)
    out, dec_caches = model.decoder.forward(P, z)
    px = model.px
    recon, r_cache = pick(type(px).nll, model.backend)(px, out, x)
    loss_b = recon + model.beta * kl

    dout = pick(type(px).nll_backward, model.backend)(px, 1.0 / n, r_cache)
    dz, dec_grads = model.decoder.backward(P, dout, dec_caches)
    dh = sample_kl_backward(xp, dz, model.beta / n, sk_cache)
    _, enc_grads = model.encoder.backward(P, dh, enc_caches)
    P.write_grads({**enc_grads, **dec_grads})
    return loss_b, recon, kl


@twin_of(Autoencoder.forward_backward, exact=False, backends=GPU, case=_model_case(Autoencoder))
def autoencoder_forward_backward(model, P, x, eps=None, batch_size=None):
    """Autoencoder.forward_backward with the fused likelihood kernels."""
    n = x.shape[0] if batch_size is None else batch_size
    code, enc_caches = model.encoder.forward(P, x)
    out, dec_caches = model.decoder.forward(P, code)
    px = model.px
    recon, r_cache = pick(type(px).nll, model.backend)(px, out, x)
    dout = pick(type(px).nll_backward, model.backend)(px, 1.0 / n, r_cache)
    dcode, dec_grads = model.decoder.backward(P, dout, dec_caches)
    _, enc_grads = model.encoder.backward(P, dcode, enc_caches)
    P.write_grads({**enc_grads, **dec_grads})
    return recon, recon, model.xp.zeros_like(recon)
