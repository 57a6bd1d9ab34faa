"""The engine's fast paths against the reference they replace, and the rule between the rooms.

One test walks the registry: every twin runs its case on its own backend (NumPy; CuPy for the
GPU kernels, skipped with the reason where no GPU works) against the reference computed on
"numpy" and on "strict" (array-api-strict, where no fast path can run). A twin that promises
the reference's bits must give them; the others agree to float64 round-off.
"""
import ast
import pathlib

import numpy as np
import pytest

import minivae
from minivae.backend import BackendUnavailable, get_backend
from minivae.engine import REGISTRY, pick
from minivae.engine.registry import twin_of

ROOT = pathlib.Path(minivae.__file__).parent
REFERENCE = ["layers.py", "sampling.py", "losses.py", "models.py", "optim.py", "params.py"]


def _same(fast, ref, exact, label):
    assert len(fast) == len(ref), label
    for i, (a, b) in enumerate(zip(fast, ref)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, (label, i, a.shape, b.shape)
        if exact:
            np.testing.assert_array_equal(a, b, err_msg=f"{label}: output {i} not bit-equal")
        else:
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14,
                                       err_msg=f"{label}: output {i} beyond round-off")


@pytest.mark.parametrize("twin", REGISTRY,
                         ids=lambda t: f"{t.name.replace('minivae.', '')}@{t.backends[0]}")
@pytest.mark.parametrize("reference_on", ["numpy", "strict"])
def test_every_registered_twin_equals_its_reference(twin, reference_on, kernel_mode):
    try:
        own = get_backend(twin.backends[0])
    except BackendUnavailable as e:
        pytest.skip(f"{twin.name} runs on {twin.backends[0]}: {e}")
    fast = twin.case(twin.fast, own, np.random.default_rng(7))
    ref = twin.case(twin.reference, get_backend(reference_on), np.random.default_rng(7))
    _same(fast, ref, twin.exact, f"{twin.name} vs reference on {reference_on}")


def test_the_registry_covers_the_speed_paths_and_dispatches_per_backend():
    from minivae import VAE, Adam, layers, losses
    names = {t.name for t in REGISTRY}
    for must in ("minivae.layers.Dense.backward", "minivae.layers.ReLU.forward",
                 "minivae.losses.Bernoulli.nll", "minivae.models.VAE.forward_backward",
                 "minivae.optim.Adam.update"):
        assert must in names
    np_, strict = get_backend("numpy"), get_backend("strict")
    assert pick(VAE.forward_backward, np_) is not VAE.forward_backward
    assert pick(VAE.forward_backward, strict) is VAE.forward_backward       # the reference
    assert pick(Adam.update, strict) is Adam.update
    assert pick(layers.Tanh.backward, np_) is layers.Tanh.backward          # no twin: reference
    assert pick(losses.Gaussian.nll, np_) is losses.Gaussian.nll


def test_the_gpu_kernels_are_registered_for_cupy_and_dispatch_without_a_gpu():
    """The CuPy twins are in the registry for "cupy" only, picked by name (no GPU needed to
    see the dispatch), and a CuPy step runs on one host thread (the device does the work)."""
    import subprocess
    import sys

    from minivae import VAE, Adam, Autoencoder, losses
    from minivae.backend import Backend
    from minivae.engine import cupy_twins
    from minivae.engine.registry import threaded

    gpu = Backend("cupy", get_backend("numpy").xp)         # a name is all pick() looks at
    assert pick(Adam.update, gpu) is cupy_twins.adam_update
    assert pick(losses.Bernoulli.nll, gpu) is cupy_twins.bernoulli_nll
    assert pick(losses.Bernoulli.nll_backward, gpu) is cupy_twins.bernoulli_nll_backward
    assert pick(VAE.forward_backward, gpu) is cupy_twins.vae_forward_backward
    assert pick(Autoencoder.forward_backward, gpu) is cupy_twins.autoencoder_forward_backward
    assert pick(losses.Gaussian.nll, gpu) is losses.Gaussian.nll
    assert not threaded(gpu) and threaded(get_backend("numpy"))
    assert pick(Adam.update, get_backend("numpy")) is not cupy_twins.adam_update
    # the kernels compile on first use: importing minivae never imports CuPy
    code = "import sys, minivae, minivae.engine; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_twin_cannot_be_registered_twice_or_without_a_case():
    with pytest.raises(TypeError, match="needs a case"):
        twin_of(len, exact=True, case=None)
    from minivae.layers import Dense
    with pytest.raises(ValueError, match="already has a twin"):
        twin_of(Dense.backward, exact=True, case=lambda *a: [])(lambda *a: None)


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


@pytest.mark.parametrize("name", REFERENCE)
def test_the_reference_imports_nothing_from_the_engine_and_has_no_threads(name):
    path = ROOT / name
    mods = set(_imports(path))
    bad = {m for m in mods if "engine" in m or m.split(".")[0] in ("threading", "numpy", "ctypes")
           or m in ("concurrent.futures", "queue")}
    assert not bad, f"{name} imports {bad}"
    text = path.read_text()
    assert "backend.name ==" not in text and "backend.name !=" not in text


NAMES = {"numpy", "cupy", "strict", "vae", "autoencoder", "discrete_vae"}   # backend names, model kinds


def test_no_backend_name_or_model_kind_string_tests_outside_their_modules():
    """Behaviour is chosen by methods and attributes (has_prior, px, the registry), not by
    comparing names, anywhere but backend.py (which defines the backends) and models.py."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("backend.py", "models.py", "engine/registry.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                consts = {c.value for side in sides for c in ast.walk(side)
                          if isinstance(c, ast.Constant) and not isinstance(side, ast.Call)}
                if consts & NAMES:
                    offenders.append(f"{rel}: {ast.unparse(node)}")
    assert not offenders, offenders


# -- what the registry's equality cannot see -------------------------------------------------------
NP = get_backend("numpy")


def test_in_place_twins_really_work_in_place_and_never_on_the_callers_arrays(rng):
    from minivae.engine import numpy_twins as nt
    from minivae.layers import ReLU, mlp
    from minivae.params import Layout, Params

    r, a = ReLU(backend=NP), rng.standard_normal((6, 9))
    out, _ = nt.relu_forward(r, {}, a, True)
    assert out is a                                              # owned: in place
    b = rng.standard_normal((6, 9))
    b0 = b.copy()
    nt.relu_forward(r, {}, b, False)                             # not owned: untouched
    np.testing.assert_array_equal(b, b0)
    net = mlp([5, 8, 8, 3], "relu", prefix="n", backend=NP)
    P = Params(Layout(net.param_entries()), NP, "float64")
    P.data[...] = rng.standard_normal(P.data.shape)
    x, G = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    x0, G0 = x.copy(), G.copy()
    _, caches = nt.sequential_forward(net, P, x)
    nt.sequential_backward(net, P, G, caches)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(G, G0)


def test_bernoulli_twin_gradient_is_sigmoid_minus_x_at_extreme_logits(rng, kernel_mode):
    from minivae import losses
    from minivae.engine import numpy_twins as nt

    px = losses.Bernoulli(NP.xp, 40)
    l = rng.standard_normal((5, 40)) * 60.0
    l[0, :4] = [0.0, -0.0, 800.0, -800.0]
    x = rng.random((5, 40))
    _, cache = nt.bernoulli_nll(px, l, x)
    s = np.exp(-np.logaddexp(0.0, -l))                           # sigmoid, overflow-free
    np.testing.assert_allclose(nt.bernoulli_nll_backward(px, 1.0, cache), s - x,
                               rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("cls", ["VAE", "Autoencoder"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian_learned"])
def test_whole_step_on_numpy_with_every_fast_path_equals_the_reference_on_strict(cls, likelihood,
                                                                              rng):
    cls = getattr(minivae, cls)
    kw = dict(d_in=12, hidden=(10, 6), latent=3, likelihood=likelihood, dtype="float64", seed=2)
    fast, plain = cls(backend="numpy", **kw), cls(backend="strict", **kw)
    x = (rng.random((40, 12)) < 0.4).astype(np.float64)
    eps = rng.standard_normal((40, 3)) if fast.has_prior else None
    fo, po = minivae.Adam(fast.params, lr=0.01), minivae.Adam(plain.params, lr=0.01)
    for _ in range(3):
        rf = minivae.DataParallel(fast, threads=2).train_step(fo, x, eps)
        rp = plain.loss_and_grads(plain.backend.asarray(x),
                                  None if eps is None else plain.backend.asarray(eps))
        po.step()
        np.testing.assert_allclose(float(rf.loss), float(rp.loss), rtol=1e-13)
        np.testing.assert_allclose(rf.grads, plain.backend.to_host(rp.grads), rtol=1e-11,
                                   atol=1e-14)
    np.testing.assert_allclose(fast.params.data, plain.backend.to_host(plain.params.data),
                               rtol=1e-11, atol=1e-13)


def test_fast_step_keeps_float32_end_to_end(rng):
    m = minivae.VAE(d_in=20, hidden=(16,), latent=4, seed=0)
    opt = minivae.Adam(m.params)
    x = (rng.random((40, 20)) < 0.5).astype(np.float32)
    r = minivae.train_step(m, opt, x)
    for a in (r.loss, r.elbo, r.grads, m.params.data, opt.m, opt.v):
        assert a.dtype == np.float32


@pytest.mark.parametrize("rows", [1, 8, 32, 33])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_input_grad_takes_either_form_of_the_same_product(rows, dtype):
    """numpy_twins.input_grad computes G W^T as (W G^T)^T for small float32 batches with a
    long inner dimension (faster on OpenBLAS): the same product, to float32 round-off, and
    C-contiguous either way."""
    from minivae.engine import numpy_twins as nt

    rng = np.random.default_rng(rows)
    G = rng.standard_normal((rows, 300)).astype(dtype)
    W = rng.standard_normal((50, 300)).astype(dtype)
    got = nt.input_grad(G, W)
    want = G.astype(np.float64) @ W.T.astype(np.float64)
    assert got.dtype == dtype and got.shape == (rows, 50) and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=1e-4 if dtype == np.float32 else 1e-12,
                               atol=1e-4 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(got, np.matmul(G, W.T), rtol=1e-5, atol=1e-5)
