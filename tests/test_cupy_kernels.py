"""The CuPy kernels' arithmetic, checked on the CPU before any GPU sees it.

``cupy.ElementwiseKernel`` runs its body once per element, with inputs read-only and outputs
read-write. Here each body of :data:`minivae.engine.cupy_twins.KERNELS` is put in the same
loop as C++ (g++, float and double), loaded through ctypes, and swapped in for the CuPy kernels
on an emulated device: a backend named "cupy" whose arrays are NumPy's, so that dispatch picks
the CuPy twins and the GPU code path (no host views of the parameters) runs. Every CuPy twin's
registry case then runs against the reference on NumPy, and a whole training step against the
reference step.

What this cannot check: CUDA's math library, NVRTC and CuPy's argument handling. tests/test_gpu.py
runs the real kernels, on a GPU.
"""
import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from minivae.backend import RNG, Backend, get_backend
from minivae.engine import REGISTRY, cupy_twins

CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile the "
                                "kernel bodies on the CPU")


def _params(text):
    return [tuple(p.split()) for p in text.split(",")]


class CPUKernel:
    """An ElementwiseKernel's body in a C++ loop: call(*inputs, *outputs) as CuPy's (outputs
    optional; inputs broadcast; Python numbers for T parameters cast to T)."""

    def __init__(self, spec, workdir):
        ins, outs, self.body, self.name = spec
        self.ins, self.outs, self.workdir, self.libs = _params(ins), _params(outs), workdir, {}

    def _lib(self, dtype):
        if dtype in self.libs:
            return self.libs[dtype]
        args = ["long n"]
        pre = []
        for typ, name in self.ins:
            if typ == "T":
                args.append(f"const T* a_{name}")
                pre.append(f"const T {name} = a_{name}[i];")
            else:
                args.append(f"double {name}")
        for typ, name in self.outs:
            args.append(f"T* a_{name}")
            pre.append(f"T& {name} = a_{name}[i];")
        src = ("#include <cmath>\nusing namespace std;\n"
               f"typedef {CTYPE[dtype]} T;\n"
               f'extern "C" void kernel({", ".join(args)}) {{\n'
               "  for (long i = 0; i < n; ++i) {\n    " + "\n    ".join(pre) + "\n"
               + self.body + "\n  }\n}\n")
        stem = self.workdir / f"{self.name}_{CTYPE[dtype]}"
        stem.with_suffix(".cpp").write_text(src)
        so = stem.with_suffix(".so")
        subprocess.run(["g++", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-o", str(so),
                        str(stem.with_suffix(".cpp"))], check=True, capture_output=True)
        lib = ctypes.CDLL(str(so))
        self.libs[dtype] = lib
        return lib

    def __call__(self, *args):
        ins, given = args[: len(self.ins)], list(args[len(self.ins):])
        dtype = next(a.dtype for a in ins if isinstance(a, np.ndarray))
        shape = np.broadcast_shapes(*(np.shape(a) for (t, _), a in zip(self.ins, ins) if t == "T"),
                                    *(g.shape for g in given))
        keep, cargs = [], [ctypes.c_long(int(np.prod(shape)))]
        for (typ, _), a in zip(self.ins, ins):
            if typ == "T":
                arr = np.ascontiguousarray(np.broadcast_to(np.asarray(a, dtype=dtype), shape))
                keep.append(arr)
                cargs.append(ctypes.c_void_p(arr.ctypes.data))
            else:
                cargs.append(ctypes.c_double(float(a)))
        bufs = [np.array(np.broadcast_to(given[k], shape), dtype=dtype) if k < len(given)
                else np.empty(shape, dtype) for k in range(len(self.outs))]
        cargs += [ctypes.c_void_p(b.ctypes.data) for b in bufs]
        self._lib(dtype).kernel(*cargs)
        for g, b in zip(given, bufs):
            g[...] = b                              # outputs given are written in place
        outs = given + bufs[len(given):]
        return outs[0] if len(outs) == 1 else tuple(outs)


class EmulatedGPU(Backend):
    """The "cupy" backend's code path on NumPy arrays: the name dispatch sees, no host views."""

    def __init__(self):
        super().__init__("cupy", get_backend("numpy").xp)

    def asarray(self, a, dtype=None):
        return np.asarray(a, dtype=None if dtype is None else self.dtype(dtype))

    def to_host(self, a):
        return np.asarray(a)

    def is_array(self, a):
        return isinstance(a, np.ndarray)

    def host_memory(self, a):
        return None                                  # as on a device

    def memory_bytes(self):
        return None

    def rng(self, seed=0):
        r = RNG.__new__(RNG)                         # CuPy's draw path, on NumPy's generator
        r.backend, r.seed, r._gen = self, seed, np.random.default_rng(seed)
        return r


@pytest.fixture(scope="module")
def cpu_kernels(tmp_path_factory):
    work = tmp_path_factory.mktemp("kernels")
    return {name: CPUKernel(spec, work) for name, spec in cupy_twins.KERNELS.items()}


@pytest.fixture
def gpu(cpu_kernels, monkeypatch):
    monkeypatch.setattr(cupy_twins, "_kernels", lambda: cpu_kernels)
    return EmulatedGPU()


GPU_TWINS = [t for t in REGISTRY if t.backends == ("cupy",)]


def test_every_gpu_kernel_has_a_registered_twin_that_uses_it():
    assert {t.name for t in GPU_TWINS} == {
        "minivae.optim.Adam.update", "minivae.losses.Bernoulli.nll",
        "minivae.losses.Bernoulli.nll_backward", "minivae.models.VAE.forward_backward",
        "minivae.models.Autoencoder.forward_backward"}


@pytest.mark.parametrize("twin", GPU_TWINS, ids=lambda t: t.name.replace("minivae.", ""))
def test_gpu_twin_with_its_kernel_bodies_equals_the_reference(twin, gpu):
    fast = twin.case(twin.fast, gpu, np.random.default_rng(7))
    ref = twin.case(twin.reference, get_backend("numpy"), np.random.default_rng(7))
    assert len(fast) == len(ref)
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14,
                                   err_msg=f"{twin.name}: output {i} beyond round-off")


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 2e-5)])
def test_fused_sampler_and_kl_equal_the_reference_functions(gpu, dtype, tol):
    rng = np.random.default_rng(3)
    h = rng.standard_normal((9, 8)).astype(dtype) * 2
    mu, logvar = h[:, :4], h[:, 4:]                  # strided views, as in the model
    eps, dz = (rng.standard_normal((9, 4)).astype(dtype) for _ in range(2))
    fused = cupy_twins.sample_kl_fused(gpu.xp, mu, logvar, eps, dz, 0.3)
    ref = cupy_twins.sample_kl_reference(get_backend("numpy").xp, mu, logvar, eps, dz, 0.3)
    for a, b in zip(fused, ref):
        assert a.dtype == np.dtype(dtype) and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["vae", "autoencoder"])
def test_a_training_step_on_the_emulated_gpu_equals_the_reference_step(gpu, kind):
    """train_step on the "cupy" path (fused kernels, one host thread, the flat buffers only
    reached through device arrays) = loss_and_grads + Adam.step of the reference on NumPy."""
    from minivae import Adam, build_model, train_step
    from minivae.optim import Adam as RefAdam

    rng = np.random.default_rng(5)
    x = (rng.random((16, 30)) < 0.3).astype(np.float64)
    cfg = {"kind": kind, "d_in": 30, "hidden": [12], "latent": 3}
    fast = build_model(cfg, backend=gpu, dtype="float64", seed=1)
    ref = build_model(cfg, backend=get_backend("numpy"), dtype="float64", seed=1)
    ref.params.set_flat(fast.params.data.copy())
    o_fast, o_ref = Adam(fast.params, lr=0.01), RefAdam(ref.params, lr=0.01)
    for step in range(3):
        eps = None if kind == "autoencoder" else rng.standard_normal((16, 3))
        r1 = train_step(fast, o_fast, x, eps)
        r2 = ref.loss_and_grads(x, eps)
        o_ref.step()
        np.testing.assert_allclose(float(r1.loss), float(r2.loss), rtol=1e-12)
        np.testing.assert_allclose(fast.params.data, ref.params.data, rtol=1e-10, atol=1e-13)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA compiler)")
@pytest.mark.parametrize("name", sorted(cupy_twins.KERNELS))
def test_each_kernel_body_compiles_as_cuda_device_code(name, tmp_path):
    """The bodies as the device sees them (float and double, CUDA's math overloads); CuPy
    compiles with NVRTC, which takes the same language."""
    ins, outs, body, kname = cupy_twins.KERNELS[name]
    src = []
    for ctype in ("float", "double"):
        args, pre = ["long n"], []
        for typ, p in _params(ins):
            args.append(f"const T* a_{p}" if typ == "T" else f"double {p}")
            if typ == "T":
                pre.append(f"const T {p} = a_{p}[i];")
        for _, p in _params(outs):
            args.append(f"T* a_{p}")
            pre.append(f"T& {p} = a_{p}[i];")
        src.append(f"namespace k_{ctype} {{ typedef {ctype} T;\n__global__ void {kname}("
                   f"{', '.join(args)}) {{\n long i = blockIdx.x * (long)blockDim.x + "
                   f"threadIdx.x; if (i >= n) return;\n " + "\n ".join(pre) + body + "}\n}\n")
    cu = tmp_path / f"{name}.cu"
    cu.write_text("\n".join(src))
    r = subprocess.run(["nvcc", "-c", "-o", str(tmp_path / f"{name}.o"), str(cu)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
