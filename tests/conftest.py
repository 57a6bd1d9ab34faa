"""Shared fixtures: one test body, run on every array backend.

``backend`` is parametrised over "numpy", "strict" (array-api-strict: fails on any NumPy leak)
and "cupy" (skipped, with the reason, where CuPy or a working GPU is missing).
"""
import numpy as np
import pytest

from minivae.backend import BackendUnavailable, get_backend

BACKENDS = ["numpy", "strict", "cupy"]


def _backend_or_skip(name):
    try:
        return get_backend(name)
    except BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each backend in turn; cupy is skipped cleanly without a GPU."""
    return _backend_or_skip(request.param)


@pytest.fixture(params=["numpy", "strict"])
def cpu_backend(request):
    return get_backend(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=["compiled", "numpy"])
def kernel_mode(request, monkeypatch):
    """The NumPy fast paths twice: with minivae's compiled kernels (minivae/engine/_kernels.c) and
    with their NumPy twins. "compiled" is skipped, with the reason, where it was not built."""
    from minivae.engine import kernels

    if request.param == "compiled" and not kernels.available():
        pytest.skip("minivae.engine._kernels was not built (no C compiler at install time)")
    monkeypatch.setattr(kernels, "_enabled", request.param == "compiled")
    return request.param
