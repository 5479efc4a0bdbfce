"""Exact-match evaluation of a saved model on a local multiple-choice / short-answer JSONL file.

One JSON object per line (blank lines are ignored); image paths are relative to ``image_root``
(default: the JSONL file's folder)::

    {"id": "q1", "image": "img/1.png", "question": "What color is the car?", "answer": "red"}
    {"id": 2, "image": "img/2.png", "question": "How many dogs?", "answer": 3, "category": "count"}
    {"id": "q3", "image": "img/3.png", "question": "Where is the cup?",
     "choices": ["left", "right"], "answer": "B"}

=================  ==========================================================================
``id``             str or int, unique (compared as a string: ``1`` and ``"1"`` clash)
``image``          path relative to ``image_root``; must be a readable image
``question``       str, non-empty
``answer``         str or number; for multiple choice the choice text or its letter
``choices``        optional list of 2 to 26 distinct strings: the question is multiple choice
``answer_type``    optional ``word|number|yesno|choice``; inferred from the answer when missing
``category``       optional str, default ``"all"``; accuracy is also reported per category
anything else      kept in the record, not used
=================  ==========================================================================

A multiple-choice question is asked with its lettered choices on the lines below it
(``A. left``, ``B. right``); the prompt is otherwise the project's usual one (``<Focus>`` forced,
then ``<think>...</think><answer>...</answer>``), decoding is greedy, and answers are scored by
exact match after normalisation (``exact_match``). Command line::

    python -m fmr1lib.benchmark --model runs/tiny/anchor/focus_anchor/model \\
        --file my_bench/questions.jsonl --out runs/tiny/my_bench.json
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import string
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fmr1lib import evaluation, modeling, prompting, records, repro
from fmr1lib.records import ANSWER_TYPES, DataError

logger = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase
DEFAULT_CATEGORY = "all"
REQUIRED_KEYS = ("id", "image", "question", "answer")

_EDGE_CHARS = string.punctuation + string.whitespace + "\u201c\u201d\u2018\u2019"
_NUMBER_EDGE_CHARS = "".join(c for c in _EDGE_CHARS if c not in "+-.")
_NUMBER_RE = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)")
_ARTICLES = ("a", "an", "the")
_LETTERED_RE = re.compile(r"\(?([a-z])[.):]\s*(.+)")

_Fail = Callable[[str, str], DataError]


# --- loading ------------------------------------------------------------------------------


def _locator(path: Path, line: int | None, record_id: str | None) -> _Fail:
    """``fail(field, reason)`` building a DataError located at ``path`` line ``line``."""

    def fail(field: str, reason: str) -> DataError:
        return DataError(reason, path=path, line=line, record_id=record_id, field=field)

    return fail


def _answer_text(value: Any, fail: _Fail) -> str:
    if isinstance(value, str):
        if not value.strip():
            raise fail("answer", f"answer = {value!r}: must not be empty")
        return value.strip()
    if records._is_number(value):
        return str(value)
    raise fail("answer", f"answer = {value!r}: must be a string or a finite number")


def _check_choices(value: Any, fail: _Fail) -> list[str]:
    if not isinstance(value, list):
        raise fail("choices", f"choices = {value!r}: must be a list of strings")
    if not 2 <= len(value) <= len(LETTERS):
        raise fail("choices", f"choices = {value!r}: need 2 to {len(LETTERS)} choices, "
                              f"got {len(value)}")
    seen: dict[str, int] = {}
    out = []
    for i, choice in enumerate(value):
        if not isinstance(choice, str) or not choice.strip():
            raise fail(f"choices[{i}]", f"choices[{i}] = {choice!r}: must be a non-empty string")
        key = normalise_for_match(choice, "word")
        if key in seen:
            raise fail(f"choices[{i}]", f"choices[{i}] = {choice!r}: same as "
                                        f"choices[{seen[key]}] after normalisation")
        seen[key] = i
        out.append(choice.strip())
    return out


def _choice_index(answer: str, choices: Sequence[str], fail: _Fail) -> int:
    """Index of the correct choice, from its text or its letter (they must not disagree)."""
    key = normalise_for_match(answer, "word")
    by_text = next((i for i, c in enumerate(choices) if normalise_for_match(c, "word") == key),
                   None)
    letter = answer.strip().upper()
    by_letter = LETTERS.index(letter) if len(letter) == 1 and letter in LETTERS[:len(choices)] \
        else None
    if by_text is not None and by_letter is not None and by_text != by_letter:
        raise fail("answer", f"answer = {answer!r}: ambiguous, it is the letter of choice "
                             f"{choices[by_letter]!r} and the text of choice {LETTERS[by_text]}")
    index = by_text if by_text is not None else by_letter
    if index is None:
        raise fail("answer", f"answer = {answer!r}: neither a choice text nor a letter "
                             f"A-{LETTERS[len(choices) - 1]} of choices {choices!r}")
    return index


def _infer_type(answer: str) -> str:
    """``records.infer_answer_type``, reading ``1,000`` as a number too."""
    answer = records.normalise_answer(answer)
    if _parse_number(answer) is not None:
        return "number"
    return records.infer_answer_type(answer)


def _validate(rec: dict[str, Any], fail: _Fail) -> dict[str, Any]:
    """Check one parsed line and return the benchmark record (without its image)."""
    for key in REQUIRED_KEYS:
        if key not in rec:
            raise fail(key, f"{key}: missing required key")
    rid = rec["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip():
        raise fail("id", f"id = {rid!r}: must be a non-empty string or an integer")
    image = rec["image"]
    if not isinstance(image, str) or not image.strip():
        raise fail("image", f"image = {image!r}: must be a non-empty path string")
    question = rec["question"]
    if not isinstance(question, str) or not question.strip():
        raise fail("question", f"question = {question!r}: must be a non-empty string")
    answer = _answer_text(rec["answer"], fail)

    category = rec.get("category")
    if category is None:
        category = DEFAULT_CATEGORY
    elif not isinstance(category, str) or not category.strip():
        raise fail("category", f"category = {category!r}: must be a non-empty string")

    answer_type = rec.get("answer_type")
    if answer_type is not None and answer_type not in ANSWER_TYPES:
        raise fail("answer_type",
                   f"answer_type = {answer_type!r}: must be one of {', '.join(ANSWER_TYPES)}")
    choices = rec.get("choices")
    letter = None
    if choices is not None:
        if answer_type not in (None, "choice"):
            raise fail("answer_type", f"answer_type = {answer_type!r}: a record with choices is "
                                      f"multiple choice; use 'choice' or leave it out")
        choices = _check_choices(choices, fail)
        index = _choice_index(answer, choices, fail)
        answer, letter, answer_type = choices[index], LETTERS[index], "choice"
    elif answer_type == "choice":
        raise fail("choices", "choices: missing, but answer_type is 'choice'")
    elif answer_type is None:
        answer_type = _infer_type(answer)
    elif answer_type == "number" and _parse_number(answer) is None:
        raise fail("answer", f"answer = {answer!r}: not a number, but answer_type is 'number'")
    elif answer_type == "yesno" and normalise_for_match(answer, "yesno") not in ("yes", "no"):
        raise fail("answer", f"answer = {answer!r}: not yes/no, but answer_type is 'yesno'")

    return {**rec, "id": str(rid).strip(), "image": image.strip(), "question": question.strip(),
            "answer": answer, "answer_type": answer_type, "choices": choices,
            "answer_letter": letter, "category": category.strip()}


def load_benchmark(path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None,
                   *, load_images: bool = True) -> list[dict[str, Any]]:
    """Load and validate a benchmark JSONL file (format in the module docstring).

    Args:
        path: the JSONL file.
        image_root: folder the ``image`` paths are relative to (default: ``path``'s folder).
        load_images: True puts the decoded RGB image in ``image``; False keeps the relative path
            there and reads only each image's header (``evaluate_benchmark`` decodes per batch).

    Returns:
        One dict per record, in file order, with every key of the line plus: ``id`` (str),
        ``answer`` (str; for multiple choice the correct choice's text), ``answer_type``,
        ``choices`` (list or None), ``answer_letter`` (``"A"``... or None), ``category``,
        ``image_path`` (absolute), ``source_file`` and ``source_line`` (1-based line number).

    Raises:
        DataError: invalid JSON, a line that is not an object, a missing or wrong-typed key,
            a duplicate id, a missing or unreadable image, bad choices, an answer that is not
            among the choices, or a file without records; the message names the file, the
            line, the record id when known and the key.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    out: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            rec = records._parse_line(raw, path, line_no)
            if rec is None:
                continue
            fail = _locator(path, line_no, records._id_for_message(rec))
            item = _validate(rec, fail)
            if item["id"] in first_line:
                raise fail("id", f"duplicate id, first seen on line {first_line[item['id']]}")
            image_path = Path(os.path.abspath(root / item["image"]))
            image, _ = records._read_image(image_path, load_images, fail)
            first_line[item["id"]] = line_no
            item.update(image_path=str(image_path), source_file=str(path), source_line=line_no)
            if load_images:
                item["image"] = image
            out.append(item)
    if not out:
        raise DataError("no records in the file", path=path)
    return out


# --- matching -----------------------------------------------------------------------------


def _parse_number(text: str) -> float | None:
    """The value of a plain number (``1,000`` and ``3.`` included), else None."""
    t = text.strip().strip(_NUMBER_EDGE_CHARS)
    if not _NUMBER_RE.fullmatch(t):
        return None
    value = float(t.replace(",", ""))
    return value if math.isfinite(value) else None


def _number_key(value: float) -> str:
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _choice_key(text: Any, choices: Sequence[str]) -> str:
    """``normalise_for_match`` of a multiple-choice answer: a letter when it names a choice."""
    keys = [normalise_for_match(c, "word") for c in choices]
    letters = LETTERS[:len(choices)]
    word = normalise_for_match(text, "word")
    if word in keys:
        return LETTERS[keys.index(word)]
    t = prompting.normalise(str(text)).strip(_EDGE_CHARS)
    if len(t) == 1 and t.upper() in letters:
        return t.upper()
    m = _LETTERED_RE.fullmatch(t)
    if m and m.group(1).upper() in letters:
        index = LETTERS.index(m.group(1).upper())
        if normalise_for_match(m.group(2), "word") == keys[index]:
            return LETTERS[index]
    return word


def normalise_for_match(text: Any, answer_type: str = "word",
                        choices: Sequence[str] | None = None) -> str:
    """The canonical form two answers are compared in.

    Builds on ``prompting.normalise`` (lower case, collapsed whitespace, no trailing period),
    then strips surrounding punctuation and quotes. A number becomes its value (``"1,000"``,
    ``"1000.0"`` -> ``"1000"``) whatever ``answer_type`` says; ``word`` answers also lose a
    leading article. With ``choices``, an answer equal to a choice's text or to a choice letter
    (alone or as ``"B. text"``) becomes that upper-case letter; text wins over letter when a
    choice's text is itself a letter.

    Args:
        text: the answer (a number is formatted first).
        answer_type: one of ``ANSWER_TYPES``.
        choices: the choices of a multiple-choice record.

    Returns:
        The canonical string ("" for an empty answer).

    >>> normalise_for_match("  The Cat. ")
    'cat'
    >>> normalise_for_match("1,000", "number"), normalise_for_match("3.0", "number")
    ('1000', '3')
    >>> normalise_for_match("b) Blue", "choice", ["green", "blue"])
    'B'
    """
    if answer_type == "choice" and choices:
        return _choice_key(text, choices)
    base = prompting.normalise(str(text))
    number = _parse_number(base)
    if number is not None:
        return _number_key(number)
    t = base.strip(_EDGE_CHARS)
    if answer_type == "word":
        first, _, rest = t.partition(" ")
        if first in _ARTICLES and rest:
            t = rest
    return t


def exact_match(pred: str | None, record: Mapping[str, Any]) -> bool:
    """Whether a predicted answer matches the record's ground truth exactly after normalisation.

    True whenever ``prompting.answers_match`` is; besides, both sides are compared through
    ``normalise_for_match``. A multiple-choice prediction is right when it is the correct
    letter, the correct choice's text, or ``"<letter>. <text>"`` of the correct choice.

    Args:
        pred: the parsed answer (None when the response had none).
        record: a record from ``load_benchmark`` (``answer``, ``answer_type``, ``choices``,
            ``answer_letter``).

    Returns:
        True when the prediction is correct.

    >>> exact_match("B", {"answer": "blue", "answer_type": "choice",
    ...                   "choices": ["green", "blue"], "answer_letter": "B"})
    True
    >>> exact_match("three", {"answer": "3", "answer_type": "number"})
    False
    """
    if pred is None or not str(pred).strip():
        return False
    answer_type = record.get("answer_type") or "word"
    gold = str(record["answer"])
    if prompting.answers_match(str(pred), gold, answer_type):
        return True
    choices = record.get("choices")
    if answer_type == "choice" and choices:
        letter = record.get("answer_letter") or normalise_for_match(gold, "choice", choices)
        word = normalise_for_match(pred, "word")
        return (word in (letter.lower(), normalise_for_match(gold, "word"))
                or normalise_for_match(pred, "choice", choices) == letter)
    return normalise_for_match(pred, answer_type) == normalise_for_match(gold, answer_type)


# --- scoring ------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-example values.

    NaN entries are left out; with nothing left the interval is ``(nan, nan)``.

    Args:
        values: a 1-D sequence of numbers (e.g. 0/1 correctness).
        n_boot: number of resamples.
        seed: seed of the ``numpy.random.Generator`` that draws them.
        alpha: 1 - coverage (0.05 gives the 95% interval).

    Returns:
        ``(lo, hi)``, the ``alpha/2`` and ``1 - alpha/2`` percentiles of the resampled means.

    Raises:
        ValueError: ``values`` is not 1-D, ``n_boot < 1`` or ``alpha`` not in (0, 1).

    >>> bootstrap_ci([1, 1, 1])
    (1.0, 1.0)
    >>> bootstrap_ci([])
    (nan, nan)
    """
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {arr.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    arr = arr[~np.isnan(arr)]
    n = arr.size
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)  # bounds the index matrix to a few million entries
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        means[start:stop] = arr[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def _mean(values: Sequence[bool | float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def score_predictions(recs: Sequence[Mapping[str, Any]],
                      predictions: Mapping[str, str | None]) -> dict[str, Any]:
    """Score raw model responses against the records.

    Each response is parsed with ``prompting.parse_answer``; an unparsable or missing response
    scores 0. ``format_rate`` is the share of responses that are well formed
    (``prompting.is_well_formed``), as in ``evaluation.answer_metrics``.

    Args:
        recs: records from ``load_benchmark``.
        predictions: record id (str, or an int id) -> raw response
            (``<Focus><think>...</think><answer>X</answer>``); ids not among ``recs`` are ignored.

    Returns:
        ``accuracy``, ``accuracy_ci`` (95% percentile bootstrap, 1000 resamples, seed 0), ``n``,
        ``n_correct``, ``format_rate``, ``n_unparsable``, ``n_missing`` (records without a
        response), ``by_category`` (``{category: {"accuracy", "n"}}``, sorted by name) and
        ``per_record`` (``id``, ``category``, ``pred``, ``answer``, ``correct``,
        ``well_formed``, ``response``, in record order).
    """
    by_id = {str(k): v for k, v in predictions.items()}
    per_record = []
    n_missing = 0
    for rec in recs:
        rid = str(rec["id"])
        response = by_id.get(rid)
        n_missing += rid not in by_id
        pred = prompting.parse_answer(response)
        per_record.append({
            "id": rid, "category": rec.get("category", DEFAULT_CATEGORY), "pred": pred,
            "answer": rec["answer"], "correct": exact_match(pred, rec),
            "well_formed": prompting.is_well_formed(response), "response": response,
        })
    if n_missing:
        logger.warning("%d of %d record(s) have no response; scored as wrong",
                       n_missing, len(per_record))
    correct = [r["correct"] for r in per_record]
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in per_record:
        groups[r["category"]].append(r["correct"])
    lo, hi = bootstrap_ci(np.asarray(correct, dtype=float))
    return {
        "accuracy": _mean(correct),
        "accuracy_ci": [lo, hi],
        "n": len(per_record),
        "n_correct": int(sum(correct)),
        "format_rate": _mean([r["well_formed"] for r in per_record]),
        "n_unparsable": sum(r["pred"] is None for r in per_record),
        "n_missing": n_missing,
        "by_category": {cat: {"accuracy": _mean(v), "n": len(v)}
                        for cat, v in sorted(groups.items())},
        "per_record": per_record,
    }


# --- generation ---------------------------------------------------------------------------


def question_text(record: Mapping[str, Any]) -> str:
    """The question as asked: multiple-choice records get their lettered choices appended.

    >>> question_text({"question": "Which?", "choices": ["red", "blue"]})
    'Which?\\nA. red\\nB. blue'
    """
    choices = record.get("choices")
    if not choices:
        return str(record["question"])
    lines = [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join([str(record["question"]), *lines])


def _record_image(rec: Mapping[str, Any]) -> Image.Image:
    image = rec["image"]
    if isinstance(image, Image.Image):
        return image
    fail = _locator(Path(rec.get("source_file", "?")), rec.get("source_line"), rec["id"])
    decoded, _ = records._read_image(Path(rec["image_path"]), True, fail)
    assert decoded is not None
    return decoded


@torch.no_grad()
def generate_responses(model: Any, processor: Any, recs: Sequence[Mapping[str, Any]],
                       batch_size: int = 16, max_new_tokens: int = 64) -> dict[str, str]:
    """Greedy responses to the records with the project's prompt (``anchoring.encode_batch``).

    Args:
        model: a Qwen2.5-VL with the ``<Focus>`` tokens (inputs go to its device).
        processor: its processor.
        recs: records from ``load_benchmark`` (images decoded or not).
        batch_size: records per ``generate`` call.
        max_new_tokens: generation limit per response.

    Returns:
        Record id -> response text (tags kept, ``<|im_end|>`` cut).
    """
    model.eval()
    out: dict[str, str] = {}
    with tqdm(total=len(recs), desc="benchmark", unit="q") as bar:
        for start in range(0, len(recs), batch_size):
            chunk = recs[start:start + batch_size]
            rows = [{"id": r["id"], "image": _record_image(r), "question": question_text(r),
                     "answer": r["answer"], "evidence_boxes": [], "meta": {}} for r in chunk]
            _, texts = evaluation.generate_greedy(model, processor, rows, max_new_tokens)
            out.update(zip((str(r["id"]) for r in chunk), texts, strict=True))
            bar.update(len(chunk))
    return out


def evaluate_records(model: Any, processor: Any, recs: Sequence[Mapping[str, Any]],
                     batch_size: int = 16, max_new_tokens: int = 64, n: int = 0) -> dict[str, Any]:
    """Generate greedy answers for the first ``n`` records (all if 0) and score them.

    Returns:
        ``score_predictions``'s dict plus ``decoding`` (``greedy``, ``max_new_tokens``,
        ``batch_size``) and ``generation_time_s``.
    """
    if n < 0 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"need n >= 0, batch_size >= 1 and max_new_tokens >= 1, got n={n}, "
                         f"batch_size={batch_size}, max_new_tokens={max_new_tokens}")
    recs = list(recs[:n] if n else recs)
    t0 = time.perf_counter()
    responses = generate_responses(model, processor, recs, batch_size, max_new_tokens)
    elapsed = time.perf_counter() - t0
    return {"decoding": {"greedy": True, "max_new_tokens": max_new_tokens,
                         "batch_size": batch_size},
            "generation_time_s": elapsed, **score_predictions(recs, responses)}


def _with_source(result: dict[str, Any], path: str | os.PathLike[str],
                 image_root: str | os.PathLike[str] | None, n_in_file: int) -> dict[str, Any]:
    return {"file": str(path), "image_root": None if image_root is None else str(image_root),
            "n_in_file": n_in_file, **result}


def evaluate_benchmark(model: Any, processor: Any, path: str | os.PathLike[str],
                       image_root: str | os.PathLike[str] | None = None, batch_size: int = 16,
                       max_new_tokens: int = 64, n: int = 0,
                       out_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Load a benchmark file, answer it greedily and score the answers.

    Images are decoded batch by batch, so large benchmarks do not sit in memory.

    Args:
        model: a Qwen2.5-VL with the ``<Focus>`` tokens (a saved backbone or trained stage).
        processor: its processor.
        path: the benchmark JSONL.
        image_root: folder the image paths are relative to (default: ``path``'s folder).
        batch_size: records per ``generate`` call.
        max_new_tokens: generation limit per response.
        n: evaluate only the first ``n`` records (0: all).
        out_path: if given, the result is also written there as JSON (atomically).

    Returns:
        ``file``, ``image_root``, ``n_in_file``, ``decoding``, ``generation_time_s`` and the
        fields of ``score_predictions``.

    Raises:
        DataError: a malformed line or image (named by file, line, record and key).
    """
    recs = load_benchmark(path, image_root, load_images=False)
    result = _with_source(
        evaluate_records(model, processor, recs, batch_size, max_new_tokens, n),
        path, image_root, len(recs))
    if out_path is not None:
        repro.atomic_write_json(out_path, result)
    return result


# --- command line -------------------------------------------------------------------------


def load_model(folder: str | os.PathLike[str], dtype: str = "float32",
               device: str | None = None) -> tuple[Any, Any]:
    """A model folder written by ``modeling.save_backbone`` (any stage), on ``device``.

    Args:
        folder: e.g. ``runs/tiny/anchor/focus_anchor/model``.
        dtype: weights dtype (``float32``, ``bfloat16``, ``float16``).
        device: torch device; default CUDA when available, else CPU.

    Returns:
        ``(model, processor)`` with the model in eval mode.
    """
    from fmr1lib import config

    params = config.load_params(config.ModelParams, {"dtype": dtype})
    model, processor = modeling.load_saved_backbone(folder, params)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor


def format_result(result: Mapping[str, Any]) -> str:
    """Overall accuracy with its interval and the per-category table, as text."""
    lo, hi = result["accuracy_ci"]
    lines = [
        f"{result.get('file', 'benchmark')}: {result['n']} record(s)",
        f"accuracy {result['accuracy']:.3f}  95% CI [{lo:.3f}, {hi:.3f}]  "
        f"format rate {result['format_rate']:.3f}  unparsable {result['n_unparsable']}",
    ]
    cats = result["by_category"]
    width = max([len("category"), *map(len, cats)])
    lines.append(f"{'category':<{width}}  {'n':>5}  accuracy")
    lines += [f"{cat:<{width}}  {v['n']:>5}  {v['accuracy']:.3f}" for cat, v in cats.items()]
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fmr1lib.benchmark",
        description="Exact-match accuracy of a saved model on a benchmark JSONL file.")
    parser.add_argument("--model", required=True, help="saved model folder (config.json inside)")
    parser.add_argument("--file", required=True, help="benchmark JSONL")
    parser.add_argument("--image-root", default=None,
                        help="folder image paths are relative to (default: the file's folder)")
    parser.add_argument("--out", default=None, help="write the full result JSON here")
    parser.add_argument("--n", type=int, default=0, help="first N records only (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=sorted(modeling.DTYPES))
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; prints the summary and optionally writes the JSON result.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a ``DataError`` (its message goes to stderr), 1 when the benchmark
        file or the model folder is missing.
    """
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        # The file is checked before the (possibly large) model is loaded.
        recs = load_benchmark(args.file, args.image_root, load_images=False)
        model, processor = load_model(args.model, args.dtype, args.device)
        result = _with_source(
            evaluate_records(model, processor, recs, args.batch_size, args.max_new_tokens,
                             args.n),
            args.file, args.image_root, len(recs))
    except DataError as exc:
        sys.stderr.write(f"DataError: {exc}\n")
        return 2
    except FileNotFoundError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    result = {"model": str(args.model), **result}
    sys.stdout.write(format_result(result) + "\n")
    if args.out:
        repro.atomic_write_json(args.out, result)
        sys.stdout.write(f"wrote {args.out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
