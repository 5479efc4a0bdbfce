"""Does the faithful reward measure faithful use? Reward candidates against ``reading`` (docs/design.md §6.6).

``measure`` samples ``G`` rollouts per prompt from a model along the stage-2 code path
(``grpo.rollout``, the teacher-forced forward with attention capture, ``faithful.counterfactual_view``),
computes the causal ``reading`` of every distinct correct trajectory (``fmr1lib.reading``), and
for each reward candidate (a ``config.RewardParams``) the within-group rank correlation of its
reward with ``reading``. A candidate measures faithful use when that correlation is positive on
models whose correct rollouts differ in what they read (``reading_spread``: the share of them that
are cue-dependent). ``scripts/reward_validity.py`` runs it over the study's models.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fmr1lib import attention, batching, faithful, grpo, prompting, reading, records, scoring
from fmr1lib.config import RewardParams


@torch.no_grad()
def measure(model: Any, processor: Any, rows: Sequence[dict[str, Any]], params: Any,
            candidates: Mapping[str, RewardParams], seed: int = 0,
            prompts_per_batch: int = 4, how: str = "logprob") -> dict[str, Any]:
    """Reward validity of each candidate on rollouts of ``model``.

    Args:
        model: the start policy (eval mode is set here).
        processor: its processor.
        rows: prompts (records whose meta names a shortcut region, with evidence boxes).
        params: ``RLParams`` (group size, temperature, intervention, reward layers).
        candidates: name -> the reward's settings.
        seed: torch seed of the rollouts.
        prompts_per_batch: prompts sampled per ``generate`` call.
        how: the reading (``reading.READINGS``).

    Returns:
        ``{"n_prompts", "n_correct", "n_distinct", "reading_spread", "readings",
        "candidates": {name: {"spearman_mean", "positive_share", "n_groups", "per_group"}}}``
        where ``reading_spread`` is the share of the distinct correct trajectories whose
        ``reading`` is negative (cue-dependent).
    """
    torch.manual_seed(seed)
    ctx = grpo.setup_grpo(model, processor, params, "faithful")
    per_group: dict[str, list[float]] = {name: [] for name in candidates}
    values: list[float] = []
    n_correct = 0
    for start in tqdm(range(0, len(rows), prompts_per_batch), desc="reward validity", leave=False):
        chunk = list(rows[start:start + prompts_per_batch])
        groups = grpo.rollout(ctx, chunk)
        n_correct += sum(sum(g.correct) for g in groups)
        distinct = [g.distinct_correct() if g.row["evidence_boxes"] else [] for g in groups]
        batch = batching.build_sequences(chunk, [g.tokens for g in groups], processor)
        with batching.eval_mode(model), attention.AttentionCapture(
                model, batch.query_positions, ctx.layers) as cap:
            logits = batching.completion_logits(model, batch.inputs, batch.completion_ids.shape[1],
                                                params.rollout.temperature)
        view = faithful.counterfactual_view(model, processor, batch, chunk, distinct, params.reward,
                                            "boxes", params.rollout.temperature)
        if view is None:
            continue
        sel = view.selected
        g_size = batch.group_size
        group_of = [start + int(i) // g_size for i in sel.tolist()]
        answers = [chunk[int(i) // g_size]["answer"] for i in sel.tolist()]
        r = reading.reading_scores(
            model, processor, batch, chunk,
            reading.Trajectories(sel, logits.index_select(0, sel), answers),
            params.reward.intervention, params.rollout.temperature, how)
        values += r
        for name, settings in candidates.items():
            rewards = faithful.faithful_rewards(view, batch, logits, cap.attentions, settings).rewards
            scores = [rewards[c[0]] for c in view.copies]
            per_group[name] += reading.within_group_spearman(scores, r, group_of)
    finite = [v for v in values if np.isfinite(v)]
    return {
        "n_prompts": len(rows), "n_correct": n_correct, "n_distinct": len(values),
        "reading_spread": float(np.mean([v < 0 for v in finite])) if finite else float("nan"),
        "readings": values,
        "candidates": {name: summarise(v) for name, v in per_group.items()},
    }


def summarise(per_group: Sequence[float]) -> dict[str, Any]:
    """Mean within-group correlation, the share of groups where it is positive, their number.

    >>> summarise([0.5, -0.5, 1.0])["positive_share"]
    0.6666666666666666
    """
    v = [float(x) for x in per_group]
    return {"spearman_mean": float(np.mean(v)) if v else float("nan"),
            "positive_share": float(np.mean([x > 0 for x in v])) if v else float("nan"),
            "n_groups": len(v), "per_group": v}


@torch.no_grad()
def instrument_check(model: Any, processor: Any, rows: Sequence[dict[str, Any]], params: Any,
                     seed: int = 0, prompts_per_batch: int = 4,
                     how: str = "logprob") -> dict[str, Any]:
    """Whether ``reading`` tells which region an answer came from, where the answer says it.

    On records whose cue contradicts the answer (``meta.shortcut_agrees`` false), a sampled
    answer equal to the evidence's value was read from the evidence, one equal to the cue's
    value from the cue: a planted effect. ``reading`` should be positive on the first and
    negative on the second.

    Returns:
        ``{"n_evidence", "n_cue", "evidence_positive", "cue_negative", "agreement"}``: counts of
        distinct trajectories answering each way, the share of each whose ``reading`` has the
        expected sign, and the share over both.
    """
    torch.manual_seed(seed)
    ctx = grpo.setup_grpo(model, processor, params, "faithful")
    signs: dict[str, list[bool]] = {"evidence": [], "cue": []}
    for start in tqdm(range(0, len(rows), prompts_per_batch), desc="instrument check", leave=False):
        chunk = list(rows[start:start + prompts_per_batch])
        groups = grpo.rollout(ctx, chunk)
        batch = batching.build_sequences(chunk, [g.tokens for g in groups], processor)
        picked, answers, source = [], [], []
        for gi, g in enumerate(groups):
            meta = records.decode_meta(g.row["meta"])
            cue_value = (meta.get("cue") or {}).get("value")
            seen: set[tuple[int, ...]] = set()
            for k, text in enumerate(g.texts):
                pred = prompting.parse_answer(text)
                key = tuple(g.tokens[k])
                if pred is None or key in seen or cue_value is None:
                    continue
                seen.add(key)
                for name, value in (("evidence", g.row["answer"]), ("cue", cue_value)):
                    if scoring.answers_match(pred, value):
                        picked.append(gi * batch.group_size + k)
                        answers.append(value)
                        source.append(name)
        if not picked:
            continue
        r = _readings(model, processor, batch, chunk, picked, answers, params, how)
        for name, v in zip(source, r, strict=True):
            if np.isfinite(v):
                signs[name].append(v > 0 if name == "evidence" else v < 0)
    both = signs["evidence"] + signs["cue"]

    def share(x: list[bool]) -> float:
        return float(np.mean(x)) if x else float("nan")

    return {"n_evidence": len(signs["evidence"]), "n_cue": len(signs["cue"]),
            "evidence_positive": share(signs["evidence"]), "cue_negative": share(signs["cue"]),
            "agreement": share(both)}


@torch.no_grad()
def example_pair(model: Any, processor: Any, rows: Sequence[dict[str, Any]], params: Any,
                 seed: int = 0, prompts_per_batch: int = 4) -> dict[str, Any] | None:
    """Two sampled correct trajectories of one prompt whose ``reading`` differs most: the worked
    example of notebook 04 (the profile's own reasoning, as the model writes it).

    Returns:
        ``{"row", "completions": [higher reading, lower reading], "readings"}``, or None when no
        prompt had two distinct correct trajectories with a defined reading.
    """
    best: dict[str, Any] | None = None
    for scored in _sampled_readings(model, processor, rows, params, seed, prompts_per_batch):
        for g, pairs in scored:
            mine = [(v, k) for v, k in pairs if np.isfinite(v)]
            if len(mine) < 2:
                continue
            (lo, k_lo), (hi, k_hi) = min(mine), max(mine)
            if best is None or hi - lo > best["readings"][0] - best["readings"][1]:
                best = {"row": g.row, "completions": [g.texts[k_hi], g.texts[k_lo]],
                        "readings": [hi, lo]}
        if best is not None and best["readings"][0] > 0 > best["readings"][1]:
            break  # one reads the evidence, the other the cue
    return best


def _sampled_readings(model: Any, processor: Any, rows: Sequence[dict[str, Any]], params: Any,
                      seed: int, prompts_per_batch: int
                      ) -> Iterator[list[tuple[grpo.Group, list[tuple[float, int]]]]]:
    """Per batch of prompts, each group with ``(reading, k)`` of its distinct correct rollouts
    (``k``: the first of the identical copies); ``G`` samples along the stage-2 code path, seeded."""
    torch.manual_seed(seed)
    ctx = grpo.setup_grpo(model, processor, params, "faithful")
    for start in range(0, len(rows), prompts_per_batch):
        chunk = list(rows[start:start + prompts_per_batch])
        groups = grpo.rollout(ctx, chunk)
        batch = batching.build_sequences(chunk, [g.tokens for g in groups], processor)
        g_size = batch.group_size
        picked = [gi * g_size + same[0] for gi, g in enumerate(groups)
                  for same in g.distinct_correct()]
        pairs: list[list[tuple[float, int]]] = [[] for _ in groups]
        if picked:
            answers = [chunk[i // g_size]["answer"] for i in picked]
            values = _readings(model, processor, batch, chunk, picked, answers, params)
            for i, v in zip(picked, values, strict=True):
                pairs[i // g_size].append((v, i % g_size))
        yield list(zip(groups, pairs, strict=True))


def _readings(model: Any, processor: Any, batch: batching.SequenceBatch,
              rows: Sequence[dict[str, Any]], picked: Sequence[int], answers: Sequence[str],
              params: Any, how: str = "logprob") -> list[float]:
    """``reading`` of the ``picked`` sequences of ``batch`` (their eval-mode logits on ``I`` first)."""
    sel = torch.tensor(list(picked))
    with batching.eval_mode(model):
        logits = batching.completion_logits(model, batching.select_sequences(batch.inputs, sel),
                                            batch.completion_ids.shape[1],
                                            params.rollout.temperature)
    return reading.reading_scores(model, processor, batch, rows,
                                  reading.Trajectories(sel, logits, answers),
                                  params.reward.intervention, params.rollout.temperature, how)


def reading_spread(groups: Sequence[Sequence[float]], threshold: float = 0.2) -> dict[str, Any]:
    """How much a start model's correct rollouts differ in what they read, and where.

    Args:
        groups: per prompt, the ``reading`` of each of its distinct correct rollouts.
        threshold: the share of mixed groups the faithful reward needs to have something to select.

    Returns:
        ``cue_share`` (share of all rollouts that are cue-dependent), ``mixed_share`` (share of the
        groups with at least two rollouts that hold both a cue-dependent and an evidence-dependent
        one: what GRPO can compare), ``within_var_share`` (within-group variance of ``reading`` over
        its total variance), ``n_groups``.

    >>> s = reading_spread([[-1.0, -1.1], [2.0, 2.1], [-0.5, 0.5]])
    >>> round(s["cue_share"], 2), round(s["mixed_share"], 2), s["n_groups"]
    (0.5, 0.33, 3)
    """
    groups = [[float(v) for v in g if np.isfinite(v)] for g in groups]
    values = np.array([v for g in groups for v in g], dtype=float)
    multi = [g for g in groups if len(g) >= 2]
    total = float(values.var()) if values.size else float("nan")
    within = float(np.mean([np.var(g) for g in multi])) if multi else float("nan")
    mixed = float(np.mean([min(g) < 0 < max(g) for g in multi])) if multi else float("nan")
    return {"cue_share": float(np.mean(values < 0)) if values.size else float("nan"),
            "mixed_share": mixed,
            "within_var_share": within / total if total > 0 else float("nan"),
            "n_groups": len(multi), "threshold": threshold}


@torch.no_grad()
def group_readings(model: Any, processor: Any, rows: Sequence[dict[str, Any]], params: Any,
                   seed: int = 0, prompts_per_batch: int = 4) -> list[list[float]]:
    """Per prompt, the ``reading`` of each distinct correct rollout of ``model`` (``G`` samples
    along the stage-2 code path; seeded)."""
    return [[v for v, _ in pairs]
            for scored in _sampled_readings(model, processor, rows, params, seed, prompts_per_batch)
            for _, pairs in scored]
