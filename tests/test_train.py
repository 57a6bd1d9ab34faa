"""minivae.train: the loop, its metrics, checkpoints, resume, Ctrl-C and the NaN guard.

Runs use a tiny model (16-8-2) on a small synthetic data set so each takes well under a second.
"""
from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest

from minivae import train as train_mod
from minivae.data import Dataset
from minivae.train import (CheckpointError, Diverged, TrainConfig, Trainer, load_checkpoint,
                           load_model)

BACKENDS = ["numpy", "strict"]


@pytest.fixture(scope="module")
def tiny():
    """Blobby 4x4 'images' in [0, 1] with labels: 240 train, 60 test."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    centres = rng.random((3, 16))
    x = np.clip(centres[y] + 0.15 * rng.standard_normal((300, 16)), 0, 1).astype(np.float32)
    return Dataset("tiny", x[:240], y[:240].astype(np.int64), x[240:], y[240:].astype(np.int64),
                   image_shape=(4, 4))


def cfg(tmp_path, **kw):
    base = dict(hidden=[8], latent=2, epochs=3, batch_size=32, log_every=3, progress=False,
                figures=False, out=str(tmp_path / "run"))
    return TrainConfig(**{**base, **kw})


def quiet(msg):
    pass


def fresh(c, tiny):
    return Trainer(c, dataset=tiny, log=quiet)


def comparable(history):
    """History rows without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in history]


# -- a run's outputs -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_writes_finite_per_example_metrics_and_a_checkpoint(tmp_path, tiny, backend):
    t = fresh(cfg(tmp_path, backend=backend), tiny)
    assert t.fit() == "done"
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["epoch"] for r in doc["epochs"]] == [1, 2, 3]
    for r in doc["epochs"]:
        for key in ("train_loss", "test_loss", "test_recon", "test_kl", "train_recon", "train_kl"):
            assert math.isfinite(r[key]), key
        # loss is the negative ELBO: reconstruction plus KL, per example
        assert r["test_loss"] == pytest.approx(r["test_recon"] + r["test_kl"], rel=1e-6)
        assert r["train_loss"] == pytest.approx(r["train_recon"] + r["train_kl"], rel=1e-6)
        assert r["test_kl"] > 0 and r["step"] == 8 * r["epoch"]    # ceil(240 / 32) = 8 steps
    assert doc["epochs"][-1]["train_loss"] < doc["epochs"][0]["train_loss"], "it did not learn"
    csv_rows = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 4 and csv_rows[0].startswith("epoch,")
    arrays, meta = load_checkpoint(tmp_path / "run")
    assert meta["epoch"] == 3 and meta["step"] == 24 and not meta["in_epoch"]
    assert not list((tmp_path / "run").glob("*.tmp")), "a temporary file was left behind"


def test_test_loss_is_the_evaluated_elbo_of_the_saved_model(tmp_path, tiny):
    from minivae.evaluate import elbo

    t = fresh(cfg(tmp_path, epochs=2), tiny)
    t.fit()
    model, _ = load_model(tmp_path / "run")
    assert elbo(model, tiny.x_test)["loss"] == pytest.approx(t.history[-1]["test_loss"], rel=1e-6)


def _count_transfers(monkeypatch):
    """Record every device-to-host transfer on the strict backend (as on CuPy, each is a
    conversion of an array to a host value: float(), bool(), int(), index, __array__,
    __dlpack__, iteration, or Backend.to_host) and every start of a training step, in order."""
    import array_api_strict

    from minivae.backend import Backend

    events = []
    Array = type(array_api_strict.asarray(0.0))
    for name in ("__float__", "__bool__", "__int__", "__index__", "__complex__", "__array__",
                 "__dlpack__", "__iter__"):
        orig = getattr(Array, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            events.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(Array, name, counted)
    to_host = Backend.to_host
    monkeypatch.setattr(Backend, "to_host",
                        lambda self, a: (events.append("to_host"), to_host(self, a))[1])
    step = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step",
                        lambda *a, **k: (events.append("STEP"), step(*a, **k))[1])
    return events


@pytest.mark.parametrize("kw", [dict(), dict(binarize="dynamic", warmup_epochs=1.0),
                                dict(model="autoencoder")],
                         ids=["vae", "vae-dynamic-warmup", "autoencoder"])
def test_no_device_to_host_transfer_between_log_intervals(tmp_path, tiny, monkeypatch, kw):
    """On a device, a read-back stalls the host until the GPU drains its queue. The loop may
    read the loss sums once per log interval (two scalars) and nowhere else: no transfer in any
    step, none in the loop around it (issue 14)."""
    t = fresh(cfg(tmp_path, backend="strict", epochs=1, batch_size=8, log_every=7, **kw), tiny)
    events = _count_transfers(monkeypatch)
    t.fit()
    assert t.step == 30
    starts = [i for i, e in enumerate(events) if e == "STEP"]
    assert len(starts) == 30
    for k in range(29):                  # after step k: the step itself, then the loop body
        seen = events[starts[k] + 1: starts[k + 1]]
        expected = ["__float__", "__float__"] if (k + 1) % 7 == 0 else []
        assert seen == expected, f"step {k + 1}: {seen}"


# -- resume gives the same run ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_after_an_epoch_continues_bit_for_bit(tmp_path, tiny, backend):
    a = fresh(cfg(tmp_path / "a", backend=backend, epochs=3, binarize="dynamic"), tiny)
    a.fit()
    b = fresh(cfg(tmp_path / "b", backend=backend, epochs=1, binarize="dynamic"), tiny)
    b.fit()
    b = Trainer.resume(tmp_path / "b" / "run", dataset=tiny, log=quiet, epochs=3)
    assert b.epoch == 1
    b.fit()
    np.testing.assert_array_equal(b.backend.to_host(b.model.params.data),
                                  a.backend.to_host(a.model.params.data))
    np.testing.assert_array_equal(b.backend.to_host(b.opt.v), a.backend.to_host(a.opt.v))
    assert comparable(b.history) == comparable(a.history)


def test_ctrl_c_saves_mid_epoch_and_resume_matches_an_uninterrupted_run(tmp_path, tiny,
                                                                        monkeypatch):
    ref = fresh(cfg(tmp_path / "ref", epochs=2), tiny)
    ref.fit()

    t = fresh(cfg(tmp_path / "cut", epochs=2), tiny)
    real_step = train_mod.train_step

    def step_then_ctrl_c(model, opt, x, **kw):   # a real SIGINT, in the middle of epoch 2
        r = real_step(model, opt, x, **kw)
        if opt.t == 11:
            os.kill(os.getpid(), signal.SIGINT)
        return r

    monkeypatch.setattr(train_mod, "train_step", step_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)   # Python's default; SIG_IGN under nohup / `&`
    assert t.fit() == "interrupted"
    assert signal.getsignal(signal.SIGINT) is before, "handler not restored"
    _, meta = load_checkpoint(tmp_path / "cut" / "run")
    assert meta["in_epoch"] and meta["epoch"] == 1 and meta["step"] == 11 and meta["pos"] == 96

    r = Trainer.resume(tmp_path / "cut" / "run", dataset=tiny, log=quiet)
    assert r.fit() == "done"
    np.testing.assert_array_equal(r.model.params.data, ref.model.params.data)
    assert comparable(r.history) == comparable(ref.history)


def test_checkpoint_written_on_numpy_resumes_on_strict(tmp_path, tiny):
    ref = fresh(cfg(tmp_path / "ref", epochs=2), tiny)
    ref.fit()
    t = fresh(cfg(tmp_path / "x", epochs=1), tiny)
    t.fit()
    r = Trainer.resume(tmp_path / "x" / "run", dataset=tiny, log=quiet, epochs=2, backend="strict")
    assert r.backend.name == "strict"
    r.fit()
    np.testing.assert_allclose(r.backend.to_host(r.model.params.data), ref.model.params.data,
                               rtol=1e-4, atol=1e-5)


# -- failure handling --------------------------------------------------------------------------------------
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, tiny):
    t = fresh(cfg(tmp_path, epochs=1), tiny)
    t.fit()
    good = load_checkpoint(tmp_path / "run")[0]["params"].copy()
    t.cfg.epochs = 3
    t.model.params.data[3] = np.nan          # what an exploding update leaves behind
    with pytest.raises(Diverged, match=r"NaN/Inf near step \d+ of epoch 2.*last good checkpoint"):
        t.fit()
    arrays, meta = load_checkpoint(tmp_path / "run")
    assert meta["epoch"] == 1
    np.testing.assert_array_equal(arrays["params"], good)
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(doc["epochs"]) == 1


def test_corrupt_or_truncated_checkpoints_are_rejected(tmp_path, tiny):
    fresh(cfg(tmp_path, epochs=1), tiny).fit()
    path = tmp_path / "run" / "checkpoint.npz"
    raw = path.read_bytes()
    cases = {
        "truncated": raw[: len(raw) // 2],
        "flipped": raw[:2000] + bytes(b ^ 0xFF for b in raw[2000:2100]) + raw[2100:],
        "not a zip": b"hello, I am not a checkpoint",
        "empty": b"",
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.npz"
        bad.write_bytes(content)
        with pytest.raises(CheckpointError, match="corrupt or truncated|not a minivae"):
            load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.npz")


def test_a_checkpoint_whose_arrays_do_not_fit_is_rejected(tmp_path, tiny):
    fresh(cfg(tmp_path, epochs=1), tiny).fit()
    arrays, meta = load_checkpoint(tmp_path / "run")
    arrays["params"] = arrays["params"][:-1]
    train_mod.save_checkpoint(tmp_path / "short.npz", arrays, meta)
    with pytest.raises(CheckpointError, match="parameter array has shape"):
        load_checkpoint(tmp_path / "short.npz")
    meta["format"] = "something-else"
    train_mod.save_checkpoint(tmp_path / "other.npz", load_checkpoint(tmp_path / "run")[0], meta)
    with pytest.raises(CheckpointError, match="not a minivae checkpoint"):
        load_checkpoint(tmp_path / "other.npz")


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, tiny, monkeypatch):
    t = fresh(cfg(tmp_path, epochs=1), tiny)
    t.fit()
    before = (tmp_path / "run" / "checkpoint.npz").read_bytes()

    def disk_full(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_mod.np, "savez", disk_full)
    t.model.params.data[:] = 0.0
    with pytest.raises(OSError, match="No space"):
        t.save()
    assert (tmp_path / "run" / "checkpoint.npz").read_bytes() == before
    assert not list((tmp_path / "run").glob("*.tmp")), "half-written file left behind"
    load_checkpoint(tmp_path / "run")


# -- data handling inside the loop ------------------------------------------------------------------------
def _spy_on_train_step(monkeypatch, record):
    """Call record(model, x) on every training step the trainer takes."""
    real = train_mod.train_step

    def spy(model, opt, x, **kw):
        record(model, x)
        return real(model, opt, x, **kw)

    monkeypatch.setattr(train_mod, "train_step", spy)


def test_binarization_modes(tmp_path, tiny, monkeypatch):
    seen = []
    batches = []
    _spy_on_train_step(monkeypatch, lambda model, x: batches.append(np.asarray(x).copy()))
    for mode in ("none", "static", "dynamic"):
        t = fresh(cfg(tmp_path / mode, epochs=2, binarize=mode), tiny)
        batches.clear()
        t.fit()
        values = np.unique(np.concatenate(batches))
        if mode == "none":
            assert len(values) > 2                      # grey levels, as in the PyTorch example
        else:
            assert values.tolist() == [0.0, 1.0]
        seen.append((t.x_train, t.x_test))
    np.testing.assert_array_equal(seen[1][1], seen[2][1])  # static and dynamic: same test set
    assert len(np.unique(seen[1][0])) == 2 and len(np.unique(seen[2][0])) > 2  # dynamic redraws


def test_kl_warmup_ramps_beta_linearly_then_holds(tmp_path, tiny, monkeypatch):
    t = fresh(cfg(tmp_path, epochs=3, warmup_epochs=2, beta=0.5), tiny)   # 16 warm-up steps
    used = []
    _spy_on_train_step(monkeypatch, lambda model, x: used.append(model.beta))
    t.fit()
    np.testing.assert_allclose(used[:16], 0.5 * np.arange(1, 17) / 16)
    assert used[16:] == [0.5] * 8
    assert [r["beta"] for r in t.history] == [0.25, 0.5, 0.5]


def test_autoencoder_trains_with_reconstruction_only(tmp_path, tiny):
    t = fresh(cfg(tmp_path, model="autoencoder", epochs=2), tiny)
    t.fit()
    assert [r["test_kl"] for r in t.history] == [0.0, 0.0]
    assert t.history[1]["test_loss"] == t.history[1]["test_recon"] < t.history[0]["test_loss"]


def test_invalid_configuration_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="binarize"):
        TrainConfig(binarize="sometimes")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


@pytest.mark.parametrize("field, value", [("warmup_epochs", float("nan")),
                                          ("warmup_epochs", float("inf")),
                                          ("beta", float("nan")), ("beta", -1.0),
                                          ("lr", float("inf")), ("weight_decay", float("nan"))])
def test_train_config_refuses_non_finite_or_negative_numbers_naming_the_field(field, value):
    from minivae.train import TrainConfig

    with pytest.raises(ValueError, match=f"{field} must be a finite number >= 0"):
        TrainConfig(**{field: value})


def test_a_json_file_given_as_checkpoint_is_named_not_unpickled(tmp_path):
    from minivae.train import CheckpointError, load_checkpoint

    p = tmp_path / "metrics.json"
    p.write_text('{"epochs": []}')
    with pytest.raises(CheckpointError, match="is not a minivae checkpoint") as e:
        load_checkpoint(p)
    assert "pickle" not in str(e.value)


def test_a_batch_larger_than_the_training_set_is_said_once_and_trains_full_batch(tmp_path, tiny):
    said = []
    t = Trainer(cfg(tmp_path, batch_size=100000, epochs=2), dataset=tiny, log=said.append)
    assert [m for m in said if "larger than the 240 training examples" in m] != []
    assert t.steps_per_epoch == 1
    assert t.fit() == "done" and t.step == 2
    said.clear()
    Trainer(cfg(tmp_path / "b", batch_size=240), dataset=tiny, log=said.append)
    assert not [m for m in said if "larger than" in m]          # exactly the set: no note


def test_the_optimizers_name_is_one_run_in_any_case(tmp_path, tiny):
    """'SGD' from the Python API and 'sgd' on a resume are the same optimizer; an unknown name
    is refused by the configuration itself, before momentum is looked at."""
    t = Trainer(cfg(tmp_path, optimizer="SGD", momentum=0.9, epochs=1), dataset=tiny, log=quiet)
    assert t.cfg.optimizer == "sgd" and t.fit() == "done"
    r = Trainer.resume(tmp_path / "run", dataset=tiny, log=quiet, optimizer="sgd", epochs=2,
                       momentum=0.5)
    assert r.changed == {"epochs": (1, 2), "momentum": (0.9, 0.5)}
    with pytest.raises(ValueError, match="unknown optimizer 'nesterov'"):
        TrainConfig(optimizer="nesterov", momentum=0.9)


def test_make_run_dir_counts_only_the_directories_it_made(tmp_path, monkeypatch):
    from pathlib import Path

    from minivae.train import make_run_dir
    assert make_run_dir(tmp_path / "a" / "b") == [tmp_path / "a", tmp_path / "a" / "b"]
    assert make_run_dir(tmp_path / "a" / "b") == []                # there already
    real = Path.mkdir

    def raced(self, *a, **kw):          # another process makes it first: ours then fails
        real(self)
        raise FileExistsError(self)
    monkeypatch.setattr(Path, "mkdir", raced)
    assert make_run_dir(tmp_path / "c") == []
    assert (tmp_path / "c").is_dir()
