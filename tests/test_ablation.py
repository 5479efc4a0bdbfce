"""The ablation's bookkeeping: seeds, reuse of runs, the table and the data-efficiency x axis."""

from __future__ import annotations

import math

import pytest

from fmr1lib import ablation, config, evaluation, repro, stages


def _summary(acc, gap=0.0):
    out = {k: {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
           for k in evaluation.METRICS}
    out["accuracy"] = {"mean": acc, "lo": acc - 0.1, "hi": acc + 0.1, "n": 10}
    out["faithfulness_gap"] = {"mean": gap, "lo": gap - 0.1, "hi": gap + 0.1, "n": 10}
    return out


@pytest.fixture()
def results():
    split = lambda acc, gap=0.0: {"test_ood": _summary(acc, gap)}  # noqa: E731
    return {
        "backbone": {0: split(0.2), 1: split(0.2), 2: split(0.2)},
        "anchoring_grpo": {0: split(0.5, 0.1), 1: split(0.6, 0.2), 2: split(0.7, 0.3)},
        "faithful_mr1": {0: split(0.6, 0.3), 1: split(0.6, 0.4), 2: split(0.9, 0.5)},
    }


def test_aggregate_mean_std_over_seeds_and_shared_backbone(results):
    long = ablation.aggregate(results, ["test_ood"])
    index = {(e["row"], e["metric"]): e for e in long}
    acc = index[("anchoring_grpo", "accuracy")]
    assert acc["mean"] == pytest.approx(0.6) and acc["std"] == pytest.approx(0.1)
    assert acc["n_seeds"] == 3 and acc["seed_means"] == [0.5, 0.6, 0.7]
    bb = index[("backbone", "accuracy")]
    assert bb["n_seeds"] == 1 and math.isnan(bb["std"])  # one model for every seed
    assert math.isnan(index[("faithful_mr1", "pointing")]["mean"])  # not measured here


def test_table_markdown_and_csv(results):
    long = ablation.aggregate(results, ["test_ood"])
    md = ablation.table_markdown(long, ["test_ood"], metrics=("accuracy", "faithfulness_gap", "pointing"))
    lines = md.splitlines()
    assert lines[0] == "**test_ood**"
    assert "| anchoring + GRPO | 0.60 ± 0.10 | 0.20 ± 0.10 | – |" in lines
    assert "| stage-0 backbone | 0.20 [0.10, 0.30] |" in md  # bootstrap interval, no std
    rows = ablation.table_csv(long).splitlines()
    assert rows[0].startswith("row,split,metric,mean,std")
    assert len(rows) == 1 + 3 * len(evaluation.METRICS)


def test_paired_difference_pairs_seeds(results):
    long = ablation.aggregate(results, ["test_ood"])
    d = ablation.paired_difference(long, "faithful_mr1", "anchoring_grpo", "test_ood", "faithfulness_gap")
    assert d["mean"] == pytest.approx(0.2) and d["min"] == pytest.approx(0.2)
    assert d["std"] == pytest.approx(0.0, abs=1e-12) and d["n"] == 3
    vs_backbone = ablation.paired_difference(long, "anchoring_grpo", "backbone", "test_ood", "accuracy")
    assert vs_backbone["mean"] == pytest.approx(0.4) and vs_backbone["n"] == 3


def test_run_names_and_rows():
    assert stages.eval_name("backbone", None, 2) == "backbone"
    assert stages.eval_name("rl", "faithful", 1, 8) == "faithful_mr1_seed1_n8"
    assert stages.eval_name("anchor", "focus_anchor", 0) == "anchoring_seed0"
    assert stages.row_name("rl", "faithful") == "faithful_mr1"
    assert stages.row_name("anchor", "plain") == "plain_sft"
    assert list(stages.ROWS) == list(config.ABLATION_ROWS)


def test_stage_params_change_only_the_seed():
    ep = config.load_params(config.EvalParams)
    _, a0, r0 = stages.seed_params(ep, 0)
    _, a2, r2 = stages.seed_params(ep, 2, n_prompts=8)
    assert a2.seed == 2 and r2.seed == 2 and r2.n_prompts == 8
    d0, d2 = config.params_to_dict(a0), config.params_to_dict(a2)
    assert {k for k in d0 if d0[k] != d2[k]} == {"seed"}
    assert ablation.prompts_seen(r0, 3000) == r0.steps * r0.rollout.prompts_per_step
    assert ablation.prompts_seen(r2, 3000) == 8


def test_ensure_trained_reuses_complete_runs_and_retrains_stale_ones(tmp_path, monkeypatch, capsys):
    anchor_file = tmp_path / "03_anchoring.yaml"
    anchor_file.write_text((repro.project_root() / "params/tiny/03_anchoring.yaml").read_text())
    ep = config.load_params(config.EvalParams, run_root=str(tmp_path),
                            anchor_params_file=str(anchor_file))
    monkeypatch.setattr(stages, "_start_run_of", lambda *a: None)  # no backbone run here
    trained = []

    def fake_anchor_stage(p, variant, dsd=None, build=False):
        out = stages.run_folder(p, "anchor", variant)
        repro.save_params(p, out)
        (out / "model").mkdir(parents=True, exist_ok=True)
        (out / "model" / "config.json").write_text("{}")
        (out / "info.json").write_text("{}")
        stages.mark_complete(out, p)  # written last by a run that finished
        trained.append((variant, p.seed, build))

    monkeypatch.setattr(stages, "anchor_stage", fake_anchor_stage)
    folder = stages.ensure_trained(ep, "anchoring", 1, dsd=None)
    assert trained == [("focus_anchor", 1, True)] and folder.name == "model"  # the ablation asks
    assert "building" not in capsys.readouterr().out  # its own rows: its report line names them
    stages.ensure_trained(ep, "anchoring", 1, dsd=None)
    assert len(trained) == 1  # complete and same params: reused
    # The params file's content changed (here: other steps): the run is stale and trains again.
    anchor_file.write_text(anchor_file.read_text() + "steps: 201\n")
    ap = stages.row_params(ep, "anchoring", 1)
    assert stages.run_status(ap, "anchor", "focus_anchor").reason.startswith(
        "not finished: its own params")
    stages.ensure_trained(ep, "anchoring", 1, dsd=None)
    assert trained == [("focus_anchor", 1, True)] * 2


def test_eval_params_validation_and_smoke():
    with pytest.raises(config.ParamsError, match="rows"):
        config.load_params(config.EvalParams, {"rows": ["nope"]})
    with pytest.raises(config.ParamsError, match="efficiency_prompts"):
        config.load_params(config.EvalParams, {"efficiency_prompts": [0]})
    smoke = config.load_params(config.EvalParams).smoke_version()
    assert smoke.smoke and smoke.seeds == [0] and len(smoke.efficiency_prompts) == 1
