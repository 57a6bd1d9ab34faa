"""benchmarks/gpu/run.sh, the one call a lent GPU gets, tested where it runs first: here,
without a GPU. It must run to the end, skip the GPU parts with the reason, run the rest,
write at most 7 files (the device tool brings back 8; the caller's log is the 8th) and fail
when a step fails."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minivae.backend import available

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    available()["cupy"] == "ok",
    reason="a GPU works here: benchmarks/gpu/run.sh runs the real suite instead of this check")


def _run(out, *args):
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_gpu_suite_runs_to_the_end_without_a_gpu_and_says_why_it_skipped(tmp_path):
    p = _run(tmp_path, "--quick")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    files = sorted(f.name for f in tmp_path.iterdir())
    assert files == ["bench.json", "figures.png", "gradcheck.json", "summary.json", "tests.txt",
                     "train.json"]
    s = json.loads((tmp_path / "summary.json").read_text())
    steps = s["steps"]
    assert list(steps) == ["probe", "gradcheck", "train", "bench", "tests"]
    assert s["gpu"] is False and "no GPU" in steps["probe"]["reason"]
    for gpu_part in ("gradcheck", "bench"):
        assert steps[gpu_part]["status"] == "skipped"
        assert "no GPU" in steps[gpu_part]["reason"] and "CuPy" in steps[gpu_part]["reason"]
    # what needs no GPU still ran: NumPy gradient checks, training, the tests
    assert steps["gradcheck"]["numpy_passed"] is True
    g = json.loads((tmp_path / "gradcheck.json").read_text())
    assert g["cupy"] is None and g["numpy"]["passed"] and len(g["numpy"]["checks"]) >= 20
    assert steps["train"]["status"] == "ok" and steps["train"]["device"] == "numpy"
    t = json.loads((tmp_path / "train.json").read_text())
    assert len(t["metrics"]["epochs"]) == 1 and t["resumes"] == {}
    assert steps["tests"]["status"] == "ok"
    rows = steps["tests"]["by_backend"]
    assert rows["numpy"]["passed"] > 0 and rows["strict"]["passed"] > 0
    assert rows["cupy"]["skipped"] > 0 and rows["cupy"]["passed"] == 0
    assert "passed" in (tmp_path / "tests.txt").read_text()


def test_an_unwritable_out_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    p = _run(tmp_path / "afile")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "cannot write there" in p.stderr


def test_gradcheck_json_without_the_backend_is_still_json():
    p = subprocess.run([sys.executable, "-m", "minivae", "gradcheck", "--backend", "cupy",
                        "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "CuPy" in p.stderr
    doc = json.loads(p.stdout)
    assert doc["passed"] is False and "CuPy" in doc["error"] and doc["checks"] == []


def test_a_failing_step_fails_the_suite(tmp_path):
    p = _run(tmp_path, "--steps", "tests", "--tests", "tests/no_such_test_file.py")
    assert p.returncode == 1
    s = json.loads((tmp_path / "summary.json").read_text())
    assert list(s["steps"]) == ["probe", "tests"] and s["steps"]["tests"]["status"] == "failed"
