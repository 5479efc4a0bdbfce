"""Answer scoring (fmr1lib.scoring): one matcher for the reward, the evaluation and the benchmark,
and one bootstrap for the evaluation summary and the benchmark."""

from __future__ import annotations

import doctest
import math
from types import SimpleNamespace

import numpy as np
import pytest

from fmr1lib import benchmark, prompting, records, rewards, scoring

COLOURS = ["green", "blue", "red"]

# (pred, gold, answer_type, choices, expected). The comments mark the cases on which the three
# former matchers disagreed with each other (prompting.answers_match for the reward and the
# evaluation, benchmark.exact_match for the benchmark).
CASES = [
    # articles
    ("the cat", "cat", "word", None, True),
    ("a cat", "the cat", "word", None, True),
    ("An apple", "apple", None, None, True),
    ("cats", "cat", "word", None, False),
    ("reddish", "red", "word", None, False),
    # case, punctuation, quotes, whitespace
    ("Red.", "red", "word", None, True),
    ("  RED! ", "red", "word", None, True),
    ('"Light  Blue".', "light blue", "word", None, True),
    # numbers: separators, value, words
    ("1,000", "1000", "number", None, True),
    ("1000", "1,000", "number", None, True),
    ("1,000", "1000", "word", None, True),
    ("12", "1,2", "word", None, False),  # not a valid thousands group
    ("3.0", "3", "number", None, True),
    ("2.0", "2", "word", None, True),
    ("03", "3", "number", None, True),
    ("-2.50", "-2.5", "number", None, True),
    ("1e3", "1000", "number", None, True),
    ("three", "3", "number", None, True),
    ("Twenty", "20", "word", None, True),
    ("4", "3", "number", None, False),
    ("thirty", "3", "number", None, False),  # beyond the number words
    ("3 dogs", "3", "number", None, False),
    # yes / no
    ("yes!", "yes", "yesno", None, True),
    ("Yes.", "yes", "yesno", None, True),
    ("NO", "no", "yesno", None, True),
    ("yes", "no", "yesno", None, False),
    ("True", "yes", "yesno", None, True),
    ("true", "yes", "word", None, False),  # true means yes only for yesno answers
    ("yes, it is", "yes", "yesno", None, False),
    # multiple choice: a letter or the text, on either side
    ("B", "blue", "choice", COLOURS, True),
    ("(b)", "blue", "choice", COLOURS, True),
    ("b.", "blue", "choice", COLOURS, True),
    ("B) blue", "blue", "choice", COLOURS, True),
    ("Blue", "blue", "choice", COLOURS, True),
    ("blue", "B", "choice", COLOURS, True),
    ("(B)", "b", "choice", COLOURS, True),
    ("a", "green", "choice", COLOURS, True),  # a lone "a" is a letter, not an article
    ("A", "blue", "choice", COLOURS, False),
    ("green", "blue", "choice", COLOURS, False),
    ("B. green", "blue", "choice", COLOURS, False),  # letter and text disagree
    ("D", "blue", "choice", COLOURS, False),  # no fourth choice
    ("purple", "blue", "choice", COLOURS, False),
    ("A", "A", "choice", ["B", "A"], True),  # the text "A" (choice B) wins over the letter
    ("b", "A", "choice", ["B", "A"], False),
    ("2.0", "2", "choice", ["1", "2"], True),
    # no answer
    (None, "red", "word", None, False),
    ("", "red", "word", None, False),
    ("...", "red", "word", None, False),
]


def _case_id(case: tuple) -> str:
    pred, gold, answer_type, choices, _ = case
    return f"{pred!r}~{gold!r}:{answer_type}" + ("+choices" if choices else "")


def test_doctests() -> None:
    result = doctest.testmod(scoring)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize(("pred", "gold", "answer_type", "choices", "expected"), CASES,
                         ids=[_case_id(c) for c in CASES])
def test_answers_match_table(pred, gold, answer_type, choices, expected):
    assert scoring.answers_match(pred, gold, answer_type, choices) is expected


@pytest.mark.parametrize(("pred", "gold", "answer_type", "expected"), [
    ("3", "3", "number", True),
    ("3.0", "3", "number", True),
    ("03", "3", "number", True),
    (" 3. ", "3", "number", True),
    ("4", "3", "number", False),
    ("many", "3", "number", False),
    ("", "3", "number", False),
    (None, "3", "number", False),
    ("red", "red", "word", True),
    ("Red.", "red", "word", True),
    ("  light  blue ", "Light Blue", "word", True),
    ("reddish", "red", "word", False),
    ("yes", "no", "word", False),
    (None, "red", "word", False),
    ("3 cats", "3", "word", False),  # a word answer is not read as its leading number
])
def test_answers_match_basics(pred, gold, answer_type, expected):
    assert scoring.answers_match(pred, gold, answer_type) is expected


def _response(pred: str | None) -> str | None:
    return None if pred is None else prompting.response_text(pred, "look at the image")


def _verdicts(monkeypatch) -> dict[str, list[bool]]:
    """Each scorer's verdict on every case, from the raw response as the model would write it."""
    from fmr1lib import evaluation

    responses = [_response(c[0]) for c in CASES]
    golds = [c[1] for c in CASES]
    types = [c[2] for c in CASES]
    choices = [c[3] for c in CASES]
    rows = [{"id": f"case-{i}", "answer": gold, "answer_type": kind, "choices": opts,
             "meta": {}, "evidence_boxes": [], "image": None, "category": "all"}
            for i, (gold, kind, opts) in enumerate(zip(golds, types, choices, strict=True))]
    by_id = {r["id"]: text for r, text in zip(rows, responses, strict=True)}

    # The evaluation's model calls are replaced by the cases' responses: only scoring runs.
    def fake_generate(model, processor, batch, max_new_tokens=24, image_column="image"):
        return [[0] for _ in batch], [by_id[r["id"]] for r in batch]

    def fake_focus(model, processor, batch, *args, **kwargs):
        return [{"id": r["id"], "grid": np.ones((1, 1)), "target": np.zeros((1, 1))}
                for r in batch]

    monkeypatch.setattr(evaluation, "generate_greedy", fake_generate)
    monkeypatch.setattr(evaluation, "focus_attention", fake_focus)
    monkeypatch.setattr(evaluation, "answer_attention", lambda m, p, batch, *a, **k: [None] * len(batch))
    monkeypatch.setattr(evaluation, "focus_and_answer_attention",
                        lambda m, p, batch, *a, **k: (fake_focus(m, p, batch), [None] * len(batch)))
    model = SimpleNamespace(eval=lambda: None)
    reward = rewards.accuracy_reward(responses, golds, types, choices)
    predicted = evaluation.predict_answers(model, None, rows, batch_size=7)
    split = evaluation.evaluate_split(model, None, rows,
                                      evaluation.Settings(batch_size=7, views=False))
    bench = benchmark.score_predictions(rows, by_id)["per_record"]
    return {
        "reward": [r == 1.0 for r in reward],
        "evaluation.predict_answers": [p["correct"] for p in predicted],
        "evaluation.evaluate_split": [e["correct"] for e in split],
        "benchmark": [r["correct"] for r in bench],
    }


def test_reward_evaluation_and_benchmark_agree_on_every_case(monkeypatch):
    verdicts = _verdicts(monkeypatch)
    wrong = [
        f"{_case_id(case)}: expected {case[4]}, "
        + ", ".join(f"{name}={v[i]}" for name, v in verdicts.items())
        for i, case in enumerate(CASES)
        if any(v[i] is not case[4] for v in verdicts.values())
    ]
    assert not wrong, "\n".join(wrong)


def test_normalise_answer_is_idempotent_and_keeps_stored_and_parsed_forms():
    texts = {t for c in CASES for t in (c[0], c[1], *(c[3] or ())) if t is not None}
    texts |= {"the the cat", "the 'cat'", "(-3)", "50%", "$1,000.", "a", "the", "U.S.A."}
    for text in sorted(texts):
        for kind in (None, *records.ANSWER_TYPES):
            key = scoring.normalise_answer(text, kind)
            assert scoring.normalise_answer(key, kind) == key, (text, kind)
            # Storing records.clean_answer's form, or parsing a response, changes no verdict.
            assert scoring.normalise_answer(records.clean_answer(text), kind) == key, (text, kind)
            assert scoring.normalise_answer(prompting.normalise(text), kind) == key, (text, kind)
            # A key survives the response template and parsing unchanged.
            if key:
                assert prompting.parse_answer(prompting.response_text(key)) == key, text


@pytest.mark.parametrize(("text", "answer_type", "expected"), [
    ("  The Cat. ", None, "cat"),
    ("the the cat", None, "cat"),
    ("the", None, "the"),
    ("a", None, "a"),
    ("1,000", "number", "1000"),
    ("$1,000.", None, "1000"),
    ("50%", None, "50"),
    ("(-3)", "number", "-3"),
    (".5", None, "0.5"),
    ("2.50", None, "2.5"),
    ("-0", None, "0"),
    ("1,2", None, "1,2"),
    ("Three", "number", "3"),
    ("three", "word", "3"),
    ("zero", None, "0"),
    ("Yes!", "yesno", "yes"),
    ("FALSE", "yesno", "no"),
    ("false", "word", "false"),
    ("\u201cblue\u201d", None, "blue"),
    ("!?", None, ""),
])
def test_normalise_answer(text, answer_type, expected):
    assert scoring.normalise_answer(text, answer_type) == expected


def test_unknown_answer_type_is_an_error():
    with pytest.raises(ValueError, match="answer_type"):
        scoring.normalise_answer("red", "colour")
    with pytest.raises(ValueError, match="answer_type"):
        scoring.answers_match("red", "red", "colour")


def test_choice_index_letters_text_and_numbers():
    assert scoring.choice_index("Blue", COLOURS) == 1
    assert scoring.choice_index("c", COLOURS) == 2
    assert scoring.choice_index("(C)", COLOURS) == 2
    assert scoring.choice_index("purple", COLOURS) is None
    assert scoring.choice_index("d", COLOURS) is None
    # A numeric choice is found by value; the text wins over a letter of the same spelling.
    assert scoring.choice_index("2.0", ["1", "2"]) == 1
    assert scoring.choice_index("A", ["B", "A"]) == 1
    assert scoring.normalise_answer("1,000", "word") == "1000"
    assert scoring.letter_index("b)", 2) == 1 and scoring.letter_index("c", 2) is None


def test_parse_number():
    assert scoring.parse_number("1,234,567.5") == 1234567.5
    assert scoring.parse_number("-.5") == -0.5
    assert scoring.parse_number(7) == 7.0
    for text in ("1,2", "12,34", "three", "2 cats", "nan", "inf", "1e999", "-", "."):
        assert scoring.parse_number(text) is None, text


def test_reward_without_choices_reads_a_letter_as_text():
    # grpo passes no choices; a letter then only matches a choice whose text is that letter.
    assert rewards.accuracy_reward(["<answer>B</answer>"], ["blue"], ["choice"]) == [0.0]
    assert rewards.accuracy_reward(["<answer>B</answer>"], ["blue"], ["choice"],
                                   [COLOURS]) == [1.0]


# ------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_properties():
    assert scoring.bootstrap_ci([1.0] * 20) == (1.0, 1.0, 1.0, 20)
    assert scoring.bootstrap_ci(np.zeros(5))[:3] == (0.0, 0.0, 0.0)
    values = np.random.default_rng(1).integers(0, 2, 60).astype(float)
    ci = scoring.bootstrap_ci(values)
    assert ci.mean == pytest.approx(values.mean()) and ci.n == 60
    assert ci.lo < ci.mean < ci.hi
    assert scoring.bootstrap_ci(values, seed=3) == scoring.bootstrap_ci(values, seed=3)
    assert scoring.bootstrap_ci(values, seed=3) != scoring.bootstrap_ci(values, seed=4)
    assert scoring.bootstrap_ci(list(values)) == ci
    wide = scoring.bootstrap_ci(values, alpha=0.01)
    assert wide.lo <= ci.lo and ci.hi <= wide.hi
    # Large inputs are resampled in chunks; the interval is still tight around the mean.
    big = np.random.default_rng(2).random(5000)
    b = scoring.bootstrap_ci(big, n_boot=500)
    assert b.lo < big.mean() < b.hi and b.hi - b.lo < 0.05


def test_bootstrap_ci_degenerate_nan_and_bad_input():
    empty = scoring.bootstrap_ci([])
    assert all(map(math.isnan, empty[:3])) and empty.n == 0
    only_nan = scoring.bootstrap_ci([float("nan")])
    assert all(map(math.isnan, only_nan[:3])) and only_nan.n == 0
    assert scoring.bootstrap_ci([1.0, float("nan"), 1.0]) == (1.0, 1.0, 1.0, 2)
    assert scoring.bootstrap_ci([0.25]) == (0.25, 0.25, 0.25, 1)
    with pytest.raises(ValueError, match="1-D"):
        scoring.bootstrap_ci([[1.0, 0.0]])
    with pytest.raises(ValueError, match="2-D"):
        scoring.bootstrap_cis([1.0, 0.0])
    with pytest.raises(ValueError, match="n_boot"):
        scoring.bootstrap_ci([1.0], n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        scoring.bootstrap_ci([1.0], alpha=1.0)


def test_bootstrap_cis_resamples_columns_jointly():
    rng = np.random.default_rng(5)
    col = rng.random(40)
    other = rng.random(40)
    other[::3] = np.nan  # does not apply to every third example
    table = np.stack([col, other, col], axis=1)
    cis = scoring.bootstrap_cis(table, n_boot=300, seed=2)
    # One draw serves every column: equal columns get equal intervals, and a column's interval
    # is the one-column bootstrap's under the same seed (up to summation order).
    assert cis[0] == cis[2]
    alone = scoring.bootstrap_ci(col, n_boot=300, seed=2)
    assert cis[0][:3] == pytest.approx(alone[:3], rel=1e-12) and cis[0].n == alone.n
    assert cis[1].n == 26 and cis[1].mean == pytest.approx(np.nanmean(other))
    assert cis[1].lo <= cis[1].mean <= cis[1].hi
    empty = scoring.bootstrap_cis(np.empty((0, 2)))
    assert len(empty) == 2 and all(math.isnan(c.mean) and c.n == 0 for c in empty)


def test_summarise_keeps_its_numbers():
    """evaluation.summarise's values for a fixed input, as the implementation before
    scoring.bootstrap_cis gave them (the committed figures are built from them)."""
    from fmr1lib import evaluation

    rng = np.random.default_rng(0)
    ex = []
    for i in range(60):
        correct, ev, mass = bool(rng.random() < 0.6), bool(rng.random() < 0.3), float(rng.random())
        ex.append({"correct": correct, "well_formed": True, "pred": "red", "cue": "blue",
                   "cue_agrees": bool(i % 2), "focus_mass": mass, "pointing": True,
                   "answer_mass": 0.5, "pred_evidence": "blue", "correct_evidence": ev,
                   "pred_control": "red", "correct_control": True})
    s = evaluation.summarise(ex, n_boot=500, seed=1)
    expected = {
        "accuracy": (0.55, 0.4166666666666667, 0.6833333333333333, 60),
        "focus_mass": (0.5106623305672694, 0.43569800596176683, 0.5914478420299433, 60),
        "drop_control": (-0.45, -0.5833333333333334, -0.31666666666666665, 60),
        "conflict_accuracy": (0.5, 0.32768817204301076, 0.6666666666666666, 30),
        "wrong_is_cue": (0.0, 0.0, 0.0, 27),
    }
    for name, (mean, lo, hi, n) in expected.items():
        got = s[name]
        assert (got["mean"], got["lo"], got["hi"]) == pytest.approx((mean, lo, hi), rel=1e-12)
        assert got["n"] == n, name
