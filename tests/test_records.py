"""Tests for fmr1lib.records (schema validation, the JSONL adapter) and fmr1lib.converters (the
Visual CoT converter, the command line)."""

from __future__ import annotations

import doctest
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fmr1lib import converters, records
from fmr1lib.converters import convert_visual_cot
from fmr1lib.records import (
    DataError,
    decode_meta,
    load_jsonl,
    records_to_dataset,
    validate_record,
)

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
SIZE = (64, 48)
VCOT_SIZE = (128, 96)


def write_png(path: Path, size: tuple[int, int], colour=(90, 140, 200)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    """records_sample.jsonl copied into tmp_path with its images generated next to it."""
    dst = tmp_path / "records.jsonl"
    shutil.copy(DATA / "records_sample.jsonl", dst)
    for i in range(4):
        # scene3 is palette-mode to check the RGB conversion.
        image = Image.new("RGB", SIZE, (40 * i, 100, 150))
        if i == 3:
            image = image.convert("P")
        (tmp_path / "images").mkdir(exist_ok=True)
        image.save(tmp_path / "images" / f"scene{i}.png")
    return dst


def good_record(rid: str, image: str = "images/scene0.png") -> dict:
    return {
        "id": rid,
        "image": image,
        "question": "What color is the circle?",
        "answer": "red",
        "answer_type": "word",
        "choices": None,
        "evidence_boxes": [[8, 8, 24, 24]],
        "meta": {"seed": 0},
    }


@pytest.mark.parametrize("module", [records, converters], ids=lambda m: m.__name__)
def test_doctests(module) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0
    assert result.failed == 0


def test_valid_sample_loads(sample: Path) -> None:
    recs, skipped = load_jsonl(sample)
    assert skipped == 0
    assert [r["id"] for r in recs] == ["shapes-0", "shapes-1", "shapes-2", "shapes-3"]
    for rec in recs:
        assert isinstance(rec["image"], Image.Image)
        assert rec["image"].mode == "RGB" and rec["image"].size == SIZE
        assert Path(rec["image_path"]).is_absolute() and Path(rec["image_path"]).is_file()
        for box in rec["evidence_boxes"]:
            assert len(box) == 4 and all(type(v) is float for v in box)
    assert recs[1]["answer"] == "2"  # stripped
    assert recs[1]["evidence_boxes"][1] == [40.5, 10.25, 60.0, 30.75]
    assert recs[2]["meta"] == {} and recs[2]["choices"] is None
    assert recs[3]["choices"] == ["circle", "triangle", "square"]
    # 48.3 is within the rounding tolerance of a 48 px high image, and is clipped to it.
    assert recs[3]["evidence_boxes"][0] == [0.0, 0.0, 64.0, 48.0]


def test_load_without_images_keeps_paths(sample: Path) -> None:
    recs, _ = load_jsonl(sample, load_images=False)
    assert recs[0]["image"] == "images/scene0.png"
    assert recs[0]["image_path"] == str(sample.parent / "images" / "scene0.png")


def test_image_root_resolves_relative_paths(sample: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = elsewhere / "records.jsonl"
    shutil.move(sample, moved)
    with pytest.raises(DataError, match="image file not found"):
        load_jsonl(moved)
    recs, _ = load_jsonl(moved, image_root=tmp_path)
    assert len(recs) == 4


# Each case: (name, how to break record 'bad-1', field named in the error, text in the message).
BAD_CASES = [
    (
        "box_outside",
        lambda r: r.update(evidence_boxes=[[8, 8, 70, 24]]),
        "evidence_boxes[0]",
        "outside the 64x48 image",
    ),
    (
        "box_negative",
        lambda r: r.update(evidence_boxes=[[0, 0, 4, 4], [-3, 8, 10, 24]]),
        "evidence_boxes[1]",
        "outside the image",
    ),
    (
        "x1_le_x0",
        lambda r: r.update(evidence_boxes=[[10, 5, 8, 20]]),
        "evidence_boxes[0]",
        "[10, 5, 8, 20]: x1 must be > x0",
    ),
    (
        "y1_le_y0",
        lambda r: r.update(evidence_boxes=[[10, 20, 18, 20]]),
        "evidence_boxes[0]",
        "y1 must be > y0",
    ),
    (
        "box_not_4_numbers",
        lambda r: r.update(evidence_boxes=[[1, 2, 3]]),
        "evidence_boxes[0]",
        "4 finite numbers",
    ),
    (
        "missing_image_file",
        lambda r: r.update(image="images/nope.png"),
        "image",
        "image file not found",
    ),
    (
        "unreadable_image",
        lambda r: r.update(image="images/garbage.png"),
        "image",
        "cannot read image",
    ),
    ("empty_question", lambda r: r.update(question="   "), "question", "must not be empty"),
    ("empty_answer", lambda r: r.update(answer=""), "answer", "must not be empty"),
    ("answer_not_string", lambda r: r.update(answer=3), "answer", "must be a string"),
    (
        "choice_not_among",
        lambda r: r.update(answer_type="choice", choices=["blue", "green"]),
        "answer",
        "not among choices",
    ),
    (
        "choice_without_choices",
        lambda r: r.update(answer_type="choice", choices=[]),
        "choices",
        "needs choices",
    ),
    (
        "unknown_answer_type",
        lambda r: r.update(answer_type="color"),
        "answer_type",
        "must be one of word, number, yesno, choice",
    ),
    ("missing_field", lambda r: r.pop("question"), "question", "missing required field"),
    ("meta_not_object", lambda r: r.update(meta=[1, 2]), "meta", "must be an object"),
]


def write_with_bad_line(tmp_path: Path, bad_line: str) -> Path:
    """A JSONL of good-0, a blank line, the bad line (line 3), good-2, next to real images."""
    write_png(tmp_path / "images" / "scene0.png", SIZE)
    (tmp_path / "images" / "garbage.png").write_bytes(b"this is not a png \x00\x01\x02")
    lines = [json.dumps(good_record("good-0")), "", bad_line, json.dumps(good_record("good-2"))]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("name,mutate,field,text", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_error_mode(tmp_path, name, mutate, field, text) -> None:
    rec = good_record("bad-1")
    mutate(rec)
    path = write_with_bad_line(tmp_path, json.dumps(rec))
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    exc = err.value
    message = str(exc)
    assert exc.line == 3 and exc.record_id == "bad-1" and exc.field == field
    assert exc.path == str(path)
    assert message.startswith(f"{path} line 3 (record 'bad-1'): {field}")
    assert text in message


@pytest.mark.parametrize("name,mutate,field,text", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_skip_mode(tmp_path, caplog, name, mutate, field, text) -> None:
    rec = good_record("bad-1")
    mutate(rec)
    path = write_with_bad_line(tmp_path, json.dumps(rec))
    with caplog.at_level(logging.WARNING, logger="fmr1lib.records"):
        recs, skipped = load_jsonl(path, on_bad_record="skip")
    assert skipped == 1
    assert [r["id"] for r in recs] == ["good-0", "good-2"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("bad-1" in w and text in w for w in warnings)
    assert any("skipped 1 bad record" in w for w in warnings)


def test_invalid_json_line(tmp_path, caplog) -> None:
    path = write_with_bad_line(tmp_path, '{"id": "bad-1", "question": ')
    with pytest.raises(DataError, match=r"line 3: json: invalid JSON") as err:
        load_jsonl(path)
    assert err.value.line == 3 and err.value.field == "json"
    with caplog.at_level(logging.WARNING, logger="fmr1lib.records"):
        recs, skipped = load_jsonl(path, on_bad_record="skip")
    assert skipped == 1 and [r["id"] for r in recs] == ["good-0", "good-2"]


def test_duplicate_id(tmp_path) -> None:
    path = write_with_bad_line(tmp_path, json.dumps(good_record("good-0")))
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert err.value.field == "id" and err.value.line == 3 and err.value.record_id == "good-0"
    assert "duplicate id, first seen on line 1" in str(err.value)
    recs, skipped = load_jsonl(path, on_bad_record="skip")
    assert skipped == 1 and [r["id"] for r in recs] == ["good-0", "good-2"]


def test_invalid_on_bad_record(sample) -> None:
    with pytest.raises(ValueError, match="on_bad_record.*'ignore'"):
        load_jsonl(sample, on_bad_record="ignore")
    with pytest.raises(ValueError, match="on_bad_record"):
        convert_visual_cot(
            DATA / "visual_cot_sample.jsonl", sample.parent / "o.jsonl", on_bad_record="drop"
        )


def test_validate_record_in_memory_image_uses_its_size() -> None:
    rec = good_record("mem-0")
    rec["image"] = Image.new("RGB", (20, 20))
    with pytest.raises(DataError, match=r"outside the 20x20 image"):
        validate_record(rec, image_size=None)
    rec["evidence_boxes"] = [[1, 2, 3, 4]]
    out = validate_record(rec, image_size=None)
    assert out["evidence_boxes"] == [[1.0, 2.0, 3.0, 4.0]]
    assert rec["evidence_boxes"] == [[1, 2, 3, 4]]  # input untouched


def test_data_error_survives_pickling() -> None:
    exc = DataError(
        "x1 must be > x0", path="a.jsonl", line=7, record_id="r", field="evidence_boxes[0]"
    )
    again = pickle.loads(pickle.dumps(exc))
    assert (
        str(again) == str(exc) == "a.jsonl line 7 (record 'r'): evidence_boxes[0]: x1 must be > x0"
    )
    assert (again.path, again.line, again.record_id, again.field) == (
        "a.jsonl",
        7,
        "r",
        "evidence_boxes[0]",
    )


def test_decode_meta() -> None:
    assert decode_meta({"a": 1}) == {"a": 1}
    assert decode_meta('{"a": [1, 2]}') == {"a": [1, 2]}
    with pytest.raises(ValueError):
        decode_meta("[1, 2]")


def test_records_to_dataset_round_trip(sample) -> None:
    recs, _ = load_jsonl(sample)
    ds = records_to_dataset(recs)
    assert len(ds) == 4
    assert set(ds.column_names) == {
        "id",
        "image",
        "question",
        "answer",
        "answer_type",
        "choices",
        "evidence_boxes",
        "meta",
    }
    for rec, row in zip(recs, ds, strict=True):
        assert row["id"] == rec["id"]
        assert row["question"] == rec["question"] and row["answer"] == rec["answer"]
        assert row["answer_type"] == rec["answer_type"]
        assert row["choices"] == rec["choices"]
        assert isinstance(row["image"], Image.Image) and row["image"].size == SIZE
        assert row["image"].convert("RGB").tobytes() == rec["image"].tobytes()
        assert len(row["evidence_boxes"]) == len(rec["evidence_boxes"])
        for got, want in zip(row["evidence_boxes"], rec["evidence_boxes"], strict=True):
            assert got == pytest.approx(want)
        assert decode_meta(row["meta"]) == rec["meta"]
    assert ds[2]["choices"] is None and decode_meta(ds[2]["meta"]) == {}
    # Path-based records (load_images=False) give the same images.
    lazy, _ = load_jsonl(sample, load_images=False)
    ds_lazy = records_to_dataset(lazy)
    assert ds_lazy[1]["image"].convert("RGB").tobytes() == recs[1]["image"].tobytes()


# --- Visual CoT converter ------------------------------------------------------------------


@pytest.fixture
def vcot(tmp_path: Path) -> Path:
    """The Visual CoT sample with its images generated (128x96) under tmp_path/images."""
    root = tmp_path / "images"
    for line in (DATA / "visual_cot_sample.jsonl").read_text().splitlines():
        write_png(root / json.loads(line)["image"], VCOT_SIZE)
    return root


def test_convert_error_mode_names_line_and_writes_nothing(vcot, tmp_path) -> None:
    out = tmp_path / "out" / "train.jsonl"
    with pytest.raises(DataError) as err:
        convert_visual_cot(DATA / "visual_cot_sample.jsonl", out, vcot)
    assert err.value.line == 4 and err.value.record_id == "vcot-104"
    assert err.value.field == "evidence_boxes[0]"
    assert (
        "line 4 (record 'vcot-104'): evidence_boxes[0] = [90, 10, 40, 30]: x1 must be > x0"
        in str(err.value)
    )
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temp file left behind


def test_convert_skip_mode(vcot, tmp_path) -> None:
    out = tmp_path / "train.jsonl"
    counts = convert_visual_cot(DATA / "visual_cot_sample.jsonl", out, vcot, on_bad_record="skip")
    assert counts == {"written": 4, "skipped": 1}
    recs, skipped = load_jsonl(out, image_root=vcot)
    assert skipped == 0
    by_id = {r["id"]: r for r in recs}
    assert list(by_id) == ["vcot-101", "vcot-102", "vcot-103", "vcot-105"]
    assert by_id["vcot-101"]["answer"] == "red"
    assert by_id["vcot-101"]["answer_type"] == "word"
    assert by_id["vcot-102"]["answer"] == "yes"
    assert by_id["vcot-102"]["answer_type"] == "yesno"
    assert by_id["vcot-102"]["question"] == "Is the man wearing a hat?"
    assert by_id["vcot-103"]["answer_type"] == "number"
    assert by_id["vcot-105"]["question"] == "What is written on the sign?"
    assert by_id["vcot-105"]["answer"] == "stop"
    assert by_id["vcot-102"]["evidence_boxes"] == [[30.5, 5.0, 70.25, 40.0]]
    assert by_id["vcot-103"]["meta"] == {
        "source": "visual_cot",
        "dataset": "flickr30k",
        "split": "train",
    }
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert raw[0]["image"] == "gqa/2354786.jpg"  # kept relative
    for rec in recs:
        assert validate_record(rec, image_size=rec["image"].size)["id"] == rec["id"]


def test_convert_without_images_checks_declared_size(tmp_path) -> None:
    src = tmp_path / "src.jsonl"
    line = {
        "question_id": 1,
        "image": "x.jpg",
        "question": "q?",
        "answer": "a",
        "bboxs": [[0, 0, 200, 10]],
        "dataset": "gqa",
        "split": "val",
        "width": 100,
        "height": 50,
    }
    src.write_text(json.dumps(line) + "\n")
    with pytest.raises(DataError, match=r"line 1 .*outside the 100x50 image"):
        convert_visual_cot(src, tmp_path / "out.jsonl")


def test_convert_rejects_size_mismatch(tmp_path) -> None:
    write_png(tmp_path / "x.png", (80, 40))
    src = tmp_path / "src.jsonl"
    line = {
        "question_id": 1,
        "image": "x.png",
        "question": "q?",
        "answer": "a",
        "bboxs": [[0, 0, 10, 10]],
        "width": 100,
        "height": 50,
    }
    src.write_text(json.dumps(line) + "\n")
    with pytest.raises(DataError, match=r"x.png is 80x40 but the source declares"):
        convert_visual_cot(src, tmp_path / "out.jsonl")


# --- command line ----------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "fmr1lib.converters", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_convert_and_check(vcot, tmp_path) -> None:
    src = str(DATA / "visual_cot_sample.jsonl")
    out = tmp_path / "cli.jsonl"
    convert = ["convert", "--format", "visual_cot", "--src", src, "--out", str(out)]
    bad = run_cli(*convert, "--image-root", str(vcot))
    assert bad.returncode != 0
    assert "DataError:" in bad.stderr and "line 4 (record 'vcot-104')" in bad.stderr
    assert not out.exists()

    ok = run_cli(*convert, "--image-root", str(vcot), "--on-bad-record", "skip")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"written": 4, "skipped": 1}

    check = run_cli("check", str(out), "--image-root", str(vcot))
    assert check.returncode == 0, check.stderr
    counts = json.loads(check.stdout)
    assert counts["records"] == 4 and counts["skipped"] == 0 and counts["with_boxes"] == 4
    assert counts["answer_types"] == {"number": 1, "word": 2, "yesno": 1}

    broken = run_cli("check", str(out))  # images not found next to the file
    assert broken.returncode != 0
    assert "line 1 (record 'vcot-101'): image file not found" in broken.stderr
