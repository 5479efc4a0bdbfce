"""Benchmark files: loading and its errors, matching, scoring, evaluation, CLI.

The matcher and the bootstrap themselves are fmr1lib.scoring's (tests/test_scoring.py); here they
are checked through the benchmark's own scoring path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmr1lib import batching, benchmark, config, modeling, prompting, scoring
from fmr1lib.records import DataError

DATA = Path(__file__).parent / "data" / "benchmark_sample"
SAMPLE = DATA / "sample.jsonl"
N_SAMPLE = 8


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    model, processor = modeling.build_tiny_backbone(config.ModelParams(), seed=0)
    model.eval()
    return model, processor


@pytest.fixture(scope="module")
def saved_model(tiny, tmp_path_factory) -> Path:
    return modeling.save_backbone(*tiny, tmp_path_factory.mktemp("bench_model") / "model")


def response(answer: str) -> str:
    return prompting.response_text(answer, "look at the image")


# ------------------------------------------------------------------------- loading


def test_sample_images_are_tiny_pngs():
    for png in (DATA / "images").glob("*.png"):
        assert png.stat().st_size < 2048
        with Image.open(png) as im:
            assert im.size == (56, 56)


def test_load_sample():
    recs = benchmark.load_benchmark(SAMPLE)
    assert len(recs) == N_SAMPLE
    by_id = {r["id"]: r for r in recs}
    assert list(by_id) == ["color-1", "color-2", "color-3", "4", "count-2", "scene-1", "scene-2",
                           "scene-3"]
    assert {r["category"] for r in recs} == {"color", "count", "scene"}
    types = {rid: r["answer_type"] for rid, r in by_id.items()}
    assert types == {"color-1": "word", "color-2": "word", "color-3": "choice", "4": "number",
                     "count-2": "number", "scene-1": "yesno", "scene-2": "yesno",
                     "scene-3": "choice"}
    # An integer id and a numeric answer become strings; a letter answer becomes the choice text.
    assert by_id["4"]["answer"] == "2"
    assert (by_id["scene-3"]["answer"], by_id["scene-3"]["answer_letter"]) == ("left", "A")
    assert (by_id["color-3"]["answer"], by_id["color-3"]["answer_letter"]) == ("blue", "B")
    assert by_id["color-1"]["choices"] is None and by_id["color-1"]["answer_letter"] is None
    assert by_id["color-3"]["source"] == "hand-written"  # extra keys are kept
    assert by_id["count-2"]["source_line"] == 6  # line 5 is blank
    image = by_id["color-1"]["image"]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (56, 56)
    assert by_id["color-1"]["image_path"] == str(DATA / "images" / "red_square.png")


def test_load_without_images_and_with_image_root(tmp_path):
    moved = tmp_path / "elsewhere" / "bench.jsonl"
    moved.parent.mkdir()
    moved.write_text(SAMPLE.read_text())
    with pytest.raises(DataError, match="image file not found"):
        benchmark.load_benchmark(moved)
    recs = benchmark.load_benchmark(moved, image_root=DATA, load_images=False)
    assert recs[0]["image"] == "images/red_square.png"
    assert Path(recs[0]["image_path"]).is_file()


def write_bench(tmp_path: Path, bad: dict | str) -> Path:
    """A file with one good record, a blank line and ``bad`` on line 3."""
    Image.new("RGB", (28, 28), (200, 0, 0)).save(tmp_path / "ok.png")
    good = {"id": "good", "image": "ok.png", "question": "What color?", "answer": "red"}
    bad_line = bad if isinstance(bad, str) else json.dumps(bad)
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + bad_line + "\n")
    return path


BASE = {"id": "q7", "image": "ok.png", "question": "Which?", "answer": "red"}
MC = {**BASE, "choices": ["red", "blue", "green"]}


@pytest.mark.parametrize(("bad", "field", "reason"), [
    ('{"id": "q7", "image": ', "json", "invalid JSON"),
    ("[1, 2]", "json", "JSON object"),
    ({k: v for k, v in BASE.items() if k != "id"}, "id", "missing"),
    ({k: v for k, v in BASE.items() if k != "image"}, "image", "missing"),
    ({k: v for k, v in BASE.items() if k != "question"}, "question", "missing"),
    ({k: v for k, v in BASE.items() if k != "answer"}, "answer", "missing"),
    ({**BASE, "id": True}, "id", "non-empty string or an integer"),
    ({**BASE, "id": ""}, "id", "non-empty string or an integer"),
    ({**BASE, "image": 3}, "image", "path string"),
    ({**BASE, "question": 5}, "question", "non-empty string"),
    ({**BASE, "answer": ["red"]}, "answer", "string or a finite number"),
    ({**BASE, "answer": "  "}, "answer", "must not be empty"),
    ({**BASE, "category": 3}, "category", "non-empty string"),
    ({**BASE, "answer_type": "colour"}, "answer_type", "must be one of"),
    ({**BASE, "answer_type": "choice"}, "choices", "missing"),
    ({**BASE, "answer_type": "number"}, "answer", "not a number"),
    ({**BASE, "answer_type": "yesno"}, "answer", "not yes/no"),
    ({**BASE, "id": "good"}, "id", "duplicate id, first seen on line 1"),
    ({**BASE, "image": "nope.png"}, "image", "image file not found"),
    ({**BASE, "image": "broken.png"}, "image", "cannot read image"),
    ({**MC, "choices": "red, blue"}, "choices", "list of strings"),
    ({**MC, "choices": ["red"]}, "choices", "need 2 to 26"),
    ({**MC, "choices": ["red", 2]}, "choices[1]", "non-empty string"),
    ({**MC, "choices": ["red", "Red."]}, "choices[1]", "same as choices[0]"),
    ({**MC, "answer": "purple"}, "answer", "neither a choice text nor a letter"),
    ({**MC, "answer": "D"}, "answer", "neither a choice text nor a letter A-C"),
    ({**MC, "choices": ["B", "A"], "answer": "A"}, "answer", "ambiguous"),
    ({**MC, "answer_type": "word"}, "answer_type", "multiple choice"),
])
def test_malformed_line_names_file_line_record_and_key(tmp_path, bad, field, reason):
    path = write_bench(tmp_path, bad)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError) as err:
        benchmark.load_benchmark(path)
    exc = err.value
    assert (exc.path, exc.line, exc.field) == (str(path), 3, field)
    assert reason in exc.reason
    message = str(exc)
    assert message.startswith(f"{path} line 3") and field in message
    if isinstance(bad, dict) and isinstance(bad.get("id"), str) and bad["id"]:
        assert exc.record_id == bad["id"] and repr(bad["id"]) in message


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        benchmark.load_benchmark(path)


# ------------------------------------------------------------------------- matching


def rec(answer, answer_type="word", choices=None, letter=None) -> dict:
    return {"answer": answer, "answer_type": answer_type, "choices": choices,
            "answer_letter": letter}


COLOURS = ["green", "blue", "red"]


@pytest.mark.parametrize(("pred", "record", "expected"), [
    ("3.0", rec("3", "number"), True),
    ("1,000", rec("1000", "number"), True),
    ("1000", rec("1,000", "number"), True),
    ("-2.50", rec("-2.5", "number"), True),
    ("0.5", rec(".5", "number"), True),
    ("4", rec("3", "number"), False),
    ("three", rec("3", "number"), True),  # number words count as their digits
    ("thirty", rec("3", "number"), False),
    ("12", rec("1,2", "word"), False),
    ("Red", rec("red"), True),
    ("  RED! ", rec("red"), True),
    ('"light  blue".', rec("light blue"), True),
    ("the cat", rec("cat"), True),
    ("a cat", rec("the cat"), True),
    ("cats", rec("cat"), False),
    ("Yes.", rec("yes", "yesno"), True),
    ("NO", rec("no", "yesno"), True),
    ("yes", rec("no", "yesno"), False),
    ("B", rec("blue", "choice", COLOURS, "B"), True),
    ("b", rec("blue", "choice", COLOURS, "B"), True),
    ("(B)", rec("blue", "choice", COLOURS, "B"), True),
    ("Blue", rec("blue", "choice", COLOURS, "B"), True),
    ("B. blue", rec("blue", "choice", COLOURS, "B"), True),
    ("A", rec("blue", "choice", COLOURS, "B"), False),
    ("green", rec("blue", "choice", COLOURS, "B"), False),
    ("B. green", rec("blue", "choice", COLOURS, "B"), False),
    ("D", rec("blue", "choice", COLOURS, "B"), False),
    (None, rec("red"), False),
    ("", rec("red"), False),
])
def test_benchmark_scores_answers(pred, record, expected):
    """The benchmark's verdict, from a response through parsing to ``score_predictions``."""
    recs = [{"id": "q", **record}]
    predictions = {} if pred is None else {"q": response(pred)}
    assert benchmark.score_predictions(recs, predictions)["per_record"][0]["correct"] is expected
    assert scoring.answers_match(pred, record["answer"], record["answer_type"],
                                 record["choices"]) is expected


@pytest.mark.parametrize(("pred", "gold", "answer_type"), [
    ("3.0", "3", "number"), ("Red.", "red", "word"), ("1e3", "1000", "number"),
    ("light  Blue", "light blue", "word"),
])
def test_benchmark_accepts_whatever_the_reward_accepts(pred, gold, answer_type):
    from fmr1lib import rewards

    assert rewards.accuracy_reward([response(pred)], [gold], [answer_type]) == [1.0]
    res = benchmark.score_predictions([{"id": "q", **rec(gold, answer_type)}],
                                      {"q": response(pred)})
    assert res["per_record"][0]["correct"]


def test_loaded_choices_match_by_letter_and_text():
    recs = {r["id"]: r for r in benchmark.load_benchmark(SAMPLE, load_images=False)}
    scene = recs["scene-3"]  # the file gives the letter "A"; the record keeps the text
    for pred in ("A", "(a)", "left", "A. left"):
        assert scoring.answers_match(pred, scene["answer"], "choice", scene["choices"]), pred
    assert not scoring.answers_match("B", scene["answer"], "choice", scene["choices"])


def test_question_text_lists_choices():
    assert benchmark.question_text({"question": "Which?", "choices": None}) == "Which?"
    assert (benchmark.question_text({"question": "Which?", "choices": COLOURS})
            == "Which?\nA. green\nB. blue\nC. red")


# ------------------------------------------------------------------------- scoring


def test_score_predictions_on_the_sample():
    recs = benchmark.load_benchmark(SAMPLE, load_images=False)
    preds = {
        "color-1": response("Red."),
        "color-2": "<answer>blue</answer>",  # right but not well formed
        "color-3": response("B"),
        "4": response("2.0"),
        "count-2": "three",  # unparsable
        "scene-1": response("Yes"),
        "scene-2": response("yes"),
        # scene-3 has no response
        "unknown": response("red"),
    }
    res = benchmark.score_predictions(recs, preds)
    assert res["n"] == N_SAMPLE and res["n_correct"] == 5
    assert res["accuracy"] == pytest.approx(5 / 8)
    assert res["format_rate"] == pytest.approx(5 / 8)
    assert (res["n_unparsable"], res["n_missing"]) == (2, 1)
    assert res["by_category"] == {
        "color": {"accuracy": 1.0, "n": 3},
        "count": {"accuracy": 0.5, "n": 2},
        "scene": {"accuracy": pytest.approx(1 / 3), "n": 3},
    }
    lo, hi = res["accuracy_ci"]
    assert 0.0 <= lo <= 5 / 8 <= hi <= 1.0
    first = res["per_record"][0]
    assert first == {"id": "color-1", "category": "color", "pred": "red", "answer": "red",
                     "correct": True, "well_formed": True, "response": response("Red.")}
    assert [r["id"] for r in res["per_record"]] == [r["id"] for r in recs]
    assert res["per_record"][4]["pred"] is None and not res["per_record"][4]["correct"]


def test_score_predictions_by_category():
    recs = [{"id": f"a{i}", "answer": "red", "answer_type": "word", "category": "colour"}
            for i in range(4)]
    recs.append({"id": "b0", "answer": "2", "answer_type": "number"})  # default category
    preds = {"a0": response("red"), "a1": response("red"), "a2": response("Red"),
             "a3": response("blue"), "b0": response("2")}
    res = benchmark.score_predictions(recs, preds)
    assert res["by_category"] == {"all": {"accuracy": 1.0, "n": 1},
                                  "colour": {"accuracy": 0.75, "n": 4}}
    assert res["accuracy"] == pytest.approx(0.8)


# ------------------------------------------------------------------------- bootstrap


def test_accuracy_ci_is_the_scoring_bootstrap():
    recs = [{"id": f"r{i}", "answer": "red", "answer_type": "word"} for i in range(40)]
    preds = {r["id"]: response("red" if i % 3 else "blue") for i, r in enumerate(recs)}
    res = benchmark.score_predictions(recs, preds)
    ci = scoring.bootstrap_ci(np.array([r["correct"] for r in res["per_record"]], dtype=float))
    assert res["accuracy_ci"] == [ci.lo, ci.hi]
    assert ci.lo < res["accuracy"] == ci.mean < ci.hi


# ------------------------------------------------------------------------- evaluation


def test_evaluate_benchmark_end_to_end(tiny, tmp_path):
    model, processor = tiny
    out = tmp_path / "res" / "bench.json"
    res = benchmark.evaluate_benchmark(model, processor, SAMPLE, batch_size=3, max_new_tokens=6,
                                       out_path=out)
    assert res["n"] == res["n_in_file"] == N_SAMPLE
    assert res["file"] == str(SAMPLE) and res["image_root"] is None
    assert res["decoding"] == {"greedy": True, "max_new_tokens": 6, "batch_size": 3}
    correct = [r["correct"] for r in res["per_record"]]
    assert res["accuracy"] == pytest.approx(np.mean(correct))
    assert sum(c["n"] for c in res["by_category"].values()) == N_SAMPLE
    assert [r["id"] for r in res["per_record"]][:2] == ["color-1", "color-2"]
    assert all(isinstance(r["response"], str) for r in res["per_record"])
    assert len(res["accuracy_ci"]) == 2
    saved = json.loads(out.read_text())
    assert saved["n"] == N_SAMPLE and saved["per_record"][3]["id"] == "4"
    few = benchmark.evaluate_benchmark(model, processor, SAMPLE, max_new_tokens=2, n=3)
    assert few["n"] == 3 and few["n_in_file"] == N_SAMPLE


def test_evaluate_asks_choices_and_scores_right_answers(tiny, monkeypatch):
    """With a model that answers each prompt correctly, accuracy is 1 (the wiring is right)."""
    model, processor = tiny
    recs = {r["id"]: r for r in benchmark.load_benchmark(SAMPLE, load_images=False)}
    asked: list[dict] = []
    encode = batching.encode_batch

    def spy_encode(rows, processor, **kw):
        asked.extend(rows)
        assert kw == {"with_response": False}
        return encode(rows, processor, **kw)

    def fake_generate(model, processor, inputs, max_new_tokens):
        rows = asked[-inputs["input_ids"].shape[0]:]
        return torch.zeros((len(rows), 1), dtype=torch.long), [
            response(recs[r["id"]]["answer_letter"] or recs[r["id"]]["answer"]) for r in rows]

    # The benchmark generates through evaluation.generate_greedy, which calls these two.
    monkeypatch.setattr(batching, "encode_batch", spy_encode)
    monkeypatch.setattr(modeling, "generate", fake_generate)
    res = benchmark.evaluate_benchmark(model, processor, SAMPLE, batch_size=5)
    assert res["accuracy"] == 1.0 and res["format_rate"] == 1.0
    questions = {r["id"]: r["question"] for r in asked}
    assert questions["color-3"] == "What color is the circle?\nA. green\nB. blue\nC. red"
    assert questions["color-1"] == "What color is the square?"
    assert all(isinstance(r["image"], Image.Image) for r in asked)


# ------------------------------------------------------------------------- command line


def test_cli_writes_the_result(saved_model, tmp_path, capsys):
    out = tmp_path / "result.json"
    rc = benchmark.main(["--model", str(saved_model), "--file", str(SAMPLE), "--out", str(out),
                         "--max-new-tokens", "4", "--batch-size", "8", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "95% CI" in printed
    for category in ("color", "count", "scene"):
        assert category in printed
    saved = json.loads(out.read_text())
    assert saved["model"] == str(saved_model) and saved["n"] == N_SAMPLE
    assert set(saved["by_category"]) == {"color", "count", "scene"}


def test_cli_data_error_exits_2_before_loading_the_model(tmp_path, capsys):
    path = write_bench(tmp_path, {**BASE, "question": 5})
    rc = benchmark.main(["--model", str(tmp_path / "no_model"), "--file", str(path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("DataError: ") and "line 3" in err and "question" in err


def test_cli_missing_model_exits_1(tmp_path, capsys):
    rc = benchmark.main(["--model", str(tmp_path / "no_model"), "--file", str(SAMPLE)])
    assert rc == 1
    assert "no backbone" in capsys.readouterr().err
