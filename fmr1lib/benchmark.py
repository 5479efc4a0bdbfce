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
``scoring.answers_match``, the matcher of the reward and of ``evaluation.evaluate_split``: exact
match after normalisation, a letter or the text naming the same choice. Command line::

    python -m fmr1lib.benchmark --model runs/tiny/anchor/focus_anchor/model \\
        --file my_bench/questions.jsonl --out runs/tiny/my_bench.json

Before the model loads, every line is validated and every image decoded, so a bad record stops
the run at once (``DataError``, exit 2) or, with ``--on-bad-record skip``, is skipped and
counted (``n_skipped``). Image paths must lead inside ``image_root`` (after ``..`` and
symlinks); ``--allow-absolute-images`` lifts that. With ``--out``, each answered record is
appended to ``<out stem>.records.jsonl`` as its batch finishes (``partial_results_path``), so
a run that dies keeps what it had done; the full result JSON is written at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import string
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fmr1lib import evaluation, modeling, progress, prompting, records, repro, scoring
from fmr1lib.choices import OnBadRecord
from fmr1lib.records import ANSWER_TYPES, DataError

logger = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase
DEFAULT_CATEGORY = "all"
REQUIRED_KEYS = ("id", "image", "question", "answer")

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
        key = scoring.normalise_answer(choice)
        if key in seen:
            raise fail(f"choices[{i}]", f"choices[{i}] = {choice!r}: same as "
                                        f"choices[{seen[key]}] after normalisation")
        seen[key] = i
        out.append(choice.strip())
    return out


def _choice_index(answer: str, choices: Sequence[str], fail: _Fail) -> int:
    """Index of the correct choice, from its text or its letter (they must not disagree).

    Stricter than ``scoring.choice_index``, which lets the text win: a ground truth that is both
    one choice's letter and another choice's text is a data error, not a guess.
    """
    key = scoring.normalise_answer(answer)
    by_text = next((i for i, c in enumerate(choices) if scoring.normalise_answer(c) == key), None)
    by_letter = scoring.letter_index(answer, len(choices))
    if by_text is not None and by_letter is not None and by_text != by_letter:
        raise fail("answer", f"answer = {answer!r}: ambiguous, it is the letter of choice "
                             f"{choices[by_letter]!r} and the text of choice {LETTERS[by_text]}")
    index = by_text if by_text is not None else by_letter
    if index is None:
        raise fail("answer", f"answer = {answer!r}: neither a choice text nor a letter "
                             f"A-{LETTERS[len(choices) - 1]} of choices {choices!r}")
    return index


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
        # The comparison key, so "1,000" and "Yes!" are typed as the matcher will read them.
        answer_type = records.infer_answer_type(scoring.normalise_answer(answer))
    elif (answer_type == "number"
          and scoring.parse_number(scoring.normalise_answer(answer, "number")) is None):
        raise fail("answer", f"answer = {answer!r}: not a number, but answer_type is 'number'")
    elif answer_type == "yesno" and scoring.normalise_answer(answer, "yesno") not in ("yes", "no"):
        raise fail("answer", f"answer = {answer!r}: not yes/no, but answer_type is 'yesno'")

    return {**rec, "id": str(rid).strip(), "image": image.strip(), "question": question.strip(),
            "answer": answer, "answer_type": answer_type, "choices": choices,
            "answer_letter": letter, "category": category.strip()}


def read_benchmark(path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None,
                   *, load_images: bool = True, verify_images: bool = False,
                   on_bad_record: str = "error",
                   allow_outside_root: bool = False) -> tuple[list[dict[str, Any]], int]:
    """``load_benchmark`` that also returns the number of bad records skipped.

    Returns:
        ``(records, n_skipped)``; ``n_skipped`` is 0 in error mode.
    """
    records._check_on_bad_record(on_bad_record)
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    decode = load_images or verify_images
    out: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}
    n_skipped = 0
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                rec = records._parse_line(raw, path, line_no)
                if rec is None:
                    continue
                fail = _locator(path, line_no, records._id_for_message(rec))
                item = _validate(rec, fail)
                if item["id"] in first_line:
                    raise fail("id", f"duplicate id, first seen on line {first_line[item['id']]}")
                image_path = records.resolve_image_path(root, item["image"], fail,
                                                        allow_outside_root)
                image, _ = records._read_image(image_path, decode, fail)
            except DataError as exc:
                if on_bad_record == "error":
                    raise
                n_skipped += 1
                logger.warning("skipping bad record: %s", exc)
                continue
            first_line[item["id"]] = line_no
            item.update(image_path=str(image_path), source_file=str(path), source_line=line_no)
            if load_images:
                item["image"] = image
            out.append(item)
    if not out:
        raise records._no_records(path, n_skipped)
    if n_skipped:
        logger.warning("%s: skipped %d bad record(s), kept %d", path, n_skipped, len(out))
    return out, n_skipped


def load_benchmark(path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None,
                   *, load_images: bool = True, verify_images: bool = False,
                   on_bad_record: str = "error",
                   allow_outside_root: bool = False) -> list[dict[str, Any]]:
    """Load and validate a benchmark JSONL file (format in the module docstring).

    Args:
        path: the JSONL file.
        image_root: folder the ``image`` paths are relative to (default: ``path``'s folder).
        load_images: True puts the decoded RGB image in ``image``; False keeps the relative path
            there (``evaluate_benchmark`` decodes per batch) and reads only each image's header,
            unless ``verify_images``.
        verify_images: with ``load_images`` False, still decode every image once (a truncated
            one is a bad record) without keeping it: what a run needs before the model loads.
        on_bad_record: ``"error"`` raises on the first bad record; ``"skip"`` warns, skips it
            and counts it (``read_benchmark`` returns the count).
        allow_outside_root: allow image paths that lead outside ``image_root`` (absolute, ``..``,
            symlinks); by default such a record is bad (``records.resolve_image_path``).

    Returns:
        One dict per record, in file order, with every key of the line plus: ``id`` (str),
        ``answer`` (str; for multiple choice the correct choice's text), ``answer_type``,
        ``choices`` (list or None), ``answer_letter`` (``"A"``... or None), ``category``,
        ``image_path`` (absolute), ``source_file`` and ``source_line`` (1-based line number).

    Raises:
        DataError: invalid JSON, a line that is not an object, a missing or wrong-typed key,
            a duplicate id, a missing or unreadable image or one outside the image root, bad
            choices, an answer that is not among the choices (error mode), or a file without
            any valid record (either mode); the message names the file, the line, the record
            id when known and the key.
        FileNotFoundError: ``path`` does not exist.
    """
    return read_benchmark(path, image_root, load_images=load_images, verify_images=verify_images,
                          on_bad_record=on_bad_record, allow_outside_root=allow_outside_root)[0]


# --- scoring ------------------------------------------------------------------------------


def _mean(values: Sequence[bool | float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def score_predictions(recs: Sequence[Mapping[str, Any]],
                      predictions: Mapping[str, str | None]) -> dict[str, Any]:
    """Score raw model responses against the records.

    Each response is parsed with ``prompting.parse_answer`` and compared with the record's
    answer by ``scoring.answers_match`` (the record's ``answer_type`` and ``choices``, so a
    letter and the choice's text both count); an unparsable or missing response scores 0.
    ``format_rate`` is the share of responses that are well formed
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
        n_missing += rid not in by_id
        per_record.append(score_record(rec, by_id.get(rid)))
    if n_missing:
        logger.warning("%d of %d record(s) have no response; scored as wrong",
                       n_missing, len(per_record))
    correct = [r["correct"] for r in per_record]
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in per_record:
        groups[r["category"]].append(r["correct"])
    ci = scoring.bootstrap_ci(np.asarray(correct, dtype=float))
    return {
        "accuracy": _mean(correct),
        "accuracy_ci": [ci.lo, ci.hi],
        "n": len(per_record),
        "n_correct": int(sum(correct)),
        "format_rate": _mean([r["well_formed"] for r in per_record]),
        "n_unparsable": sum(r["pred"] is None for r in per_record),
        "n_missing": n_missing,
        "by_category": {cat: {"accuracy": _mean(v), "n": len(v)}
                        for cat, v in sorted(groups.items())},
        "per_record": per_record,
    }


def score_record(rec: Mapping[str, Any], response: str | None) -> dict[str, Any]:
    """One row of ``per_record``: ``id``, ``category``, ``pred``, ``answer``, ``correct``,
    ``well_formed``, ``response``."""
    pred = prompting.parse_answer(response)
    return {
        "id": str(rec["id"]), "category": rec.get("category", DEFAULT_CATEGORY), "pred": pred,
        "answer": rec["answer"],
        "correct": scoring.answers_match(pred, rec["answer"], rec.get("answer_type"),
                                         rec.get("choices")),
        "well_formed": prompting.is_well_formed(response), "response": response,
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
                       batch_size: int = 16, max_new_tokens: int = 64,
                       on_batch: Callable[[Sequence[Mapping[str, Any]], Sequence[str]], None]
                       | None = None) -> dict[str, str]:
    """Greedy responses to the records with the project's prompt (``batching.encode_batch``).

    Args:
        model: a Qwen2.5-VL with the ``<Focus>`` tokens (inputs go to its device).
        processor: its processor.
        recs: records from ``load_benchmark`` (images decoded or not).
        batch_size: records per ``generate`` call.
        max_new_tokens: generation limit per response.
        on_batch: called with each batch's records and responses as soon as they are known.

    Returns:
        Record id -> response text (tags kept, ``<|im_end|>`` cut).
    """
    model.eval()
    out: dict[str, str] = {}
    with progress.bar(total=len(recs), desc="benchmark", unit="q") as bar:
        for start in range(0, len(recs), batch_size):
            chunk = recs[start:start + batch_size]
            rows = [{"id": r["id"], "image": _record_image(r), "question": question_text(r),
                     "answer": r["answer"], "evidence_boxes": [], "meta": {}} for r in chunk]
            _, texts = evaluation.generate_greedy(model, processor, rows, max_new_tokens)
            out.update(zip((str(r["id"]) for r in chunk), texts, strict=True))
            if on_batch is not None:
                on_batch(chunk, texts)
            bar.update(len(chunk))
    return out


def partial_results_path(out_path: str | os.PathLike[str]) -> Path:
    """Where the per-record rows of a run writing ``out_path`` are appended as they come:
    ``runs/x/bench.json`` -> ``runs/x/bench.records.jsonl``."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.records.jsonl")


class _RowAppender:
    """Appends ``score_record`` rows to a JSONL file, flushed and fsynced per batch."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        repro.atomic_write_text(self.path, "")  # a new run starts a new file

    def __call__(self, chunk: Sequence[Mapping[str, Any]], texts: Sequence[str]) -> None:
        lines = "".join(json.dumps(score_record(r, t)) + "\n"
                        for r, t in zip(chunk, texts, strict=True))
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())


def evaluate_records(model: Any, processor: Any, recs: Sequence[Mapping[str, Any]],
                     batch_size: int = 16, max_new_tokens: int = 64, n: int = 0,
                     partial_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Generate greedy answers for the first ``n`` records (all if 0) and score them.

    Args:
        partial_path: if given, each answered record's row (``score_record``) is appended there
            as its batch finishes (the file is started anew), so a crash keeps what was done.

    Returns:
        ``score_predictions``'s dict plus ``decoding`` (``greedy``, ``max_new_tokens``,
        ``batch_size``) and ``generation_time_s``.
    """
    if n < 0 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"need n >= 0, batch_size >= 1 and max_new_tokens >= 1, got n={n}, "
                         f"batch_size={batch_size}, max_new_tokens={max_new_tokens}")
    recs = list(recs[:n] if n else recs)
    on_batch = _RowAppender(partial_path) if partial_path is not None else None
    t0 = time.perf_counter()
    responses = generate_responses(model, processor, recs, batch_size, max_new_tokens, on_batch)
    elapsed = time.perf_counter() - t0
    return {"decoding": {"greedy": True, "max_new_tokens": max_new_tokens,
                         "batch_size": batch_size},
            "generation_time_s": elapsed, **score_predictions(recs, responses)}


def _with_source(result: dict[str, Any], path: str | os.PathLike[str],
                 image_root: str | os.PathLike[str] | None, n_in_file: int,
                 n_skipped: int = 0) -> dict[str, Any]:
    return {"file": str(path), "image_root": None if image_root is None else str(image_root),
            "n_in_file": n_in_file, "n_skipped": n_skipped, **result}


@dataclass(frozen=True)
class Reading:
    """How ``evaluate_benchmark`` reads the JSONL file and its images (``load_benchmark``)."""

    image_root: str | os.PathLike[str] | None = None
    """Folder the image paths are relative to (None: the file's folder)."""
    on_bad_record: OnBadRecord = "error"
    """``"error"`` raises on the first bad record; ``"skip"`` skips and counts it."""
    allow_outside_root: bool = False
    """Allow image paths outside ``image_root``."""


def evaluate_benchmark(model: Any, processor: Any, path: str | os.PathLike[str],
                       reading: Reading | None = None, batch_size: int = 16,
                       max_new_tokens: int = 64, n: int = 0,
                       out_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Load a benchmark file, answer it greedily and score the answers.

    Every image is decoded once before the first question is asked (a truncated one fails,
    or is skipped, at once), then again batch by batch, so large benchmarks do not sit in
    memory.

    Args:
        model: a Qwen2.5-VL with the ``<Focus>`` tokens (a saved backbone or trained stage).
        processor: its processor.
        path: the benchmark JSONL.
        reading: the image root and what to do with bad records (default: ``Reading()``).
        batch_size: records per ``generate`` call.
        max_new_tokens: generation limit per response.
        n: evaluate only the first ``n`` records (0: all).
        out_path: if given, the result is also written there as JSON (atomically), and the
            per-record rows are appended to ``partial_results_path(out_path)`` as they come.

    Returns:
        ``file``, ``image_root``, ``n_in_file`` (valid records), ``n_skipped`` (bad records
        skipped), ``decoding``, ``generation_time_s`` and the fields of ``score_predictions``.

    Raises:
        DataError: a malformed line or image (named by file, line, record and key).
    """
    reading = reading or Reading()
    recs, skipped = read_benchmark(path, reading.image_root, load_images=False,
                                   verify_images=True, on_bad_record=reading.on_bad_record,
                                   allow_outside_root=reading.allow_outside_root)
    partial = partial_results_path(out_path) if out_path is not None else None
    result = _with_source(
        evaluate_records(model, processor, recs, batch_size, max_new_tokens, n, partial),
        path, reading.image_root, len(recs), skipped)
    if out_path is not None:
        repro.atomic_write_json(out_path, result)
    return result


# --- command line -------------------------------------------------------------------------


_MAKERS = {
    "backbone": ("02_backbone", "backbone"),
    "anchor": ("03_anchoring", "anchor"),
    "rl": ("04_counterfactual_rl", "rl"),
}
"""Run-folder stage -> (the notebook that trains it, the CLI command)."""

_RUN_NAME = re.compile(r"(?P<variant>.+?)(?:_seed(?P<seed>\d+))?(?:_n(?P<n>\d+))?")


def missing_model_message(folder: str | os.PathLike[str]) -> str:
    """What to run to make the model a ``--model`` folder without ``config.json`` should hold.

    A run folder's model (``runs/<profile>/backbone/model``,
    ``runs/<profile>/<anchor|rl>/<variant>[_seed<k>][_n<prompts>]/model``) names the notebook
    and the command of its stage; any other folder gets the layout of those.
    """
    path = Path(folder)
    if path.name != "model" and (path / "model" / "config.json").exists():
        return f"no model at {path}: its trained model is in {path / 'model'}"
    parts = path.parts
    where = None
    if len(parts) >= 3 and parts[-1] == "model" and parts[-2] == "backbone":
        where = (parts[-3], "backbone", None)
    elif len(parts) >= 4 and parts[-1] == "model" and parts[-3] in ("anchor", "rl"):
        where = (parts[-4], parts[-3], parts[-2])
    if where is None:
        return (f"no backbone or trained model at {path} (no config.json): --model is a "
                f"saved model folder, e.g. "
                f"runs/tiny/rl/faithful/model, made by notebooks 02-04 or "
                f"`python -m fmr1lib backbone|anchor|rl --params params/<profile>/...`")
    profile, stage, name = where
    notebook, command = _MAKERS[stage]
    cmd = f"python -m fmr1lib {command} --params params/{profile}/{notebook}.yaml"
    if name is not None:
        m = _RUN_NAME.fullmatch(name)
        cmd += f" --variants {m['variant']}"
        if m["seed"]:
            cmd += f" --set seed={m['seed']}"
        if m["n"] and stage == "rl":
            cmd += f" --set n_prompts={m['n']}"
    what = "backbone" if stage == "backbone" else "trained model"
    return (f"no {what} at {path} (no config.json): train it with notebooks/{notebook}.ipynb "
            f"(profile {profile}) or `{cmd}`")


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

    if not (Path(folder) / "config.json").exists():
        raise FileNotFoundError(missing_model_message(folder))
    params = config.load_params(config.ModelParams, {"dtype": dtype})
    model, processor = modeling.load_saved_backbone(folder, params)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor


def format_result(result: Mapping[str, Any]) -> str:
    """Overall accuracy with its interval and the per-category table, as text."""
    lo, hi = result["accuracy_ci"]
    skipped = result.get("n_skipped") or 0
    lines = [
        f"{result.get('file', 'benchmark')}: {result['n']} record(s)"
        + (f" ({skipped} bad record(s) skipped)" if skipped else ""),
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
    parser.add_argument("--out", default=None,
                        help="write the full result JSON here (and the per-record rows, as they "
                             "come, to <stem>.records.jsonl next to it)")
    parser.add_argument("--on-bad-record", default="error", choices=records.ON_BAD_RECORD,
                        help="error (default): stop at the first bad record; skip: skip and "
                             "count bad records")
    parser.add_argument("--allow-absolute-images", action="store_true",
                        help="allow image paths outside the image root (absolute, '..', "
                             "symlinks)")
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
        # The file is checked, every image decoded, before the (possibly large) model loads.
        recs, skipped = read_benchmark(args.file, args.image_root, load_images=False,
                                       verify_images=True, on_bad_record=args.on_bad_record,
                                       allow_outside_root=args.allow_absolute_images)
        model, processor = load_model(args.model, args.dtype, args.device)
        partial = partial_results_path(args.out) if args.out else None
        result = _with_source(
            evaluate_records(model, processor, recs, args.batch_size, args.max_new_tokens,
                             args.n, partial),
            args.file, args.image_root, len(recs), skipped)
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
