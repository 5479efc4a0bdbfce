"""The command line: ``--set`` overrides, ``--dry-run``, missing prerequisites, notebook progress,
experiment trackers."""

from __future__ import annotations

import json
import os
import types

import nbformat
import pytest
from accelerate.tracking import GeneralTracker

from fmr1lib import cli, config

RL = "params/tiny/04_counterfactual_rl.yaml"
ANCHOR = "params/tiny/03_anchoring.yaml"


@pytest.fixture
def at_root(monkeypatch):
    """Run from the project root, as the CLI's relative params paths expect."""
    monkeypatch.chdir(config.PARAMS_ROOT)


def _fail(*args, **kwargs):
    pytest.fail("work was done")


# ---------------------------------------------------------------- --set and --dry-run


def test_set_overrides_are_applied_and_validated(at_root, capsys):
    p = cli.load_stage_params(config.AnchorParams, ANCHOR, ["steps=7", "lr=0.01",
                                                            "variants=[plain]"])
    assert (p.steps, p.lr, p.variants) == (7, 0.01, ["plain"])
    assert cli.main(["anchor", "--params", ANCHOR, "--set", "steps=7", "--dry-run"]) == 0
    assert "steps: 7\n" in capsys.readouterr().out

    bad = {"stepz=5": "--set stepz: unknown key 'stepz' for AnchorParams",
           "steps=five": "--set steps='five'",
           "steps": "--set 'steps': expected KEY=VALUE"}
    for item, expected in bad.items():
        assert cli.main(["anchor", "--params", ANCHOR, "--set", item, "--dry-run"]) == 2
        assert expected in capsys.readouterr().err, item
    assert cli.main(["anchor", "--params", ANCHOR, "--set", "steps=1", "--set", "steps=2"]) == 2
    assert "--set steps: given twice" in capsys.readouterr().err
    # The notebook command passes them to papermill, checked against the notebook's class.
    assert cli.main(["notebook", "03_anchoring", "--set", "stepz=5", "--dry-run"]) == 2
    assert "--set stepz: unknown key" in capsys.readouterr().err


def test_profile_flag_lists_the_profiles(at_root, capsys):
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--help"])
    assert "one of jsonl_example, qwen2_5_vl_3b, qwen2_5_vl_7b, study, tiny" in " ".join(capsys.readouterr().out.split())
    assert cli.main(["reproduce", "--profile", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no profile 'nope'" in err and "'tiny'" in err


def test_dry_run_does_no_work(at_root, tmp_path, monkeypatch, capsys):
    from fmr1lib import data, stages

    for name in ("backbone_stage", "anchor_stage", "rl_stage", "stage_data"):
        monkeypatch.setattr(stages, name, _fail)
    monkeypatch.setattr(data, "make_dataset", _fail)
    monkeypatch.setattr(cli, "run_notebook", _fail)
    runs = tmp_path / "runs"
    where = ["--set", f"run_root={runs}", "--dry-run"]
    for argv in (["data", "--params", "params/tiny/01_data_construction.yaml", *where],
                 ["backbone", "--params", "params/tiny/02_backbone.yaml", *where],
                 ["anchor", "--params", ANCHOR, *where],
                 ["rl", "--params", RL, "--variants", "faithful", *where],
                 ["ablation", "--params", "params/tiny/05_evaluation.yaml", *where],
                 ["notebook", "03_anchoring", "--set", "steps=3", "--dry-run"],
                 ["reproduce", "--dry-run"]):
        assert cli.main(argv) == 0, argv
        out = capsys.readouterr().out
        assert "dry run: nothing was run or written" in out and "  would " in out, argv
    assert not runs.exists()


# ---------------------------------------------------------------- missing prerequisites


def test_rl_without_stage1_model_stops_with_the_command(at_root, tmp_path, monkeypatch, capsys):
    from fmr1lib import stages

    monkeypatch.setattr(stages, "anchor_stage", _fail)
    monkeypatch.setattr(stages, "backbone_stage", _fail)
    runs = tmp_path / "runs"
    argv = ["rl", "--params", RL, "--variants", "faithful", "--set", f"run_root={runs}",
            "--set", "seed=1"]
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    assert "python -m fmr1lib backbone --params params/tiny/02_backbone.yaml" in err
    assert (f"python -m fmr1lib anchor --params {ANCHOR} --variants focus_anchor "
            f"--set run_root={runs} --set seed=1") in err
    assert "--build-missing" in err
    assert not runs.exists()  # stopped before any run folder
    assert cli.main(["anchor", "--params", ANCHOR, "--variants", "plain", "--set",
                     f"run_root={runs}"]) == 3
    assert "python -m fmr1lib backbone --params params/tiny/02_backbone.yaml" in capsys.readouterr().err
    with pytest.raises(stages.MissingPrerequisiteError, match="fmr1lib anchor"):
        stages.start_model(cli.load_stage_params(config.RLParams, RL, [f"run_root={runs}"]),
                           "faithful", build=False)

    # --build-missing builds the backbone, then the stage-1 model, before stage 2 (the stages
    # themselves stand in here: each marks its run finished), one printed line each.
    capsys.readouterr()
    made = _fake_upstream_stages(monkeypatch)

    def rl_stage_body(model, processor, ds, p, out, variant, accelerator=None):
        return types.SimpleNamespace(steps=p.steps, wall_time_s=0.0, out_dir=out)

    monkeypatch.setattr(stages, "stage_data", lambda p, acc=None, dsd=None: {p.train_split: None})
    monkeypatch.setattr(stages.modeling, "load_saved_backbone", lambda folder, p: (None, None))
    monkeypatch.setattr(stages, "prepare_trainable", lambda model, processor, p: model)
    monkeypatch.setattr(stages.grpo, "train_grpo", rl_stage_body)
    monkeypatch.setattr(stages, "save_stage", lambda model, *a: model)
    assert cli.main([*argv, "--build-missing"]) == 0
    assert made == [("backbone", None, 0), ("focus_anchor", 1, True)]
    out = capsys.readouterr().out
    assert ("building the stage-0 backbone, needed for the stage-2 faithful run (not finished: "
            f"no finished run in {runs / 'tiny' / 'backbone'})") in out
    assert "building the stage-1 focus_anchor model, needed for the stage-2 faithful run" in out


def _fake_upstream_stages(monkeypatch) -> list:
    """Stand-ins for ``backbone_stage`` and ``anchor_stage`` that record ``(variant, seed,
    build)`` and mark their run finished (``run_status``) without training."""
    from fmr1lib import stages

    made, finished = [], set()
    real_status = stages.run_status

    def backbone_stage(p, dsd=None):
        made.append(("backbone", None, p.seed))
        finished.add(stages.run_folder(p, "backbone", create=False))

    def anchor_stage(p, variant, dsd=None, build=False):
        made.append((variant, p.seed, build))
        finished.add(stages.run_folder(p, "anchor", variant, create=False))

    def run_status(p, stage, variant=None):
        folder = stages.run_folder(p, stage, variant, create=False)
        if folder in finished:
            return stages.RunStatus(folder, True, "", "sha")
        return real_status(p, stage, variant)

    monkeypatch.setattr(stages, "backbone_stage", backbone_stage)
    monkeypatch.setattr(stages, "anchor_stage", anchor_stage)
    monkeypatch.setattr(stages, "run_status", run_status)
    return made


def test_library_builds_a_missing_start_model_only_when_asked(at_root, tmp_path, monkeypatch,
                                                              capsys):
    """The library's default is to stop: a stage, ``start_model`` or ``ensure_backbone`` whose
    start model is missing raises ``MissingPrerequisiteError`` and trains nothing; with
    ``build=True`` the missing runs are built, in order, each announced by one line."""
    from fmr1lib import stages

    for name in ("backbone_stage", "stage_data"):
        monkeypatch.setattr(stages, name, _fail)
    monkeypatch.setattr(stages.grpo, "train_grpo", _fail)
    monkeypatch.setattr(stages.anchoring, "train_supervised", _fail)
    runs = tmp_path / "runs"
    rp = cli.load_stage_params(config.RLParams, RL, [f"run_root={runs}"])
    ap = stages.upstream_params(rp, "anchor")
    for call in (lambda: stages.anchor_stage(ap, "plain"), lambda: stages.ensure_backbone(ap)):
        with pytest.raises(stages.MissingPrerequisiteError, match="fmr1lib backbone --params"):
            call()
    for call in (lambda: stages.rl_stage(rp, "faithful"), lambda: stages.start_model(rp, "grpo")):
        with pytest.raises(stages.MissingPrerequisiteError, match="fmr1lib anchor --params"):
            call()
    assert not runs.exists()  # stopped before any run folder
    assert "building" not in capsys.readouterr().out

    made = _fake_upstream_stages(monkeypatch)
    monkeypatch.setattr(stages.modeling, "load_saved_backbone", lambda folder, p: (folder, p))
    folder, _ = stages.start_model(rp, "faithful_plain", build=True)
    assert made == [("backbone", None, 0), ("plain", 0, True)]
    assert folder == stages.model_folder(rp, "anchor", "plain")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("building ")]
    assert [ln.split(",")[0] for ln in lines] == ["building the stage-0 backbone",
                                                 "building the stage-1 plain model"]


def test_benchmark_names_the_command_of_a_missing_model(tmp_path):
    from fmr1lib import benchmark

    msg = benchmark.missing_model_message("runs/tiny/rl/faithful_seed1_n8/model")
    assert "notebooks/04_counterfactual_rl.ipynb" in msg
    assert ("python -m fmr1lib rl --params params/tiny/04_counterfactual_rl.yaml --variants "
            "faithful --set seed=1 --set n_prompts=8") in msg
    msg = benchmark.missing_model_message("runs/qwen2_5_vl_3b/anchor/focus_anchor/model")
    assert "anchor --params params/qwen2_5_vl_3b/03_anchoring.yaml --variants focus_anchor`" in msg
    assert "02_backbone" in benchmark.missing_model_message("runs/tiny/backbone/model")
    with pytest.raises(FileNotFoundError, match="e.g. runs/tiny/rl/faithful/model"):
        benchmark.load_model(tmp_path)


# ---------------------------------------------------------------- notebook progress


def test_run_notebook_prints_cell_progress_and_estimates(tmp_path, monkeypatch, capsys):
    from papermill.engines import NBClientEngine

    seen_env = []

    def fake_execute(cls, nb_man, kernel_name, **kwargs):  # the kernel, without a kernel
        seen_env.append((os.environ.get("TQDM_MININTERVAL"),
                         os.environ.get(cli.PROGRESS_LINES_ENV)))
        for i, cell in enumerate(nb_man.nb.cells):
            nb_man.cell_start(cell, i)
            if cell.cell_type == "code":
                kwargs["stderr_file"].write("\rtraining:  50%|#    | 1/2")
            nb_man.cell_complete(cell, i)
        return nb_man.nb

    monkeypatch.setattr(NBClientEngine, "execute_managed_notebook", classmethod(fake_execute))
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    out = cli.run_notebook("01_data_construction", "tiny", out_dir=tmp_path)
    assert out.exists() and not (tmp_path / "01_data_construction.partial.ipynb").exists()
    every = str(cli.KERNEL_TQDM_MININTERVAL)
    assert seen_env == [(every, every)]  # the kernel's bars refresh rarely, training runs print
    assert "TQDM_MININTERVAL" not in os.environ  # this process's are as they were
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[01_")]
    n_code = sum(c.cell_type == "code" for c in nbformat.read(out, as_version=4).cells)
    assert [ln.split(":")[0] for ln in lines] == [
        f"[01_data_construction] cell {k}/{n_code}" for k in range(1, n_code + 1)]
    assert not any("estimate" in ln for ln in lines)  # nothing recorded yet: no estimate
    times = json.loads((tmp_path / cli.TIMES_FILE).read_text())["notebooks"]
    assert len(times["01_data_construction"]["cells_s"]) == n_code

    cli.run_notebook("01_data_construction", "tiny", out_dir=tmp_path)
    err = capsys.readouterr().err
    assert "training:  50%" in err  # the kernel's stderr, forwarded
    lines = [ln for ln in err.splitlines() if ln.startswith("[01_")]
    assert len(lines) == n_code and all("left (estimate: last run's cell times)" in ln
                                        for ln in lines)
    assert "estimate from the last run's times" in cli.reproduce_estimate(
        ["01_data_construction"], cli.read_times(tmp_path / cli.TIMES_FILE), tmp_path)


# ---------------------------------------------------------------- experiment trackers


class FakeTracker(GeneralTracker):
    """Stands in for accelerate's TensorBoardTracker: records what it is given."""

    name = "tensorboard"
    requires_logging_directory = True
    made: list[FakeTracker] = []

    def __init__(self, run_name, logging_dir, **kwargs):
        super().__init__()
        self.run_name, self.logging_dir = run_name, logging_dir
        self.logged, self.config, self.finished = [], None, False
        FakeTracker.made.append(self)

    @property
    def tracker(self):
        return self

    def start(self):
        pass

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def test_fit_sends_metrics_rows_to_trackers_and_progress_lines(tmp_path, monkeypatch, capsys):
    from accelerate import tracking

    from fmr1lib import anchoring, data, modeling, repro, train

    assert cli.PROGRESS_LINES_ENV == train.PROGRESS_LINES_ENV
    monkeypatch.setenv(train.PROGRESS_LINES_ENV, "1000")

    monkeypatch.setitem(config.TRACKERS, "tensorboard", ("json",))  # "installed"
    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "tensorboard", FakeTracker)
    FakeTracker.made.clear()
    p = config.load_params(config.AnchorParams, {
        "steps": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 0,
        "lr_warmup_steps": 0, "log_with": ["tensorboard"]})
    model, processor = modeling.build_tiny_backbone(p, seed=0)
    rows = data.make_split(config.DataParams(), "train", 4)
    anchoring.train_supervised(model, processor, rows, p, tmp_path, "plain")
    (tracker,) = FakeTracker.made
    metrics = repro.read_jsonl(tmp_path / "metrics.jsonl")
    assert len(metrics) == 2
    expected = [(r["step"], {k: v for k, v in r.items() if k != "step"
                             and isinstance(v, (int, float)) and not isinstance(v, bool)})
                for r in metrics]
    assert tracker.logged == expected
    assert {"ce", "lr", "time_s"} <= set(tracker.logged[0][1])
    assert (tracker.run_name, tracker.logging_dir) == ("tensorboard", str(tmp_path))
    assert tracker.config["lr"] == p.lr and tracker.config["log_with"] == '["tensorboard"]'
    assert tracker.finished
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[train] ")]
    assert len(lines) == 2 and "step 0/2, starting" in lines[0] and "2 steps in" in lines[1], lines


def test_log_with_is_validated_before_training(monkeypatch):
    with pytest.raises(config.ParamsError, match=r"key 'log_with': unknown \['tensorbored'\]"):
        config.load_params(config.RLParams, {"log_with": ["tensorbored"]})
    monkeypatch.setitem(config.TRACKERS, "wandb", ("no_such_package_fmr1",))
    with pytest.raises(config.ParamsError, match="needs a package that is not installed: pip "
                                                 "install no_such_package_fmr1"):
        config.load_params(config.AnchorParams, {"log_with": ["wandb"]})


def test_tensorboard_events_hold_the_rows_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fmr1lib import anchoring, data, modeling, repro

    p = config.load_params(config.AnchorParams, {
        "steps": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 0,
        "lr_warmup_steps": 0, "log_with": ["tensorboard"]})
    model, processor = modeling.build_tiny_backbone(p, seed=0)
    anchoring.train_supervised(model, processor, data.make_split(config.DataParams(), "train", 4),
                               p, tmp_path, "plain")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    metrics = repro.read_jsonl(tmp_path / "metrics.jsonl")
    for key in ("ce", "lr", "grad_norm", "time_s"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in metrics], key
