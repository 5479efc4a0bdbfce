"""FocusShapes: determinism, valid boxes, recomputable answers, the shortcut's statistics,
and counterfactual views that remove the evidence and only the evidence."""

from __future__ import annotations

import io

import numpy as np
import pytest

from fmr1lib import data, records
from fmr1lib.config import DataParams

ALL_FAMILIES = {"color": 1.0, "shape": 1.0, "count": 1.0, "relation": 1.0, "exists": 1.0}


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def small():
    p = DataParams(n_train=400, n_warmup=20, n_test_id=40, n_test_ood=40, tasks=ALL_FAMILIES,
                   shortcut_p=0.9, run_root="/nonexistent")
    return p, data.make_focus_shapes(p)


def test_determinism_byte_identical():
    p = DataParams(n_train=6, n_warmup=2, n_test_id=3, n_test_ood=3, tasks=ALL_FAMILIES)
    a, b = data.make_focus_shapes(p), data.make_focus_shapes(p)
    for split in a:
        for ra, rb in zip(a[split], b[split], strict=True):
            assert _png(ra["image"]) == _png(rb["image"])
            assert {k: v for k, v in ra.items() if not k.startswith("image")} == \
                   {k: v for k, v in rb.items() if not k.startswith("image")}
    other = data.make_focus_shapes(DataParams(**{**p.__dict__, "seed": 1}))
    assert _png(other["train"][0]["image"]) != _png(a["train"][0]["image"])


def test_boxes_inside_image_and_answers_recomputable(small):
    p, dsd = small
    families = set()
    for split in dsd:
        for row in dsd[split]:
            meta = records.decode_meta(row["meta"])
            families.add(meta["task"])
            w, h = row["image"].size
            assert (w, h) == (p.image_size, p.image_size)
            for x0, y0, x1, y1 in row["evidence_boxes"]:
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert data.answer_from_scene(meta["task"], row["question"], meta["objects"]) == row["answer"]
            # The stored scene description re-renders to the very same pixels.
            assert _png(data.render_scene(meta, p.image_size)) == _png(row["image"].convert("RGB"))
            if meta["task"] == "exists" and row["answer"] == "no":
                assert row["evidence_boxes"] == [] and meta["evidence_absent"] is True
            if meta["task"] == "count":
                assert len(row["evidence_boxes"]) == int(row["answer"])
            if meta["task"] == "relation":
                assert len(row["evidence_boxes"]) == 2
    assert families == set(ALL_FAMILIES)


def test_evidence_pixels_have_the_object_colour(small):
    _, dsd = small
    row = next(r for r in dsd["train"] if records.decode_meta(r["meta"])["task"] == "color")
    x0, y0, x1, y1 = (int(v) for v in row["evidence_boxes"][0])
    patch = np.asarray(row["image"])[y0:y1, x0:x1].reshape(-1, 3)
    colour = np.array(data.PALETTE[row["answer"]])
    assert (patch == colour).all(axis=1).mean() > 0.3


def test_shortcut_agreement_rates(small):
    p, dsd = small
    assert abs(data.shortcut_agreement(dsd["train"]) - p.shortcut_p) <= 0.05
    assert data.shortcut_agreement(dsd["test_ood"]) == 0.0  # ood_cue="contradict"
    assert np.isnan(data.shortcut_agreement(dsd["warmup"]))  # warmup_cue="none"
    # Families without a natural cue say so.
    for m in map(records.decode_meta, dsd["train"]["meta"]):
        if m["task"] in ("count", "relation", "exists"):
            assert m["cue_kind"] == "none" and m["cue"] is None and m["shortcut_agrees"] is None


def test_ood_random_cue_is_at_chance():
    p = DataParams(n_train=1, n_warmup=1, n_test_id=1, n_test_ood=800, ood_cue="random")
    ds = data.make_split(p, "test_ood", p.n_test_ood)
    assert abs(data.shortcut_agreement(ds) - 1 / len(p.colors)) < 0.05


def test_cue_sits_in_the_corner_cell_and_no_object_does(small):
    p, dsd = small
    cue_rc = data.cue_cell(p.image_size, p.cue_corner)
    for m in map(records.decode_meta, dsd["train"]["meta"]):
        assert all(tuple(o["cell"]) != cue_rc for o in m["objects"])
        if m["cue"] is not None:
            x0, y0, x1, y1 = m["cue"]["box"]
            assert (y0 // data.CELL, x0 // data.CELL) == cue_rc and x1 - x0 == p.cue_size


def test_counterfactual_views_remove_evidence_only(small):
    p, dsd = small
    n_checked = 0
    for row in dsd["test_id"]:
        meta = records.decode_meta(row["meta"])
        orig = np.asarray(row["image"].convert("RGB")).astype(int)
        ev = np.asarray(row["image_cf_evidence"].convert("RGB")).astype(int)
        ctl = np.asarray(row["image_cf_control"].convert("RGB")).astype(int)
        for idx in meta["evidence_objects"]:
            x0, y0, x1, y1 = (int(v) for v in meta["objects"][idx]["box"])
            region = (slice(y0, y1), slice(x0, x1))
            assert (orig[region] != ev[region]).any(), "evidence view left an evidence object intact"
            assert (orig[region] == ctl[region]).all(), "control view touched an evidence object"
            n_checked += 1
        # The control view leaves the cue alone.
        if meta["cue"] is not None:
            x0, y0, x1, y1 = (int(v) for v in meta["cue"]["box"])
            assert (orig[y0:y1, x0:x1] == ctl[y0:y1, x0:x1]).all()
        assert [list(b) for b in row["control_boxes"]] != [] or row["evidence_boxes"] == []
        for cb, eb in zip(row["control_boxes"], row["evidence_boxes"], strict=True):
            assert cb[2] - cb[0] == pytest.approx(eb[2] - eb[0])
            assert cb[3] - cb[1] == pytest.approx(eb[3] - eb[1])
    assert n_checked > 20


def test_save_and_load_roundtrip(tmp_path, small):
    p, dsd = small
    folder = data.save_dataset(dsd, tmp_path / "data", p)
    again = data.load_dataset_dir(folder)
    assert again.num_rows == dsd.num_rows
    assert _png(again["test_ood"][3]["image_cf_evidence"]) == _png(dsd["test_ood"][3]["image_cf_evidence"])


def test_load_missing_dir_says_which_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match="01_data_construction"):
        data.load_dataset_dir(tmp_path / "nope")


def test_too_many_objects_is_a_clear_error():
    p = DataParams(image_size=56, n_distractors=3, n_blobs=1)
    with pytest.raises(ValueError, match="do not fit"):
        data.make_example(p, "train", 0)


def test_every_control_view_changes_pixels_on_objects_that_do_not_decide(small):
    """The control view intervenes on something: a distractor or the grey blob. (The old random
    control box landed on empty background and left the image pixel-identical.)"""
    p, dsd = small
    n_views = 0
    for split in ("test_id", "test_ood"):
        for row in dsd[split]:
            if not data.row_has_views(row):
                continue
            n_views += 1
            meta = records.decode_meta(row["meta"])
            orig = np.asarray(row["image"].convert("RGB")).astype(int)
            ctl = np.asarray(row["image_cf_control"].convert("RGB")).astype(int)
            assert (orig != ctl).any(), f"{row['id']}: the control view equals the original image"
            others = [o for i, o in enumerate(meta["objects"]) if i not in meta["evidence_objects"]]
            for cb in row["control_boxes"]:
                assert any(data.cell_box(*o["cell"])[0] <= cb[0] and cb[2] <= data.cell_box(*o["cell"])[2]
                           and data.cell_box(*o["cell"])[1] <= cb[1]
                           and cb[3] <= data.cell_box(*o["cell"])[3] for o in others), (
                    f"{row['id']}: control box {cb} is not inside a non-evidence object's cell")
    assert n_views >= 70


def test_jsonl_control_regions_change_pixels():
    """A JSONL record's control region is redrawn until intervening on it changes pixels."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (112, 112), (240, 240, 240))
    draw = ImageDraw.Draw(img)
    draw.rectangle([10, 10, 29, 29], fill=(200, 30, 30))    # the evidence
    draw.rectangle([70, 70, 89, 89], fill=(30, 30, 200))    # something else
    p = DataParams()
    for seed in range(5):
        _, ctl, boxes = data.record_views(img, [[10.0, 10.0, 30.0, 30.0]], {"seed": seed}, p, "r")
        assert boxes and not np.array_equal(np.asarray(ctl), np.asarray(img))
