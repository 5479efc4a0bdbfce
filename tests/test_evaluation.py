"""Metrics on hand-built cases with known values."""

from __future__ import annotations

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
