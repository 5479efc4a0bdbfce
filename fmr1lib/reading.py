"""Which region an answer reads: the instrument that validates the faithful reward (docs/design.md §6.6).

The faithful reward (``fmr1lib.faithful``) claims to prefer trajectories that *use* the evidence.
Whether it does is an empirical question, answered here with a causal measure that the method
itself never sees. For a trajectory ``y`` of a record whose ``meta`` names a shortcut region (the
FocusShapes cue), at the tokens ``A`` that spell the answer's first occurrence in ``y`` (where the
trajectory commits to its answer; ``answer_positions``), ``reading`` is the dependence of those
tokens on the evidence minus their dependence on the cue. Two measures of dependence
(``READINGS``):

    logprob:  d(R) = sum_{t in A} log pi(y_t | I, y<t) - log pi(y_t | I without R, y<t)
    kl:       d(R) = sum_{t in A} KL(pi(.|I, y<t) || pi(.|I without R, y<t))

    reading(y) = d(evidence) - d(cue)

Positive: the answer depends on the evidence more than on the cue; negative: cue-dependent.
``kl`` measures the *policy* at those positions, not the sampled answer: a cue answer drawn
from a policy that reads the evidence still has a large evidence KL. ``logprob`` follows the
sampled token and is the default because it passes the planted check (``validity.instrument_check``:
on records where the cue contradicts the answer, an answer equal to the cue's value must read
negative). Both removals use the reward's own intervention (``faithful.counterfactual_images``:
no padding, the record's seed). ``within_group_spearman`` then asks whether, among a group's
correct trajectories, the reward ranks them as ``reading`` does (``fmr1lib.validity``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from fmr1lib import batching, faithful, records
from fmr1lib.choices import Reading, options

READINGS = options(Reading)
"""How the dependence of the answer tokens on a region is measured (``reading_scores``)."""


class Trajectories(NamedTuple):
    """Trajectories of a batch that ``reading_scores`` reads."""

    selected: torch.Tensor
    """``[n_sel]`` sequence indices in the batch."""
    logits: torch.Tensor
    """``[n_sel, T, V]`` their eval-mode logits on ``I``."""
    answers: Sequence[str]
    """The answer each gave."""


def shortcut_boxes(row: dict[str, Any]) -> list[list[float]]:
    """The record's shortcut region from ``meta`` (FocusShapes: the cue patch or glyph; or a
    ``shortcut_boxes`` list in a JSONL record's meta); empty when it names none.

    >>> shortcut_boxes({"meta": '{"cue": {"box": [84, 84, 96, 96]}}'})
    [[84.0, 84.0, 96.0, 96.0]]
    >>> shortcut_boxes({"meta": {"cue": None}})
    []
    """
    meta = records.decode_meta(row.get("meta"))
    if meta.get("shortcut_boxes"):
        return [[float(v) for v in b] for b in meta["shortcut_boxes"]]
    cue = meta.get("cue")
    return [[float(v) for v in cue["box"]]] if cue and cue.get("box") else []


def answer_positions(pieces: Sequence[str], answer: str) -> list[int]:
    """Positions of the tokens that spell the first whole-word occurrence of ``answer``.

    Args:
        pieces: the completion's tokens, decoded one by one.
        answer: the answer the trajectory gave (or the reference answer).

    Returns:
        Token positions (empty when the answer does not occur).

    >>> answer_positions(["<think>", "the", " circle", " is", " red", "</think>", "<answer>", "red"], "red")
    [4]
    >>> answer_positions(["the", " reddish"], "red")
    []
    """
    text = "".join(pieces)
    m = re.search(rf"(?<![A-Za-z0-9]){re.escape(answer.strip())}(?![A-Za-z0-9])", text, re.I)
    if not answer.strip() or m is None:
        return []
    out, pos = [], 0
    for t, piece in enumerate(pieces):
        lo, hi = pos, pos + len(piece)
        if lo < m.end() and hi > m.start():
            out.append(t)
        pos = hi
    return out


@torch.no_grad()
def reading_scores(model: Any, processor: Any, batch: batching.SequenceBatch,
                   rows: Sequence[dict[str, Any]], chosen: Trajectories,
                   method: str = "background", temperature: float = 1.0,
                   how: Reading = "logprob") -> list[float]:
    """``reading`` of the ``selected`` trajectories of ``batch`` (NaN where it is undefined:
    no evidence boxes, no shortcut region, or the answer not spelled in the trajectory).

    Args:
        model: the policy (unwrapped), put in eval mode here.
        processor: its processor.
        batch: the sequences (groups of ``batch.group_size``; group ``g`` is ``rows[g]``).
        rows: one record per group.
        chosen: the selected trajectories, their eval-mode logits on ``I`` and answers.
        method: the intervention (the reward's, ``RewardParams.intervention``).
        temperature: the logits' temperature (as in ``logits_i``).
        how: ``logprob`` (the answer tokens' log-probability lost when the region is removed)
            or ``kl`` (the KL of the policy at those tokens; ``READINGS``).
    """
    if how not in READINGS:
        raise ValueError(f"unknown reading {how!r}; use one of {READINGS}")
    selected, logits_i, answers = chosen
    g_size = batch.group_size
    groups = [int(i) // g_size for i in selected.tolist()]
    used = sorted(set(groups))
    ok = {g: bool(rows[g]["evidence_boxes"]) and bool(shortcut_boxes(rows[g])) for g in used}
    keep = [g for g in used if ok[g]]
    out = [float("nan")] * len(groups)
    if not keep:
        return out
    image_of = torch.tensor([keep.index(g) if ok[g] else 0 for g in groups])
    t = batch.completion_ids.shape[1]
    kls = []
    mask = batch.completion_mask.index_select(0, selected)
    targets = batch.completion_ids.index_select(0, selected)
    lp_i = batching.token_logprobs(logits_i, targets, mask)
    for regions in ([rows[g]["evidence_boxes"] for g in keep], [shortcut_boxes(rows[g]) for g in keep]):
        pv, thw = faithful.counterfactual_pixels([rows[g] for g in keep], regions, processor, method)
        inputs = batching.select_sequences(batch.inputs, selected, pv, thw, image_of)
        with batching.eval_mode(model):
            logits = batching.completion_logits(model, inputs, t, temperature)
        if how == "kl":
            kls.append(faithful.visual_dependency(logits_i, logits, mask))
        else:  # the sampled tokens' log-probability lost when the region is removed
            kls.append(lp_i - batching.token_logprobs(logits, targets, mask))
    tok = processor.tokenizer
    for j, (g, i) in enumerate(zip(groups, selected.tolist(), strict=True)):
        if not ok[g]:
            continue
        n = int(batch.completion_mask[i].sum())
        pieces = [tok.decode([x], skip_special_tokens=False) for x in batch.completion_ids[i, :n].tolist()]
        pos = answer_positions(pieces, answers[j])
        if pos:
            out[j] = float(kls[0][j, pos].sum() - kls[1][j, pos].sum())
    return out


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant
    or fewer than two pairs are given.

    >>> rank_correlation([1, 2, 3], [10, 30, 20])
    0.5
    >>> import math; math.isnan(rank_correlation([1, 1], [1, 2]))
    True
    """
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size < 2 or a.size != b.size or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    return round(float(np.corrcoef(ra, rb)[0, 1]), 12)


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):
        tie = v == value
        ranks[tie] = ranks[tie].mean()
    return ranks


def within_group_spearman(scores: Sequence[float], readings: Sequence[float],
                          group_of: Sequence[int]) -> list[float]:
    """Per group, the rank correlation of ``scores`` with ``readings`` over its members whose
    reading is defined (groups where it is undefined are left out).

    >>> within_group_spearman([0.1, 0.9, 0.5, 0.2, 0.4], [-1.0, 2.0, 0.0, 3.0, 1.0], [0, 0, 0, 1, 1])
    [1.0, -1.0]
    """
    by: dict[int, list[tuple[float, float]]] = {}
    for s, r, g in zip(scores, readings, group_of, strict=True):
        if np.isfinite(r) and np.isfinite(s):
            by.setdefault(int(g), []).append((float(s), float(r)))
    out = []
    for g in sorted(by):
        rho = rank_correlation([p[0] for p in by[g]], [p[1] for p in by[g]])
        if np.isfinite(rho):
            out.append(rho)
    return out
