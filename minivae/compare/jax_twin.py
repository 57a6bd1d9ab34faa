"""Placeholder: the JAX twin is not written yet (see minivae.compare.twin)."""
from __future__ import annotations


class JaxTwin:
    def __init__(self, model):
        raise NotImplementedError(
            "comparison against JAX is not implemented yet; use --against torch")
