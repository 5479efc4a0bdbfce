"""Real data into training: ``DataParams.source: jsonl`` through stage 1, stage 2 and the evaluation.

The records are the committed study of ``tests/data/jsonl_study/`` (hand-made scenes written by
``scripts/make_jsonl_study.py``; some records carry no evidence boxes, none carries the FocusShapes
meta). First the params checks and the dataset the stages receive, then one end-to-end run of the
stage functions on the tiny backbone.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fmr1lib import config, counterfactual, data, evaluation, grpo, records, repro, stages

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "tests" / "data" / "jsonl_study"
STUDY_PARAMS = STUDY / "01_data_construction.yaml"
FILES = {s: f"tests/data/jsonl_study/{s}.jsonl" for s in ("train", "test_id", "test_ood")}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test of this module runs with one torch thread (``one_torch_thread``)."""


def _jsonl(**kw):
    # ``source`` is also load_params' positional argument: pass the values as a mapping.
    return config.load_params(config.DataParams, {"source": "jsonl", "jsonl_files": dict(FILES),
                                                  **kw})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study's dataset as the stages get it (``data.load_or_make``)."""
    p = config.load_params(config.DataParams, STUDY_PARAMS,
                           run_root=str(tmp_path_factory.mktemp("runs")))
    return p, data.load_or_make(p)


# --------------------------------------------------------------------------------------
# Params: the source keys are checked when the params load
# --------------------------------------------------------------------------------------


def test_default_source_is_focusshapes_and_the_study_params_load():
    p = config.load_params(config.DataParams)
    assert (p.source, p.jsonl_files, p.image_root, p.on_bad_record) == (
        "focusshapes", {}, None, "error")
    study = config.load_params(config.DataParams, STUDY_PARAMS)
    assert study.source == "jsonl" and set(study.jsonl_files) == {"train", "test_id", "test_ood"}


@pytest.mark.parametrize(("values", "expected"), [
    ({"source": "csv"}, "key 'source': expected one of ['focusshapes', 'jsonl'], got 'csv'"),
    ({"on_bad_record": "drop"}, "key 'on_bad_record'"),
    ({"jsonl_files": dict(FILES)}, "key 'jsonl_files': set, but source is 'focusshapes'"),
    ({"image_root": "tests/data"}, "key 'image_root': set, but source is 'focusshapes'"),
    ({"source": "jsonl"}, "key 'jsonl_files': no file for split(s) ['train', 'test_id', 'test_ood']"),
    ({"source": "jsonl", "jsonl_files": {"train": FILES["train"], "test_id": FILES["test_id"]}},
     "no file for split(s) ['test_ood']"),
    ({"source": "jsonl", "jsonl_files": {**FILES, "valid": FILES["train"]}},
     "key 'jsonl_files': unknown split(s) ['valid']"),
    ({"source": "jsonl", "jsonl_files": {**FILES, "test_ood": "tests/data/nowhere.jsonl"}},
     "the test_ood file 'tests/data/nowhere.jsonl' does not exist"),
    ({"source": "jsonl", "jsonl_files": FILES, "image_root": "tests/data/nowhere"},
     "key 'image_root': 'tests/data/nowhere' is not a folder"),
    ({"source": "jsonl", "jsonl_files": FILES, "shortcut_p": 0.9},
     "key 'shortcut_p': a FocusShapes setting, but source is 'jsonl'"),
    ({"source": "jsonl", "jsonl_files": FILES, "image_size": 448, "n_train": 10},
     "key 'image_size': a FocusShapes setting"),
])
def test_bad_source_keys_raise_params_error_naming_the_key(tmp_path, values, expected):
    path = tmp_path / "01_data_construction.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(config.ParamsError) as err:
        config.load_params(config.DataParams, path)
    assert str(err.value).startswith(str(path)) and expected in str(err.value)


def test_absolute_paths_and_image_root(tmp_path):
    """Files anywhere, with the images under another folder than the records files."""
    for split in FILES:
        shutil.copy(STUDY / f"{split}.jsonl", tmp_path / f"{split}.jsonl")
    p = _jsonl(image_root=str(STUDY), jsonl_files={s: str(tmp_path / f"{s}.jsonl") for s in FILES})
    ds, skipped = data.load_jsonl_split(p, "train")
    assert skipped == 0 and len(ds) == 24
    with pytest.raises(records.DataError, match="image file not found"):
        data.load_jsonl_split(_jsonl(jsonl_files=p.jsonl_files), "train")


# --------------------------------------------------------------------------------------
# The dataset: same splits and columns as FocusShapes, views from the records' boxes
# --------------------------------------------------------------------------------------


def test_jsonl_dataset_has_the_focusshapes_splits_and_columns(study):
    p, dsd = study
    fs = data.make_focus_shapes(config.load_params(config.DataParams, n_train=2, n_warmup=2,
                                                   n_test_id=2, n_test_ood=2))
    assert set(dsd) == set(fs) == set(data.SPLITS)
    for split in data.SPLITS:
        assert dsd[split].column_names == fs[split].column_names, split
    assert dsd.num_rows == {"train": 24, "warmup": 0, "test_id": 8, "test_ood": 8}
    info = json.loads((data.data_dir(p) / "info.json").read_text())
    assert info["source"] == "jsonl" and info["skipped"] == dict.fromkeys(data.SPLITS, 0)
    assert info["counts"]["test_id"] == {"records": 8, "with_boxes": 5, "without_boxes": 3,
                                         "with_views": 5, "without_views": 3}
    assert info["counts"]["train"]["without_boxes"] == 8
    # meta keeps the record's own keys and gains the split and the intervention seed
    meta = records.decode_meta(dsd["train"][1]["meta"])
    assert meta["source"] == "jsonl_study" and meta["split"] == "train"
    assert meta["seed"] == data.record_seed(0, "train", "study-train-01")
    assert data.task_counts(dsd["train"]) == {data.NO_TASK: 24}
    assert math.isnan(data.shortcut_agreement(dsd["train"]))


def test_test_views_are_made_from_the_evidence_boxes(study):
    p, dsd = study
    for split in ("test_id", "test_ood"):
        for row in dsd[split]:
            image = np.asarray(row["image"].convert("RGB"), dtype=np.int16)
            ev = np.asarray(row["image_cf_evidence"], dtype=np.int16)
            ctl = np.asarray(row["image_cf_control"], dtype=np.int16)
            if not row["evidence_boxes"]:
                # no boxes: no views (the originals, no controls), skipped by the evaluation
                assert row["control_boxes"] == [] and not data.row_has_views(row)
                assert np.array_equal(ev, image) and np.array_equal(ctl, image)
                continue
            assert data.row_has_views(row)
            assert len(row["control_boxes"]) == len(row["evidence_boxes"])
            inside = np.zeros(image.shape[:2], dtype=bool)
            pad = p.intervention_pad
            for x0, y0, x1, y1 in row["evidence_boxes"]:
                inside[max(0, int(y0) - pad):math.ceil(y1) + pad,
                       max(0, int(x0) - pad):math.ceil(x1) + pad] = True
            changed = (ev != image).any(-1)
            assert changed.any() and not changed[~inside].any(), row["id"]
            # the fill is the image's own background (no FocusShapes background in meta)
            bg = counterfactual.estimate_background(row["image"])
            x0, y0, x1, y1 = (int(v) for v in row["evidence_boxes"][0])
            assert tuple(ev[(y0 + y1) // 2, (x0 + x1) // 2]) == bg
            # controls keep a margin of 2 * pad from the evidence: both are padded when removed
            m = 2 * pad
            for cb in row["control_boxes"]:
                assert not any(counterfactual.boxes_overlap(cb, [b[0] - m, b[1] - m, b[2] + m,
                                                                 b[3] + m])
                               for b in row["evidence_boxes"])


def test_records_without_room_for_a_control_get_no_views():
    p = _jsonl()
    image = Image.new("RGB", (56, 56), (200, 200, 200))
    ev, ctl, boxes = data.record_views(image, [[0.0, 0.0, 50.0, 50.0]], {"seed": 1}, p, "big")
    assert boxes == [] and ev is image and ctl is image
    assert not data.row_has_views({"evidence_boxes": [[0.0, 0.0, 50.0, 50.0]],
                                   "control_boxes": boxes})


def test_bad_records_raise_before_training_or_are_skipped(tmp_path):
    lines = (STUDY / "train.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["evidence_boxes"] = [[10.0, 5.0, 8.0, 20.0]]
    lines[1] = json.dumps(bad)
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    files = {**FILES, "train": str(path)}
    p = _jsonl(jsonl_files=files, image_root=str(STUDY), run_root=str(tmp_path / "runs"))
    with pytest.raises(records.DataError) as err:
        data.load_or_make(p)
    assert (err.value.path, err.value.line, err.value.record_id, err.value.field) == (
        str(path), 2, "study-train-01", "evidence_boxes[0]")
    assert not (data.data_dir(p) / "params.json").exists()
    skip = _jsonl(jsonl_files=files, image_root=str(STUDY), on_bad_record="skip")
    ds, skipped = data.load_jsonl_split(skip, "train")
    assert (len(ds), skipped) == (23, 1) and "study-train-01" not in ds["id"]


def test_changed_records_file_rebuilds_the_dataset(tmp_path):
    for split in FILES:
        shutil.copy(STUDY / f"{split}.jsonl", tmp_path / f"{split}.jsonl")
    p = _jsonl(image_root=str(STUDY), jsonl_files={s: str(tmp_path / f"{s}.jsonl") for s in FILES},
               run_root=str(tmp_path / "runs"))
    assert data.load_or_make(p).num_rows["test_id"] == 8
    lines = (tmp_path / "test_id.jsonl").read_text().splitlines()
    (tmp_path / "test_id.jsonl").write_text("\n".join(lines[:5]) + "\n")
    assert data.load_or_make(p).num_rows["test_id"] == 5


def test_an_empty_split_saves_and_loads(tmp_path):
    """The JSONL study has no warm-up file; the GPU profiles' FocusShapes set ``n_warmup: 0``."""
    p = config.load_params(config.DataParams, n_train=2, n_warmup=0, n_test_id=1, n_test_ood=1,
                           run_root=str(tmp_path))
    dsd = data.load_or_make(p)
    assert dsd.num_rows == {"train": 2, "warmup": 0, "test_id": 1, "test_ood": 1}
    assert dsd["warmup"].column_names == dsd["train"].column_names


def test_focusshapes_make_refuses_jsonl_params():
    with pytest.raises(ValueError, match="data.make_dataset"):
        data.make_focus_shapes(_jsonl())


# --------------------------------------------------------------------------------------
# The evaluation counts what each metric skips
# --------------------------------------------------------------------------------------


def test_metrics_skip_and_count_records_without_boxes_views_or_cue():
    examples = [
        {"correct": True, "well_formed": True, "pred": "red", "cue": None, "cue_agrees": None,
         "has_evidence": True, "has_views": True, "focus_mass": 0.8, "pointing": True,
         "answer_mass": 0.5, "pred_evidence": "blue", "correct_evidence": False,
         "pred_control": "red", "correct_control": True},
        {"correct": False, "well_formed": True, "pred": "2", "cue": None, "cue_agrees": None,
         "has_evidence": False, "has_views": False, "focus_mass": None, "pointing": None,
         "answer_mass": None},
    ]
    counts = evaluation.coverage(examples)
    assert counts == {"examples": 2, "with_evidence": 1, "without_evidence": 1, "with_views": 1,
                      "without_views": 1, "with_cue": 0, "without_cue": 2}
    summary = evaluation.summarise(examples, n_boot=20)
    assert summary["accuracy"]["n"] == 2 and summary["accuracy"]["mean"] == 0.5
    for metric, mean in (("focus_mass", 0.8), ("pointing", 1.0), ("answer_mass", 0.5),
                         ("faithfulness_gap", 1.0), ("consistency", 1.0), ("acc_evidence", 0.0)):
        assert summary[metric]["n"] == 1 and summary[metric]["mean"] == pytest.approx(mean), metric
    for metric in ("conflict_accuracy", "cue_rate", "wrong_is_cue"):
        assert summary[metric]["n"] == 0 and math.isnan(summary[metric]["mean"])


# --------------------------------------------------------------------------------------
# End to end: the stage functions read the JSONL study
# --------------------------------------------------------------------------------------


def _write(path: Path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_stages_train_and_evaluate_on_jsonl(tmp_path, monkeypatch):
    common = {"profile": "jsonl_study", "data_params_file": str(STUDY_PARAMS)}
    bfile = _write(tmp_path / "02_backbone.yaml", {**common, "warmup": False})
    afile = _write(tmp_path / "03_anchoring.yaml", {
        **common, "backbone_params_file": bfile, "steps": 4, "batch_size": 6, "lr": 2e-3,
        "lr_warmup_steps": 0, "log_every": 1, "checkpoint_every": 0, "eval_n": 0})
    rfile = _write(tmp_path / "04_counterfactual_rl.yaml", {
        **common, "anchor_params_file": afile, "steps": 2, "prompts_per_step": 4,
        "group_size": 4, "n_prompts": 4, "max_new_tokens": 10, "lr": 1e-4, "log_every": 1,
        "checkpoint_every": 0, "faithful_form": "raw", "n_show": 16})
    run_root = {"run_root": str(tmp_path / "runs")}
    ap = config.load_params(config.AnchorParams, afile, **run_root)
    rp = config.load_params(config.RLParams, rfile, **run_root)
    dsd = stages.stage_data(ap)
    assert dsd.num_rows == {"train": 24, "warmup": 0, "test_id": 8, "test_ood": 8}
    boxed = {r["id"]: bool(r["evidence_boxes"]) for r in dsd["train"].select_columns(
        ["id", "evidence_boxes"])}

    # Stage 1: the attention loss is over the samples with a box target (NaN never enters it).
    repro.seed_everything(0)
    _, _, res1 = stages.anchor_stage(ap, "focus_anchor", build=True)  # the backbone first
    assert res1.steps == 4
    assert all(math.isfinite(m["attn_loss"]) and m["attn_loss"] > 0 for m in res1.metrics)
    assert all(0.0 <= m["focus_mass"] <= 1.0 for m in res1.metrics)

    # Stage 2 with the faithful reward. The untrained backbone answers nothing right, so every
    # valid completion is marked correct: the faithful reward then scores exactly the prompts
    # with boxes, and gives 0 to the first four prompts' unannotated one.
    monkeypatch.setattr(grpo.rewards, "accuracy_reward",
                        lambda completions, *a, **k: [1.0] * len(completions))
    repro.seed_everything(0)
    _, _, res2 = stages.rl_stage(rp, "faithful")
    assert res2.steps == 2
    folder = stages.run_folder(rp, "rl", "faithful", create=False)
    samples = repro.read_jsonl(folder / "samples.jsonl")
    firsts = [r["id"] for r in dsd["train"].select(range(4))]
    assert {s["id"] for s in samples} == set(firsts) and not all(boxed[i] for i in firsts)
    assert all(s["faithful"] == 0.0 for s in samples if not boxed[s["id"]])
    assert any(s["faithful"] > 0.0 for s in samples if boxed[s["id"]])
    n_boxed = sum(boxed[i] for i in firsts)
    assert all(0 < m["n_faithful_scored"] <= n_boxed * rp.rollout.group_size for m in res2.metrics)
    monkeypatch.undo()

    # The evaluation: accuracy over every example; box-based metrics over the annotated ones.
    result = evaluation.evaluate_saved(folder / "model", rp, dsd, ["test_id", "test_ood"],
                                       tmp_path / "eval.json",
                                       evaluation.Settings(n=0, batch_size=8, max_new_tokens=10,
                                                           n_boot=50))
    for split, n_boxes in (("test_id", 5), ("test_ood", 6)):
        counts = result["splits"][split]["counts"]
        assert counts == {"examples": 8, "with_evidence": n_boxes, "without_evidence": 8 - n_boxes,
                          "with_views": n_boxes, "without_views": 8 - n_boxes,
                          "with_cue": 0, "without_cue": 8}
        summary = result["splits"][split]["summary"]
        assert summary["accuracy"]["n"] == 8
        for metric in ("focus_mass", "pointing", "faithfulness_gap", "acc_evidence"):
            assert summary[metric]["n"] == n_boxes, (split, metric)
        assert summary["conflict_accuracy"]["n"] == 0
        assert math.isnan(summary["conflict_accuracy"]["mean"])
        no_box = [ex for ex in result["splits"][split]["examples"] if not ex["has_evidence"]]
        assert no_box and all("correct_evidence" not in ex and ex["focus_mass"] is None
                              for ex in no_box)
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["splits"]["test_id"]["counts"] == result["splits"]["test_id"]["counts"]
