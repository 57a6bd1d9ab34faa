"""One flat buffer, named views into it."""
import numpy as np
import pytest

from minivae.params import Layout, Params


def test_layout_packs_tensors_end_to_end():
    L = Layout([("a.W", (2, 3)), ("a.b", (3,)), ("c.W", (3, 1))])
    assert L.size == 6 + 3 + 3
    assert [L.offsets[n] for n in L.names] == [0, 6, 9]
    assert L.slice("a.b") == slice(6, 9)
    assert Layout.from_json(L.to_json()) == L
    with pytest.raises(ValueError, match="duplicate"):
        Layout([("x", (1,)), ("x", (2,))])


def test_views_share_memory_with_the_flat_buffers(backend):
    P = Params(Layout([("l.W", (2, 3)), ("l.b", (3,))]), backend, "float64")
    P.views["l.W"][...] = 1.0
    P.group("l", grad=True)["b"][...] = 2.0
    data, grad = backend.to_host(P.data), backend.to_host(P.grad)
    assert np.array_equal(data, [1.0] * 6 + [0.0] * 3)
    assert np.array_equal(grad, [0.0] * 6 + [2.0] * 3)
    assert set(P.group("l")) == {"W", "b"} and tuple(P.group("l")["W"].shape) == (2, 3)


def test_state_dict_round_trip_and_layout_mismatch(backend):
    L = Layout([("l.W", (2, 2))])
    P = Params(L, backend, "float32")
    P.set_flat(np.array([1, 2, 3, 4], dtype=np.float32))
    Q = Params(L, backend, "float32")
    Q.load_state_dict(P.state_dict())
    assert np.array_equal(backend.to_host(Q.views["l.W"]), [[1, 2], [3, 4]])
    other = Params(Layout([("l.W", (4,))]), backend, "float32")
    with pytest.raises(ValueError, match="layout does not match"):
        other.load_state_dict(P.state_dict())
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \(4,\)"):
        P.set_flat(np.zeros(3, dtype=np.float32))
