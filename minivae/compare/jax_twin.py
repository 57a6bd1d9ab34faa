"""The minivae VAE / Autoencoder as a JAX function of its parameters, on minivae's weights.

Only this module imports jax (float64 enabled by :func:`minivae.compare.require`). The
parameters are a list of arrays in layout order, in minivae's shapes (Dense W: (D_in, D_out));
``jax.grad`` of the loss gives the gradient, concatenated into minivae's flat layout.
The Bernoulli term uses ``jax.nn.log_sigmoid``, the Gaussian ones
``jax.scipy.stats.norm.logpdf``: JAX's implementations, not copies of minivae's formulas.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from ..layers import Dense, LeakyReLU

_ACT = {"ReLU": jax.nn.relu, "Tanh": jnp.tanh, "Sigmoid": jax.nn.sigmoid,
        "Softplus": jax.nn.softplus}


class JaxTwin:
    """twin.loss_and_grads(x, eps) -> (loss: float, flat grads: np.ndarray (n,), layout order)"""

    def __init__(self, model):
        self.model = model
        self.layout = model.params.layout
        self.dtype = jnp.float64 if "64" in str(model.dtype) else jnp.float32
        flat = model.backend.to_host(model.params.data)
        self.params = [jnp.asarray(flat[self.layout.slice(n)].reshape(self.layout.shapes[n]),
                                   dtype=self.dtype) for n in self.layout.names]
        self._grad = jax.value_and_grad(self.loss)

    def _net(self, seq, by_name, h):
        for name, layer in seq:
            if isinstance(layer, Dense):
                h = h @ by_name[f"{name}.W"] + by_name[f"{name}.b"]
            elif isinstance(layer, LeakyReLU):
                h = jax.nn.leaky_relu(h, layer.alpha)
            else:
                h = _ACT[type(layer).__name__](h)
        return h

    def _recon(self, out, x):
        m = self.model
        if m.likelihood == "bernoulli":
            return -jnp.sum(x * jax.nn.log_sigmoid(out) + (1 - x) * jax.nn.log_sigmoid(-out), 1)
        if m.likelihood == "gaussian":
            return -jnp.sum(norm.logpdf(x, out, math.exp(0.5 * m.x_logvar)), 1)
        D = m.d_in
        return -jnp.sum(norm.logpdf(x, out[:, :D], jnp.exp(0.5 * out[:, D:])), 1)

    def loss(self, params, x, eps=None):
        m = self.model
        by_name = dict(zip(self.layout.names, params))
        h = self._net(m.encoder, by_name, x)
        if not m.has_prior:
            return jnp.mean(self._recon(self._net(m.decoder, by_name, h), x))
        L = m.latent
        mu, logvar = h[:, :L], h[:, L:]
        z = mu + jnp.exp(0.5 * logvar) * eps
        recon = self._recon(self._net(m.decoder, by_name, z), x)
        kl = 0.5 * jnp.sum(mu ** 2 + jnp.exp(logvar) - 1.0 - logvar, 1)
        return jnp.mean(recon + m.beta * kl)

    def loss_and_grads(self, x, eps=None):
        x = jnp.asarray(np.asarray(x), dtype=self.dtype)
        eps = None if eps is None else jnp.asarray(np.asarray(eps), dtype=self.dtype)
        loss, grads = self._grad(self.params, x, eps)
        flat = np.concatenate([np.asarray(g).reshape(-1) for g in grads])
        return float(loss), flat
