"""The same models in autograd frameworks, for checking minivae's hand-written gradients.

    from minivae import VAE
    from minivae.compare import compare
    model = VAE(dtype="float64")
    c = compare(model, x, eps, against="torch")    # same weights, same eps, same x
    c.max_rel_diff, c.per_tensor["enc.0.W"]        # {"max_abs": ..., "max_rel": ...}

A twin is built from the minivae model's own weights (minivae's Dense W is (D_in, D_out) and
the forward is x @ W + b, so the tensors are used as they are; the VAE encoder's last Dense
has width 2L, columns [:L] mu and [L:] logvar) and is fed the same eps. Its loss and
gradients come back in minivae's flat layout (``model.params.layout``), so the two gradient
buffers can be compared tensor by tensor.

The twins' likelihoods use the frameworks' own implementations (torch:
``binary_cross_entropy_with_logits``, ``torch.distributions.Normal``; jax:
``jax.nn.log_sigmoid``, ``jax.scipy.stats.norm``), not a copy of minivae's formulas, so
agreement is evidence, not an echo. The KL term: torch's twin uses
``torch.distributions.kl_divergence``; JAX has no KL function, so its twin writes the closed
form 1/2 sum(mu^2 + exp(logvar) - 1 - logvar) out itself; its *gradient* is still JAX's. JAX is optional (``pip install 'minivae[jax]'``); float64
is switched on in JAX when its twin is built.

Relative difference, per tensor (this is what ``minivae compare`` reports):

    max_rel = max|a - b| / max(max|a|, max|b|)        (0 when both tensors are all zero)

the largest elementwise difference measured against the tensor's scale. It does not blow up
where single entries are near zero (an elementwise |a-b|/|a| would, for any nonzero round-off
there), and a tensor that disagrees anywhere by more than round-off still shows up.

torch and jax are imported only inside this package: the core never needs them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

AGAINST = ("torch", "jax")

#: the largest ``max_rel_diff`` that counts as agreement to round-off, per dtype
TOLERANCE = {"float64": 1e-10, "float32": 1e-4}

INSTALL_HINT = {
    "torch": "pip install 'minivae[compare]' (in this workplace: pip install torch==2.13.0, "
             "the CPU build)",
    "jax": "pip install 'minivae[jax]' (or: pip install jax jaxlib)",
}


class FrameworkMissing(ImportError):
    """The autograd framework asked for is not installed (the message says how to get it)."""


def require(framework: str):
    """Import and return ``torch`` or ``jax``, or raise :class:`FrameworkMissing`."""
    if framework not in AGAINST:
        raise ValueError(f"unknown framework {framework!r}; choose one of {', '.join(AGAINST)}")
    try:
        if framework == "torch":
            import torch
        else:
            import jax
            jax.config.update("jax_enable_x64", True)
            return jax
    except ImportError as e:
        raise FrameworkMissing(
            f"comparing against {framework} needs {framework}, which is not installed: "
            f"{INSTALL_HINT[framework]}"
        ) from e
    return torch


def twin(model, against: str = "torch"):
    """The autograd twin of ``model`` for ``against`` ("torch" or "jax"), with its weights."""
    require(against)
    if against == "torch":
        from .torch_twin import TorchTwin

        return TorchTwin(model)
    from .jax_twin import JaxTwin

    return JaxTwin(model)


def diff(a, b) -> dict:
    """{"max_abs": max|a-b|, "max_rel": max|a-b| / max(max|a|, max|b|)} of two arrays."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(b)))) if a.size else 0.0
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs}


@dataclass
class Comparison:
    """minivae vs a framework on one batch: loss and every gradient tensor."""

    against: str
    dtype: str
    loss_minivae: float
    loss_other: float
    per_tensor: dict = field(default_factory=dict)  # name -> {"max_abs", "max_rel"}

    @property
    def max_rel_diff(self) -> float:
        return max(d["max_rel"] for d in self.per_tensor.values())

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.dtype]

    @property
    def passed(self) -> bool:
        return self.max_rel_diff <= self.tolerance

    def to_json(self) -> dict:
        return {"against": self.against, "dtype": self.dtype, "max_rel_diff": self.max_rel_diff,
                "tolerance": self.tolerance, "passed": self.passed,
                "loss": {"minivae": self.loss_minivae, self.against: self.loss_other},
                "per_tensor": self.per_tensor}

    def table(self) -> str:
        w = max(len(n) for n in self.per_tensor)
        lines = [f"minivae vs {self.against} ({self.dtype}); rel = max|a-b| / max(max|a|, max|b|)",
                 f"{'tensor':<{w}}  {'max abs diff':>12}  {'max rel diff':>12}"]
        for name, d in self.per_tensor.items():
            lines.append(f"{name:<{w}}  {d['max_abs']:12.3e}  {d['max_rel']:12.3e}")
        verdict = "agree" if self.passed else "DISAGREE"
        lines.append(f"max rel diff {self.max_rel_diff:.3e} (tolerance {self.tolerance:.0e}): "
                     f"{verdict}")
        return "\n".join(lines)


def compare(model, x, eps=None, against: str = "torch") -> Comparison:
    """One forward/backward of ``model`` and of its ``against`` twin on the same x and eps.

    x: (B, D) host or backend array; eps: (B, L) for a VAE (drawn from the model's RNG when
    None), None for an Autoencoder. Returns the per-tensor differences of the gradients, and
    of the loss (entry "loss").
    """
    be = model.backend
    tw = twin(model, against)
    x_dev = be.asarray(np.asarray(be.to_host(x) if be.is_array(x) else x), dtype=model.dtype)
    if model.has_prior and eps is None:
        eps = model.draw_eps(x_dev.shape[0])
    eps_dev = None if eps is None else be.asarray(
        np.asarray(be.to_host(eps) if be.is_array(eps) else eps), dtype=model.dtype)
    r = model.loss_and_grads(x_dev, eps_dev)
    loss_a = float(r.loss)
    grad_a = be.to_host(r.grads).copy()
    x_h = be.to_host(x_dev)
    eps_h = None if eps_dev is None else be.to_host(eps_dev)
    loss_b, grad_b = tw.loss_and_grads(x_h, eps_h)
    per = {"loss": diff(np.array([loss_a]), np.array([loss_b]))}
    layout = model.params.layout
    for name in layout.names:
        sl = layout.slice(name)
        per[name] = diff(grad_a[sl], grad_b[sl])
    dtype = "float64" if "64" in str(model.dtype) else "float32"
    return Comparison(against, dtype, loss_a, loss_b, per)
