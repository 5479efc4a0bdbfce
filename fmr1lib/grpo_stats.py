"""What a GRPO step logs: the per-step lists ``grpo.grpo_step`` fills, and the metrics and sample
completions made of them (``grpo.train_grpo`` lists the metrics)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fmr1lib import prompting

IS_KEYS = ("sampler_logp_gap", "sampler_logp_gap_max", "is_ratio_mean", "is_ratio_min",
           "is_ratio_max", "is_capped_frac")
"""The sampler-mismatch statistics (``rollouts.importance_weights``), logged only by a sampler that
returns its log-probs (``rollout_backend: vllm``)."""


@dataclass
class StepLog:
    """Per-step lists of the quantities ``step_stats`` averages, and the timings."""

    lists: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in (
        "concentration", "s_t", "share", "clip_frac", "clip_low_frac", "clip_high_frac",
        "ratio_mean", "kl", "entropy", "loss", "attn_rl", "distinct", "reading", "reading_cue",
        "reading_spearman", *IS_KEYS)})
    faithful_s: float = 0.0

    def add(self, stats: dict[str, Any]) -> None:
        for k, v in stats.items():
            if k in self.lists and not (isinstance(v, float) and math.isnan(v)):
                self.lists[k].append(v)





def std(x: Sequence[float]) -> float | None:
    return float(np.std(x)) if len(x) else None


def mean(x: Sequence[float | None]) -> float | None:
    vals = [v for v in x if v is not None]
    return float(np.mean(vals)) if vals else None


def route_shares(texts: Sequence[str]) -> dict[str, float | None]:
    """Share of the completions whose reasoning takes each route (``prompting.response_route``):
    ``route_cue`` and ``route_evidence``; the rest have neither form.

    >>> route_shares(["<think>the corner patch is red</think><answer>red</answer>", "x"])
    {'route_cue': 0.5, 'route_evidence': 0.0}
    """
    if not texts:
        return {f"route_{r}": None for r in prompting.ROUTES[::-1]}
    shares = prompting.route_shares(texts)
    return {f"route_{r}": shares[r] for r in prompting.ROUTES[::-1]}


def step_stats(ctx: Any, groups: Sequence[Any], chunks: Sequence[Any], log: StepLog) -> dict[str, Any]:
    """The metrics of one step (``grpo.train_grpo`` lists them) from its groups, chunks and log."""
    g_size = ctx.params.rollout.group_size
    overall = [r for c in chunks for r in c.overall or []]
    faith = [r for c in chunks for r in c.faithful or []]
    acc_r = [r for g in groups for r in g.accuracy]
    fmt_r = [r for g in groups for r in g.format]
    faith_groups = [faith[i * g_size:(i + 1) * g_size] for i in range(len(groups))]
    faith_correct = [[f for f, ok in zip(fg, g.correct, strict=True) if ok]
                     for fg, g in zip(faith_groups, groups, strict=True)]
    ls = log.lists
    stats: dict[str, Any] = {
        "reward_mean": mean(overall), "reward_std": std(overall),
        "accuracy": mean(acc_r), "accuracy_std": std(acc_r),
        "format": mean(fmt_r), "format_std": std(fmt_r),
        "faithful_mean": mean(faith), "faithful_std": std(faith),
        "faithful_group_std": mean([std(fg) for fg in faith_groups]),
        "faithful_group_std_correct": mean([std(fc) for fc in faith_correct if len(fc) >= 2]),
        "completion_len": mean([len(t) for g in groups for t in g.tokens]),
        **route_shares([t for g in groups for t in g.texts]),
        "vision_token_rate": mean([0.0 if ok else 1.0 for g in groups for ok in g.ok]),
        "concentration": mean(ls["concentration"]), "s_t_mean": mean(ls["s_t"]),
        "region_share": mean(ls["share"]),
        "n_faithful_scored": len(ls["concentration"]), "n_faithful_distinct": len(ls["distinct"]),
        **{k: mean(ls[k]) for k in ("clip_frac", "clip_high_frac", "clip_low_frac",
                                     "ratio_mean", "kl", "entropy")},
        "loss": sum(ls["loss"]) / max(1, ctx.params.loss.num_iterations),
        "attn_rl_loss": mean(ls["attn_rl"]),
        # The reward-validity diagnostic (fmr1lib.reading): mean reading of the scored distinct
        # trajectories, the share of them that are cue-dependent, and the within-group rank
        # correlation of the faithful reward with reading (mean over groups, and their number).
        "reading": mean(ls["reading"]), "reading_cue_share": mean(ls["reading_cue"]),
        "reward_reading_spearman": mean(ls["reading_spearman"]),
        "reward_reading_groups": len(ls["reading_spearman"]),
        "reward_reading_positive": mean([float(v > 0) for v in ls["reading_spearman"]]),
    }
    if ls["sampler_logp_gap"]:
        stats.update(sampler_stats(ls))
    return stats


def sampler_stats(lists: dict[str, list[float]]) -> dict[str, float]:
    """The step's sampler-mismatch metrics from its chunks' ``IS_KEYS`` lists: the largest of the
    maxima, the smallest of the minima, the mean of the rest.

    >>> sampler_stats({"sampler_logp_gap": [0.1, 0.3], "sampler_logp_gap_max": [0.5, 0.9],
    ...                "is_ratio_mean": [1.0, 1.2], "is_ratio_min": [0.9, 0.8],
    ...                "is_ratio_max": [1.1, 1.5], "is_capped_frac": [0.0, 0.5]})["is_ratio_max"]
    1.5
    """
    pick = {"sampler_logp_gap_max": max, "is_ratio_max": max, "is_ratio_min": min}
    return {k: float(pick.get(k, np.mean)(lists[k])) for k in IS_KEYS if lists[k]}


def samples(groups: Sequence[Any], chunks: Sequence[Any], n_show: int) -> list[dict[str, Any]]:
    """The first ``n_show`` completions with their rewards."""
    overall = [r for c in chunks for r in c.overall or []]
    faith = [r for c in chunks for r in c.faithful or []]
    flat = [(g, k) for g in groups for k in range(len(g.tokens))][:n_show]
    return [{"id": g.row.get("id", ""), "question": g.row["question"], "answer": g.row["answer"],
             "completion": g.texts[k], "accuracy": g.accuracy[k], "format": g.format[k],
             "faithful": faith[i], "overall": overall[i]} for i, (g, k) in enumerate(flat)]
