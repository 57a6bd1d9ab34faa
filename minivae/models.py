"""An Autoencoder and a VAE built from the layers, with hand-written backward passes.

Both expose ``loss_and_grads(x, eps=None) -> LossResult``: the loss (mean over the batch, in
nats per example), its parts, and the gradient of the loss in the flat buffer
``model.params.grad`` (overwritten on every call).

VAE, for one batch x: (B, D):

    h           = encoder(x)                       (B, 2L)  columns [:L] mu, [L:] logvar
    z           = mu + exp(logvar/2) * eps         (B, L)   eps ~ N(0, I), drawn by the model
    out         = decoder(z)                       (B, D)   logits (Bernoulli) or mean
    recon       = -log p(x|z)                      (B,)
    kl          = KL(q(z|x) || N(0, I))            (B,)     analytic
    loss        = mean_B(recon + beta * kl)        ()       = -ELBO per example when beta = 1

The mu and logvar heads share one Dense layer of width 2L: one matrix product instead of two.
"""
from __future__ import annotations

import math
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

from . import losses, parallel
from .backend import resolve
from .layers import mlp, sigmoid
from .optim import sum_into_first
from .params import Layout, Params
from .sampling import sample, sample_backward

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned")


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


class _Model:
    """Shared plumbing: flat parameters, backend, RNG, input validation, decoding."""

    kind = "model"

    def _setup(self, nets, backend, dtype, seed):
        self.backend = resolve(backend)
        self.xp = self.backend.xp
        layout = Layout([e for net in nets for e in net.param_entries()])
        self.params = Params(layout, self.backend, dtype)
        self.dtype = self.params.dtype
        self.rng = self.backend.rng(seed)
        self._replicas = []  # Params sharing self.params.data, one per extra thread
        for net in nets:
            for name, layer in net:
                layer.init(self.params.group(name), self.rng)

    @property
    def config(self) -> dict:
        """Constructor arguments; ``build_model(model.config)`` rebuilds the architecture."""
        return dict(self._config)

    # -- input checks: clear errors, nothing half-done ------------------------------------
    def check_input(self, x, name="x"):
        """Raise ValueError/TypeError naming the problem if x is not a finite (B, D) batch."""
        xp = self.xp
        if not self.backend.is_array(x):
            raise TypeError(
                f"{name} is a {type(x).__module__}.{type(x).__name__}, but this model runs on "
                f"backend {self.backend.name!r}: convert it with model.backend.asarray({name})"
            )
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (batch, {self.d_in})")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch")
        if not xp.isdtype(x.dtype, "real floating"):
            raise TypeError(
                f"{name} has dtype {x.dtype}; expected floating data ({self.dtype}). Integer "
                f"pixels must be scaled to [0, 1] first, e.g. x / 255"
            )
        if x.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the model uses {self.dtype}")
        if not bool(xp.all(xp.isfinite(x))):
            raise ValueError(f"{name} contains NaN or Inf")
        if self.likelihood == "bernoulli" and not bool(xp.all((x >= 0.0) & (x <= 1.0))):
            raise ValueError(f"{name} has values outside [0, 1], which a Bernoulli likelihood needs")

    def loss_and_grads(self, x, eps=None, check=True) -> LossResult:
        """One forward and backward pass. x: (B, D); eps: (B, L) or None to draw it (VAE; an
        Autoencoder takes None). The maths is in ``_pass``.

        On NumPy, a batch of at least 2 * parallel.MIN_ROWS rows is split over
        ``minivae.get_num_threads()`` threads (see :mod:`minivae.parallel`): each thread runs
        ``_pass`` on its rows into its own gradient buffer, and the buffers are summed.
        ``check=False`` skips the input validation (it reads a device flag back to the host).
        """
        return self._step(x, eps, check, opt=None)

    def _step(self, x, eps, check, opt):
        """loss_and_grads, then ``opt.step()`` when an optimizer is given (minivae.train_step)."""
        xp = self.xp
        if check:
            self.check_input(x)
        B = x.shape[0]
        eps = self._noise(eps, B, check)
        if self.backend.name == "numpy" and (k := parallel.shards(B)) > 1:
            loss_b, recon, kl = self._pass_parallel(x, eps, B, k, opt)
        else:
            pin = parallel.one_blas_thread() if self.backend.name == "numpy" else nullcontext()
            with pin:
                loss_b, recon, kl = self._pass(self.params, x, eps, B)
            if opt is not None:
                opt.step()
        return LossResult(loss=xp.mean(loss_b), recon=xp.mean(recon), kl=xp.mean(kl),
                          elbo=-(recon + kl), grads=self.params.grad)

    def _pass_parallel(self, x, eps, B, k, opt=None):
        """``_pass`` on k row blocks in k threads; then, once all k are done (a barrier), each
        thread sums the k gradient buffers over its slice of the flat buffer into params.grad
        and, given an optimizer, applies the update to that slice: one parallel section."""
        if len(self._replicas) < k - 1 or any(r.data is not self.params.data for r in self._replicas):
            self._replicas = [self.params.with_own_grad() for _ in range(k - 1)]
        shards = [self.params, *self._replicas[: k - 1]]
        grads = [P.grad for P in shards]
        rows, slices = parallel.bounds(B, k), parallel.bounds(grads[0].shape[0], k)
        update = None

        def count_the_step():         # run once, by the last thread to reach the barrier
            nonlocal update
            if opt is not None:
                opt.t += 1
                update = opt._sliced_update() if opt.fast else None

        all_done = threading.Barrier(k, action=count_the_step)

        def job(j):
            (lo, hi), (a, b) = rows[j], slices[j]
            try:
                out = self._pass(shards[j], x[lo:hi], None if eps is None else eps[lo:hi], B)
            except BaseException:
                all_done.abort()      # the others stop waiting; the team re-raises this error
                raise
            all_done.wait()
            gs = tuple(g[a:b] for g in grads)
            if update is None:
                sum_into_first(gs)
            else:                     # the update sums them itself, in the same pass
                fn, arrays, args = update
                fn(gs, *(arr[a:b] for arr in arrays), *args)
            return out

        parts = parallel.team(k).run([partial(job, j) for j in range(k)], concurrent=True)
        if parts is None:             # the team is busy (a nested call): one thread instead
            with parallel.one_blas_thread():
                terms = self._pass(self.params, x, eps, B)
            if opt is not None:
                opt.step()
            return terms
        if opt is not None and update is None:        # no sliced form: the plain step
            opt._step_plain(self.params.data, self.params.grad)
        return tuple(self.xp.concat([p[j] for p in parts]) for j in range(3))

    def recon_nll(self, out, x):
        """-log p(x|z) per example from the decoder output.

        out: (B, D) logits or mean, or (B, 2D) mean | logvar; x: (B, D) -> (B,), cache.
        Public so that evaluation and the gradient estimators share this one dispatch.
        """
        xp = self.xp
        if self.likelihood == "bernoulli":
            if self.backend.name == "numpy":  # in-place twin, tests/test_fastpath.py
                return losses.bernoulli_nll_numpy(out, x)
            return losses.bernoulli_nll(xp, out, x)
        if self.likelihood == "gaussian":
            return losses.gaussian_nll(xp, out, x, self.x_logvar)
        D = self.d_in
        return losses.gaussian_nll(xp, out[:, :D], x, out[:, D:])

    def recon_nll_backward(self, scale, cache):
        """scale: d loss / d per-example NLL (float or (B,)) -> d loss / d out, (B, D) or (B, 2D)."""
        xp = self.xp
        if self.likelihood == "bernoulli":
            if self.backend.name == "numpy":
                return losses.bernoulli_nll_backward_numpy(scale, cache)
            return losses.bernoulli_nll_backward(xp, scale, cache)
        dmean, dlogvar = losses.gaussian_nll_backward(xp, scale, cache)
        return dmean if dlogvar is None else xp.concat([dmean, dlogvar], axis=1)

    def decode_logits(self, z):
        """z: (B, L) -> raw decoder output (B, D) (or (B, 2D): mean | logvar, learned variance)."""
        out, _ = self.decoder.forward(self.params, z)
        return out

    def decode(self, z):
        """z: (B, L) -> mean of p(x|z), (B, D): probabilities (Bernoulli) or the Gaussian mean."""
        out = self.decode_logits(z)
        if self.likelihood == "bernoulli":
            return sigmoid(self.xp, out)
        return out[:, : self.d_in]

    def n_params(self) -> int:
        return self.params.layout.size


class VAE(_Model):
    """Variational autoencoder: encoder -> (mu, logvar) -> reparametrized z -> decoder.

    Defaults are the classic setup (Kingma & Welling; the PyTorch example): 784-400-20, ReLU,
    Bernoulli likelihood. ``beta`` weights the KL term (beta-VAE, and KL warm-up).
    ``likelihood``: "bernoulli" | "gaussian" (fixed std ``x_sigma``) | "gaussian_learned".
    """

    kind = "vae"

    def __init__(self, d_in=784, hidden=(400,), latent=20, activation="relu",
                 likelihood="bernoulli", beta=1.0, x_sigma=1.0, init=None,
                 backend="numpy", dtype="float32", seed=0):
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
        hidden = tuple(int(h) for h in hidden)
        self._config = dict(kind="vae", d_in=int(d_in), hidden=list(hidden), latent=int(latent),
                            activation=activation, likelihood=likelihood, beta=float(beta),
                            x_sigma=float(x_sigma), init=init)
        self.d_in, self.latent, self.likelihood = int(d_in), int(latent), likelihood
        self.beta = float(beta)
        self.x_logvar = 2.0 * math.log(x_sigma)
        d_out = 2 * self.d_in if likelihood == "gaussian_learned" else self.d_in
        self.encoder = mlp([self.d_in, *hidden, 2 * self.latent], activation, prefix="enc",
                           init=init, backend=backend)
        self.decoder = mlp([self.latent, *reversed(hidden), d_out], activation, prefix="dec",
                           init=init, backend=backend)
        self._setup([self.encoder, self.decoder], backend, dtype, seed)

    def encode(self, x):
        """x: (B, D) -> mu (B, L), logvar (B, L) of q(z|x)."""
        h, _ = self.encoder.forward(self.params, x)
        return h[:, : self.latent], h[:, self.latent:]

    def draw_eps(self, batch: int):
        """eps ~ N(0, I), (batch, L), from the model's RNG on its backend."""
        return self.rng.normal((batch, self.latent), self.dtype)

    def check_eps(self, eps, batch):
        if not self.backend.is_array(eps):
            raise TypeError(f"eps is a {type(eps).__name__}; expected a {self.backend.name} array")
        if tuple(eps.shape) != (batch, self.latent):
            raise ValueError(
                f"eps has shape {tuple(eps.shape)} but the batch needs ({batch}, {self.latent}) "
                f"(batch size, latent size)"
            )
        if eps.dtype != self.dtype:
            raise TypeError(f"eps has dtype {eps.dtype} but the model uses {self.dtype}")

    def _noise(self, eps, B, check):
        if eps is None:
            return self.draw_eps(B)
        if check:
            self.check_eps(eps, B)
        return eps

    def _pass(self, P, x, eps, n):
        """Forward and backward over the rows x: (b, D) with their eps: (b, L), writing
        d(sum of these rows' losses / n)/d params into ``P.grad`` (n: the whole batch's size,
        so that the gradients of several row blocks add up to the batch mean's).
        -> per-row (loss, recon, kl), each (b,)."""
        xp, L = self.xp, self.latent
        b = x.shape[0]
        # forward
        h, enc_caches = self.encoder.forward(P, x)
        mu, logvar = h[:, :L], h[:, L:]
        z, s_cache = sample(xp, mu, logvar, eps)
        out, dec_caches = self.decoder.forward(P, z)
        recon, r_cache = self.recon_nll(out, x)
        kl, k_cache = losses.kl_normal(xp, mu, logvar)
        loss_b = recon + self.beta * kl if self.beta != 1.0 else recon + kl

        # backward: d loss / d per-example terms is 1/n (recon) and beta/n (kl)
        dout = self.recon_nll_backward(1.0 / n, r_cache)
        dz = self.decoder.backward(P, dout, dec_caches, overwrite_dout=True)
        dmu, dlogvar, _ = sample_backward(dz, s_cache)
        kmu, klogvar = losses.kl_normal_backward(xp, self.beta / n, k_cache)
        dh = xp.empty((b, 2 * L), dtype=self.dtype)  # written in halves: no concat copy
        dh[:, :L] = dmu + kmu
        dh[:, L:] = dlogvar + klogvar
        self.encoder.backward(P, dh, enc_caches, need_dx=False, overwrite_dout=True)
        return loss_b, recon, kl

    def elbo(self, x, eps=None):
        """Per-example ELBO (B,) in nats with one sample of z (no gradients)."""
        mu, logvar = self.encode(x)
        eps = self.draw_eps(x.shape[0]) if eps is None else eps
        z, _ = sample(self.xp, mu, logvar, eps)
        recon, _ = self.recon_nll(self.decode_logits(z), x)
        kl, _ = losses.kl_normal(self.xp, mu, logvar)
        return -(recon + kl)

    def reconstruct(self, x, sample_z=False):
        """x: (B, D) -> mean of p(x|z) at z = mu (or a sample of q(z|x)), (B, D)."""
        mu, logvar = self.encode(x)
        z = sample(self.xp, mu, logvar, self.draw_eps(x.shape[0]))[0] if sample_z else mu
        return self.decode(z)

    def sample(self, n: int):
        """n new examples: decode z ~ N(0, I) -> (n, D) means of p(x|z)."""
        return self.decode(self.draw_eps(int(n)))


class Autoencoder(_Model):
    """Deterministic autoencoder: x -> code (B, L) -> reconstruction. The PCA generalisation:
    with ``activation=None`` and a Gaussian likelihood it is linear and learns the principal
    subspace. Loss = mean_B(-log p(x | decoder(encoder(x)))), no KL, no sampling.
    """

    kind = "autoencoder"

    def __init__(self, d_in=784, hidden=(400,), latent=20, activation="relu",
                 likelihood="bernoulli", x_sigma=1.0, init=None,
                 backend="numpy", dtype="float32", seed=0):
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
        hidden = tuple(int(h) for h in hidden)
        self._config = dict(kind="autoencoder", d_in=int(d_in), hidden=list(hidden),
                            latent=int(latent), activation=activation, likelihood=likelihood,
                            x_sigma=float(x_sigma), init=init)
        self.d_in, self.latent, self.likelihood = int(d_in), int(latent), likelihood
        self.x_logvar = 2.0 * math.log(x_sigma)
        d_out = 2 * self.d_in if likelihood == "gaussian_learned" else self.d_in
        self.encoder = mlp([self.d_in, *hidden, self.latent], activation, prefix="enc",
                           init=init, backend=backend)
        self.decoder = mlp([self.latent, *reversed(hidden), d_out], activation, prefix="dec",
                           init=init, backend=backend)
        self._setup([self.encoder, self.decoder], backend, dtype, seed)

    def encode(self, x):
        """x: (B, D) -> code (B, L)."""
        code, _ = self.encoder.forward(self.params, x)
        return code

    def _noise(self, eps, B, check):
        if eps is not None:
            raise ValueError("an Autoencoder draws no noise: pass eps=None")
        return None

    def _pass(self, P, x, eps, n):
        """Forward and backward over the rows x: (b, D), writing d(sum of their losses / n)
        / d params into ``P.grad``. -> per-row (loss, recon, kl = 0), each (b,)."""
        code, enc_caches = self.encoder.forward(P, x)
        out, dec_caches = self.decoder.forward(P, code)
        recon, r_cache = self.recon_nll(out, x)
        dout = self.recon_nll_backward(1.0 / n, r_cache)
        dcode = self.decoder.backward(P, dout, dec_caches, overwrite_dout=True)
        self.encoder.backward(P, dcode, enc_caches, need_dx=False, overwrite_dout=True)
        return recon, recon, self.xp.zeros_like(recon)

    def reconstruct(self, x):
        return self.decode(self.encode(x))


def train_step(model, opt, x, eps=None, check=True) -> LossResult:
    """One optimisation step on the batch x: (B, D). The same as its plain twin

        r = model.loss_and_grads(x, eps, check); opt.step(); return r

    (``tests/test_parallel.py`` checks that), but on NumPy with several threads the gradient
    sum and the optimizer update run in the same parallel section as the forward/backward,
    each thread on its own slice of the flat buffers right after the others finish: one
    hand-off to the worker threads per step instead of three. The trainer uses this.
    """
    if opt.params is not model.params:
        raise ValueError("the optimizer was built for another model's parameters")
    return model._step(x, eps, check, opt=opt)


def build_model(config: dict, backend="numpy", dtype="float32", seed=0):
    """Rebuild a model from ``model.config`` (e.g. from a checkpoint)."""
    cfg = dict(config)
    kind = cfg.pop("kind", "vae")
    cls = {"vae": VAE, "autoencoder": Autoencoder}.get(kind)
    if cls is None:
        raise ValueError(f"unknown model kind {kind!r}")
    return cls(**cfg, backend=backend, dtype=dtype, seed=seed)
