"""The reading instrument (fmr1lib.reading): which region an answer depends on."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from fmr1lib import batching, config, data, modeling, reading


def test_answer_positions_find_the_first_whole_word():
    pieces = ["<think>", "the", " corner", " patch", " is", " red", "</think>", "<answer>", "red"]
    assert reading.answer_positions(pieces, "red") == [5]
    assert reading.answer_positions(["the", " re", "d", " x"], "red") == [1, 2]
    assert reading.answer_positions(["the", " redder"], "red") == []
    assert reading.answer_positions(["x"], "") == []


def test_shortcut_boxes_from_meta():
    assert reading.shortcut_boxes({"meta": json.dumps({"cue": {"box": [1, 2, 3, 4]}})}) == [[1, 2, 3, 4]]
    assert reading.shortcut_boxes({"meta": {"shortcut_boxes": [[0, 0, 5, 5]]}}) == [[0, 0, 5, 5]]
    assert reading.shortcut_boxes({"meta": None}) == []


def test_rank_correlation_and_groups():
    assert reading.rank_correlation([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert reading.rank_correlation([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0)
    assert math.isnan(reading.rank_correlation([1, 2], [3, 3]))
    # NaN readings are left out; a group with one defined member has no correlation.
    assert reading.within_group_spearman([1, 2, 3], [1.0, float("nan"), 2.0], [0, 0, 1]) == []


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model, processor = modeling.build_tiny_backbone(config.load_params(config.BackboneParams))
    return model.eval(), processor


def _reading(model, processor, row, text):
    ids = processor.tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
    batch = batching.build_sequences([row], [[ids]], processor)
    sel = torch.tensor([0])
    with batching.eval_mode(model):
        logits = batching.completion_logits(model, batch.inputs, batch.completion_ids.shape[1])
    return reading.reading_scores(model, processor, batch, [row],
                                  reading.Trajectories(sel, logits, [row["answer"]]))[0]


def test_reading_is_evidence_minus_cue_dependence(tiny):
    """Swapping the roles of the two regions flips the sign: the instrument removes the region
    it names. Removing the same region on both sides gives exactly 0."""
    model, processor = tiny
    p = config.load_params(config.DataParams)
    row = next(r for r in (data.make_example(p, "train", i) for i in range(40))
               if r["meta"]["cue"] is not None and r["evidence_boxes"])
    text = f"<think>the circle is {row['answer']}</think><answer>{row['answer']}</answer>"
    value = _reading(model, processor, row, text)
    assert math.isfinite(value) and value != 0.0
    swapped = copy.deepcopy(row)
    swapped["evidence_boxes"] = [list(row["meta"]["cue"]["box"])]
    swapped["meta"]["cue"]["box"] = list(row["evidence_boxes"][0])
    if len(row["evidence_boxes"]) == 1:
        assert _reading(model, processor, swapped, text) == pytest.approx(-value, abs=1e-5)
    same = copy.deepcopy(row)
    same["meta"]["cue"]["box"] = list(row["evidence_boxes"][0])
    same["evidence_boxes"] = [list(row["evidence_boxes"][0])]
    assert _reading(model, processor, same, text) == pytest.approx(0.0, abs=1e-6)
    # A record without a shortcut region has no reading.
    none = copy.deepcopy(row)
    none["meta"]["cue"] = None
    assert math.isnan(_reading(model, processor, none, text))


def test_reading_spread_tells_prompt_level_from_within_group_spread():
    """The faithful reward compares trajectories within a group: a start model whose rollouts
    read the cue on some prompts and the evidence on others (prompt-level spread) gives it
    nothing to select; only groups that mix both do."""
    from fmr1lib import validity

    prompt_level = validity.reading_spread([[-1.0, -1.02], [2.0, 2.03], [-0.5, -0.49], [1.0, 1.01]])
    assert prompt_level["cue_share"] == pytest.approx(0.5)
    assert prompt_level["mixed_share"] == 0.0 and prompt_level["within_var_share"] < 1e-3
    mixed = validity.reading_spread([[-1.0, 1.0], [2.0, -2.0], [1.0, 1.1]])
    assert mixed["mixed_share"] == pytest.approx(2 / 3) and mixed["within_var_share"] > 0.5
    # Groups with one defined reading count for the cue share, not for mixing.
    lone = validity.reading_spread([[-1.0], [1.0, float("nan")]])
    assert lone["n_groups"] == 0 and math.isnan(lone["mixed_share"])


def test_doctests_of_the_instrument_modules():
    import doctest

    from fmr1lib import validity

    for module in (reading, validity):
        assert doctest.testmod(module).failed == 0, module.__name__
