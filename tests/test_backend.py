"""Backends: names, clear errors, seeded RNG on the right device, host round trips."""
import numpy as np
import pytest

from minivae.backend import NAMES, BackendUnavailable, available, get_backend


def test_known_names_and_unknown_name_error():
    assert set(NAMES) == {"numpy", "cupy", "strict", "auto"}
    with pytest.raises(ValueError, match="unknown backend 'torch'.*numpy"):
        get_backend("torch")


def test_auto_picks_a_working_backend():
    be = get_backend("auto")
    assert be.name in ("numpy", "cupy")
    assert (be.name == "cupy") == (available()["cupy"] == "ok")


def test_cupy_request_without_gpu_says_which_part_is_missing():
    status = available()["cupy"]
    if status == "ok":
        pytest.skip("a GPU is usable here")
    with pytest.raises(BackendUnavailable) as err:
        get_backend("cupy")
    msg = str(err.value)
    assert "not installed" in msg or "no CUDA device/driver is usable" in msg
    assert msg == status


def test_rng_is_seeded_and_draws_on_the_backend(backend):
    a = backend.rng(7).normal((3, 4), "float64")
    b = backend.rng(7).normal((3, 4), "float64")
    c = backend.rng(8).normal((3, 4), "float64")
    assert backend.is_array(a) and tuple(a.shape) == (3, 4)
    assert a.dtype == backend.xp.float64
    assert np.array_equal(backend.to_host(a), backend.to_host(b))
    assert not np.array_equal(backend.to_host(a), backend.to_host(c))
    assert backend.rng(0).normal((2,), "float32").dtype == backend.xp.float32


def test_numpy_and_strict_see_identical_noise_for_the_same_seed():
    n, s = get_backend("numpy"), get_backend("strict")
    assert np.array_equal(n.to_host(n.rng(3).normal((5,))), s.to_host(s.rng(3).normal((5,))))


def test_rng_state_round_trip_continues_the_stream(cpu_backend):
    r = cpu_backend.rng(11)
    r.normal((4,))
    state = r.get_state()
    expected = cpu_backend.to_host(r.normal((6,)))
    r2 = cpu_backend.rng(0)
    r2.set_state(state)
    assert np.array_equal(cpu_backend.to_host(r2.normal((6,))), expected)


def test_host_round_trip_and_dtype_names(backend):
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    dev = backend.asarray(host)
    assert backend.is_array(dev)
    back = backend.to_host(dev)
    assert isinstance(back, np.ndarray) and np.array_equal(back, host)
    assert backend.dtype("float64") == backend.xp.float64
    with pytest.raises(ValueError, match="float32 or float64"):
        backend.dtype("int8")
