"""Metrics on hand-built cases with known values."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from fmr1lib import evaluation


def _map(grid, target):
    return {"grid": np.array(grid, dtype=float), "target": np.array(target, dtype=float)}


def test_all_attention_in_the_box_gives_mass_and_pointing_one():
    m = _map([[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]])
    assert evaluation.perception_metrics([m]) == {"focus_mass": 1.0, "pointing": 1.0, "n": 1}


def test_uniform_attention_gives_the_chance_level():
    target = np.zeros((4, 4))
    target[0, 0] = 1.0
    m = _map(np.full((4, 4), 1 / 16), target)
    res = evaluation.perception_metrics([m])
    assert res["focus_mass"] == pytest.approx(1 / 16)
    assert evaluation.uniform_mass([m]) == pytest.approx(1 / 16)


def test_rows_without_evidence_are_skipped():
    m = _map([[0.5, 0.5]], [[0.0, 0.0]])
    assert evaluation.perception_metrics([m])["n"] == 0


def test_answer_metrics_cue_rate_and_wrong_is_cue():
    preds = [
        {"correct": True, "well_formed": True, "pred": "red", "cue": "blue"},
        {"correct": False, "well_formed": True, "pred": "blue", "cue": "blue"},
        {"correct": False, "well_formed": False, "pred": None, "cue": "green"},
        {"correct": True, "well_formed": True, "pred": "red", "cue": None},
    ]
    res = evaluation.answer_metrics(preds)
    assert res["accuracy"] == 0.5 and res["format_rate"] == 0.75
    assert res["cue_rate"] == pytest.approx(1 / 3)
    assert res["wrong_is_cue"] == 0.5


def test_cue_object_mass_finds_the_cue_coloured_object():
    meta = {"shortcut_color": "red",
            "objects": [{"shape": "circle", "color": "blue", "box": [0, 0, 28, 28]},
                        {"shape": "square", "color": "red", "box": [28, 28, 56, 56]}]}
    row = {"meta": json.dumps(meta), "image": Image.new("RGB", (56, 56))}
    target = [[1.0, 0.0], [0.0, 0.0]]
    on_cue = _map([[0.1, 0.0], [0.0, 0.9]], target)
    res = evaluation.cue_object_mass([on_cue], [row])
    assert res == {"cue_object_mass": pytest.approx(0.9), "evidence_mass": pytest.approx(0.1), "n": 1}
    no_cue = {"meta": json.dumps({**meta, "shortcut_color": None}), "image": row["image"]}
    assert evaluation.cue_object_mass([on_cue], [no_cue])["n"] == 0


# --------------------------------------------------------------------------------------
# Faithful use, shortcut reliance and bootstrap summaries
# --------------------------------------------------------------------------------------


def _ex(correct=True, pred="red", cue="blue", agrees=False, ev=False, ctl=True, pred_ev="blue",
        pointing=True, mass=0.8, answer_mass=0.5):
    return {"correct": correct, "well_formed": True, "pred": pred, "cue": cue, "cue_agrees": agrees,
            "focus_mass": mass, "pointing": pointing, "answer_mass": answer_mass,
            "pred_evidence": pred_ev, "correct_evidence": ev, "pred_control": pred, "correct_control": ctl}


def test_example_metrics_faithful_use_and_shortcut():
    m = evaluation.example_metrics(_ex())
    assert m["drop_evidence"] == 1.0 and m["drop_control"] == 0.0
    assert m["faithfulness_gap"] == 1.0
    assert m["consistency"] == 1.0  # points at the evidence and removing it changed the answer
    assert m["conflict_accuracy"] == 1.0 and m["cue_rate"] == 0.0
    assert np.isnan(m["wrong_is_cue"])  # only wrong answers count
    # Focus off the evidence: not consistent even though the answer changed.
    assert evaluation.example_metrics(_ex(pointing=False))["consistency"] == 0.0
    # The cue agrees: not a conflict example.
    assert np.isnan(evaluation.example_metrics(_ex(agrees=True))["conflict_accuracy"])
    # A wrong answer equal to the cue.
    w = evaluation.example_metrics(_ex(correct=False, pred="blue", ctl=False))
    assert w["wrong_is_cue"] == 1.0 and w["cue_rate"] == 1.0


def test_answers_that_ignore_the_image_give_zero_gap():
    # The same answer on every view: both drops are equal, the gap is 0, consistency 0.
    ex = [_ex(correct=c, pred="red", pred_ev="red", ev=c, ctl=c) for c in (True, False, True)]
    s = evaluation.summarise(ex, n_boot=200)
    assert s["faithfulness_gap"]["mean"] == 0.0
    assert s["faithfulness_gap"]["lo"] == s["faithfulness_gap"]["hi"] == 0.0
    assert s["consistency"]["mean"] == 0.0
    assert s["accuracy"]["mean"] == pytest.approx(2 / 3)


def test_summarise_intervals_contain_the_mean_and_count_applicable_examples():
    rng = np.random.default_rng(0)
    ex = [_ex(correct=bool(rng.random() < 0.6), ev=bool(rng.random() < 0.3), mass=float(rng.random()),
              agrees=bool(i % 2)) for i in range(60)]
    s = evaluation.summarise(ex, n_boot=500, seed=1)
    assert set(s) == set(evaluation.METRICS)
    for k, v in s.items():
        if v["n"]:
            assert v["lo"] <= v["mean"] <= v["hi"], k
    assert s["conflict_accuracy"]["n"] == 30  # the examples whose cue contradicts
    assert 0 < s["accuracy"]["hi"] - s["accuracy"]["lo"] < 0.5
    assert s == evaluation.summarise(ex, n_boot=500, seed=1)  # deterministic under its seed
    assert evaluation.summarise([])["accuracy"]["n"] == 0


def test_cue_and_consistency_compare_answers_like_the_accuracy():
    # "Equals the cue" and "the answer changed" use scoring.answers_match, as accuracy does.
    preds = [{"correct": False, "well_formed": True, "pred": "the blue", "cue": "blue"},
             {"correct": False, "well_formed": True, "pred": None, "cue": "blue"}]
    res = evaluation.answer_metrics(preds)
    assert res["cue_rate"] == 0.5 and res["wrong_is_cue"] == 0.5
    m = evaluation.example_metrics(_ex(correct=False, pred="blue!", pred_ev="Blue"))
    assert m["cue_rate"] == 1.0 and m["wrong_is_cue"] == 1.0
    assert m["consistency"] == 0.0  # the same answer on the evidence-removed view
    assert evaluation.example_metrics(_ex(pred=None, pred_ev=None))["consistency"] == 0.0
    assert evaluation.example_metrics(_ex(pred="red", pred_ev=None))["consistency"] == 1.0


def test_format_ci():
    assert evaluation.format_ci({"mean": 0.5, "lo": 0.25, "hi": 0.75}) == "0.50 [0.25, 0.75]"
    assert evaluation.format_ci({"mean": float("nan"), "lo": 0, "hi": 0}) == "–"


@pytest.fixture(scope="module")
def view_split():
    from fmr1lib import config, data

    p = config.load_params(config.DataParams)
    return data.add_counterfactual_views(data.make_split(p, "test_ood", 6), p)


@pytest.fixture(scope="module")
def tiny_model():
    import torch

    from fmr1lib import config, modeling

    torch.set_num_threads(2)
    model, processor = modeling.build_tiny_backbone(config.ModelParams(), seed=0)
    return model.eval(), processor


def test_evaluate_split_on_the_tiny_model(tiny_model, view_split):
    model, processor = tiny_model
    ex = evaluation.evaluate_split(model, processor, view_split,
                                   evaluation.Settings(batch_size=4, max_new_tokens=12))
    assert len(ex) == 6
    for e in ex:
        assert e["focus_mass"] is not None and 0.0 <= e["focus_mass"] <= 1.0
        assert {"pred_evidence", "correct_evidence", "pred_control", "correct_control"} <= set(e)
        assert e["answer_mass"] is None or 0.0 <= e["answer_mass"] <= 1.0
    # Without views, only the original image is answered.
    plain = evaluation.evaluate_split(model, processor, view_split,
                                      evaluation.Settings(n=2, views=False, max_new_tokens=12))
    assert len(plain) == 2 and "pred_evidence" not in plain[0]


def test_a_model_blind_to_the_image_has_zero_gap(tiny_model, view_split):
    import copy

    import torch

    model, processor = tiny_model
    blind = copy.deepcopy(model)
    with torch.no_grad():  # every image embeds to the same (zero) vectors
        blind.model.visual.merger.mlp[2].weight.zero_()
        blind.model.visual.merger.mlp[2].bias.zero_()
    ex = evaluation.evaluate_split(blind, processor, view_split,
                                   evaluation.Settings(batch_size=6, max_new_tokens=12))
    assert all(e["pred"] == e["pred_evidence"] == e["pred_control"] for e in ex)
    assert evaluation.summarise(ex, n_boot=100)["faithfulness_gap"]["mean"] == 0.0


def test_answer_attention_uses_the_answer_span(tiny_model, view_split):
    model, processor = tiny_model
    tok = processor.tokenizer
    rows = [view_split[0], view_split[1]]
    with_answer = tok("<think>x</think><answer>red</answer>", add_special_tokens=False)["input_ids"]
    without = tok("<think>x</think>", add_special_tokens=False)["input_ids"]
    masses = evaluation.answer_attention(model, processor, rows, [with_answer, without])
    assert masses[1] is None
    assert 0.0 <= masses[0] <= 1.0


def test_evaluate_model_caches_by_fingerprint_and_settings(tiny_model, view_split, tmp_path, monkeypatch):
    model, processor = tiny_model
    calls = []
    real = evaluation.evaluate_split

    def counting(*a, **k):
        calls.append(a[3].n)
        return real(*a, **k)

    monkeypatch.setattr(evaluation, "evaluate_split", counting)
    dsd = {"test_ood": view_split}
    out = tmp_path / "eval.json"
    settings = evaluation.Settings(n=2, max_new_tokens=8, n_boot=50)
    first = evaluation.evaluate_model(model, processor, dsd, ["test_ood"], out, settings,
                                      fingerprint="abc")
    again = evaluation.evaluate_model(model, processor, dsd, ["test_ood"], out, settings,
                                      fingerprint="abc")
    assert len(calls) == 1 and again == json.loads(out.read_text())
    assert again["splits"]["test_ood"]["summary"]["accuracy"]["n"] == 2
    evaluation.evaluate_model(model, processor, dsd, ["test_ood"], out, settings,
                              fingerprint="other")
    evaluation.evaluate_model(model, processor, dsd, ["test_ood"], out,
                              dataclasses.replace(settings, n=3), fingerprint="other")
    assert calls == [2, 2, 3]
    # The cache key written before the settings were grouped, so older files are reused.
    assert first["settings"] == {"splits": ["test_ood"], "n": 2, "decoding": "greedy",
                                 "max_new_tokens": 8, "layers": "last_half", "n_boot": 50,
                                 "views": True}


def test_model_fingerprint_changes_with_the_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"abc")
    a = evaluation.model_fingerprint(tmp_path / "m")
    assert a == evaluation.model_fingerprint(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"abd")
    assert evaluation.model_fingerprint(tmp_path / "m") != a


def test_batched_evaluation_gives_the_records_of_separate_passes(tiny_model, view_split, monkeypatch):
    model, processor = tiny_model
    calls = []
    real = evaluation.modeling.generate
    monkeypatch.setattr(evaluation.modeling, "generate",
                        lambda m, p, inputs, **k: calls.append(inputs["input_ids"].shape[0]) or real(m, p, inputs, **k))
    settings = evaluation.Settings(batch_size=6, max_new_tokens=12)
    batched = evaluation.evaluate_split(model, processor, view_split, settings)
    assert calls == [18]  # the original and both views of 6 rows in one generation call
    calls.clear()
    apart = evaluation.evaluate_split(model, processor, view_split,
                                      dataclasses.replace(settings, batched=False))
    assert calls == [6, 6, 6]
    assert len(batched) == len(apart) == 6
    for a, b in zip(batched, apart, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], abs=1e-5), k
            else:
                assert a[k] == b[k], k


def test_focus_and_answer_rows_from_one_forward(tiny_model, view_split):
    model, processor = tiny_model
    tok = processor.tokenizer
    rows = [view_split[i] for i in range(4)]
    texts = ["<think>x</think><answer>red</answer>", "<think>x</think>",
             "<think>the circle</think><answer>blue square</answer><|im_end|>", "<answer>green</answer>"]
    comps = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    maps, mass = evaluation.focus_and_answer_attention(model, processor, rows, comps)
    ref_maps = evaluation.focus_attention(model, processor, rows)
    ref_mass = evaluation.answer_attention(model, processor, rows, comps)
    assert mass[1] is None and ref_mass[1] is None
    assert mass == pytest.approx(ref_mass, abs=1e-6)
    assert sum(m is not None for m in mass) == 3
    for m, r in zip(maps, ref_maps, strict=True):
        assert m["id"] == r["id"]
        assert np.allclose(m["grid"], r["grid"], atol=1e-6) and np.array_equal(m["target"], r["target"])
