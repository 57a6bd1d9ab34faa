"""The product keeps its word under bad flags, damaged checkpoints, signals, two writers and a
full disk (issue 13). Each case is the command or call a user makes and the clear error or the
right result; training runs are tiny (hidden 16, latent 2, a few hundred images)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from minivae.cli import main
from minivae.fileio import atomic_write, temp_path
from minivae.train import (CheckpointError, TrainConfig, Trainer, load_checkpoint,
                           save_checkpoint)

ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MINIVAE_NUM_THREADS": "1"}
TINY = ["--hidden", "16", "--latent", "2", "--no-figures", "--no-progress"]


def train(capsys, out, *flags):
    code = main(["train", "--out", str(out), *TINY, *flags])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


@pytest.fixture
def run1(tmp_path, capsys):
    out = tmp_path / "r"
    code, _ = train(capsys, out, "--epochs", "2")
    assert code == 0
    return out


# -- 1. --resume keeps its word ------------------------------------------------------------------
@pytest.mark.parametrize("flags, named", [
    (["--hidden", "64"], "--hidden 64 differs from this run's 16"),
    (["--latent", "3"], "--latent 3 differs"),
    (["--batch", "17"], "--batch 17 differs from this run's 128"),
    (["--batch-size", "17"], "--batch 17 differs"),
    (["--seed", "4"], "--seed 4 differs"),
    (["--dtype", "float64"], "--dtype float64 differs"),
    (["--optimizer", "sgd"], "--optimizer sgd differs"),
    (["--binarize", "dynamic"], "--binarize dynamic differs"),
])
def test_resume_refuses_flags_that_define_the_run_naming_the_flag(run1, capsys, flags, named):
    before = load_checkpoint(run1)[0]["params"].copy()
    code, text = train(capsys, run1, "--resume", "--epochs", "3", *flags)
    assert code == 2 and named in text
    np.testing.assert_array_equal(load_checkpoint(run1)[0]["params"], before)   # nothing ran


def test_resume_applies_and_reports_the_flags_that_may_change(run1, capsys):
    code, text = train(capsys, run1, "--resume", "--epochs", "3", "--lr", "0.0005",
                       "--beta", "0.5", "--log-every", "7")
    assert code == 0
    for line in ("--epochs 2 -> 3", "--lr 0.001 -> 0.0005", "--beta 1.0 -> 0.5",
                 "--log-every 20 -> 7"):
        assert f"changed: {line}" in text
    cfg = load_checkpoint(run1)[1]["train_config"]
    assert (cfg["lr"], cfg["beta"], cfg["epochs"], cfg["log_every"]) == (0.0005, 0.5, 3, 7)
    assert json.loads((run1 / "metrics.json").read_text())["epochs"][-1]["beta"] == 0.5


def test_the_lr_given_on_resume_is_the_one_the_optimizer_uses(run1):
    t = Trainer.resume(run1, epochs=3, lr=0.25, progress=False, figures=False)
    assert t.opt.lr == 0.25 and t.changed["lr"] == (0.001, 0.25)


def test_keep_and_from_epoch_roll_a_run_back(tmp_path, capsys):
    out = tmp_path / "k"
    assert train(capsys, out, "--epochs", "4", "--keep", "2")[0] == 0
    assert sorted(p.name for p in out.glob("checkpoint-epoch*")) == [
        "checkpoint-epoch0003.npz", "checkpoint-epoch0004.npz"]
    code, text = train(capsys, out, "--resume", "--from-epoch", "1")
    assert code == 2 and "keeps no checkpoint of epoch 1 (kept epochs: 3, 4)" in text
    code, text = train(capsys, out, "--resume", "--from-epoch", "3", "--lr", "0.0003")
    assert code == 0 and "from its epoch 3 checkpoint, training to epoch 4" in text
    meta = load_checkpoint(out)[1]
    assert meta["epoch"] == 4 and meta["train_config"]["lr"] == 0.0003
    hist = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
    assert train(capsys, out, "--from-epoch", "3")[1].count("--from-epoch needs --resume")


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_diverged_run_says_how_to_continue_and_the_advice_works(tmp_path, capsys):
    out = tmp_path / "d"
    assert train(capsys, out, "--epochs", "1")[0] == 0
    code, text = train(capsys, out, "--resume", "--epochs", "3", "--lr", "1e6")
    assert code == 1 and "became NaN/Inf" in text
    advice = f"minivae train --resume --out {out} --epochs 3 --lr 100000"
    assert advice in text
    assert "kept epochs: 1" in text and "RuntimeWarning" not in text
    # the advice, with a learning rate small enough, trains on to the run's goal
    flags = advice.split()[1:]
    flags[flags.index("--lr") + 1] = "0.0005"
    code = main([*flags, *TINY])
    text = "".join(capsys.readouterr())
    assert code == 0 and "changed: --lr 0.001 -> 0.0005" in text      # the bad lr never saved
    assert load_checkpoint(out)[1]["epoch"] == 3


# -- 2. one writer per run directory --------------------------------------------------------------
HOLD = """
import sys, time
from minivae.train import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(30)
"""


def test_a_second_writer_is_refused_while_the_first_holds_the_run(tmp_path, capsys):
    out = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, text = train(capsys, out, "--epochs", "1")
        assert code == 2 and "is in use by another minivae train" in text
        assert not (out / "checkpoint.npz").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train(capsys, out, "--epochs", "1")[0] == 0          # free again once it is gone


# -- 3. SIGTERM saves, like Ctrl-C ------------------------------------------------------------------
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_the_run_and_exit_with_their_documented_status(tmp_path, sig,
                                                                                status):
    out = tmp_path / "t"
    p = subprocess.Popen([sys.executable, "-m", "minivae", "train", "--out", str(out), *TINY,
                          "--epochs", "500", "--log-every", "1"], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(600):                                     # until the first epoch is saved
        if (out / "checkpoint.npz").exists():
            break
        time.sleep(0.05)
    p.send_signal(sig)
    text = p.communicate(timeout=60)[0]
    assert p.returncode == status, text
    assert "state saved to" in text and "continue with --resume" in text
    meta = load_checkpoint(out)[1]
    assert meta["epoch"] >= 1 and meta["step"] > 0


# -- 4. flags that parse but mean nothing are refused at parse time, naming the flag ---------------
@pytest.mark.parametrize("flags, message", [
    (["--warmup", "nan"], "argument --warmup: must be a finite number"),
    (["--warmup", "-1"], "argument --warmup: must be >= 0"),
    (["--beta", "inf"], "argument --beta: must be a finite number"),
    (["--beta", "nan"], "argument --beta: must be a finite number"),
    (["--weight-decay", "nan"], "argument --weight-decay: must be a finite number"),
    (["--lr", "inf"], "argument --lr: must be a finite number"),
    (["--lr", "0"], "argument --lr: must be > 0"),
    (["--seed", "-1"], "argument --seed: must be >= 0"),
    (["--seed", "1.5"], "argument --seed: expected a whole number"),
    (["--hidden", ""], "argument --hidden: expected comma-separated widths"),
    (["--hidden", "64,"], "argument --hidden: expected comma-separated widths"),
    (["--keep", "-2"], "argument --keep: must be >= 0"),
])
def test_meaningless_flags_are_refused_before_anything_runs(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "f"), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_batch_size_is_accepted_as_the_pytorch_examples_name(tmp_path, capsys):
    code, _ = train(capsys, tmp_path / "b", "--epochs", "1", "--batch-size", "256")
    assert code == 0
    assert load_checkpoint(tmp_path / "b")[1]["train_config"]["batch_size"] == 256


@pytest.mark.parametrize("out, message", [("file", "is a file, not a directory"),
                                          ("/dev/null/run", "cannot write there")])
def test_an_out_that_cannot_be_written_is_refused_before_training(tmp_path, capsys, out,
                                                                  message):
    if out == "file":
        out = tmp_path / "file"
        out.write_text("keep me")
    code, text = train(capsys, out, "--epochs", "1")
    assert code == 2 and message in text and "training" not in text
    if isinstance(out, Path):
        assert out.read_text() == "keep me"


# -- 5. strict JSON -------------------------------------------------------------------------------
def test_evaluate_json_is_strict_json_even_when_the_loss_overflows(run1, tmp_path, capsys):
    arrays, meta = load_checkpoint(run1)
    arrays["params"] = arrays["params"] * np.float32(1e30)        # finite, but the loss is not
    save_checkpoint(tmp_path / "huge.npz", arrays, meta)
    assert main(["evaluate", str(tmp_path / "huge.npz"), "--json", "--k", "0"]) == 0
    text = capsys.readouterr().out
    res = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert res["finite"] is False and res["loss"] is None


def test_metrics_json_never_holds_nan(run1):
    json.loads((run1 / "metrics.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))


# -- 6. a model far too big is refused in seconds, not a MemoryError ---------------------------------
def test_a_model_too_big_for_the_machine_is_refused_with_its_size(tmp_path, capsys):
    t0 = time.perf_counter()
    code, text = train(capsys, tmp_path / "big", "--hidden", "1000000000")
    assert code == 2 and "GiB for its parameter and gradient buffers alone" in text
    assert time.perf_counter() - t0 < 20


# -- 7. checkpoints crafted or damaged by hand ---------------------------------------------------------
def _damage(run, tmp_path, change):
    arrays, meta = load_checkpoint(run)
    arrays, meta = change(dict(arrays), json.loads(json.dumps(meta)))
    path = tmp_path / "damaged.npz"
    payload = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    payload["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **payload)
    return path


def _in_epoch(arrays, meta, perm=None, pos=5):
    meta["in_epoch"], meta["pos"] = True, pos
    arrays["perm"] = np.arange(9000) if perm is None else perm
    return arrays, meta


CRAFTED = {
    "meta is a list": (lambda a, m: (a, [m]), "is not a minivae checkpoint"),
    "layout missing": (lambda a, m: (a, {k: v for k, v in m.items() if k != "layout"}),
                       "header field 'layout' must be a list"),
    "model missing": (lambda a, m: (a, {k: v for k, v in m.items() if k != "model"}),
                      "header field 'model' must be an object"),
    "epoch negative": (lambda a, m: (a, {**m, "epoch": -1}), "'epoch' must be a whole number"),
    "dtype odd": (lambda a, m: (a, {**m, "dtype": "int8"}), "'dtype' must be"),
    "layout entry bad": (lambda a, m: (a, {**m, "layout": [["w", [0]]]}), "'layout' must be"),
    "config far larger than layout": (
        lambda a, m: (a, {**m, "model": {**m["model"], "hidden": [100000]}}),
        "its model config implies"),
    "optimizer t negative": (lambda a, m: (a, {**m, "optimizer": {**m["optimizer"], "t": -3}}),
                             "'optimizer' must be"),
    "history not rows": (lambda a, m: (a, {**m, "history": [1, 2]}), "'history' must be"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_checkpoint_header_is_refused_naming_the_field(run1, tmp_path, case):
    change, message = CRAFTED[case]
    path = _damage(run1, tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize("case, change, message", [
    ("perm out of range", lambda a, m: _in_epoch(a, m, perm=np.arange(9000) + 5),
     "not a permutation"),
    ("perm too short", lambda a, m: _in_epoch(a, m, perm=np.arange(10)), "not a permutation"),
    ("pos out of range", lambda a, m: _in_epoch(a, m, pos=90000), "outside the epoch"),
    ("history shorter than epochs", lambda a, m: (a, {**m, "history": []}), "epochs of history"),
    ("sums damaged", lambda a, m: ({**a, "sums": np.array([np.nan, 1, 2])}, m), "running sums"),
    ("step beyond the examples seen",      # each step takes at least one example
     lambda a, m: (a, {**m, "step": 10 ** 30, "optimizer": {**m["optimizer"], "t": 10 ** 30}}),
     "more steps than the 18000 training examples its 2 epochs saw"),
    ("step beyond the examples seen, in an epoch",
     lambda a, m: _in_epoch(a, {**m, "step": 18006, "optimizer": {**m["optimizer"], "t": 18006}}),
     "more steps than the 18005 training examples"),
])
def test_a_damaged_checkpoint_is_refused_on_resume_not_trained_on(run1, tmp_path, capsys, case,
                                                                   change, message):
    path = _damage(run1, tmp_path, change)
    os.replace(path, run1 / "checkpoint.npz")
    code, text = train(capsys, run1, "--resume", "--epochs", "3")
    assert code == 2 and message in text


# -- 8. a full disk loses nothing ---------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(run1):
    before = (run1 / "checkpoint.npz").read_bytes()
    t = Trainer.resume(run1, epochs=3, progress=False, figures=False)
    tmp = temp_path(run1 / "checkpoint.npz")
    tmp.symlink_to("/dev/full")                                 # every write there: ENOSPC
    with pytest.raises(OSError, match=r"could not write .*checkpoint.npz.*the previous "
                                      r"checkpoint .* is intact"):
        t.save()
    assert (run1 / "checkpoint.npz").read_bytes() == before
    assert not tmp.exists() and not tmp.is_symlink()           # nothing half-written left


# -- 9. a float64 run resumed mid-epoch reports exactly what an uninterrupted one does -----------------
def test_float64_resume_mid_epoch_is_exact(tmp_path, monkeypatch):
    from minivae import train as train_mod

    cfg = dict(hidden=[16], latent=2, epochs=1, dtype="float64", progress=False, figures=False,
               log_every=1)
    whole = Trainer(TrainConfig(out=str(tmp_path / "w"), **cfg), log=lambda m: None)
    whole.fit()
    real, calls = train_mod.train_step, []

    def step_then_interrupt(*a, **kw):
        calls.append(1)
        r = real(*a, **kw)
        if len(calls) == 13:
            signal.raise_signal(signal.SIGINT)                    # as Ctrl-C mid-epoch
        return r

    monkeypatch.setattr(train_mod, "train_step", step_then_interrupt)
    part = Trainer(TrainConfig(out=str(tmp_path / "p"), **cfg), log=lambda m: None)
    assert part.fit() == "interrupted" and part.stopped_by == "SIGINT"
    monkeypatch.setattr(train_mod, "train_step", real)
    rest = Trainer.resume(tmp_path / "p", log=lambda m: None)
    assert rest.fit() == "done"
    assert rest.history[-1]["train_loss"] == whole.history[-1]["train_loss"]
    assert rest.history[-1]["test_loss"] == whole.history[-1]["test_loss"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_sample_into_a_full_disk_keeps_the_previous_png(run1, capsys):
    png = run1 / "samples.png"
    assert main(["sample", str(run1), "-n", "4", "--out", str(png)]) == 0
    before = png.read_bytes()
    tmp = temp_path(png)
    tmp.symlink_to("/dev/full")
    assert main(["sample", str(run1), "-n", "9", "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert f"could not write {png}" in err and "the previous figure" in err and "intact" in err
    assert png.read_bytes() == before and not tmp.exists() and not tmp.is_symlink()


def test_a_temp_file_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    """SIGKILL mid-write leaves the temp file (nothing can run in the killed process); a
    write of that path on this host removes it once it is 10 minutes old. Temps of live
    processes, of other hosts and with odd names are not touched ('²' passes isdigit and
    broke every write with a ValueError)."""
    path = tmp_path / "checkpoint.npz"
    code = ("import sys, time; from minivae.fileio import atomic_write\n"
            "def fill(f):\n    f.write(b'half'); f.flush(); print('writing', flush=True); "
            "time.sleep(60)\n"
            "atomic_write(sys.argv[1], fill)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and f".{proc.pid}." in left[0].name and left[0].read_bytes() == b"half"
    atomic_write(path, lambda f: f.write(b"whole"))
    # touched less than 10 minutes ago: it could be a live writer's on another host of the
    # same name (a shared file system), so it stays for now
    assert path.read_bytes() == b"whole" and left[0].read_bytes() == b"half"
    old = time.time() - 601
    os.utime(left[0], (old, old))
    live = temp_path(path).with_name(temp_path(path).name.replace(f".{os.getpid()}.",
                                                                   f".{os.getppid()}."))
    other = tmp_path / "checkpoint.npz.another-host.12345.1.tmp"
    odd = left[0].with_name(left[0].name.replace(f".{proc.pid}.", ".\u00b2."))   # not a pid
    for p in (live, other, odd):
        p.write_bytes(b"theirs")
        os.utime(p, (old, old))
    atomic_write(path, lambda f: f.write(b"again"))
    assert path.read_bytes() == b"again" and not left[0].exists()
    assert all(p.read_bytes() == b"theirs" for p in (live, other, odd))


def test_a_long_valid_file_name_is_written(tmp_path):
    """A 250-character name is valid; the temp file beside it must be too (its suffix made
    the temp's name too long: 'File name too long', naming the temp)."""
    path = tmp_path / ("a" * 246 + ".png")
    atomic_write(path, lambda f: f.write(b"png"))
    assert path.read_bytes() == b"png" and sorted(tmp_path.iterdir()) == [path]


def test_two_writers_of_one_path_at_once_leave_one_whole_file(tmp_path):
    """Two threads write the same path at the same moment, each its own bytes, 20 times: every
    write succeeds and the file is always one writer's bytes, whole (with one shared temp
    file they wrote into each other's: errors, and files that were a mix)."""
    path = tmp_path / "s.png"
    blobs = [bytes([i]) * 300_000 for i in (1, 2)]
    for _ in range(20):
        both = threading.Barrier(2)

        def write(blob):
            def fill(f):
                f.write(blob[:1000])
                both.wait(timeout=10)         # both temp files are open and half-written now
                f.write(blob[1000:])
            try:
                atomic_write(path, fill)
            except Exception as e:                # noqa: BLE001  (collected, asserted below)
                errors.append(e)

        errors = []
        threads = [threading.Thread(target=write, args=(b,)) for b in blobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert path.read_bytes() in blobs
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]


def test_resume_details_a_new_user_found(run1, capsys):
    """The default given explicitly is no conflict; a setting change is saved even when there
    is nothing left to train, which the output says; an empty --out is refused."""
    code, text = train(capsys, run1, "--resume", "--init", "torch")     # None: torch for ReLU
    assert code == 0 and "nothing will be trained: give --epochs 3" in text
    code, text = train(capsys, run1, "--resume", "--lr", "0.002")
    assert code == 0 and "changed: --lr 0.001 -> 0.002" in text
    assert load_checkpoint(run1)[1]["train_config"]["lr"] == 0.002      # saved, not just said
    code, text = train(capsys, run1, "--resume", "--init", "glorot")
    assert code == 2 and "--init glorot differs from this run's torch (the default)" in text
    code, text = train(capsys, "", "--epochs", "1")
    assert code == 2 and "--out must name a run directory" in text


def _edit(run, tmp_path, change_meta=None, change_arrays=None, raw=None):
    with np.load(run / "checkpoint.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    if change_meta:
        change_meta(meta)
    if change_arrays:
        change_arrays(arrays)
    arrays["meta"] = np.array(raw(json.dumps(meta)) if raw else json.dumps(meta))
    path = tmp_path / "edited.npz"
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


EDITS = {
    "params as int32": (None, lambda a: a.update(params=a["params"].astype(np.int32)),
                        None, "parameters are int32, but the header says float32"),
    "train_config.lr deleted": (lambda m: m["train_config"].pop("lr"), None, None,
                                "missing lr"),
    "train_config.epochs -1": (lambda m: m["train_config"].update(epochs=-1), None, None,
                               "epochs must be a whole number >= 0"),
    "backend evil": (lambda m: m.update(backend="evil"), None, None, "'backend' must be"),
    "optimizer hyper lr a string": (lambda m: m["optimizer"]["hyper"].update(lr="fast"), None,
                                    None, "hyper holds finite numbers"),
    "NaN literal in the header": (None, None,
                                  lambda t: t.replace('"beta": 1.0', '"beta": NaN', 1),
                                  "NaN, which is not valid JSON"),
    "perm as float64": (None, lambda a: a.update(perm=a["perm"].astype(np.float64)), None,
                        "1-D integer array"),
    "optimizer t differs from step": (lambda m: m["optimizer"].update(t=3), None, None,
                                      "the optimizer has taken 3 steps"),
    "epoch absurd": (lambda m: m.update(epoch=10 ** 30), None, None, "do not agree"),
    "optimizer buffer short": (None, lambda a: a.update(**{"opt.m": a["opt.m"][:5]}), None,
                               "optimizer buffer 'm'"),
    # the fifth attack (the Python API): evaluate took these, or crashed on them
    "Adam's v negative": (None, lambda a: a.update(**{"opt.v": -np.abs(a["opt.v"]) - 1}), None,
                          "'v' holds negative numbers"),
    "model config with a field it has not": (lambda m: m["model"].update(foo=1), None, None,
                                             "the VAE config has no field 'foo'"),
    "model config with seed": (lambda m: m["model"].update(seed=3), None, None,
                               "VAE config has no field 'seed'"),
    "model config beta -1": (lambda m: m["model"].update(beta=-1), None, None,
                             "beta must be a finite number >= 0, got -1"),
    "history row empty": (lambda m: m.update(history=[{}] * len(m["history"])), None, None,
                          "'history' must be one object of numbers per epoch"),
    "layout tensor renamed": (lambda m: m["layout"][0].__setitem__(0, "zzz"), None, None,
                              "tensor 0: enc.0.W"),
    "train_config dtype float16": (lambda m: m["train_config"].update(dtype="float16"), None,
                                   None, "dtype must be float32 or float64"),
}

EDITS.update({   # the sixth attack: generator states and layout names
    "noise generator state a string": (
        lambda m: m["rng"].update(model={"kind": "numpy", "state": {"bit_generator": "PCG64",
                                                                    "state": "x"}}), None, None,
        "'rng' must be an object whose model state is a NumPy PCG64 state"),
    "noise generator of no kind": (lambda m: m["rng"]["model"].update(kind="bogus"), None, None,
                                   "'rng' must be an object whose model state"),
    "noise generator inc of 200 bits": (
        lambda m: m["rng"]["model"]["state"]["state"].update(inc=2 ** 200), None, None,
        "'rng' must be an object whose model state"),
    "shuffle state a float": (lambda m: m["rng"]["shuffle"]["state"].update(state=1.5), None,
                              None, "'rng' must be an object whose shuffle state"),
    "shuffle uinteger negative": (lambda m: m["rng"]["shuffle"].update(uinteger=-1), None, None,
                                  "'rng' must be an object whose shuffle state"),
    "layout name twice": (lambda m: m["layout"][1].__setitem__(0, m["layout"][0][0]), None, None,
                          "'layout' is not valid .duplicate"),
})

RESUME_ONLY = {   # the model loads for evaluate; the run cannot continue from it
    "dtype differs from the training config": (
        lambda m: m.update(dtype="float64"), "its dtype float64 does not match"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_hand_edited_checkpoints_a_new_user_made_are_refused_by_evaluate_and_resume(
        run1, tmp_path, capsys, case):
    change_meta, change_arrays, raw, message = EDITS[case]
    path = _edit(run1, tmp_path, change_meta, change_arrays, raw)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    assert main(["evaluate", str(path), "--k", "0"]) == 2
    assert message.split(",")[0][:20] in capsys.readouterr().err


@pytest.mark.parametrize("case", list(RESUME_ONLY))
def test_resume_refuses_a_header_that_cannot_continue_the_run(run1, tmp_path, capsys, case):
    change_meta, message = RESUME_ONLY[case]
    to64 = (lambda a: a.update({k: v.astype(np.float64) for k, v in a.items()
                                if v.dtype == np.float32})) if "dtype" in case else None
    path = _edit(run1, tmp_path, change_meta, to64)
    os.replace(path, run1 / "checkpoint.npz")
    with pytest.raises(CheckpointError, match=message):
        Trainer.resume(run1, progress=False, figures=False)


def test_an_npy_file_is_named_as_not_a_checkpoint(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match=r"a\.npy is not a minivae checkpoint \(a single "
                                              r"NumPy array"):
        load_checkpoint(tmp_path / "a.npy")


def test_history_rows_with_new_columns_still_write_metrics_csv(run1):
    t = Trainer.resume(run1, progress=False, figures=False)
    t.history[-1]["new_column"] = 1.5          # a later minivae's extra column after resume
    t.write_metrics()
    rows = (run1 / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith(",new_column") and rows[1].endswith(",") and rows[-1].endswith(",1.5")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_through_the_cli_is_one_line_without_an_errno_prefix(run1, capsys):
    """The words of the error, not Python's "[Errno 28] " in front of them."""
    png = run1 / "samples.png"
    temp_path(png).symlink_to("/dev/full")
    assert main(["sample", str(run1), "-n", "4", "--out", str(png)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minivae sample: error: could not write") and "[Errno" not in err
    assert "\n" not in err


def test_a_damaged_checkpoint_beside_kept_epoch_checkpoints_says_how_to_go_on(tmp_path, capsys):
    out = tmp_path / "k"
    assert train(capsys, out, "--epochs", "2", "--keep", "5")[0] == 0
    (out / "checkpoint.npz").write_bytes(os.urandom(100))
    code, text = train(capsys, out, "--resume", "--epochs", "3")
    assert code == 2
    # epoch 2's checkpoint is the same file as the run's own (a hard link): not offered
    assert (f"the checkpoint of epoch 1 is kept beside it: minivae train --resume --out {out} "
            f"--from-epoch 1") in text
    code, text = train(capsys, out, "--resume", "--from-epoch", "1")
    assert code == 0, text                     # and the advice works, as given
    assert "training to epoch 2" in text       # the run's own goal, read from epoch 1's file
    (out / "checkpoint.npz").unlink()          # gone altogether: a rollback still works
    code, text = train(capsys, out, "--resume", "--from-epoch", "1")
    assert code == 0, text


def _deny_reading_checkpoints(monkeypatch):
    """Reading a file named checkpoint.npz raises PermissionError, as for a file of another
    user without read access (root, which runs these tests, could read it anyway)."""
    from pathlib import Path

    real = Path.read_bytes

    def denied(self):
        if self.name == "checkpoint.npz":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)


def test_an_unreadable_checkpoint_gets_no_advice_to_roll_back(tmp_path, capsys, monkeypatch):
    """Permission denied on an intact checkpoint: rolling back would throw epochs away; the
    message says what is wrong with the file and nothing else."""
    out = tmp_path / "k"
    assert train(capsys, out, "--epochs", "2", "--keep", "5")[0] == 0
    _deny_reading_checkpoints(monkeypatch)
    code, text = train(capsys, out, "--resume", "--epochs", "3")
    assert code == 2 and "cannot be read (Permission denied)" in text
    assert "--from-epoch" not in text


def test_a_checkpoint_that_is_a_directory_is_named_as_one_on_resume(run1, capsys):
    (run1 / "checkpoint.npz").unlink()
    (run1 / "checkpoint.npz").mkdir()
    code, text = train(capsys, run1, "--resume", "--epochs", "3")
    assert code == 2 and "is a directory, not a checkpoint file" in text


# -- the data a run was trained on ----------------------------------------------------------------
def _idx_dir(d, seed, hw=(28, 28), invert=False):
    from minivae.data import write_idx

    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for k, n in (("train", 64), ("t10k", 16)):
        x = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
        write_idx(d / f"{k}-images-idx3-ubyte.gz", 255 - x if invert else x)
        write_idx(d / f"{k}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))


@pytest.mark.parametrize("change", ["numbers", "image size"])
def test_a_run_resumed_or_evaluated_on_changed_data_says_the_data_changed(tmp_path, capsys,
                                                                           change):
    """A checkpoint records its data's fingerprint: resuming on other numbers of the same
    shape used to train on quietly (a helper's find: train loss 369 -> 1369), and other image
    sizes were reported as a damaged checkpoint. Now resume refuses, naming the data
    directory; evaluate refuses other image sizes and notes other numbers."""
    data, out = tmp_path / "data", tmp_path / "run"
    _idx_dir(data, seed=0)
    flags = ["--data", "mnist", "--data-dir", str(data), "--batch", "16"]
    assert train(capsys, out, "--epochs", "1", *flags)[0] == 0
    assert train(capsys, out, "--resume", "--epochs", "2")[0] == 0      # same data: fine
    _idx_dir(data, seed=0, invert=change == "numbers", hw=(28, 28) if change == "numbers"
             else (14, 14))
    code, text = train(capsys, out, "--resume", "--epochs", "3")
    assert code == 2 and "the data changed since" in text and str(data) in text
    assert text.count("\n") == 1
    code = main(["evaluate", str(out), "--no-progress"])
    cap = capsys.readouterr()
    if change == "numbers":
        assert code == 0 and "note: " in cap.err and "the data changed since" in cap.err
    else:
        assert code == 2 and "has 196 pixels an image" in cap.err and str(data) in cap.err


def test_a_checkpoint_with_a_bad_data_fingerprint_is_refused(run1, capsys):
    import json as _json

    path = run1 / "checkpoint.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    good = _json.loads(str(arrays.pop("meta")))
    assert sorted(good["data_fingerprint"]) == ["test", "train"]
    for bad in ({"train": good["data_fingerprint"]["train"], "test": "not hex"}, None, "ab" * 16):
        meta = {**good, "data_fingerprint": bad}
        np.savez(path, **arrays, meta=np.array(_json.dumps(meta)))
        code, text = train(capsys, run1, "--resume", "--epochs", "3")
        assert code == 2 and "'data_fingerprint' must be an object" in text
    meta = {k: v for k, v in good.items() if k != "data_fingerprint"}    # an older minivae's
    np.savez(path, **arrays, meta=np.array(_json.dumps(meta)))
    assert train(capsys, run1, "--resume", "--epochs", "3")[0] == 0


def test_what_does_not_change_a_run_does_not_stop_it(tmp_path, capsys, monkeypatch):
    """Labels only (a VAE does not train on them) and the same files in another order of
    compression resume; evaluate says nothing when only the training split changed (it reads
    the test split); a relative --data-dir is named with the directory it resolves to."""
    from minivae.data import write_idx

    monkeypatch.chdir(tmp_path)
    _idx_dir(tmp_path / "data", seed=0)
    out = tmp_path / "run"
    flags = ["--data", "mnist", "--data-dir", "data", "--batch", "16"]
    assert train(capsys, out, "--epochs", "1", *flags)[0] == 0
    write_idx(tmp_path / "data" / "train-labels-idx1-ubyte.gz", np.zeros(64, np.uint8))
    assert train(capsys, out, "--resume", "--epochs", "2")[0] == 0
    rng = np.random.default_rng(9)
    write_idx(tmp_path / "data" / "train-images-idx3-ubyte.gz",
              rng.integers(0, 256, (64, 28, 28), dtype=np.uint8))
    assert main(["evaluate", str(out), "--no-progress"]) == 0
    assert "note" not in capsys.readouterr().err
    code, text = train(capsys, out, "--resume", "--epochs", "3")
    assert code == 2 and "the images of its train split differ" in text
    assert f"mnist from data ({tmp_path / 'data'})" in text


def test_a_checkpoint_that_cannot_be_read_is_not_called_damaged(run1, monkeypatch):
    """Permission denied is not corruption: the error says the file cannot be read, and why
    (a helper's find: 'corrupt or truncated (PermissionError: [Errno 13] ...)')."""
    _deny_reading_checkpoints(monkeypatch)
    with pytest.raises(CheckpointError, match=r"checkpoint.npz: cannot be read \(Permission "
                                               r"denied\)$"):
        load_checkpoint(run1)


def test_resume_on_a_dataset_given_in_python_names_it_so(run1, tmp_path):
    from minivae.data import load_dataset
    from minivae.train import DataChanged

    ds = load_dataset("mnist10k")
    ds.x_test = 1.0 - ds.x_test
    with pytest.raises(DataChanged, match="the dataset given is not the data"):
        Trainer.resume(run1, dataset=ds, epochs=3, progress=False, figures=False)


def test_a_home_relative_data_dir_is_named_where_it_is_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _idx_dir(tmp_path / "home" / "dd", seed=0)
    out = tmp_path / "run"
    flags = ["--data", "mnist", "--data-dir", "~/dd", "--batch", "16"]
    assert train(capsys, out, "--epochs", "1", *flags)[0] == 0
    _idx_dir(tmp_path / "home" / "dd", seed=0, invert=True)
    code, text = train(capsys, out, "--resume", "--epochs", "2")
    assert code == 2 and f"mnist from ~/dd ({tmp_path / 'home' / 'dd'})" in text


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_checkpoint_that_is_a_fifo_is_named_alike_everywhere(run1, capsys):
    (run1 / "checkpoint.npz").unlink()
    os.mkfifo(run1 / "checkpoint.npz")
    code, text = train(capsys, run1, "--resume", "--epochs", "3")
    assert code == 2 and "it is not a regular file" in text
    assert main(["evaluate", str(run1), "--no-progress"]) == 2
    assert "it is not a regular file" in capsys.readouterr().err


def test_rolling_back_onto_the_newest_epoch_repairs_the_run(tmp_path, capsys):
    """A finished run whose checkpoint.npz was replaced by junk (not written in place, so the
    newest epoch's hard link survives), or deleted: the advice names the newest epoch, and
    following it writes a sound checkpoint.npz (it used to say "nothing will be trained" and
    leave the junk, so that the next --resume gave the same advice again). The rollback
    trains to the run's goal as last raised (--resume --epochs), read from the newest epoch
    checkpoint when checkpoint.npz is damaged."""
    from minivae.train import load_checkpoint

    out = tmp_path / "k"
    assert train(capsys, out, "--epochs", "2", "--keep", "5")[0] == 0
    assert train(capsys, out, "--resume", "--epochs", "3")[0] == 0    # the goal raised to 3
    for damage in ("junk", "gone"):
        main_ckpt = out / "checkpoint.npz"
        main_ckpt.unlink()
        if damage == "junk":
            main_ckpt.write_bytes(os.urandom(3000))
        code, text = train(capsys, out, "--resume")
        assert code == 2 and f"--out {out} --from-epoch 3" in text, text
        code, text = train(capsys, out, "--resume", "--from-epoch", "3")
        assert code == 0, text
        assert load_checkpoint(out)[1]["epoch"] == 3        # repaired
        assert train(capsys, out, "--resume")[0] == 0
    (out / "checkpoint.npz").unlink()
    (out / "checkpoint.npz").write_bytes(b"x" * 500)
    code, text = train(capsys, out, "--resume", "--from-epoch", "2")
    assert code == 0 and "training to epoch 3" in text, text
    assert load_checkpoint(out)[1]["epoch"] == 3


def test_a_rollback_onto_a_directory_in_the_checkpoints_place_says_to_move_it(tmp_path, capsys):
    out = tmp_path / "k"
    assert train(capsys, out, "--epochs", "2", "--keep", "5")[0] == 0
    (out / "checkpoint.npz").unlink()
    (out / "checkpoint.npz").mkdir()
    code, text = train(capsys, out, "--resume")          # the advice says so first
    assert code == 2 and "move it away, then minivae train --resume" in text
    code, text = train(capsys, out, "--resume", "--from-epoch", "1")
    assert code == 2 and "is a directory: move it away" in text and "intact" not in text


def test_the_rollback_advice_quotes_an_out_with_spaces(tmp_path, capsys):
    import shlex

    out = tmp_path / "run one"
    assert train(capsys, out, "--epochs", "2", "--keep", "5")[0] == 0
    (out / "checkpoint.npz").unlink()
    code, text = train(capsys, out, "--resume")
    assert code == 2 and f"--out {shlex.quote(str(out))} --from-epoch 2" in text
    command = text[text.index("minivae train --resume"):text.index(" continues")]
    args = shlex.split(command)[1:]
    assert args[args.index("--out") + 1] == str(out)


def test_only_epoch_checkpoint_files_count_as_kept_epochs(tmp_path, capsys):
    """A directory named like an epoch checkpoint, or a name with non-ASCII digits, is not
    one: not offered in the advice, not rolled back to, not pruned (it used to be offered,
    and '²' made int() raise)."""
    from minivae.train import epoch_checkpoints

    out = tmp_path / "k"
    assert train(capsys, out, "--epochs", "2", "--keep", "5")[0] == 0
    (out / "checkpoint-epoch0009.npz").mkdir()
    (out / "checkpoint-epoch\u00b2.npz").write_bytes(b"x")
    assert sorted(epoch_checkpoints(out)) == [1, 2]
    (out / "checkpoint.npz").unlink()
    code, text = train(capsys, out, "--resume")
    assert code == 2 and "--from-epoch 2 continues" in text
    assert train(capsys, out, "--resume", "--from-epoch", "2", "--epochs", "3")[0] == 0
    assert (out / "checkpoint-epoch0009.npz").is_dir()
