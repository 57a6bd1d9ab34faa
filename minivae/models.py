"""An Autoencoder and a VAE built from the layers, with hand-written backward passes.

Both expose ``loss_and_grads(x, eps=None) -> LossResult``: the loss (mean over the batch, in
nats per example), its parts, and the gradient of the loss in the flat buffer
``model.params.grad`` (overwritten on every call). The whole of it, forward and backward for
one batch, is :meth:`VAE.forward_backward`, which reads top to bottom:

    h           = encoder(x)                       (B, 2L)  columns [:L] mu, [L:] logvar
    z           = mu + exp(logvar/2) * eps         (B, L)   eps ~ N(0, I), drawn by the model
    out         = decoder(z)                       (B, D)   logits (Bernoulli) or mean
    recon       = -log p(x|z)                      (B,)
    kl          = KL(q(z|x) || N(0, I))            (B,)     analytic
    loss        = mean_B(recon + beta * kl)        ()       = -ELBO per example when beta = 1

(Kingma & Welling 2014, "Auto-Encoding Variational Bayes", eq. 10 and appendix B.) The mu and
logvar heads share one Dense layer of width 2L: one matrix product instead of two.

This is the reference: plain array-API code, one thread. The same step split over threads,
with in-place NumPy twins and the optimizer fused in, is :class:`minivae.DataParallel` (and
:func:`minivae.train_step`, which the trainer uses); it gives the same numbers to round-off.

Every public entry point validates its input the same way (:meth:`check_input` for data,
:meth:`check_latent` for codes, :meth:`check_eps` for noise) and raises a one-line
TypeError/ValueError naming the problem.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass

from . import losses
from .backend import RNG, Picklable, dtype_name, resolve
from .layers import ACTIVATIONS, INITS, mlp
from .params import Layout, Params
from .sampling import (gumbel, gumbel_softmax, gumbel_softmax_backward, one_hot, sample,
                       sample_backward, straight_through)


@dataclass
class LossResult:
    """What one forward/backward pass gives. Scalars are 0-d backend arrays (no host sync);
    call ``float()`` on them at the log interval.

    loss:  mean_B(recon + beta * kl)                 ()
    recon: mean_B(-log p(x|z))                       ()
    kl:    mean_B(KL(q(z|x) || p(z)))                () (0 for the Autoencoder)
    elbo:  per-example ELBO = -(recon + kl), nats    (B,)
    grads: d loss / d params, the model's flat gradient buffer (n,)
    """

    loss: object
    recon: object
    kl: object
    elbo: object
    grads: object


def check_count(n, name, low=1):
    """n as an int, or TypeError/ValueError naming ``name`` unless it is a whole number >= low
    (a bool, a float such as 2.7 or a string is refused, not truncated)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be a whole number, got {n!r}")
    if n < low:
        raise ValueError(f"{name} must be >= {low}, got {n}")
    return int(n)



def _sizes(d_in, hidden, latent):
    d_in = check_count(d_in, "d_in")
    if isinstance(hidden, numbers.Integral):
        hidden = (hidden,)
    if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
        raise TypeError(f"hidden must be a sequence of layer widths, e.g. (400,), got {hidden!r}")
    hidden = tuple(check_count(h, "each hidden size") for h in hidden)
    return d_in, hidden, check_count(latent, "latent")


def _name(value, what, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _build_nets(d_in, hidden, latent, code_width, likelihood, activation, init, backend):
    """(encoder, decoder) Sequentials; layers only, nothing allocated."""
    _name(likelihood, "likelihood", tuple(losses.LIKELIHOODS))
    if init is not None:
        _name(init, "init", INITS)
    if activation is not None:
        _name(activation, "activation", tuple(ACTIVATIONS))
    d_out = 2 * d_in if likelihood == "gaussian_learned" else d_in
    encoder = mlp([d_in, *hidden, code_width], activation, prefix="enc", init=init,
                  backend=backend)
    decoder = mlp([latent, *reversed(hidden), d_out], activation, prefix="dec", init=init,
                  backend=backend)
    return encoder, decoder


class _Model(Picklable):
    """Shared plumbing: flat parameters, backend, RNG, input validation, decoding.

    ``has_prior`` says what the rest of minivae needs to know about a model: True for a VAE
    (``encode`` gives q(z|x)'s mean and log variance, codes can be drawn from the prior
    p(z) = N(0, I), the loss has a KL term), False for an Autoencoder.
    """

    has_prior = False

    def _rng(self, rng):
        """``rng`` if it is a minivae RNG on this model's backend (``model.backend.rng(seed)``),
        the model's own when None; TypeError otherwise (a NumPy Generator gave a TypeError
        deep inside the draw)."""
        if rng is None:
            return self.rng
        if not isinstance(rng, RNG) or rng.backend is not self.backend:
            raise TypeError(f"rng must be a minivae RNG on the model's backend "
                            f"(model.backend.rng(seed)), got {type(rng).__name__}")
        return rng

    def _widest(self) -> int:
        """The widest layer's output: the largest activation a decoded row makes."""
        return max(shape[-1] for shape in self.params.layout.shapes.values())

    def _check_fits(self, n: int, width: int, name: str = "n") -> int:
        """n rows of ``width`` numbers (and as many again for the work beside them) must fit in
        this machine's memory: ValueError with the size, not NumPy's MemoryError after it
        tried (sample(10**12) asked for 10.9 TiB)."""
        need = 2 * n * width * (8 if "64" in str(self.dtype) else 4)
        have = self.backend.memory_bytes()
        if have is not None and need > have:
            raise ValueError(f"{name} = {n:,} needs {need / 2**30:,.1f} GiB for its arrays, "
                             f"more than the {have / 2**30:,.1f} GiB this machine has")
        return n

    def _setup(self, nets, likelihood, x_sigma, backend, dtype, seed):
        self.backend = resolve(backend)
        self.xp = self.backend.xp
        if seed is not None:
            check_count(seed, "seed", low=0)
        layout = Layout([e for net in nets for e in net.param_entries()])
        self.params = Params(layout, self.backend, dtype)
        self.dtype = self.params.dtype
        if (isinstance(x_sigma, bool) or not isinstance(x_sigma, numbers.Real)
                or not math.isfinite(x_sigma) or x_sigma <= 0):
            raise ValueError(f"x_sigma must be a positive finite number, got {x_sigma!r}")
        self.likelihood = likelihood
        self.x_logvar = 2.0 * math.log(x_sigma)
        #: the observation model p(x|z) (a losses.Bernoulli, Gaussian or GaussianLearned)
        self.px = losses.make_likelihood(likelihood, self.xp, self.d_in, float(x_sigma))
        fi = self.xp.finfo(self.dtype)
        if isinstance(self.px, losses.Gaussian) and \
                float(x_sigma) < math.sqrt(self.d_in / (float(fi.max) * float(fi.eps))):
            # sum_D (x - mean)^2 / (2 sigma^2) must stay far from overflow for residuals ~ 1
            raise ValueError(f"x_sigma = {x_sigma!r} is too small for {dtype_name(self.dtype)}: "
                             f"the Gaussian loss, sum (x - mean)^2 / (2 x_sigma^2), would "
                             f"overflow")
        self.rng = self.backend.rng(seed)
        for net in nets:
            for name, layer in net:
                layer.init(self.params.group(name), self.rng)

    def _nets(self, d_in, hidden, latent, code_width, likelihood, activation, init, backend):
        self.encoder, self.decoder = _build_nets(d_in, hidden, latent, code_width, likelihood,
                                                 activation, init, backend)
        return [self.encoder, self.decoder]

    @property
    def config(self) -> dict:
        """Constructor arguments; ``build_model(model.config)`` rebuilds the architecture."""
        return dict(self._config)

    def n_params(self) -> int:
        return self.params.layout.size

    # -- input checks: one path for every entry point, clear errors, nothing half-done -----
    def _check_array(self, a, name):
        if not self.backend.is_array(a):
            raise TypeError(
                f"{name} is a {type(a).__module__}.{type(a).__name__}, but this model runs on "
                f"backend {self.backend.name!r}: convert it with "
                f"model.backend.asarray({name}, dtype=model.dtype)"
            )

    def _check_values(self, a, name, what):
        xp, want = self.xp, dtype_name(self.dtype)
        if not xp.isdtype(a.dtype, "real floating"):
            raise TypeError(
                f"{name} has dtype {dtype_name(a.dtype)}; expected floating {what} ({want})"
                + (". Integer pixels must be scaled to [0, 1] first, e.g. x / 255"
                   if what == "data" else "")
            )
        if a.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {dtype_name(a.dtype)} but the model uses {want}: "
                            f"convert it with model.backend.asarray({name}, dtype=model.dtype)")
        # min and max propagate NaN, and an infinity is one of them: both finite <=> all finite
        # (two fast reductions, no boolean temporary; the data check reuses them)
        lo, hi = (xp.min(a), xp.max(a)) if a.size else (0.0, 0.0)
        if not (bool(xp.isfinite(lo)) and bool(xp.isfinite(hi))):
            raise ValueError(f"{name} contains NaN or Inf")
        return lo, hi

    def check_input(self, x, name="x"):
        """Raise TypeError/ValueError naming the problem unless x is a finite (B, D) batch of
        the model's dtype on its backend (in [0, 1] for a Bernoulli likelihood)."""
        self._check_array(x, name)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (batch, {self.d_in})")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch")
        lo, hi = self._check_values(x, name, "data")
        lo_hi = self.px.data_range
        if lo_hi is not None and not (bool(lo >= lo_hi[0]) and bool(hi <= lo_hi[1])):
            raise ValueError(f"{name} has values outside [{lo_hi[0]:g}, {lo_hi[1]:g}], which a "
                             f"{self.likelihood} likelihood needs (pixels scaled by 1/255?)")

    def check_latent(self, z, name="z"):
        """Raise TypeError/ValueError unless z is a finite (B, L) batch of codes."""
        self._check_array(z, name)
        if z.ndim != 2 or z.shape[1] != self.latent or z.shape[0] == 0:
            raise ValueError(f"{name} has shape {tuple(z.shape)}; expected (batch, {self.latent})"
                             f" with batch >= 1")
        self._check_values(z, name, "codes")

    # -- one batch ---------------------------------------------------------------------------
    def loss_and_grads(self, x, eps=None, check=True) -> LossResult:
        """One forward and backward pass on the batch x: (B, D), in plain reference code.

        eps: (B, L) standard normal noise, or None to draw it from the model's RNG (VAE); an
        Autoencoder takes None. The gradient of the loss lands in ``model.params.grad``.
        ``check=False`` skips the validation (it reads a flag back from the device).
        Raises TypeError/ValueError for a bad x or eps (nothing is changed then).
        """
        if check:
            self.check_input(x)
        eps = self.prepare_eps(eps, x.shape[0], check)
        loss_b, recon, kl = self.forward_backward(self.params, x, eps)
        xp = self.xp
        return LossResult(loss=xp.mean(loss_b), recon=xp.mean(recon), kl=xp.mean(kl),
                          elbo=-(recon + kl), grads=self.params.grad)

    # -- decoding ----------------------------------------------------------------------------
    def _decode_out(self, z):
        out, _ = self.decoder.forward(self.params, z)
        return out

    def decode_logits(self, z, check=True):
        """z: (B, L) -> raw decoder output (B, D) (or (B, 2D): mean | logvar, learned variance).
        ``check=False`` skips the validation (for callers that validated already)."""
        if check:
            self.check_latent(z)
        return self._decode_out(z)

    def decode(self, z):
        """z: (B, L) -> mean of p(x|z), (B, D): probabilities (Bernoulli) or the Gaussian mean."""
        self.check_latent(z)
        return self.px.mean(self._decode_out(z))


class VAE(_Model):
    #: q(z|x) is a Gaussian (codes are points of R^L; the manifold figure applies at L = 2)
    continuous = True

    @staticmethod
    def widths(config) -> tuple[int, int]:
        """(encoder output width, decoder input width) for a config: (2L, L)."""
        latent = check_count(config.get("latent", 20), "latent")
        return 2 * latent, latent

    """Variational autoencoder: encoder -> (mu, logvar) -> reparametrized z -> decoder.

    Defaults are the classic setup (Kingma & Welling; the PyTorch example): 784-400-20, ReLU,
    Bernoulli likelihood. ``beta`` (>= 0) weights the KL term (beta-VAE, and KL warm-up).
    ``likelihood``: "bernoulli" | "gaussian" (fixed std ``x_sigma``) | "gaussian_learned".
    Raises ValueError/TypeError for sizes, names or numbers that mean nothing.
    """

    has_prior = True

    def __init__(self, d_in=784, hidden=(400,), latent=20, activation="relu",
                 likelihood="bernoulli", beta=1.0, x_sigma=1.0, init=None,
                 backend="numpy", dtype="float32", seed=0):
        d_in, hidden, latent = _sizes(d_in, hidden, latent)
        self.d_in, self.latent = d_in, latent
        self.beta = beta
        nets = self._nets(d_in, hidden, latent, 2 * latent, likelihood, activation, init, backend)
        self._setup(nets, likelihood, x_sigma, backend, dtype, seed)
        self._config = dict(kind="vae", d_in=d_in, hidden=list(hidden), latent=latent,
                            activation=activation, likelihood=likelihood, beta=self.beta,
                            x_sigma=float(x_sigma), init=init)

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value):
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not math.isfinite(value) or value < 0):
            raise ValueError(f"beta must be a finite number >= 0, got {value!r}")
        self._beta = float(value)

    # -- the reference pass: forward and backward for one batch, top to bottom ------------------
    def forward_backward(self, P, x, eps, batch_size=None):
        """x: (b, D), eps: (b, L) -> per-row (loss, recon, kl), each (b,), and writes
        d(sum of these rows' losses / batch_size) / d params into ``P.grad``.

        P: the Params to compute with (``model.params``). batch_size: the n of the batch mean,
        default b; a data-parallel step passes the whole batch's size for each row block, so
        that the blocks' gradients add up to the batch mean's. No input validation here.
        """
        xp, L = self.xp, self.latent
        n = x.shape[0] if batch_size is None else batch_size
        # forward
        h, enc_caches = self.encoder.forward(P, x)                   # (b, 2L)
        mu, logvar = h[:, :L], h[:, L:]
        z, s_cache = sample(xp, mu, logvar, eps)                     # z = mu + sigma * eps
        out, dec_caches = self.decoder.forward(P, z)                 # (b, D) logits or mean
        recon, r_cache = self.px.nll(out, x)                         # -log p(x|z)    (b,)
        kl, k_cache = losses.kl_normal(xp, mu, logvar)               # KL(q || p)     (b,)
        loss_b = recon + self.beta * kl

        # backward: d loss / d recon_i = 1/n and d loss / d kl_i = beta/n
        dout = self.px.nll_backward(1.0 / n, r_cache)                # (b, D)
        dz, dec_grads = self.decoder.backward(P, dout, dec_caches)   # (b, L)
        dmu, dlogvar, _ = sample_backward(dz, s_cache)               # through the sample
        kmu, klogvar = losses.kl_normal_backward(xp, self.beta / n, k_cache)  # and the KL
        dh = xp.concat([dmu + kmu, dlogvar + klogvar], axis=1)      # (b, 2L)
        _, enc_grads = self.encoder.backward(P, dh, enc_caches)
        P.write_grads({**enc_grads, **dec_grads})
        return loss_b, recon, kl

    # -- noise ---------------------------------------------------------------------------------
    def draw_eps(self, batch: int):
        """eps ~ N(0, I), (batch, L), from the model's RNG on its backend."""
        return self.rng.normal((check_count(batch, "batch"), self.latent), self.dtype)

    def check_eps(self, eps, batch, stacked=False):
        """Raise TypeError/ValueError unless eps is a finite (batch, L) array like the model's
        (``stacked``: (S, batch, L), S >= 1 samples per example, for the estimators)."""
        self._check_array(eps, "eps")
        if stacked:
            if eps.ndim != 3 or tuple(eps.shape[1:]) != (batch, self.latent) or eps.shape[0] < 1:
                raise ValueError(f"eps has shape {tuple(eps.shape)}; expected (S, {batch}, "
                                 f"{self.latent}) (samples, batch size, latent size)")
        elif tuple(eps.shape) != (batch, self.latent):
            raise ValueError(
                f"eps has shape {tuple(eps.shape)} but the batch needs ({batch}, {self.latent}) "
                f"(batch size, latent size)"
            )
        self._check_values(eps, "eps", "noise")

    def prepare_eps(self, eps, B, check=True):
        """The noise for a batch of B rows: eps as given (validated unless check=False), or
        drawn from the model's RNG when None."""
        if eps is None:
            return self.draw_eps(B)
        if check:
            self.check_eps(eps, B)
        return eps

    def draw_code(self, n: int, rng=None):
        """n codes from the prior p(z) = N(0, I), (n, L), from ``rng`` (a backend RNG; default
        the model's)."""
        n = self._check_fits(check_count(n, "n"), self.latent)
        return self._rng(rng).normal((n, self.latent), self.dtype)

    @property
    def prior_text(self) -> str:
        """The prior, in words (figure titles)."""
        return f"z ~ N(0, I) ({self.latent}-d)"

    # -- inference ---------------------------------------------------------------------------
    def _encode(self, x):
        h, _ = self.encoder.forward(self.params, x)
        return h[:, : self.latent], h[:, self.latent:]

    def encode(self, x, check=True):
        """x: (B, D) -> mu (B, L), logvar (B, L) of q(z|x). ``check=False`` skips the
        validation."""
        if check:
            self.check_input(x)
        return self._encode(x)

    def code(self, x):
        """x: (B, D) -> the deterministic code of each example, the mean of q(z|x): (B, L)."""
        return self.encode(x)[0]

    def _terms(self, x, eps):
        """The forward pass alone: per-example (-log p(x|z), KL), each (B,), at z = mu + sigma eps."""
        mu, logvar = self._encode(x)
        z, _ = sample(self.xp, mu, logvar, eps)
        recon, _ = self.px.nll(self._decode_out(z), x)
        kl, _ = losses.kl_normal(self.xp, mu, logvar)
        return recon, kl

    def loss(self, x, eps=None, check=True):
        """mean_B(recon + beta * kl), nats per example, forward only (no gradients): the
        value ``loss_and_grads`` returns for the same x and eps. 0-d backend array."""
        if check:
            self.check_input(x)
        recon, kl = self._terms(x, self.prepare_eps(eps, x.shape[0], check))
        return self.xp.mean(recon + self.beta * kl)

    def loss_terms(self, x, rng=None, check=True):
        """Per-example (-log p(x|z), KL), each (B,), with one z ~ q(z|x) per example drawn with
        ``rng`` (a backend RNG; default the model's). No gradients."""
        if check:
            self.check_input(x)
        return self._terms(x, self._rng(rng).normal((x.shape[0], self.latent), self.dtype))

    def elbo(self, x, eps=None):
        """Per-example ELBO (B,) in nats with one sample of z (no gradients).
        eps: (B, L) or None to draw it."""
        self.check_input(x)
        recon, kl = self._terms(x, self.prepare_eps(eps, x.shape[0], True))
        return -(recon + kl)

    def importance_log_weights(self, x, k, rng, check=True):
        """log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x) for k draws z_i ~ q(z|x) per
        example (drawn with ``rng``), (k, B): the terms of the IWAE bound (Burda et al. 2016).
        log q(z|x) at z = mu + sigma * eps is log N(eps; 0, I) - sum(logvar) / 2.
        x: (B, D) as for :meth:`loss` (checked unless ``check=False``); k: a whole number >= 1;
        rng: a minivae RNG on the model's backend. TypeError/ValueError otherwise."""
        if check:
            self.check_input(x)
            self._check_fits(check_count(k, "k") * x.shape[0], self.d_in, "k * B")
            rng = self._rng(rng)
        xp, B, L = self.xp, x.shape[0], self.latent
        mu, logvar = self._encode(x)                                    # (B, L)
        eps = rng.normal((k, B, L), self.dtype)
        z = mu + xp.exp(0.5 * logvar) * eps                             # (k, B, L)
        out = self._decode_out(xp.reshape(z, (k * B, L)))
        xr = xp.reshape(xp.broadcast_to(xp.expand_dims(x, axis=0), (k, B, self.d_in)),
                        (k * B, self.d_in))
        nll, _ = self.px.nll(out, xr)
        log_pz, log_eps = (-0.5 * xp.sum(a * a + losses.LOG_2PI, axis=-1) for a in (z, eps))
        return -xp.reshape(nll, (k, B)) + log_pz - (log_eps - 0.5 * xp.sum(logvar, axis=-1))

    def reconstruct(self, x, sample_z=False):
        """x: (B, D) -> mean of p(x|z) at z = mu (or a sample of q(z|x)), (B, D)."""
        if not isinstance(sample_z, bool):
            raise TypeError(f"sample_z must be True or False, got {sample_z!r}")
        self.check_input(x)
        mu, logvar = self._encode(x)
        z = sample(self.xp, mu, logvar, self.draw_eps(x.shape[0]))[0] if sample_z else mu
        return self.px.mean(self._decode_out(z))

    def sample(self, n: int):
        """n new examples: decode z ~ N(0, I) -> (n, D) means of p(x|z).
        Raises TypeError/ValueError unless n is a whole number >= 1."""
        n = self._check_fits(check_count(n, "n"), self._widest())
        return self.px.mean(self._decode_out(self.draw_code(n)))


class Autoencoder(_Model):
    continuous = True

    @staticmethod
    def widths(config) -> tuple[int, int]:
        latent = check_count(config.get("latent", 20), "latent")
        return latent, latent

    """Deterministic autoencoder: x -> code (B, L) -> reconstruction. The PCA generalisation:
    with ``activation=None`` and a Gaussian likelihood it is linear and learns the principal
    subspace. Loss = mean_B(-log p(x | decoder(encoder(x)))), no KL, no sampling.
    """

    has_prior = False

    def __init__(self, d_in=784, hidden=(400,), latent=20, activation="relu",
                 likelihood="bernoulli", x_sigma=1.0, init=None,
                 backend="numpy", dtype="float32", seed=0):
        d_in, hidden, latent = _sizes(d_in, hidden, latent)
        self.d_in, self.latent = d_in, latent
        nets = self._nets(d_in, hidden, latent, latent, likelihood, activation, init, backend)
        self._setup(nets, likelihood, x_sigma, backend, dtype, seed)
        self._config = dict(kind="autoencoder", d_in=d_in, hidden=list(hidden), latent=latent,
                            activation=activation, likelihood=likelihood,
                            x_sigma=float(x_sigma), init=init)

    def forward_backward(self, P, x, eps=None, batch_size=None):
        """x: (b, D) -> per-row (loss, recon, kl = 0), each (b,), and writes
        d(sum of these rows' losses / batch_size) / d params into ``P.grad`` (see VAE's)."""
        n = x.shape[0] if batch_size is None else batch_size
        code, enc_caches = self.encoder.forward(P, x)                # (b, L)
        out, dec_caches = self.decoder.forward(P, code)              # (b, D)
        recon, r_cache = self.px.nll(out, x)                         # (b,)
        dout = self.px.nll_backward(1.0 / n, r_cache)
        dcode, dec_grads = self.decoder.backward(P, dout, dec_caches)
        _, enc_grads = self.encoder.backward(P, dcode, enc_caches)
        P.write_grads({**enc_grads, **dec_grads})
        return recon, recon, self.xp.zeros_like(recon)

    def prepare_eps(self, eps, B, check=True):
        """An Autoencoder draws no noise: None."""
        if eps is not None:
            raise ValueError("an Autoencoder draws no noise: pass eps=None")
        return None

    def _encode(self, x):
        code, _ = self.encoder.forward(self.params, x)
        return code

    def encode(self, x, check=True):
        """x: (B, D) -> code (B, L). ``check=False`` skips the validation."""
        if check:
            self.check_input(x)
        return self._encode(x)

    def code(self, x):
        """x: (B, D) -> the code (B, L) (the same as encode)."""
        return self.encode(x)

    def loss(self, x, eps=None, check=True):
        """mean_B(-log p(x|code)), nats per example, forward only. 0-d backend array."""
        recon, _ = self.loss_terms(x, check=check)
        self.prepare_eps(eps, x.shape[0], check)           # refuses an eps
        return self.xp.mean(recon)

    def loss_terms(self, x, rng=None, check=True):
        """Per-example (-log p(x|code), 0), each (B,). No gradients; rng is not used."""
        if check:
            self.check_input(x)
        recon, _ = self.px.nll(self._decode_out(self._encode(x)), x)
        return recon, self.xp.zeros_like(recon)

    def reconstruct(self, x):
        """x: (B, D) -> mean of p(x|code), (B, D)."""
        self.check_input(x)
        return self.px.mean(self._decode_out(self._encode(x)))

    def draw_code(self, n: int):
        raise TypeError("an Autoencoder has no prior to draw codes from; use a VAE")

    def sample(self, n: int):
        raise TypeError("an Autoencoder has no prior to sample from; use a VAE")

    def elbo(self, x, eps=None):
        raise TypeError("an Autoencoder has no ELBO (no q(z|x), no prior); its loss is "
                        "model.loss(x), the reconstruction term")


class DiscreteVAE(_Model):
    """A VAE with categorical latents: K variables of C classes each, a uniform prior, and a
    gradient through the sample from the Gumbel-softmax relaxation (or its straight-through
    variant). One batch, top to bottom (:meth:`forward_backward`):

        l          = encoder(x)                          (B, K*C)  logits, seen as (B, K, C)
        y          = softmax((l + g) / tau)              (B, K, C) g ~ Gumbel(0, 1), drawn by the
                                                                   model (straight_through: the
                                                                   one-hot argmax, relaxed backward)
        out        = decoder(y)                          (B, D)    y flattened to (B, K*C)
        recon      = -log p(x|y)                         (B,)
        kl         = KL(Cat(softmax(l)) || Uniform(C))   (B,)      analytic, summed over K
        loss       = mean_B(recon + beta * kl)

    (Jang, Gu & Poole 2017; Maddison, Mnih & Teh 2017.) ``latent`` is K, the number of
    categorical variables, and ``categories`` is C; the code the decoder reads has
    ``model.latent = K * C`` columns after construction (``config["latent"]`` stays K).

    What the loss is: training minimises the *relaxed* objective above (the decoder sees points
    inside the simplex). The model's ELBO (:meth:`loss_terms`, :meth:`elbo`, what evaluation
    reports) is the true one, with exact one-hot samples c = argmax(l + g) (the Gumbel-max
    trick), so it is comparable with the Gaussian VAE's. ``tau`` (> 0) can change between steps
    (annealing); ``straight_through`` chooses the estimator.
    Raises ValueError/TypeError for sizes, names or numbers that mean nothing.
    """

    has_prior = True
    continuous = False

    def __init__(self, d_in=784, hidden=(400,), latent=20, categories=10, tau=1.0,
                 straight_through=False, activation="relu", likelihood="bernoulli", beta=1.0,
                 x_sigma=1.0, init=None, backend="numpy", dtype="float32", seed=0):
        d_in, hidden, K = _sizes(d_in, hidden, latent)
        C = check_count(categories, "categories", low=2)
        if init is None and activation in ("relu", "leaky_relu"):
            # He, not the Gaussian VAE's default (PyTorch's nn.Linear init): on mnist10k, 10
            # epochs, 20 x 10 categories, tau 1 -> 0.5, the test -ELBO was 136.1 / 135.2 with He
            # and 149.2 / 150.2 with torch's init (seeds 0 / 1; Glorot 141.5 at seed 1)
            init = "he"
        if not isinstance(straight_through, bool):
            raise TypeError(f"straight_through must be True or False, got {straight_through!r}")
        self.d_in, self.variables, self.categories = d_in, K, C
        self.latent = K * C
        self.beta, self.tau, self.straight_through = beta, tau, straight_through
        nets = self._nets(d_in, hidden, K * C, K * C, likelihood, activation, init, backend)
        self._setup(nets, likelihood, x_sigma, backend, dtype, seed)
        self.tau = self.tau              # again, now that the dtype is known (its lower bound)
        self._config = dict(kind="discrete_vae", d_in=d_in, hidden=list(hidden), latent=K,
                            categories=C, tau=self.tau, straight_through=straight_through,
                            activation=activation, likelihood=likelihood, beta=self.beta,
                            x_sigma=float(x_sigma), init=init)

    @staticmethod
    def widths(config) -> tuple[int, int]:
        """(encoder output, decoder input) = (K*C, K*C)."""
        K = check_count(config.get("latent", 20), "latent")
        C = check_count(config.get("categories", 10), "categories", low=2)
        return K * C, K * C

    beta = VAE.beta

    @property
    def tau(self) -> float:
        """The relaxation's temperature (> 0)."""
        return self._tau

    @tau.setter
    def tau(self, value):
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not math.isfinite(value) or value <= 0):
            raise ValueError(f"tau must be a finite number > 0, got {value!r}")
        # (l + g) / tau must stay finite: tau >= sqrt(smallest normal number) of the dtype
        # keeps it so for |l + g| up to 1 / sqrt(tiny) (float32: tau >= 1.1e-19; 1e-40 made
        # every loss NaN)
        dtype = getattr(self, "dtype", None)
        if dtype is not None:
            low = math.sqrt(2.2250738585072014e-308 if "64" in str(dtype) else 1.1754944e-38)
            if value < low:
                raise ValueError(f"tau must be >= {low:.2g} in {dtype_name(dtype)} (smaller, "
                                 f"(l + g) / tau overflows), got {value!r}")
        self._tau = float(value)

    def _grid(self, a):
        """(B, K*C) -> (B, K, C)."""
        return self.xp.reshape(a, (a.shape[0], self.variables, self.categories))

    def _flat(self, a):
        return self.xp.reshape(a, (a.shape[0], self.latent))

    # -- the reference pass ----------------------------------------------------------------------
    def forward_backward(self, P, x, g, batch_size=None):
        """x: (b, D), g: (b, K*C) Gumbel noise -> per-row (loss, recon, kl), each (b,), of the
        relaxed objective, and writes d(sum of these rows' losses / batch_size) / d params into
        ``P.grad`` (as VAE.forward_backward)."""
        xp = self.xp
        n = x.shape[0] if batch_size is None else batch_size
        # forward
        h, enc_caches = self.encoder.forward(P, x)                      # (b, K*C) logits
        logits = self._grid(h)
        sampler = straight_through if self.straight_through else gumbel_softmax
        y, s_cache = sampler(xp, logits, self._grid(g), self.tau)       # (b, K, C)
        out, dec_caches = self.decoder.forward(P, self._flat(y))
        recon, r_cache = self.px.nll(out, x)                            # -log p(x|y)   (b,)
        kl, k_cache = losses.kl_categorical(xp, logits)                 # KL(q || U)    (b,)
        loss_b = recon + self.beta * kl

        # backward
        dout = self.px.nll_backward(1.0 / n, r_cache)
        dy, dec_grads = self.decoder.backward(P, dout, dec_caches)      # (b, K*C)
        dlogits = gumbel_softmax_backward(xp, self._grid(dy), s_cache) \
            + losses.kl_categorical_backward(xp, self.beta / n, k_cache)
        _, enc_grads = self.encoder.backward(P, self._flat(dlogits), enc_caches)
        P.write_grads({**enc_grads, **dec_grads})
        return loss_b, recon, kl

    # -- noise -----------------------------------------------------------------------------------
    def draw_eps(self, batch: int):
        """Gumbel(0, 1) noise g, (batch, K*C), from the model's RNG."""
        u = self.rng.uniform((check_count(batch, "batch"), self.latent), self.dtype)
        return gumbel(self.xp, u)

    def check_eps(self, eps, batch, stacked=False):
        """Raise TypeError/ValueError unless the noise is a finite (batch, K*C) array like the
        model's (``stacked``: (S, batch, K*C))."""
        self._check_array(eps, "g")
        want = (batch, self.latent)
        if (stacked and (eps.ndim != 3 or tuple(eps.shape[1:]) != want or eps.shape[0] < 1)) \
                or (not stacked and tuple(eps.shape) != want):
            raise ValueError(f"the Gumbel noise g has shape {tuple(eps.shape)}; expected "
                             f"{'(S, ' if stacked else '('}{batch}, {self.latent}) (batch size, "
                             f"K*C = {self.variables}*{self.categories})")
        self._check_values(eps, "g", "noise")

    prepare_eps = VAE.prepare_eps

    def draw_code(self, n: int, rng=None):
        """n codes from the uniform prior: one-hot rows, (n, K*C)."""
        n = self._check_fits(check_count(n, "n"), self.latent)
        u = self._rng(rng).uniform((n, self.variables, self.categories), self.dtype)
        return self._flat(one_hot(self.xp, self.xp.argmax(u, axis=-1), self.categories,
                                  self.dtype))

    @property
    def prior_text(self) -> str:
        return f"{self.variables} categorical variables x {self.categories} classes, uniform"

    # -- inference -------------------------------------------------------------------------------
    def _encode(self, x):
        h, _ = self.encoder.forward(self.params, x)
        return h

    def encode(self, x, check=True):
        """x: (B, D) -> logits of q(z|x), (B, K*C) (variable k in columns k*C .. k*C + C-1)."""
        if check:
            self.check_input(x)
        return self._encode(x)

    def probabilities(self, x, check=True):
        """x: (B, D) -> q(z|x)'s class probabilities, (B, K, C)."""
        logits = self._grid(self.encode(x, check))
        a = logits - self.xp.max(logits, axis=-1, keepdims=True)
        e = self.xp.exp(a)
        return e / self.xp.sum(e, axis=-1, keepdims=True)

    def code(self, x):
        """x: (B, D) -> the class probabilities flattened, (B, K*C) (the latent figure)."""
        return self._flat(self.probabilities(x))

    def _hard(self, logits, g):
        """Exact samples of q: one_hot(argmax(l + g)), (B, K, C)."""
        return one_hot(self.xp, self.xp.argmax(logits + g, axis=-1), self.categories, self.dtype)

    def _relaxed_terms(self, x, g):
        logits = self._grid(self._encode(x))
        sampler = straight_through if self.straight_through else gumbel_softmax
        y, _ = sampler(self.xp, logits, self._grid(g), self.tau)
        recon, _ = self.px.nll(self._decode_out(self._flat(y)), x)
        kl, _ = losses.kl_categorical(self.xp, logits)
        return recon, kl

    def _terms(self, x, g):
        """The true ELBO's terms at exact one-hot samples: (-log p(x|z), KL), each (B,)."""
        logits = self._grid(self._encode(x))
        z = self._hard(logits, self._grid(g))
        recon, _ = self.px.nll(self._decode_out(self._flat(z)), x)
        kl, _ = losses.kl_categorical(self.xp, logits)
        return recon, kl

    def loss(self, x, eps=None, check=True):
        """The relaxed objective mean_B(recon + beta * kl) that ``loss_and_grads`` returns and
        differentiates, for the same x and Gumbel noise; forward only. 0-d backend array."""
        if check:
            self.check_input(x)
        recon, kl = self._relaxed_terms(x, self.prepare_eps(eps, x.shape[0], check))
        return self.xp.mean(recon + self.beta * kl)

    def loss_terms(self, x, rng=None, check=True):
        """Per-example (-log p(x|z), KL) of the true ELBO, one exact one-hot z ~ q(z|x) per
        example drawn with ``rng`` (default the model's). No gradients."""
        if check:
            self.check_input(x)
        u = self._rng(rng).uniform((x.shape[0], self.latent), self.dtype)
        return self._terms(x, gumbel(self.xp, u))

    def elbo(self, x, eps=None):
        """Per-example true ELBO (B,) in nats at the exact samples argmax(l + g)."""
        self.check_input(x)
        recon, kl = self._terms(x, self.prepare_eps(eps, x.shape[0], True))
        return -(recon + kl)

    def importance_log_weights(self, x, k, rng, check=True):
        """log p(x|z_i) + log p(z_i) - log q(z_i|x) for k exact samples per example, (k, B)
        (for the IWAE bound). log p(z) = -K log C; log q(z|x) = sum_K log q_k(c_k).
        Arguments and errors as :meth:`VAE.importance_log_weights`."""
        if check:
            self.check_input(x)
            self._check_fits(check_count(k, "k") * x.shape[0], self.d_in, "k * B")
            rng = self._rng(rng)
        xp, B = self.xp, x.shape[0]
        logits = self._grid(self._encode(x))
        a = logits - xp.max(logits, axis=-1, keepdims=True)
        logq = a - xp.log(xp.sum(xp.exp(a), axis=-1, keepdims=True))         # (B, K, C)
        u = rng.uniform((k, B, self.variables, self.categories), self.dtype)
        z = one_hot(xp, xp.argmax(xp.expand_dims(logits, axis=0) + gumbel(xp, u), axis=-1),
                    self.categories, self.dtype)                               # (k, B, K, C)
        log_q = xp.sum(z * xp.expand_dims(logq, axis=0), axis=(2, 3))          # (k, B)
        out = self._decode_out(xp.reshape(z, (k * B, self.latent)))
        xr = xp.reshape(xp.broadcast_to(xp.expand_dims(x, axis=0), (k, B, self.d_in)),
                        (k * B, self.d_in))
        nll, _ = self.px.nll(out, xr)
        return -xp.reshape(nll, (k, B)) - self.variables * math.log(self.categories) - log_q

    def reconstruct(self, x):
        """x: (B, D) -> mean of p(x|z) at the most probable class of each variable, (B, D)."""
        self.check_input(x)
        logits = self._grid(self._encode(x))
        z = one_hot(self.xp, self.xp.argmax(logits, axis=-1), self.categories, self.dtype)
        return self.px.mean(self._decode_out(self._flat(z)))

    def sample(self, n: int):
        """n new examples: decode z from the uniform prior -> (n, D) means of p(x|z)."""
        n = self._check_fits(check_count(n, "n"), self._widest())
        return self.px.mean(self._decode_out(self.draw_code(n)))


#: model name (``model.config["kind"]``, the CLI's --model) -> class
MODELS = {"vae": VAE, "autoencoder": Autoencoder, "discrete_vae": DiscreteVAE}


def layout_of(config: dict) -> Layout:
    """The parameter layout ``build_model(config)`` would make, without allocating it (to check
    a checkpoint's config against its layout, and a model's size, before building it)."""
    if not isinstance(config, dict):
        raise TypeError(f"a model config must be a dict, got {type(config).__name__}")
    kind = config.get("kind", "vae")
    if not isinstance(kind, str) or kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(MODELS)}")
    d_in, hidden, latent = _sizes(config.get("d_in", 784), config.get("hidden", (400,)),
                                  config.get("latent", 20))
    code, dec_in = MODELS[kind].widths(config)
    nets = _build_nets(d_in, hidden, dec_in, code, config.get("likelihood", "bernoulli"),
                       config.get("activation", "relu"), config.get("init"), "numpy")
    return Layout([e for net in nets for e in net.param_entries()])


def build_model(config: dict, backend="numpy", dtype="float32", seed=0):
    """Rebuild a model from ``model.config`` (e.g. from a checkpoint)."""
    if not isinstance(config, dict):
        raise TypeError(f"build_model needs a model's config dict (model.config), got "
                        f"{type(config).__name__}")
    cfg = dict(config)
    kind = cfg.pop("kind", "vae")
    cls = MODELS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(MODELS)}")
    _check_config_fields(cls, cfg)
    return cls(**cfg, backend=backend, dtype=dtype, seed=seed)


def _check_config_fields(cls, cfg: dict) -> None:
    """ValueError for a config field the model class does not take (a damaged checkpoint's
    'foo', or 'backend'/'dtype'/'seed', which are build_model's own arguments), instead of
    Python's TypeError about keyword arguments."""
    own = {"backend", "dtype", "seed"}
    takes = set(inspect.signature(cls.__init__).parameters) - {"self"} - own
    unknown = sorted(k for k in cfg if k not in takes)
    if unknown:
        given = [k for k in unknown if k in own]
        raise ValueError(f"the {cls.__name__} config has no field {', '.join(map(repr, unknown))}"
                         + (" (backend, dtype and seed are build_model's own arguments)"
                            if given else f"; its fields: {', '.join(sorted(takes))}"))
