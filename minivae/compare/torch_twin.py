"""The minivae VAE / Autoencoder as a PyTorch computation, on minivae's weights.

Only this module imports torch. The parameters are leaf tensors, one per entry of
``model.params.layout``, in the same shapes (Dense W: (D_in, D_out)), so ``x @ W + b`` is the
same map and the flat gradient is the concatenation of ``.grad`` in layout order.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from ..layers import Dense, LeakyReLU

_ACT = {
    "ReLU": torch.relu,
    "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid,
    "Softplus": F.softplus,
}


class TorchTwin:
    """``model``'s architecture in torch; ``params`` are its weights as leaf tensors.

    twin.loss_and_grads(x, eps) -> (loss: float, flat grads: np.ndarray (n,), layout order)
    twin.params        list of leaf tensors in layout order (e.g. for torch.optim.Adam)
    twin.flat()        the parameters as one flat NumPy array (layout order)
    """

    def __init__(self, model):
        self.model = model
        self.layout = model.params.layout
        self.dtype = torch.float64 if "64" in str(model.dtype) else torch.float32
        flat = model.backend.to_host(model.params.data)
        self.params = [
            torch.tensor(flat[self.layout.slice(n)].reshape(self.layout.shapes[n]),
                         dtype=self.dtype, requires_grad=True)
            for n in self.layout.names
        ]
        self.by_name = dict(zip(self.layout.names, self.params))

    # -- the computation ---------------------------------------------------------------------
    def _net(self, seq, h):
        for name, layer in seq:
            if isinstance(layer, Dense):
                h = h @ self.by_name[f"{name}.W"] + self.by_name[f"{name}.b"]
            elif isinstance(layer, LeakyReLU):
                h = F.leaky_relu(h, layer.alpha)
            else:
                h = _ACT[type(layer).__name__](h)
        return h

    def _recon(self, out, x):
        """-log p(x | decoder output) per example, (B,), with torch's own implementations."""
        m = self.model
        if m.likelihood == "bernoulli":
            return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)
        if m.likelihood == "gaussian":
            std = torch.full_like(out, math.exp(0.5 * m.x_logvar))
            return -Normal(out, std).log_prob(x).sum(1)
        D = m.d_in
        return -Normal(out[:, :D], torch.exp(0.5 * out[:, D:])).log_prob(x).sum(1)

    def loss(self, x, eps=None):
        """The model's loss, mean_B(recon + beta KL), as a torch scalar."""
        m = self.model
        h = self._net(m.encoder, x)
        if not m.has_prior:
            return self._recon(self._net(m.decoder, h), x).mean()
        L = m.latent
        mu, logvar = h[:, :L], h[:, L:]
        std = torch.exp(0.5 * logvar)
        z = mu + std * eps
        recon = self._recon(self._net(m.decoder, z), x)
        prior = Normal(torch.zeros_like(mu), torch.ones_like(mu))
        kl = kl_divergence(Normal(mu, std), prior).sum(1)
        return (recon + m.beta * kl).mean()

    def tensor(self, a):
        return None if a is None else torch.as_tensor(np.asarray(a), dtype=self.dtype)

    def loss_and_grads(self, x, eps=None):
        """x: (B, D), eps: (B, L) or None (host arrays) -> (loss, flat gradient (n,))."""
        loss = self.loss(self.tensor(x), self.tensor(eps))
        grads = torch.autograd.grad(loss, self.params)
        flat = torch.cat([g.reshape(-1) for g in grads]).detach().numpy()
        return float(loss.detach()), flat

    def flat(self) -> np.ndarray:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).numpy()
