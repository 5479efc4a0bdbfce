"""Provenance over the chain (docs/design.md §10.2): a run is finished only for the inputs it was
made from; every check runs before a run folder is touched; no checkpoint is trusted without a
manifest; locks and swaps without races; validation; one line per known failure in the CLI.

The chain runs on the tiny profile, shrunk to seconds: a 16-example dataset, two steps of
stages 0 and 1, one GRPO step."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from fmr1lib import checkpoints, cli, config, repro, runlock, stages, train

FILES = {
    "01_data_construction": "n_train: 16\nn_warmup: 16\nn_test_id: 4\nn_test_ood: 4\n",
    "02_backbone": "data_params_file: {data}\nsteps: 2\nbatch_size: 2\nlr_warmup_steps: 0\n",
    "03_anchoring": ("data_params_file: {data}\nbackbone_params_file: {backbone}\nsteps: 2\n"
                     "batch_size: 2\nlr_warmup_steps: 0\ncheckpoint_every: 1\n"),
    "04_counterfactual_rl": ("data_params_file: {data}\nanchor_params_file: {anchor}\nsteps: 1\n"
                             "prompts_per_step: 1\ngroup_size: 2\ncheckpoint_every: 0\n"),
    "05_evaluation": ("data_params_file: {data}\nbackbone_params_file: {backbone}\n"
                      "anchor_params_file: {anchor}\nrl_params_file: {rl}\nseeds: [0]\n"),
}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Chain:
    """Params files of a shrunk tiny profile under ``root/params/tiny``, runs under ``root/runs``."""

    def __init__(self, root: Path):
        self.root = root
        folder = root / "params" / "tiny"
        folder.mkdir(parents=True)
        self.file = {name: folder / f"{name}.yaml" for name in FILES}
        names = {"data": self.file["01_data_construction"], "backbone": self.file["02_backbone"],
                 "anchor": self.file["03_anchoring"], "rl": self.file["04_counterfactual_rl"]}
        for name, body in FILES.items():
            self.file[name].write_text(f"profile: tiny\nrun_root: {root / 'runs'}\n"
                                       + body.format(**names))
        self.original = {name: f.read_text() for name, f in self.file.items()}
        self.ep = config.load_params(config.EvalParams, self.file["05_evaluation"])

    def restore(self) -> None:
        for name, f in self.file.items():
            f.write_text(self.original[name])

    def append(self, name: str, text: str) -> None:
        self.file[name].write_text(self.original[name] + text)

    def params(self) -> tuple:
        bp, ap, rp = stages.seed_params(self.ep, 0)
        return bp, ap, rp

    def status(self) -> dict[str, stages.RunStatus]:
        bp, ap, rp = self.params()
        return {"backbone": stages.run_status(bp, "backbone"),
                "anchor": stages.run_status(ap, "anchor", "focus_anchor"),
                "rl": stages.run_status(rp, "rl", "grpo")}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    c = Chain(tmp_path_factory.mktemp("chain"))
    c.dsd = stages.stage_data(c.ep)
    stages.ensure_trained(c.ep, "anchoring_grpo", 0, c.dsd)
    yield c
    c.restore()


@pytest.fixture
def trained(chain, monkeypatch):
    """The runs the ablation trains, as (stage, variant) in order."""
    calls = []
    for name in ("backbone_stage", "anchor_stage", "rl_stage"):
        real = getattr(stages, name)

        def wrapped(p, *a, _real=real, _name=name, **kw):
            out = _real(p, *a, **kw)  # recorded once trained: a start model built inside first
            calls.append((_name.removesuffix("_stage"), a[0] if a and isinstance(a[0], str)
                          else None))
            return out

        monkeypatch.setattr(stages, name, wrapped)
    yield calls
    chain.restore()
    assert all(chain.status().values()), "a test left the chain unfinished"


# ---------------------------------------------------------------- 1. finished only for its inputs


@pytest.mark.train
def test_changed_upstream_makes_downstream_unfinished_and_ablation_retrains_exactly_those(
        chain, trained):
    stages.ensure_trained(chain.ep, "anchoring_grpo", 0, chain.dsd)
    assert trained == []  # every run finished for its inputs: reused

    # The backbone params file's content changed: the ablation retrains exactly the backbone,
    # the stage-1 model and the stage-2 run, which started from it.
    chain.append("02_backbone", "lr: 0.0019\n")
    stages.ensure_trained(chain.ep, "anchoring_grpo", 0, chain.dsd)
    assert trained == [("backbone", None), ("anchor", "focus_anchor"), ("rl", "grpo")]
    assert all(chain.status().values())

    # Back to the file as it was: each stage says which input changed, then all three retrain.
    chain.restore()
    status = chain.status()
    assert status["backbone"].reason.startswith("not finished: its own params")
    assert status["anchor"].reason.startswith(
        f"not finished: backbone params ({chain.file['02_backbone']}) changed")
    assert status["rl"].reason.startswith("not finished: backbone params (")
    trained.clear()
    stages.ensure_trained(chain.ep, "anchoring_grpo", 0, chain.dsd)
    assert trained == [("backbone", None), ("anchor", "focus_anchor"), ("rl", "grpo")]

    # The data params file's content (a seed appended): every stage's dataset changed.
    chain.append("01_data_construction", "seed: 7\n")
    for st in chain.status().values():
        assert not st and st.reason.startswith("not finished: data params (") and "changed" in st.reason
    chain.restore()
    assert all(chain.status().values())  # the same content again: finished again

    # The start model of stage 2 changed on disk (stage 1 retrained by hand, or corrupted).
    trained.clear()
    _, ap, _ = chain.params()
    weights = stages.run_folder(ap, "anchor", "focus_anchor", create=False) / "model" / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    status = chain.status()
    assert status["backbone"]
    assert "model changed since its run finished" in status["anchor"].reason
    assert status["rl"].reason.startswith("not finished: start model (") and "is not finished" in status["rl"].reason
    stages.ensure_trained(chain.ep, "anchoring_grpo", 0, chain.dsd)
    # Retrained from the same inputs, the stage-1 model is bit-identical to the one stage 2
    # started from: stage 2 is finished again without retraining.
    assert trained == [("anchor", "focus_anchor")]
    assert chain.status()["rl"]


@pytest.mark.train
def test_missing_prerequisite_names_the_input_that_changed(chain, trained):
    chain.append("02_backbone", "lr: 0.0019\n")
    _, _, rp = chain.params()
    with pytest.raises(stages.MissingPrerequisiteError, match="backbone params .* changed"):
        stages.start_model(rp, "grpo")  # build=False, the default: nothing trains unasked
    assert trained == []


# ---------------------------------------------------------------- 2. check everything, then write


@pytest.mark.train
def test_refused_resume_or_validation_leaves_a_finished_run_byte_identical(chain, trained):
    _, ap, _ = chain.params()
    folder = stages.run_folder(ap, "anchor", "focus_anchor", create=False)
    before = _snapshot(folder)
    assert "complete.json" in before and any(k.startswith("checkpoints/") for k in before)

    # A resume with a changed trajectory parameter.
    changed = config.load_params(config.AnchorParams, chain.file["03_anchoring"], resume=True,
                                 lr=0.001, seed=0)
    with pytest.raises(train.ResumeMismatchError, match="lr"):
        stages.anchor_stage(changed, "focus_anchor", chain.dsd)
    assert _snapshot(folder) == before

    # A resume after an upstream params file changed (the data: the dataset would be rebuilt).
    # The backbone, made from the old data, is no longer finished: the stage stops for it first
    # (it is not asked to build it), and the resume itself would be refused for the data too.
    chain.append("01_data_construction", "seed: 7\n")
    resumed = config.load_params(config.AnchorParams, chain.file["03_anchoring"], resume=True)
    with pytest.raises(stages.MissingPrerequisiteError, match="backbone .* data params .* changed"):
        stages.anchor_stage(resumed, "focus_anchor")
    with pytest.raises(train.ResumeMismatchError, match="data params .* changed"):
        stages.check_resume_inputs(resumed, "anchor", "focus_anchor", folder / "checkpoints",
                                   stages.run_inputs(resumed, "anchor", "focus_anchor"))
    chain.restore()
    assert _snapshot(folder) == before

    # Values refused by validation, from the command line.
    for bad in ("train_split=nosuch", "attn_implementation=bogus", "lr=1.0e+300"):
        assert cli.main(["anchor", "--params", str(chain.file["03_anchoring"]), "--variants",
                         "focus_anchor", "--set", bad]) == 2
        assert _snapshot(folder) == before
    assert trained == []


# ---------------------------------------------------------------- 3. no trust without a manifest


def _save(folder: Path, step: int, weight: float) -> Path:
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(weight)
    checkpoints.save_checkpoint(folder, step, model, keep=10)
    return folder / f"step_{step:07d}"


@pytest.mark.unit
def test_checkpoint_without_manifest_or_with_nan_weights_is_never_trusted(tmp_path, caplog,
                                                                          monkeypatch):
    monkeypatch.delenv("FMR1_TRUST_UNVERIFIED_CHECKPOINT", raising=False)
    first = _save(tmp_path, 1, 0.5)
    second = _save(tmp_path, 2, -1.5)  # a valid safetensors file: only the manifest vouches
    (second / checkpoints.MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="fmr1lib.repro"):
        assert checkpoints.latest_checkpoint(tmp_path) == first
    assert str(second / checkpoints.MANIFEST) in caplog.text

    # The only checkpoint, without a manifest: refused unless asked for explicitly.
    only = tmp_path / "only"
    ck = _save(only, 1, 0.5)
    (ck / checkpoints.MANIFEST).unlink()
    with pytest.raises(checkpoints.CheckpointError, match=checkpoints.TRUST_UNVERIFIED_ENV):
        checkpoints.latest_checkpoint(only)
    monkeypatch.setenv(checkpoints.TRUST_UNVERIFIED_ENV, "1")
    assert checkpoints.latest_checkpoint(only) == ck
    monkeypatch.delenv(checkpoints.TRUST_UNVERIFIED_ENV)

    # A checkpoint whose weights are NaN is never called the last good one.
    nan = tmp_path / "nan"
    good = _save(nan, 1, 0.5)
    _save(nan, 2, float("nan"))
    state = train.TrainState(model=None, optimizer=None, scheduler=None, accelerator=None,
                             trainable=[], checkpoint_dir=nan)
    assert state._last_good() == str(good)
    for f in nan.glob("step_0000001/*"):
        f.unlink()
    assert state._last_good() == "none"


# ---------------------------------------------------------------- 4, 8. locks


def _dead_pid() -> int:
    pid = 2**22 - 1
    while runlock._pid_alive(pid):
        pid -= 1
    return pid


@pytest.mark.unit
def test_stale_lock_is_taken_by_exactly_one_of_two_racing_restarts(tmp_path, monkeypatch):
    (tmp_path / runlock.LOCK_NAME).write_text(json.dumps(
        {"pid": _dead_pid(), "host": socket.gethostname()}))
    real = runlock._pid_alive

    def slow(pid: int) -> bool:  # both restarts see the stale owner before either replaces it
        time.sleep(0.5)
        return real(pid)

    monkeypatch.setattr(runlock, "_pid_alive", slow)
    results: list[str] = []
    locks = [runlock.RunLock(tmp_path) for _ in range(2)]

    def take(lock: runlock.RunLock) -> None:
        try:
            lock.acquire()
            results.append("held")
        except runlock.RunLockedError:
            results.append("refused")

    threads = [threading.Thread(target=take, args=(lk,)) for lk in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["held", "refused"]
    for lk in locks:
        lk.release()


@pytest.mark.unit
def test_empty_lock_file_is_taken_over(tmp_path, caplog):
    (tmp_path / runlock.LOCK_NAME).write_text("")
    with caplog.at_level(logging.WARNING, logger="fmr1lib.runlock"), runlock.RunLock(tmp_path):
        assert runlock.read_lock(tmp_path)["pid"] == os.getpid()
    assert "empty or unreadable run lock" in caplog.text


# ---------------------------------------------------------------- 5. a reader never undoes a live swap


@pytest.mark.unit
def test_reader_waits_for_a_live_swap_instead_of_undoing_it(tmp_path, monkeypatch):
    folder, tmp = tmp_path / "model", tmp_path / ".model.new"
    folder.mkdir()
    (folder / "w").write_text("old")
    tmp.mkdir()
    (tmp / "w").write_text("new")
    old = repro.old_folder(folder)
    parked = threading.Event()
    real_rename = Path.rename

    def rename(self: Path, target):
        out = real_rename(self, target)
        if Path(target) == old:  # the writer between its two renames
            parked.set()
            time.sleep(0.5)
        return out

    monkeypatch.setattr(Path, "rename", rename)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            repro.swap_folder(tmp, folder)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    assert parked.wait(5)
    repro.recover_interrupted_swap(folder)  # a reader (load_saved_backbone, load_or_make)
    t.join()
    assert errors == []
    assert (folder / "w").read_text() == "new" and not old.exists()


# ---------------------------------------------------------------- 6. validation


@pytest.mark.unit
@pytest.mark.parametrize(("cls", "key", "value"), [
    (config.AnchorParams, "lr", 1.0e300), (config.AnchorParams, "steps", 10**30),
    (config.AnchorParams, "batch_size", 10**12), (config.RLParams, "clip_high", 50.0),
    (config.AnchorParams, "seed", -1), (config.RLParams, "w_acc", -5.0),
    (config.AnchorParams, "train_split", "nosuch"), (config.RLParams, "train_split", "nosuch"),
    (config.AnchorParams, "attn_implementation", "bogus"),
])
def test_out_of_range_values_and_unknown_names_are_refused_naming_the_key(cls, key, value):
    with pytest.raises(config.ParamsError, match=f"key '{key}'"):
        config.load_params(cls, {key: value})


@pytest.mark.unit
def test_profile_pointer_and_yaml_numbers(tmp_path):
    folder = tmp_path / "params" / "tiny"
    folder.mkdir(parents=True)
    f = folder / "03_anchoring.yaml"
    f.write_text("profile: nosuch\n")
    with pytest.raises(config.ParamsError, match="'nosuch'.*'tiny' profile folder"):
        config.load_params(config.AnchorParams, f)
    f.write_text("profile: tiny\nlr: 1e-4\nlambda_attn: 2E+0\n")
    p = config.load_params(config.AnchorParams, f)
    assert p.lr == 1e-4 and p.lambda_attn == 2.0
    assert cli.parse_sets(["lr=1e-4", "steps=5"], config.AnchorParams) == {"lr": 1e-4, "steps": 5}
    ap = config.load_params(config.AnchorParams,
                            backbone_params_file="params/tiny/04_counterfactual_rl.yaml")
    with pytest.raises(config.ParamsError, match="key 'backbone_params_file'"):
        stages.upstream_params(ap, "backbone")


# ---------------------------------------------------------------- 7. keys that may change on resume


@pytest.mark.train
def test_keys_that_may_change_on_resume_do_not_unfinish_a_run(chain, trained):
    chain.append("04_counterfactual_rl", "resume: true\nlog_every: 3\neval_n: 5\n")
    chain.append("03_anchoring", "n_show: 2\neval_batch_size: 7\n")
    stages.ensure_trained(chain.ep, "anchoring_grpo", 0, chain.dsd)
    assert trained == []  # reused, not retrained
    assert all(chain.status().values())


# ---------------------------------------------------------------- 8. one line per known failure


@pytest.mark.train
def test_cli_known_failures_exit_with_their_own_status_in_one_line(chain, trained, capsys):
    argv = ["anchor", "--params", str(chain.file["03_anchoring"]), "--variants", "focus_anchor"]
    assert cli.main([*argv, "--set", "resume=true", "--set", "lr=0.001"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ResumeMismatchError: cannot resume ") and "lr" in err[-1]
    assert not any("Traceback" in line for line in err)
    _, ap, _ = chain.params()
    with runlock.RunLock(stages.run_folder(ap, "anchor", "focus_anchor", create=False)):
        assert cli.main(argv) == 5
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("RunLockedError: ")
        with pytest.raises(runlock.RunLockedError):
            cli.main(["--debug", *argv])
    assert trained == []
