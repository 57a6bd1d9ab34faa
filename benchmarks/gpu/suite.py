#!/usr/bin/env python
"""minivae's GPU suite: everything the GPU half of the mission claims, in one call.

    OUT=/some/dir bash benchmarks/gpu/run.sh            # what the device tool runs
    python benchmarks/gpu/suite.py --out DIR [--quick] [--budget SECONDS] [--tests ARGS]

Steps, in this order (the most informative first, so that a run cut short by its time limit
still brings back the numbers):

1. probe      Python, NumPy, CuPy, torch, JAX versions; the GPU model (or why none works);
              builds minivae's optional C kernels in place where they are missing.
2. gradcheck  ``python -m minivae gradcheck --backend cupy --json`` (float64 on the device),
              and ``--backend numpy`` beside it.
3. train      ``python -m minivae train --device cupy --epochs 2``: metrics and figures; a
              checkpoint written on CuPy resumed on NumPy, and one written on NumPy resumed
              on CuPy.
4. bench      ``benchmarks/step_time.py --device gpu --json`` at batch 128 and 4096: minivae
              (CuPy) vs PyTorch eager CUDA, fused Adam and torch.compile, interleaved medians.
5. tests      the whole test suite (``python -m pytest tests``): the cupy rows beside the
              numpy and strict rows, the GPU tests of tests/test_gpu.py included; counted per
              backend from pytest's JUnit report.

Without a GPU every step still runs its plumbing: the GPU parts are skipped with the reason
(the probe's, or the command's own error line), the NumPy parts run, and the files are written
as on a GPU. tests/test_gpu_suite.py runs it that way (``--quick``) in CI.

Files written under --out (at most 7; the device tool brings back 8 and the caller's log is
the 8th):

    summary.json    every step: status ("ok", "failed", "skipped", "timeout"), seconds,
                    reason; the probe; the per-backend test counts; the headline numbers
    tests.txt       pytest's output
    gradcheck.json  {"cupy": report or null, "numpy": report, "cupy_error": ...}
    train.json      the CuPy run's metrics.json and the two cross-backend resumes
    figures.png     the CuPy run's figures, tiled into one image
    bench.json      {"b128": step_time JSON, "b4096": ...}

Exit status: 0 when no step failed (skipped steps are not failures), 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
MAX_FILES = 7


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the result files")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds for the whole suite (each step gets what is left, capped)")
    p.add_argument("--quick", action="store_true",
                   help="plumbing check: a few test files, a small model, short benchmarks")
    p.add_argument("--steps", default="probe,gradcheck,train,bench,tests",
                   help="which steps to run, comma-separated (default: all, in order)")
    p.add_argument("--tests", default=None,
                   help="pytest targets (default: tests; with --quick: two small files)")
    return p.parse_args(argv)


class Suite:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / ".write-test").write_bytes(b"")
            (self.out / ".write-test").unlink()
        except OSError as e:
            raise SystemExit(f"suite.py: error: --out {self.out}: cannot write there "
                             f"({e.strerror or e})") from None
        self.work = Path(tempfile.mkdtemp(prefix="minivae-gpu-"))
        self.t0 = time.monotonic()
        self.summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "quick": args.quick,
                        "steps": {}}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
            "OPENBLAS_NUM_THREADS": "1", "MINIVAE_NUM_THREADS": os.environ.get(
                "MINIVAE_NUM_THREADS", "4"), "MPLBACKEND": "Agg",
            # JAX would take 75% of the GPU at import; the comparison tests run it on the CPU
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_PLATFORMS": "cpu"}
        self.gpu_reason = None
        self.written = set()

    # -- helpers ------------------------------------------------------------------------------
    def left(self, cap):
        return max(5.0, min(cap, self.args.budget - (time.monotonic() - self.t0)))

    def log(self, msg):
        print(f"[gpu-suite {time.monotonic() - self.t0:6.1f} s] {msg}", flush=True)

    def sh(self, cmd, cap, stdout=None):
        """Run cmd (a list) with what is left of the budget (at most cap seconds).
        -> (returncode or "timeout", stdout text, stderr text, seconds)."""
        t = time.monotonic()
        self.log("$ " + " ".join(map(str, cmd)))
        try:
            p = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=self.env, text=True,
                               capture_output=stdout is None, stdout=stdout,
                               stderr=subprocess.STDOUT if stdout is not None else None,
                               timeout=self.left(cap))
            return p.returncode, p.stdout or "", p.stderr or "", time.monotonic() - t
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            return "timeout", out, "", time.monotonic() - t

    def record(self, name, status, seconds, reason=None, **extra):
        self.summary["steps"][name] = {"status": status, "seconds": round(seconds, 1),
                                       **({"reason": reason} if reason else {}), **extra}
        self.log(f"{name}: {status}" + (f" ({reason})" if reason else ""))

    def write(self, name, payload):
        self.written.add(name)
        path = self.out / name
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload, indent=1, default=str) + "\n"
        path.write_text(payload)

    # -- 1. probe -------------------------------------------------------------------------------
    def probe(self):
        t = time.monotonic()
        info = {"python": platform.python_version(), "platform": platform.platform()}
        for mod in ("numpy", "cupy", "torch", "jax", "array_api_compat", "array_api_strict"):
            try:
                info[mod] = __import__(mod).__version__
            except Exception as e:
                info[mod] = f"unavailable ({type(e).__name__}: {str(e)[:120]})"
        sys.path.insert(0, str(ROOT))
        from minivae.backend import BackendUnavailable, get_backend

        try:
            get_backend("cupy")
            sys.path.insert(0, str(ROOT / "benchmarks"))
            import _machine

            info["gpu"] = _machine.gpu_info()
        except BackendUnavailable as e:
            self.gpu_reason = str(e)
            info["gpu"] = None
        try:
            import torch

            info["torch_cuda"] = bool(torch.cuda.is_available())
        except Exception:
            info["torch_cuda"] = False
        info["minivae_kernels"] = self.build_kernels()
        self.summary["probe"] = info
        self.record("probe", "ok", time.monotonic() - t,
                    reason=None if self.gpu_reason is None else f"no GPU: {self.gpu_reason}")

    def build_kernels(self):
        """minivae's optional C kernels (the NumPy rows' speed paths), built in place when the
        checkout has none (the GPU machine gets a plain copy of the tree)."""
        check = [PY, "-c", "import minivae.engine._kernels"]
        if subprocess.run(check, cwd=ROOT, env=self.env, capture_output=True).returncode == 0:
            return "present"
        rc, out, err, _ = self.sh([PY, "setup.py", "-q", "build_ext", "--inplace"], 120)
        ok = subprocess.run(check, cwd=ROOT, env=self.env, capture_output=True).returncode == 0
        return "built in place" if ok else f"not built ({(err or out).strip()[-200:]})"

    # -- 2. gradcheck -----------------------------------------------------------------------------
    def gradcheck(self):
        t = time.monotonic()
        doc = {}
        for be in ("cupy", "numpy"):
            rc, out, err, _ = self.sh([PY, "-m", "minivae", "gradcheck", "--backend", be,
                                       "--json"], 150)
            try:
                doc[be] = json.loads(out.strip().splitlines()[-1])
            except (IndexError, ValueError):
                doc[be] = None
            if doc[be] is None or doc[be].get("error"):     # the command could not run there
                doc[be] = None
                doc[f"{be}_error"] = (err.strip() or out.strip() or f"exit {rc}")[-500:]
        self.write("gradcheck.json", doc)
        cp = doc.get("cupy")
        if cp is None and self.gpu_reason:
            self.record("gradcheck", "skipped", time.monotonic() - t,
                        reason=f"no GPU: {doc.get('cupy_error')}",
                        numpy_passed=(doc.get("numpy") or {}).get("passed"))
            return
        ok = bool(cp and cp["passed"] and doc.get("numpy") and doc["numpy"]["passed"])
        worst = max((c["max_rel_error"] or 0.0 for c in cp["checks"]), default=None) if cp else None
        self.record("gradcheck", "ok" if ok else "failed", time.monotonic() - t,
                    reason=None if ok else doc.get("cupy_error", "a check failed"),
                    checks=len(cp["checks"]) if cp else 0, worst_rel_error=worst)

    # -- 3. train ---------------------------------------------------------------------------------
    def train(self):
        t = time.monotonic()
        gpu = self.gpu_reason is None
        device = "cupy" if gpu else "numpy"      # without a GPU: the plumbing, on NumPy
        small = ["--hidden", "64", "--latent", "8"] if self.args.quick else []
        epochs = "1" if self.args.quick else "2"
        run = self.work / f"train_{device}"
        rc, out, err, _ = self.sh([PY, "-m", "minivae", "train", "--device", device, "--epochs",
                                   epochs, "--out", run, "--no-progress", *small], 180)
        doc = {"device": device, "command": f"minivae train --device {device} --epochs {epochs}",
               "exit": rc, "stderr_tail": err[-1500:]}
        if (run / "metrics.json").is_file():
            doc["metrics"] = json.loads((run / "metrics.json").read_text())
        self.tile_figures(run)
        doc["resumes"] = {}
        if gpu:
            for first, then in (("cupy", "numpy"), ("numpy", "cupy")):
                d = self.work / f"resume_{first}_to_{then}"
                r1 = self.sh([PY, "-m", "minivae", "train", "--device", first, "--epochs", "1",
                              "--out", d, "--no-progress", "--no-figures", *small], 120)
                r2 = self.sh([PY, "-m", "minivae", "train", "--resume", "--device", then,
                              "--epochs", "2", "--out", d, "--no-progress", "--no-figures"], 120)
                m = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() \
                    else {}
                doc["resumes"][f"{first}->{then}"] = {
                    "exit": [r1[0], r2[0]], "backend_after": m.get("backend"),
                    "epochs": m.get("epochs"), "stderr_tail": (r1[2] + r2[2])[-800:]}
        self.write("train.json", doc)
        ok = rc == 0 and "metrics" in doc and all(
            r["exit"] == [0, 0] and r["backend_after"] == then
            for (k, r), then in zip(doc["resumes"].items(), ("numpy", "cupy")))
        status = "ok" if ok else ("timeout" if rc == "timeout" else "failed")
        last = (doc.get("metrics") or {}).get("epochs", [{}])[-1:] or [{}]
        self.record("train", status, time.monotonic() - t,
                    reason=None if gpu else f"ran on numpy (no GPU: {self.gpu_reason}); the "
                                            f"CuPy<->NumPy resumes skipped",
                    device=device, test_loss=last[0].get("test_loss"),
                    samples_per_s=last[0].get("samples_per_s"))

    def tile_figures(self, run):
        pngs = sorted(run.glob("*.png"))
        if not pngs:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(pngs), figsize=(4.5 * len(pngs), 4.8))
        for ax, p in zip(list(getattr(axes, "flat", [axes])), pngs):
            ax.imshow(plt.imread(p))
            ax.set_title(p.name, fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(self.out / "figures.png", dpi=70)
        self.written.add("figures.png")
        plt.close(fig)

    # -- 4. bench ---------------------------------------------------------------------------------
    def bench(self):
        t = time.monotonic()
        doc, status, reason = {}, "ok", None
        steps = ["--steps", "20", "--block", "0.2", "--settle", "0.05", "--warmup", "3"] \
            if self.args.quick else ["--steps", "200", "--block", "0.5", "--settle", "0.1"]
        for b in (128, 4096):
            rc, out, err, _ = self.sh([PY, "benchmarks/step_time.py", "--device", "gpu",
                                       "--batch", b, "--json", "--torch-compile", *steps], 150)
            lines = out.strip().splitlines()
            try:
                doc[f"b{b}"] = json.loads(lines[-1])
            except (IndexError, ValueError):
                doc[f"b{b}"] = None
                doc[f"b{b}_error"] = (err.strip() or out.strip() or f"exit {rc}")[-600:]
                status, reason = ("timeout" if rc == "timeout" else "failed"), doc[f"b{b}_error"]
            doc[f"b{b}_table"] = [ln for ln in lines[:-1] if not ln.startswith("{")][-16:]
        if self.gpu_reason and status != "ok":
            status, reason = "skipped", f"no GPU: {reason.strip().splitlines()[-1]}"
        self.write("bench.json", doc)
        ratios = {f"b{b}": {k: (doc.get(f"b{b}") or {}).get(k)
                            for k in ("ratio_minivae_to_torch", "ratio_minivae_to_torch_compile",
                                      "ratio_minivae_to_torch_fused_adam")}
                  for b in (128, 4096)}
        self.record("bench", status, time.monotonic() - t, reason=reason, ratios=ratios)

    # -- 5. tests ---------------------------------------------------------------------------------
    def tests(self):
        t = time.monotonic()
        targets = (self.args.tests or ("tests/test_backend.py tests/test_sampling.py"
                                       if self.args.quick else "tests")).split()
        junit = self.work / "junit.xml"
        self.written.add("tests.txt")
        with open(self.out / "tests.txt", "w") as f:
            rc, _, _, secs = self.sh([PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                      f"--junitxml={junit}", *targets], 330, stdout=f)
        counts = self.count_rows(junit)
        tail = (self.out / "tests.txt").read_text().strip().splitlines()[-1:] or [""]
        status = "ok" if rc == 0 else ("timeout" if rc == "timeout" else "failed")
        cupy = counts.get("cupy", {})
        reason = None
        if status == "ok" and self.gpu_reason:
            reason = f"cupy rows skipped (no GPU): {cupy.get('skipped', 0)} skipped"
        self.record("tests", status, time.monotonic() - t, reason=reason, pytest=tail[0],
                    by_backend=counts)

    @staticmethod
    def count_rows(junit):
        """{backend: {passed, failed, skipped}} from the test ids: a row belongs to cupy,
        numpy or strict when its parameters name one, GPU tests (test_gpu.py) to cupy,
        the rest to "other"."""
        counts = {}
        if not junit.is_file():
            return counts
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = case.get("name", "") + " " + case.get("classname", "")
            be = next((b for b in ("cupy", "strict", "numpy") if re.search(rf"\b{b}\b", name)),
                      "cupy" if "test_gpu" in name else "other")
            kind = ("failed" if case.find("failure") is not None or case.find("error") is not None
                    else "skipped" if case.find("skipped") is not None else "passed")
            counts.setdefault(be, {"passed": 0, "failed": 0, "skipped": 0})[kind] += 1
        return counts

    # -- the run ----------------------------------------------------------------------------------
    def run(self):
        names = [n.strip() for n in self.args.steps.split(",") if n.strip()]
        unknown = set(names) - {"probe", "gradcheck", "train", "bench", "tests"}
        if unknown:
            raise SystemExit(f"suite.py: error: unknown step(s) {', '.join(sorted(unknown))}")
        if "probe" not in names:
            names.insert(0, "probe")          # the others need to know whether a GPU works
        for step in (getattr(self, n) for n in ("probe", "gradcheck", "train", "bench", "tests")
                     if n in names):
            try:
                step()
            except Exception as e:            # a broken step is reported, the others still run
                self.record(step.__name__, "failed", 0.0, reason=f"{type(e).__name__}: {e}")
        self.summary["seconds"] = round(time.monotonic() - self.t0, 1)
        self.summary["gpu"] = self.gpu_reason is None
        self.write("summary.json", self.summary)
        shutil.rmtree(self.work, ignore_errors=True)
        files = sorted(p.name for p in self.out.iterdir())
        assert len(self.written) <= MAX_FILES and len(files) <= MAX_FILES + 1, files
        failed = [n for n, s in self.summary["steps"].items() if s["status"] in ("failed",
                                                                                 "timeout")]
        self.log(f"done in {self.summary['seconds']} s; files: {', '.join(files)}; "
                 f"{'failed: ' + ', '.join(failed) if failed else 'no step failed'}")
        return 1 if failed else 0


def main(argv=None):
    return Suite(parse(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
