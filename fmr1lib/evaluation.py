"""Accuracy and faithfulness metrics (docs/design.md §8).

* answers: greedy decoding, accuracy, format rate, and how often the answer equals the
  shortcut cue (``cue_rate``) or, among wrong answers, equals it (``wrong_is_cue``);
* faithful perception: the ``<Focus>`` token's attention mass inside the evidence and the
  pointing game (its argmax image cell lies in the evidence);
* faithful use: accuracy on the evidence-intervened and control-intervened views, the
  faithfulness gap (drop under evidence intervention minus drop under control intervention),
  the answer tokens' attention mass inside the evidence, and perception-use consistency (the
  Focus points at the evidence *and* removing the evidence changes the answer);
* shortcut reliance: accuracy where the cue contradicts the answer.

Each metric applies where its inputs exist: examples without evidence boxes (unannotated JSONL
records) count for accuracy but not for the box-based metrics, examples without counterfactual
views not for the faithful-use ones, and examples whose ``meta`` names no shortcut cue (every
JSONL record) not for the cue metrics; ``coverage`` counts each group.

``evaluate_split`` gives one record per example; ``summarise`` turns them into means with
bootstrap 95% intervals (examples resampled jointly, so every metric sees the same resample);
``evaluate_model`` runs both on several splits and caches the result as JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmr1lib import (
    anchoring,
    attention,
    batching,
    data,
    faithful,
    modeling,
    progress,
    prompting,
    records,
    repro,
    scoring,
)

logger = logging.getLogger(__name__)


def _subset(ds: Any, n: int) -> Any:
    return ds if not n or n >= len(ds) else ds.select(range(n))


def _on_device(inputs: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def generate_greedy(model: Any, processor: Any, rows: Sequence[dict[str, Any]],
                    max_new_tokens: int = 24, image_column: str = "image"
                    ) -> tuple[list[list[int]], list[str]]:
    """Greedy completions of the project's prompt for ``rows`` (one batch, on the model's device).

    Args:
        rows: records with ``question``, ``evidence_boxes`` and the image in ``image_column``.

    Returns:
        ``(token ids per row, cut after <|im_end|>; texts as ``modeling.generate`` decodes them)``.
    """
    if image_column != "image":
        rows = [{**r, "image": r[image_column]} for r in rows]
    batch = batching.encode_batch(rows, processor, with_response=False)
    ids, texts = modeling.generate(model, processor, _on_device(batch.inputs, model),
                                   max_new_tokens=max_new_tokens)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [r[: r.index(eos) + 1] if eos in r else r for r in ids.tolist()], texts


@torch.no_grad()
def predict_answers(model: Any, processor: Any, ds: Any, n: int = 0, batch_size: int = 50,
                    max_new_tokens: int = 24, image_column: str = "image") -> list[dict[str, Any]]:
    """Greedy responses for the first ``n`` rows (all if 0), with parsed answers.

    Returns:
        One dict per row: ``id``, ``response``, ``pred`` (None if unparsable), ``answer``,
        ``correct``, ``well_formed``, ``cue`` (the shortcut value or None).
    """
    model.eval()
    ds = _subset(ds, n)
    out: list[dict[str, Any]] = []
    for start in progress.bar(range(0, len(ds), batch_size), desc="generate", leave=False):
        rows = [ds[i] for i in range(start, min(len(ds), start + batch_size))]
        _, texts = generate_greedy(model, processor, rows, max_new_tokens, image_column)
        for r, text in zip(rows, texts, strict=True):
            pred = prompting.parse_answer(text)
            meta = records.decode_meta(r["meta"])
            out.append({"id": r["id"], "response": text, "pred": pred, "answer": r["answer"],
                        "correct": scoring.answers_match(pred, r["answer"], r["answer_type"],
                                                         r.get("choices")),
                        "well_formed": prompting.is_well_formed(text),
                        "cue": meta.get("shortcut_value")})
    return out


def answer_metrics(preds: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy, format rate, cue rate and the share of wrong answers equal to the cue.

    >>> answer_metrics([{"correct": True, "well_formed": True, "pred": "red", "cue": "red"},
    ...                 {"correct": False, "well_formed": True, "pred": "blue", "cue": "blue"}])
    {'accuracy': 0.5, 'format_rate': 1.0, 'cue_rate': 1.0, 'wrong_is_cue': 1.0, 'n': 2}
    """
    if not preds:
        return {"accuracy": float("nan"), "format_rate": float("nan"), "cue_rate": float("nan"),
                "wrong_is_cue": float("nan"), "n": 0}
    cued = [p for p in preds if p.get("cue") is not None]
    wrong = [p for p in cued if not p["correct"]]
    return {
        "accuracy": float(np.mean([p["correct"] for p in preds])),
        "format_rate": float(np.mean([p["well_formed"] for p in preds])),
        "cue_rate": (float(np.mean([scoring.answers_match(p["pred"], p["cue"]) for p in cued]))
                     if cued else float("nan")),
        "wrong_is_cue": (float(np.mean([scoring.answers_match(p["pred"], p["cue"]) for p in wrong]))
                         if wrong else float("nan")),
        "n": len(preds),
    }


@torch.no_grad()
def focus_attention(model: Any, processor: Any, rows: Sequence[dict[str, Any]],
                    layers: Any = "last_half", batch_size: int = 50) -> list[dict[str, Any]]:
    """The ``<Focus>`` token's layer-averaged attention over each sample's image grid.

    Returns:
        Per row: ``grid`` (``[rows, cols]`` numpy, sums to 1), ``target`` (same shape, from
        the evidence boxes; zeros when there are none), ``id``.
    """
    model.eval()
    idx = attention.resolve_layers(layers, attention.num_text_layers(model))
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = list(rows[start:start + batch_size])
        batch = batching.encode_batch(chunk, processor, with_response=False)
        with attention.AttentionCapture(model, batch.focus_pos[:, None], layers=idx) as cap:
            model(**_on_device(batch.inputs, model))
        dists = anchoring.focus_distributions(cap.attentions, batch, image_token_id)
        out += focus_maps(chunk, dists, batch.inputs["image_grid_thw"])
    return out


def focus_maps(rows: Sequence[dict[str, Any]], dists: Sequence[torch.Tensor],
               grids: torch.Tensor) -> list[dict[str, Any]]:
    """Per row, its Focus distribution (``[n_layers, n_image_tokens]``) as a layer-averaged
    grid, with the evidence target on the same grid (``focus_attention``'s records)."""
    out = []
    for row, p, thw in zip(rows, dists, grids, strict=True):
        grid = attention.to_grid(p.mean(0), thw).cpu().numpy()
        target = modeling.boxes_to_grid([list(x) for x in row["evidence_boxes"]],
                                        row["image"].size, thw).numpy()
        out.append({"id": row["id"], "grid": grid, "target": target})
    return out


def perception_metrics(maps: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean Focus mass inside the evidence and pointing-game accuracy (rows with evidence).

    >>> g = np.array([[0.9, 0.1], [0.0, 0.0]]); t = np.array([[1.0, 0.0], [0.0, 0.0]])
    >>> perception_metrics([{"grid": g, "target": t}])
    {'focus_mass': 0.9, 'pointing': 1.0, 'n': 1}
    """
    scored = [mp for mp in map(mass_and_pointing, maps) if mp is not None]
    masses = [mass for mass, _ in scored]
    hits = [hit for _, hit in scored]
    if not masses:
        return {"focus_mass": float("nan"), "pointing": float("nan"), "n": 0}
    return {"focus_mass": float(np.mean(masses)), "pointing": float(np.mean(hits)), "n": len(masses)}


def mass_and_pointing(m: dict[str, Any]) -> tuple[float, bool] | None:
    """One map's Focus mass inside the evidence and whether its argmax cell is inside
    (None when the record has no evidence)."""
    inside = m["target"] > 0
    if not inside.any():
        return None
    return float(m["grid"][inside].sum()), bool(inside.flat[int(np.argmax(m["grid"]))])


def uniform_mass(maps: Sequence[dict[str, Any]]) -> float:
    """The Focus mass a uniform attention would put inside the evidence (the chance level)."""
    vals = [float((m["target"] > 0).mean()) for m in maps if (m["target"] > 0).any()]
    return float(np.mean(vals)) if vals else float("nan")


def cue_object_mass(maps: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Focus mass on the object coloured like the shortcut cue (FocusShapes colour questions).

    On ``test_ood`` the cue's colour differs from the answer; an attention that follows the
    cue's colour instead of the named shape lands on that object. Rows without such an object
    (or without a colour cue) are skipped.

    Returns:
        ``cue_object_mass`` (mean over the rows used), ``evidence_mass`` on the same rows, ``n``.
    """
    on_cue, on_evidence = [], []
    for m, row in zip(maps, rows, strict=True):
        meta = records.decode_meta(row["meta"])
        colour = meta.get("shortcut_color")
        objs = [o for o in meta.get("objects", []) if colour and o["color"] == colour]
        if not objs or m["grid"].ndim != 2:
            continue
        rows_, cols = m["grid"].shape
        thw = (1, 2 * rows_, 2 * cols)
        inside = modeling.boxes_to_grid([objs[0]["box"]], row["image"].size, thw).numpy() > 0
        on_cue.append(float(m["grid"][inside].sum()))
        on_evidence.append(float(m["grid"][m["target"] > 0].sum()))
    if not on_cue:
        return {"cue_object_mass": float("nan"), "evidence_mass": float("nan"), "n": 0}
    return {"cue_object_mass": float(np.mean(on_cue)), "evidence_mass": float(np.mean(on_evidence)),
            "n": len(on_cue)}


# --------------------------------------------------------------------------------------
# Faithful use: intervened views, answer-token attention, consistency
# --------------------------------------------------------------------------------------

METRICS: dict[str, str] = {
    "accuracy": "answer accuracy (greedy)",
    "format_rate": "share of well-formed responses",
    "focus_mass": "<Focus> attention mass inside the evidence",
    "pointing": "<Focus> argmax cell inside the evidence (pointing game)",
    "acc_evidence": "accuracy with the evidence intervened",
    "acc_control": "accuracy with a control region of the same size intervened",
    "drop_evidence": "accuracy drop when the evidence is intervened",
    "drop_control": "accuracy drop when the control region is intervened",
    "faithfulness_gap": "drop_evidence - drop_control",
    "answer_mass": "attention mass of the answer tokens inside the evidence",
    "consistency": "Focus points at the evidence and removing it changes the answer",
    "conflict_accuracy": "accuracy where the cue contradicts the answer",
    "cue_rate": "share of answers equal to the cue",
    "wrong_is_cue": "share of wrong answers equal to the cue",
}
"""Every metric ``summarise`` reports, with its meaning (the table's legend)."""


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def example_metrics(ex: dict[str, Any]) -> dict[str, float]:
    """The per-example value of every metric in :data:`METRICS` (NaN where it does not apply).

    ``ex`` is one record of :func:`evaluate_split`. The faithful-use values need both views
    (``correct_evidence``, ``correct_control``); ``conflict_accuracy`` needs a cue that
    contradicts the answer; ``wrong_is_cue`` a wrong answer and a cue.

    >>> m = example_metrics({"correct": True, "well_formed": True, "pred": "red", "cue": "blue",
    ...     "cue_agrees": False, "focus_mass": 0.8, "pointing": True, "pred_evidence": "blue",
    ...     "correct_evidence": False, "correct_control": True, "answer_mass": 0.5})
    >>> m["faithfulness_gap"], m["consistency"], m["conflict_accuracy"]
    (1.0, 1.0, 1.0)
    """
    nan = float("nan")
    correct = float(ex["correct"])
    cue = ex.get("cue")
    is_cue = scoring.answers_match(ex["pred"], cue)
    # Two missing answers are the same answer: removing the evidence changed nothing.
    changed = (ex.get("pred_evidence") != ex["pred"]
               and not scoring.answers_match(ex.get("pred_evidence"), ex["pred"]))
    has_views = ex.get("correct_evidence") is not None and ex.get("correct_control") is not None
    out = {
        "accuracy": correct,
        "format_rate": float(ex["well_formed"]),
        "focus_mass": _nan(ex.get("focus_mass")),
        "pointing": _nan(ex.get("pointing")),
        "acc_evidence": _nan(ex.get("correct_evidence")),
        "acc_control": _nan(ex.get("correct_control")),
        "drop_evidence": correct - float(ex["correct_evidence"]) if has_views else nan,
        "drop_control": correct - float(ex["correct_control"]) if has_views else nan,
        "faithfulness_gap": (float(ex["correct_control"]) - float(ex["correct_evidence"])
                             if has_views else nan),
        "answer_mass": _nan(ex.get("answer_mass")),
        "consistency": (float(bool(ex["pointing"]) and changed)
                        if has_views and ex.get("pointing") is not None else nan),
        "conflict_accuracy": correct if cue is not None and ex.get("cue_agrees") is False else nan,
        "cue_rate": float(is_cue) if cue is not None else nan,
        "wrong_is_cue": float(is_cue) if cue is not None and not ex["correct"] else nan,
    }
    return out


def summarise(examples: Sequence[dict[str, Any]], n_boot: int = 1000,
              seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean and bootstrap 95% interval of every metric over ``examples``.

    The examples are resampled jointly (``scoring.bootstrap_cis``: one index draw per bootstrap
    replicate serves every metric); a metric's mean in a replicate is over the examples where it
    applies.

    Returns:
        ``{metric: {"mean", "lo", "hi", "n"}}`` (``n``: examples where the metric applies).
    """
    names = list(METRICS)
    vals = np.array([[example_metrics(ex)[k] for k in names] for ex in examples],
                    dtype=float).reshape(len(examples), len(names))
    cis = scoring.bootstrap_cis(vals, n_boot=n_boot, seed=seed)
    return {k: {"mean": ci.mean, "lo": ci.lo, "hi": ci.hi, "n": ci.n}
            for k, ci in zip(names, cis, strict=True)}


def paired_difference(after: dict[str, Any], before: dict[str, Any], metric: str,
                      splits: Sequence[str], n_boot: int = 1000,
                      seed: int = 0) -> scoring.Interval:
    """Mean and bootstrap 95% interval of the per-example ``after - before`` of ``metric``.

    ``after`` and ``before`` are results of :func:`evaluate_model` for two models on the same
    data; the examples are paired by split and ``id``, and only those where the metric applies
    to both count (``n``). Pairing removes what the examples share (how hard each one is), so
    the interval is narrower than the two summaries' intervals side by side.

    Raises:
        ValueError: a split's two example lists hold different ids.

    >>> ex = lambda i, m: {"id": i, "correct": True, "well_formed": True, "pred": "red",
    ...                    "focus_mass": m}
    >>> a = {"splits": {"s": {"examples": [ex(1, 0.5), ex(2, 0.7)]}}}
    >>> b = {"splits": {"s": {"examples": [ex(1, 0.1), ex(2, 0.3)]}}}
    >>> paired_difference(a, b, "focus_mass", ["s"])
    Interval(mean=0.4, lo=0.4, hi=0.4, n=2)
    """
    diffs = []
    for split in splits:
        xs, ys = after["splits"][split]["examples"], before["splits"][split]["examples"]
        if [x["id"] for x in xs] != [y["id"] for y in ys]:
            raise ValueError(f"paired_difference: split {split!r}: the two results hold "
                             f"different examples")
        diffs += [example_metrics(x)[metric] - example_metrics(y)[metric]
                  for x, y in zip(xs, ys, strict=True)]
    ci = scoring.bootstrap_ci(np.round(diffs, 12), n_boot=n_boot, seed=seed)
    return scoring.Interval(round(ci.mean, 12), round(ci.lo, 12), round(ci.hi, 12), ci.n)


def coverage(examples: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many examples each group of metrics uses, and how many it skips.

    ``with_evidence`` / ``without_evidence``: the box-based metrics (``focus_mass``,
    ``pointing``, ``answer_mass``, ``consistency``) skip examples without evidence boxes;
    ``with_views`` / ``without_views``: the faithful-use metrics (``acc_evidence`` ...
    ``faithfulness_gap``, ``consistency``) skip examples without both counterfactual views;
    ``with_cue`` / ``without_cue``: the cue metrics (``conflict_accuracy``, ``cue_rate``,
    ``wrong_is_cue``) skip examples whose ``meta`` names no shortcut cue. Every example counts
    for ``accuracy`` and ``format_rate``.

    >>> coverage([{"has_evidence": True, "has_views": True, "cue": None},
    ...           {"has_evidence": False, "has_views": False, "cue": None}])["without_evidence"]
    1
    """
    n = len(examples)
    ev = sum(bool(ex.get("has_evidence")) for ex in examples)
    views = sum(ex.get("correct_evidence") is not None and ex.get("correct_control") is not None
                for ex in examples)
    cue = sum(ex.get("cue") is not None for ex in examples)
    return {"examples": n, "with_evidence": ev, "without_evidence": n - ev,
            "with_views": views, "without_views": n - views,
            "with_cue": cue, "without_cue": n - cue}


@torch.no_grad()
def answer_attention(model: Any, processor: Any, rows: Sequence[dict[str, Any]],
                     completions: Sequence[Sequence[int]], layers: Any = "last_half") -> list[float | None]:
    """Share of the answer tokens' image attention inside each row's evidence.

    One teacher-forced forward of prompt + generated completion. The query rows are those
    that *produce* the answer tokens (the tokens strictly between ``<answer>`` and
    ``</answer>``), head- and layer-averaged, restricted to the image tokens and renormalised;
    the value is their mean mass on the image tokens that overlap the evidence boxes.

    Returns:
        Per row, the mass, or None when the completion has no answer span or the row has no
        evidence boxes.
    """
    tok = processor.tokenizer
    open_id, close_id = (tok.convert_tokens_to_ids(t) for t in ("<answer>", "</answer>"))
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    spans = [batching.answer_span(toks, open_id, close_id) for toks in completions]
    out: list[float | None] = [None] * len(rows)
    keep = [i for i, (r, sp) in enumerate(zip(rows, spans, strict=True))
            if sp is not None and len(r["evidence_boxes"])]
    if not keep:
        return out
    batch = batching.build_sequences(
        [rows[i] for i in keep], [[list(completions[i])[: spans[i][1] + 1]] for i in keep],
        processor).to(next(model.parameters()).device)
    idx = attention.resolve_layers(layers, attention.num_text_layers(model))
    model.eval()
    with attention.AttentionCapture(model, batch.query_positions, idx) as cap:
        batching.completion_logits(model, batch.inputs, batch.completion_ids.shape[1])
    ids = batch.inputs["input_ids"]
    region = faithful.region_token_mask(ids, batching.sequence_grids(batch.inputs),
                                    [rows[i]["evidence_boxes"] for i in keep],
                                    [rows[i]["image"].size for i in keep], image_id)
    share = faithful.region_share(cap.attentions, region, attention.image_token_mask(ids, image_id))
    for j, i in enumerate(keep):
        a, b = spans[i]
        out[i] = float(share[j, a:b].mean())
    return out


@torch.no_grad()
def focus_and_answer_attention(model: Any, processor: Any, rows: Sequence[dict[str, Any]],
                               completions: Sequence[Sequence[int]], layers: Any = "last_half"
                               ) -> tuple[list[dict[str, Any]], list[float | None]]:
    """``focus_attention`` and ``answer_attention`` of ``rows`` from ONE teacher-forced forward.

    The forward is prompt + generated completion (cut after ``</answer>`` where there is one).
    Its first query row is the ``<Focus>`` position (the last prompt token: causal attention
    keeps it blind to the completion, so its row is the prompt-only forward's), the others the
    completion's; the answer rows are those strictly inside the answer span.

    Returns:
        ``(maps, answer_mass)`` as the two functions return them.
    """
    tok = processor.tokenizer
    open_id, close_id = (tok.convert_tokens_to_ids(t) for t in ("<answer>", "</answer>"))
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    spans = [batching.answer_span(toks, open_id, close_id) for toks in completions]
    cut = [list(c)[: sp[1] + 1] if sp is not None else list(c) for c, sp in zip(completions, spans, strict=True)]
    batch = batching.build_sequences(rows, [[c] for c in cut], processor).to(
        next(model.parameters()).device)
    idx = attention.resolve_layers(layers, attention.num_text_layers(model))
    model.eval()
    with attention.AttentionCapture(model, batch.query_positions, idx) as cap:
        batching.completion_logits(model, batch.inputs, batch.completion_ids.shape[1])
    ids = batch.inputs["input_ids"]
    grids = batching.sequence_grids(batch.inputs)
    focus = [r[:, 0, :] for r in attention.rows_over_image_tokens(cap.attentions[:, :, :1], ids, image_id)]
    maps = focus_maps(rows, focus, grids)
    region = faithful.region_token_mask(ids, grids, [r["evidence_boxes"] for r in rows],
                                        [r["image"].size for r in rows], image_id)
    share = faithful.region_share(cap.attentions, region, attention.image_token_mask(ids, image_id))
    mass: list[float | None] = [None] * len(rows)
    for i, (r, sp) in enumerate(zip(rows, spans, strict=True)):
        if sp is not None and len(r["evidence_boxes"]):
            mass[i] = float(share[i, sp[0]:sp[1]].mean())
    return maps, mass


def _batch_outputs(model: Any, processor: Any, rows: list[dict[str, Any]], with_views: list[int],
                   max_new_tokens: int, layers: Any, batched: bool
                   ) -> tuple[list[str], list[dict[str, Any]], list[float | None], dict[str, list[str]]]:
    """Greedy texts, Focus maps, answer masses and the views' greedy texts of one batch.

    ``batched``: the original and both intervened views in one generation call, and the Focus
    and answer rows from one teacher-forced forward (``focus_and_answer_attention``); else five
    passes (three generations, the prompt-only forward, the answer forward).
    """
    view_rows = {view: [{**rows[j], "image": rows[j][f"image_cf_{view}"]} for j in with_views]
                 for view in ("evidence", "control")}
    if batched:
        all_rows = rows + view_rows["evidence"] + view_rows["control"]
        toks, texts = generate_greedy(model, processor, all_rows, max_new_tokens)
        n, k = len(rows), len(with_views)
        views = {"evidence": texts[n:n + k], "control": texts[n + k:]}
        maps, mass = focus_and_answer_attention(model, processor, rows, toks[:n], layers)
        return texts[:n], maps, mass, views
    toks, texts = generate_greedy(model, processor, rows, max_new_tokens)
    maps = focus_attention(model, processor, rows, layers=layers, batch_size=len(rows))
    mass = answer_attention(model, processor, rows, toks, layers=layers)
    views = {view: generate_greedy(model, processor, vr, max_new_tokens)[1] if vr else []
             for view, vr in view_rows.items()}
    return texts, maps, mass, views


@dataclass(frozen=True)
class Settings:
    """How ``evaluate_split`` and ``evaluate_model`` evaluate a model."""

    n: int = 0
    """Evaluate the first ``n`` rows of a split (0: all)."""
    batch_size: int = 50
    """Rows per batch; like ``batched``, not part of ``evaluate_model``'s cache key
    (``_settings``)."""
    batched: bool = True
    """The three views of a batch in one generation call and one attention forward
    (``_batch_outputs``); False: five passes apart."""
    max_new_tokens: int = 24
    """Greedy generation limit per answer."""
    layers: Any = "last_half"
    """Text layers whose attention is read (``attention.resolve_layers``)."""
    views: bool = True
    """Also answer on the intervened views where the split carries them
    (``image_cf_evidence``, ``image_cf_control``)."""
    n_boot: int = 1000
    """Bootstrap replicates of ``summarise`` (``evaluate_model`` only)."""


@torch.no_grad()
def evaluate_split(model: Any, processor: Any, ds: Any, settings: Settings | None = None,
                   desc: str = "evaluate") -> list[dict[str, Any]]:
    """One record per example of the first ``settings.n`` rows of ``ds`` (all if 0).

    Greedy answers on the original image and, when ``settings.views`` and the split carries
    them (``image_cf_evidence``, ``image_cf_control``), on both intervened views of the rows
    that have them (``data.row_has_views``: evidence boxes and their controls); the Focus
    attention (mass inside the evidence, pointing); the answer tokens' attention mass.
    ``settings.batched`` (default) generates the three views of a batch in one call and reads
    the Focus and answer rows from one forward (``_batch_outputs``); False runs the five passes
    apart (the same records to float tolerance; ``bench/evaluation.py`` times both).

    Returns:
        Records with ``id``, ``answer``, ``response``, ``pred``, ``correct``, ``well_formed``,
        ``cue``, ``cue_agrees``, ``has_evidence``, ``has_views``, ``focus_mass``, ``pointing``,
        ``answer_mass`` and, with views, ``pred_evidence``, ``correct_evidence``,
        ``pred_control``, ``correct_control``.
    """
    settings = settings or Settings()
    model.eval()
    ds = _subset(ds, settings.n)
    has_views = settings.views and {"image_cf_evidence", "image_cf_control"} <= set(ds.column_names)
    out: list[dict[str, Any]] = []
    step = settings.batch_size
    for start in progress.bar(range(0, len(ds), step), desc=desc, leave=False):
        rows = [ds[i] for i in range(start, min(len(ds), start + step))]
        with_views = [j for j, r in enumerate(rows) if has_views and data.row_has_views(r)]
        texts, maps, ans_mass, view_texts = _batch_outputs(
            model, processor, rows, with_views, settings.max_new_tokens, settings.layers,
            settings.batched)
        view_preds = {view: {j: prompting.parse_answer(t)
                             for j, t in zip(with_views, vt, strict=True)}
                      for view, vt in view_texts.items() if with_views}
        for j, (r, text) in enumerate(zip(rows, texts, strict=True)):
            pred = prompting.parse_answer(text)
            meta = records.decode_meta(r["meta"])
            mp = mass_and_pointing(maps[j])
            kind, options = r.get("answer_type") or "word", r.get("choices")
            ex = {"id": r["id"], "answer": r["answer"], "response": text, "pred": pred,
                  "correct": scoring.answers_match(pred, r["answer"], kind, options),
                  "well_formed": prompting.is_well_formed(text),
                  "cue": meta.get("shortcut_value"),
                  "cue_agrees": meta.get("shortcut_agrees"),
                  "has_evidence": bool(len(r["evidence_boxes"])),
                  "has_views": j in with_views,
                  "focus_mass": mp[0] if mp else None,
                  "pointing": mp[1] if mp else None,
                  "answer_mass": ans_mass[j]}
            for view, preds in view_preds.items():
                if j not in preds:
                    continue
                ex[f"pred_{view}"] = preds[j]
                ex[f"correct_{view}"] = scoring.answers_match(preds[j], r["answer"], kind,
                                                              options)
            out.append(ex)
    return out


def model_fingerprint(folder: str | Path) -> str:
    """A short hash of a saved model folder: file contents up to 64 MB, name+size+mtime above."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*")):
        if not f.is_file():
            continue
        h.update(str(f.relative_to(folder)).encode())
        st = f.stat()
        if st.st_size <= 64 * 2**20:
            h.update(f.read_bytes())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _settings(splits: Sequence[str], settings: Settings) -> dict[str, Any]:
    """What an evaluation result depends on besides the model (the cache key)."""
    s = settings
    return {"splits": list(splits), "n": s.n, "decoding": "greedy",
            "max_new_tokens": s.max_new_tokens, "layers": s.layers, "n_boot": s.n_boot,
            "views": s.views}


def _read_cached(path: Path, fingerprint: str | None, settings: dict[str, Any]) -> dict[str, Any] | None:
    if fingerprint is None or not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if old.get("fingerprint") == fingerprint and old.get("settings") == settings and all(
            "counts" in s for s in old.get("splits", {}).values()):
        return old
    return None


def evaluate_model(model: Any, processor: Any, dsd: Any, splits: Sequence[str], out_path: str | Path,
                   settings: Settings | None = None, fingerprint: str | None = None,
                   name: str = "") -> dict[str, Any]:
    """Evaluate one model on ``splits`` and write ``out_path`` (JSON), or reuse it.

    The JSON holds the settings (decoding, ``n``, layers, bootstrap, views), the model's
    ``fingerprint``, and per split the summary of :func:`summarise`, the example counts of
    :func:`coverage` and the per-example records. A file whose fingerprint and settings equal
    this call's is returned as is.

    Returns:
        ``{"name", "fingerprint", "settings", "splits": {split: {"summary", "counts",
        "examples"}}}``.
    """
    out_path = Path(out_path)
    settings = settings or Settings()
    key = _settings(splits, settings)
    cached = _read_cached(out_path, fingerprint, key)
    if cached is not None:
        return cached
    result: dict[str, Any] = {"name": name, "fingerprint": fingerprint, "settings": key,
                              "splits": {}}
    for split in splits:
        examples = evaluate_split(model, processor, dsd[split], settings,
                                  desc=f"{name or 'evaluate'} {split}")
        counts = coverage(examples)
        skipped = {k: v for k, v in counts.items() if k.startswith("without_") and v}
        if skipped:
            logger.info("%s %s: of %d examples, skipped by the metrics that need them: %s",
                        name or "evaluate", split, counts["examples"], skipped)
        result["splits"][split] = {"summary": summarise(examples, n_boot=settings.n_boot),
                                   "counts": counts, "examples": examples}
    repro.atomic_write_json(out_path, result)
    return result


def evaluate_saved(folder: str | Path, model_params: Any, dsd: Any, splits: Sequence[str],
                   out_path: str | Path, settings: Settings | None = None,
                   name: str = "") -> dict[str, Any]:
    """:func:`evaluate_model` for a saved model folder; the model is loaded only on a cache miss.

    Args:
        folder: a folder written by ``modeling.save_backbone``.
        model_params: ``ModelParams`` (dtype, attention implementation) to load it with.
        settings, name: as for :func:`evaluate_model`.
    """
    settings = settings or Settings()
    fingerprint = model_fingerprint(folder)
    cached = _read_cached(Path(out_path), fingerprint, _settings(splits, settings))
    if cached is not None:
        return cached
    model, processor = modeling.load_saved_backbone(folder, model_params)
    return evaluate_model(model, processor, dsd, splits, out_path, settings,
                          fingerprint=fingerprint, name=name)


def format_ci(stat: dict[str, float], digits: int = 2) -> str:
    """``"0.81 [0.74, 0.88]"`` from a summary entry (``"–"`` when undefined)."""
    if stat is None or math.isnan(stat.get("mean", float("nan"))):
        return "–"
    return f"{stat['mean']:.{digits}f} [{stat['lo']:.{digits}f}, {stat['hi']:.{digits}f}]"
