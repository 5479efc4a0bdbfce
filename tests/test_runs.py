"""Run folders that never claim more than they hold: completion markers, resume checks, the
run lock, the non-finite gradient guard, the wall time of resumed runs, notebook outputs."""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import subprocess
import sys
import time
import types

import pytest
import torch

from fmr1lib import (
    anchoring,
    checkpoints,
    cli,
    config,
    data,
    modeling,
    repro,
    runlock,
    stages,
    train,
)
from fmr1lib.config import DataParams

BASE = {"steps": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 1, "lr_warmup_steps": 0}


@pytest.fixture(scope="module")
def tiny():
    p = config.load_params(config.AnchorParams, BASE)
    model, processor = modeling.build_tiny_backbone(p, seed=0)
    return model, processor, data.make_split(DataParams(), "train", 16)


def _params(**kw):
    return config.load_params(config.AnchorParams, {**BASE, **kw})


# ---------------------------------------------------------------- completion marker


def test_killed_or_stopped_restart_is_never_complete(tiny, tmp_path, monkeypatch):
    model0, processor, rows = tiny
    monkeypatch.setattr(stages, "_load_start", lambda *a: (copy.deepcopy(model0), processor))
    monkeypatch.setattr(stages, "_start_run_of", lambda *a: None)  # no backbone run here
    monkeypatch.setattr(stages, "ensure_prerequisites", lambda *a, **kw: None)  # nor to build
    dsd = {"train": rows}
    old = _params(run_root=str(tmp_path))
    stages.anchor_stage(old, "plain", dsd)
    folder = stages.run_folder(old, "anchor", "plain", create=False)

    def is_complete(p):
        return stages.run_status(p, "anchor", "plain").finished

    assert is_complete(old)

    # Restart with another lr, killed after one step (its checkpoint is on disk).
    new = _params(run_root=str(tmp_path), lr=1e-3)
    real = anchoring.train_supervised

    def killed(*a, **kw):
        real(*a, **kw, hooks=train.Hooks(stop_after=1))
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(anchoring, "train_supervised", killed)
    with pytest.raises(KeyboardInterrupt):
        stages.anchor_stage(new, "plain", dsd)
    assert checkpoints.latest_checkpoint(folder / "checkpoints").name == "step_0000001"
    assert (folder / "info.json").exists() and (folder / "model" / "config.json").exists()
    assert not is_complete(new)  # the old model is not this run's
    assert not is_complete(old)  # nor is it vouched for any longer
    assert not (folder / runlock.LOCK_NAME).exists()  # released on the exception

    # A run that returns early (stopped, not killed) saves its model but is not complete.
    monkeypatch.setattr(anchoring, "train_supervised",
                        lambda *a, **kw: real(*a, **kw, hooks=train.Hooks(stop_after=1)))
    stages.anchor_stage(new, "plain", dsd)
    assert json.loads((folder / "info.json").read_text())["steps"] == 1
    assert not is_complete(new)


# ---------------------------------------------------------------- resume checks


def test_resume_refuses_changed_trajectory_params_and_allows_logging_ones(tiny, tmp_path):
    model0, processor, rows = tiny
    p = _params(steps=3)
    anchoring.train_supervised(copy.deepcopy(model0), processor, rows, p, tmp_path, "plain",
                               hooks=train.Hooks(stop_after=1))
    ck = tmp_path / "checkpoints" / "step_0000001"
    before = (ck / "state.json").read_text()

    def resume(variant="plain", **kw):
        q = _params(**{"steps": 3, "resume": True, **kw})
        return anchoring.train_supervised(copy.deepcopy(model0), processor, rows, q, tmp_path,
                                          variant)

    with pytest.raises(train.ResumeMismatchError, match=r"lr: 0\.002 -> 0\.001") as err:
        resume(lr=1e-3)
    assert "batch_size" not in str(err.value) and "step_0000001" in str(err.value)
    with pytest.raises(ValueError, match=r"batch_size: 2 -> 4.*steps: 3 -> 5"):
        resume(batch_size=4, steps=5)
    with pytest.raises(ValueError, match="freeze_vision: False -> True"):
        resume(freeze_vision=True)
    with pytest.raises(ValueError, match="lora: False -> True"):
        resume(lora=True)
    with pytest.raises(ValueError, match="variant: 'plain' -> 'focus_anchor'"):
        resume(variant="focus_anchor")
    assert (ck / "state.json").read_text() == before  # refused untouched
    assert len(repro.read_jsonl(tmp_path / "metrics.jsonl")) == 1

    res = resume(log_every=2, checkpoint_every=2, eval_n=7)  # logging and eval keys: allowed
    assert res.steps == 3
    state = checkpoints.read_checkpoint_meta(checkpoints.latest_checkpoint(tmp_path / "checkpoints"))
    assert state["extra"]["params"]["lr"] == p.lr and "log_every" not in state["extra"]["params"]


# ---------------------------------------------------------------- non-finite gradient


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_nan_gradient_with_finite_loss_stops_before_the_step(tiny, tmp_path, monkeypatch,
                                                             grad_clip):
    model0, processor, rows = tiny
    real = train.TrainState.backward

    def poisoned(self, loss, what="loss"):
        real(self, loss, what)
        if self.step == 2:  # the third step (logged as step 3): finite loss, NaN gradient
            next(q for q in self.trainable if q.grad is not None).grad.fill_(float("nan"))

    monkeypatch.setattr(train.TrainState, "backward", poisoned)
    model = copy.deepcopy(model0)
    p = _params(steps=4, grad_clip=grad_clip)
    with pytest.raises(train.NonFiniteLossError,
                       match=r"gradient norm nan at step 3 .*step_0000002"):
        anchoring.train_supervised(model, processor, rows, p, tmp_path, "plain")
    assert checkpoints.latest_checkpoint(tmp_path / "checkpoints").name == "step_0000002"
    assert len(repro.read_jsonl(tmp_path / "metrics.jsonl")) == 2
    assert all(torch.isfinite(q).all() for q in model.parameters())  # no step on the NaN


# ---------------------------------------------------------------- wall time of a resumed run


def test_resumed_run_reports_the_time_of_every_segment(tiny, tmp_path, monkeypatch):
    model0, processor, rows = tiny
    clock = iter(range(0, 10**9, 1000))  # the first segment: every reading 1000 s later
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    p = _params(steps=3, checkpoint_every=2)
    anchoring.train_supervised(copy.deepcopy(model0), processor, rows, p, tmp_path, "plain",
                               hooks=train.Hooks(stop_after=2))
    first = checkpoints.read_checkpoint_meta(tmp_path / "checkpoints" / "step_0000002")
    assert first["extra"]["elapsed_s"] >= 1000
    monkeypatch.setattr(train, "time", time)
    res = anchoring.train_supervised(copy.deepcopy(model0), processor, rows,
                                     _params(steps=3, checkpoint_every=2, resume=True), tmp_path,
                                     "plain")
    assert first["extra"]["elapsed_s"] < res.wall_time_s < first["extra"]["elapsed_s"] + 600


# ---------------------------------------------------------------- the run lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_writer_is_refused_naming_the_owner(tmp_path):
    with runlock.RunLock(tmp_path):
        owner = runlock.read_lock(tmp_path)
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(runlock.RunLockedError, match=f"{tmp_path}.*pid {os.getpid()}"):
            runlock.RunLock(tmp_path).acquire()
    assert runlock.read_lock(tmp_path) is None
    with pytest.raises(RuntimeError, match="boom"), runlock.RunLock(tmp_path):
        raise RuntimeError("boom")
    assert runlock.read_lock(tmp_path) is None  # released on the exception
    with runlock.RunLock(tmp_path, enabled=False):  # a non-main process: no lock file
        assert runlock.read_lock(tmp_path) is None


def test_stale_lock_is_taken_over_and_foreign_host_refused(tmp_path, caplog):
    path = tmp_path / runlock.LOCK_NAME
    dead = _dead_pid()
    path.write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="fmr1lib.runlock"), runlock.RunLock(tmp_path):
        assert runlock.read_lock(tmp_path)["pid"] == os.getpid()
    assert f"stale run lock of pid {dead}" in caplog.text
    path.write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere.example"}))
    with pytest.raises(runlock.RunLockedError, match="elsewhere.example"):
        runlock.RunLock(tmp_path).acquire()
    assert path.exists()  # not ours to remove


def test_stage_refuses_a_locked_run_folder_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "_load_start", lambda *a: pytest.fail("loaded a model"))
    monkeypatch.setattr(stages, "ensure_prerequisites", lambda *a, **kw: None)  # no backbone here
    p = _params(run_root=str(tmp_path))
    folder = stages.run_folder(p, "anchor", "plain")
    with runlock.RunLock(folder), pytest.raises(runlock.RunLockedError, match=f"pid {os.getpid()}"):
        stages.anchor_stage(p, "plain", {"train": None})
    assert not (folder / "params.json").exists()


# ---------------------------------------------------------------- notebook outputs


def test_interrupted_notebook_leaves_no_finished_output(tmp_path, monkeypatch):
    import papermill

    def failing(src, out, **kw):
        with open(out, "w") as fh:
            fh.write('{"metadata": {"papermill": {"status": "completed"}}}')
        raise RuntimeError("cell 3 failed")

    out = tmp_path / "03_anchoring.ipynb"
    out.write_text("{}")  # an earlier run's output; the new run resets the results file
    monkeypatch.setattr(papermill, "execute_notebook", failing)
    with pytest.raises(RuntimeError, match="cell 3"):
        cli.run_notebook("03_anchoring", "tiny", out_dir=tmp_path)
    assert not out.exists() and (tmp_path / "03_anchoring.partial.ipynb").exists()
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda src, dst, **kw: open(dst, "w").write("{}"))
    assert cli.run_notebook("03_anchoring", "tiny", out_dir=tmp_path) == out
    assert out.exists() and not (tmp_path / "03_anchoring.partial.ipynb").exists()
