"""The ablation table over seeds and the data-efficiency curve (notebook 05, docs/design.md §8.2-8.3).

Every row of the table is one trained model per seed, made by the stage functions of notebooks
02-04 with the parameter files those notebooks use; only ``seed`` (and, for the data-efficiency
runs, ``n_prompts``) changes. A run that finished with exactly these parameters (for seed 0:
the runs of notebooks 03 and 04) is reused (``stages.is_complete``: its completion marker names
their hash); one made with other parameters, or killed or stopped early, is retrained. The
stage-0 backbone is one model shared by every seed (its row varies only through the bootstrap).

Evaluations go through ``evaluation.evaluate_saved``: one JSON per model under
``runs/<profile>/eval/``, reused while the model's files and the evaluation settings are unchanged.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fmr1lib import config, evaluation, repro, stages
from fmr1lib.stages import ROWS

logger = logging.getLogger(__name__)

ROW_LABELS: dict[str, str] = config.ABLATION_ROW_LABELS
"""How the table names each row."""

TABLE_METRICS: tuple[str, ...] = (
    "accuracy", "focus_mass", "pointing", "acc_evidence", "acc_control", "faithfulness_gap",
    "answer_mass", "consistency", "conflict_accuracy", "wrong_is_cue", "format_rate",
)
"""Metrics shown in the markdown table (the CSV holds every metric of ``evaluation.METRICS``)."""

# --------------------------------------------------------------------------------------
# Evaluations per run
# --------------------------------------------------------------------------------------


def evaluate_folder(p: Any, folder: str | Path, name: str, dsd: Any,
                    splits: Sequence[str] = ("test_id", "test_ood"), layers: Any = "last_half",
                    n_boot: int = 1000, model_params: Any = None) -> dict[str, Any]:
    """Evaluate (or reuse the cached evaluation of) the saved model in ``folder``.

    ``p`` gives the profile, the run root and the evaluation settings (``eval_n``,
    ``eval_batch_size``, ``max_new_tokens``): notebooks 03-05 evaluate with the same settings,
    so notebook 05 reuses the evaluations of 03 and 04. The JSON is
    ``runs/<profile>/eval/<name>.json``.

    Returns:
        The result of ``evaluation.evaluate_model``.
    """
    return evaluation.evaluate_saved(
        folder, model_params if model_params is not None else p, dsd, list(splits),
        stages.eval_path(p, name), n=p.eval_n, batch_size=p.eval_batch_size,
        max_new_tokens=p.max_new_tokens, layers=layers, n_boot=n_boot, name=name)


def evaluate_run(ep: config.EvalParams, row: str, seed: int, dsd: Any, n_prompts: int = 0,
                 splits: Sequence[str] | None = None) -> dict[str, Any]:
    """Train if needed, then evaluate (cached) one row for one seed."""
    folder = stages.ensure_trained(ep, row, seed, dsd, n_prompts)
    ap = stages.row_params(ep, "anchoring", seed)
    return evaluate_folder(ep, folder, stages.eval_name(*ROWS[row], seed, n_prompts), dsd,
                           splits or ep.splits,
                           layers=ep.eval_layers, n_boot=ep.n_boot, model_params=ap)


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


def run_ablation(ep: config.EvalParams, dsd: Any) -> dict[str, dict[int, dict[str, Any]]]:
    """Every row for every seed: ``{row: {seed: {split: summary}}}``.

    Rows train in pipeline order (all of stage 1 before stage 2 of the same seed); the
    backbone row is evaluated once and listed under every seed.
    """
    out: dict[str, dict[int, dict[str, Any]]] = {row: {} for row in ep.rows}
    for seed in ep.seeds:
        for row in ep.rows:
            if ROWS[row][0] == "backbone" and out[row]:
                out[row][seed] = next(iter(out[row].values()))
                continue
            res = evaluate_run(ep, row, seed, dsd)
            out[row][seed] = {s: res["splits"][s]["summary"] for s in ep.splits}
    return out


def _seed_values(results: dict[int, dict[str, Any]], split: str, metric: str) -> list[float]:
    return [float(r[split][metric]["mean"]) for r in results.values()]


def aggregate(results: dict[str, dict[int, dict[str, Any]]], splits: Sequence[str]
              ) -> list[dict[str, Any]]:
    """Long-form rows: one per (row, split, metric) with mean, std over seeds and the per-seed
    means and bootstrap intervals. A row whose model is shared across seeds (the backbone)
    gets ``n_seeds`` 1 and std NaN."""
    long = []
    for row, per_seed in results.items():
        shared = ROWS[row][0] == "backbone"
        seeds = sorted(per_seed)[:1] if shared else sorted(per_seed)
        for split in splits:
            for metric in evaluation.METRICS:
                vals = [float(per_seed[s][split][metric]["mean"]) for s in seeds]
                finite = [v for v in vals if not np.isnan(v)]
                long.append({
                    "row": row, "split": split, "metric": metric,
                    "mean": float(np.mean(finite)) if finite else float("nan"),
                    "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan"),
                    "n_seeds": len(seeds),
                    "seed_means": vals,
                    "seed_ci": [[per_seed[s][split][metric]["lo"], per_seed[s][split][metric]["hi"]]
                                for s in seeds],
                })
    return long


def _cell(entry: dict[str, Any]) -> str:
    if np.isnan(entry["mean"]):
        return "–"
    if np.isnan(entry["std"]):
        lo, hi = entry["seed_ci"][0]
        return f"{entry['mean']:.2f} [{lo:.2f}, {hi:.2f}]"
    return f"{entry['mean']:.2f} ± {entry['std']:.2f}"


def table_markdown(long: Sequence[dict[str, Any]], splits: Sequence[str],
                   metrics: Sequence[str] = TABLE_METRICS) -> str:
    """One markdown table per split: rows x metrics, ``mean ± std`` over seeds.

    The backbone row (one model for all seeds) shows its bootstrap 95% interval instead.
    """
    index = {(e["row"], e["split"], e["metric"]): e for e in long}
    rows = list(dict.fromkeys(e["row"] for e in long))
    parts = []
    for split in splits:
        parts.append(f"**{split}**\n")
        parts.append("| model | " + " | ".join(metrics) + " |")
        parts.append("| --- " * (len(metrics) + 1) + "|")
        for row in rows:
            cells = [_cell(index[(row, split, m)]) for m in metrics]
            parts.append(f"| {ROW_LABELS.get(row, row)} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def table_csv(long: Sequence[dict[str, Any]]) -> str:
    """The long-form table as CSV (row, split, metric, mean, std, n_seeds, per-seed means)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "split", "metric", "mean", "std", "n_seeds", "seed_means"])
    for e in long:
        w.writerow([e["row"], e["split"], e["metric"], f"{e['mean']:.6g}", f"{e['std']:.6g}",
                    e["n_seeds"], " ".join(f"{v:.6g}" for v in e["seed_means"])])
    return buf.getvalue()


def write_table(long: Sequence[dict[str, Any]], splits: Sequence[str], folder: str | Path,
                header: str = "") -> tuple[Path, Path]:
    """Write ``ablation.md`` and ``ablation.csv`` to ``folder``."""
    folder = Path(folder)
    md = repro.atomic_write_text(folder / "ablation.md", (header + "\n\n" if header else "")
                                 + table_markdown(long, splits))
    cs = repro.atomic_write_text(folder / "ablation.csv", table_csv(long))
    return md, cs


# --------------------------------------------------------------------------------------
# Data efficiency
# --------------------------------------------------------------------------------------


def prompts_seen(rp: Any, n_train: int) -> int:
    """Distinct training prompts a stage-2 run draws from: ``n_prompts``, or, for a run on
    the whole split, at most ``steps x prompts_per_step`` (one pass, no prompt twice)."""
    cap = rp.steps * rp.prompts_per_step
    return min(rp.n_prompts, n_train) if rp.n_prompts else min(cap, n_train)


def run_efficiency(ep: config.EvalParams, dsd: Any, split: str = "test_ood") -> list[dict[str, Any]]:
    """Accuracy on ``split`` against the number of distinct RL training prompts.

    For each variant of ``efficiency_variants`` and each seed of ``efficiency_seeds``: one run
    per ``efficiency_prompts`` value (same steps, prompts repeated), plus the full run of the
    ablation. Returns one dict per point: ``variant``, ``seed``, ``n_prompts`` (0: full),
    ``prompts``, ``accuracy``, ``lo``, ``hi``, ``conflict_accuracy``, ``faithfulness_gap``.
    """
    row_of = {v: r for r, (st, v) in ROWS.items() if st == "rl"}
    points = []
    for variant in ep.efficiency_variants:
        row = row_of[variant]
        for seed in ep.efficiency_seeds:
            for k in [*ep.efficiency_prompts, 0]:
                # The full run's evaluation is the ablation's (same splits, so the cache serves it).
                res = evaluate_run(ep, row, seed, dsd, n_prompts=k,
                                   splits=ep.splits if k == 0 and split in ep.splits else [split])
                summ = res["splits"][split]["summary"]
                rp = stages.row_params(ep, row, seed, k)
                points.append({"variant": variant, "seed": seed, "n_prompts": k,
                               "prompts": prompts_seen(rp, len(dsd[rp.train_split])),
                               "accuracy": summ["accuracy"]["mean"],
                               "lo": summ["accuracy"]["lo"], "hi": summ["accuracy"]["hi"],
                               "conflict_accuracy": summ["conflict_accuracy"]["mean"],
                               "faithfulness_gap": summ["faithfulness_gap"]["mean"]})
    return points


# --------------------------------------------------------------------------------------
# Training logs of every stage
# --------------------------------------------------------------------------------------


def training_logs(ep: config.EvalParams) -> dict[str, dict[str, list[list[dict[str, Any]]]]]:
    """``{stage: {row: [metrics rows of each seed]}}`` for the stage-0 warm-up and the
    ablation's stage-1 and stage-2 runs that exist (read from their ``metrics.jsonl``)."""
    logs: dict[str, dict[str, list[list[dict[str, Any]]]]] = {"stage 0": {}, "stage 1": {},
                                                               "stage 2": {}}
    warm = stages.row_folder(ep, "backbone", ep.seeds[0]) / "warmup" / "metrics.jsonl"
    if warm.exists():
        logs["stage 0"]["warm-up"] = [repro.read_jsonl(warm)]
    for row in ep.rows:
        stage = ROWS[row][0]
        if stage == "backbone":
            continue
        key = "stage 1" if stage == "anchor" else "stage 2"
        for seed in ep.seeds:
            f = stages.row_folder(ep, row, seed) / "metrics.jsonl"
            if f.exists():
                logs[key].setdefault(row, []).append(repro.read_jsonl(f))
    return logs


def paired_difference(long: Sequence[dict[str, Any]], row_a: str, row_b: str, split: str,
                      metric: str) -> dict[str, float]:
    """``row_a - row_b`` on one metric, paired by seed: mean, std over seeds, and the range.

    A row shared by all seeds (the backbone) is paired with every seed of the other row.
    """
    index = {(e["row"], e["split"], e["metric"]): e for e in long}
    a = index[(row_a, split, metric)]["seed_means"]
    b = index[(row_b, split, metric)]["seed_means"]
    if len(a) == 1:
        a = a * len(b)
    if len(b) == 1:
        b = b * len(a)
    d = np.array(a, dtype=float) - np.array(b, dtype=float)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"),
                "max": float("nan"), "n": 0}
    return {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if d.size > 1 else float("nan"),
            "min": float(d.min()), "max": float(d.max()), "n": int(d.size)}


def metric_bars(long: Sequence[dict[str, Any]], rows: Sequence[str], splits: Sequence[str],
                metric: str) -> tuple[dict[str, dict[str, tuple[float, float]]], dict[str, dict[str, list[float]]]]:
    """``(values, points)`` for ``plotting.fig_bars_with_errors``: per row label and split,
    ``(mean, std)`` over seeds and the per-seed means."""
    index = {(e["row"], e["split"]): e for e in long if e["metric"] == metric}
    values = {ROW_LABELS[r]: {s: (index[(r, s)]["mean"], index[(r, s)]["std"]) for s in splits}
              for r in rows}
    points = {ROW_LABELS[r]: {s: list(index[(r, s)]["seed_means"]) for s in splits} for r in rows}
    return values, points
