"""The ablation table over seeds and the data-efficiency curve (notebook 05, docs/design.md §8.2-8.3).

Every row of the table is one trained model per seed, made by the stage functions of notebooks
02-04 with the parameter files those notebooks use; only ``seed`` (and, for the data-efficiency
runs, ``n_prompts``) changes. A run that finished from exactly the inputs it would be made from
now (for seed 0: the runs of notebooks 03 and 04) is reused (``stages.run_status``: its
completion marker records them); one made from other params, upstream params files, records
files or start model, or killed or stopped early, is retrained. The
stage-0 backbone is one model shared by every seed (its row varies only through the bootstrap).

Evaluations go through ``evaluation.evaluate_saved``: one JSON per model under
``runs/<profile>/eval/``, reused while the model's files and the evaluation settings are unchanged.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fmr1lib import claims, config, evaluation, repro, stages, validity
from fmr1lib.choices import TestSplit, options
from fmr1lib.stages import ROWS

logger = logging.getLogger(__name__)

ROW_LABELS: dict[str, str] = config.ABLATION_ROW_LABELS
"""How the table names each row."""

RL_ROW: dict[str, str] = {v: r for r, (st, v) in ROWS.items() if st == "rl"}
"""Stage-2 variant -> its ablation row (``faithful`` -> ``faithful_mr1``)."""

TABLE_METRICS: tuple[str, ...] = (
    "accuracy", "focus_mass", "pointing", "acc_evidence", "acc_control", "faithfulness_gap",
    "answer_mass", "consistency", "conflict_accuracy", "wrong_is_cue", "format_rate",
)
"""Metrics shown in the markdown table (the CSV holds every metric of ``evaluation.METRICS``)."""

# --------------------------------------------------------------------------------------
# Evaluations per run
# --------------------------------------------------------------------------------------


def evaluate_folder(p: Any, folder: str | Path, name: str, dsd: Any,
                    splits: Sequence[str] = options(TestSplit), layers: Any = "last_half",
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
        stages.eval_path(p, name),
        evaluation.Settings(n=p.eval_n, batch_size=p.eval_batch_size,
                            max_new_tokens=p.max_new_tokens, layers=layers, n_boot=n_boot),
        name=name)


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


def run_ablation(ep: config.EvalParams, dsd: Any, report: Callable[[str], Any] | None = None
                 ) -> dict[str, dict[int, dict[str, Any]]]:
    """Every row for every seed: ``{row: {seed: {split: summary}}}``.

    Rows train in pipeline order (all of stage 1 before stage 2 of the same seed); the
    backbone row is evaluated once and listed under every seed. ``report`` (e.g. ``print`` in
    notebook 05) gets one line per row and seed as it finishes: its time and two numbers.
    """
    out: dict[str, dict[int, dict[str, Any]]] = {row: {} for row in ep.rows}
    total, k, t0 = len(ep.seeds) * len(ep.rows), 0, time.perf_counter()
    for seed in ep.seeds:
        for row in ep.rows:
            k += 1
            t = time.perf_counter()
            if ROWS[row][0] == "backbone" and out[row]:
                out[row][seed] = next(iter(out[row].values()))
            else:
                res = evaluate_run(ep, row, seed, dsd)
                out[row][seed] = {s: res["splits"][s]["summary"] for s in ep.splits}
            if report is not None:
                last = ep.splits[-1]
                summ = out[row][seed][last]
                report(f"[{k}/{total}] seed {seed} {ROW_LABELS.get(row, row)}: "
                       f"accuracy ({last}) {summ['accuracy']['mean']:.3f}, Focus mass "
                       f"{summ['focus_mass']['mean']:.3f} ({time.perf_counter() - t:.0f} s; "
                       f"{time.perf_counter() - t0:.0f} s in)")
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
        shared = ROWS.get(row, ("rl",))[0] == "backbone"
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

    The backbone row (one model for all seeds) shows its bootstrap 95% interval instead. Only
    the ablation's rows are shown (the data-efficiency rows are in the CSV).
    """
    index = {(e["row"], e["split"], e["metric"]): e for e in long}
    rows = [r for r in dict.fromkeys(e["row"] for e in long) if r in ROWS]
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


def table_csv(long: Sequence[dict[str, Any]], provenance: dict[str, str] | None = None) -> str:
    """The long-form table as CSV (row, split, metric, mean, std, n_seeds, per-seed means in
    seed order), then the ``commit`` and ``params_sha256`` it was made from on every line."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    prov = provenance or {}
    w.writerow(["row", "split", "metric", "mean", "std", "n_seeds", "seed_means", "commit",
                "params_sha256"])
    for e in long:
        w.writerow([e["row"], e["split"], e["metric"], f"{e['mean']:.6g}", f"{e['std']:.6g}",
                    e["n_seeds"], " ".join(f"{v:.6g}" for v in e["seed_means"]),
                    prov.get("commit", ""), prov.get("params_sha256", "")])
    return buf.getvalue()


def write_table(long: Sequence[dict[str, Any]], splits: Sequence[str], folder: str | Path,
                header: str = "", provenance: dict[str, str] | None = None) -> tuple[Path, Path]:
    """Write ``ablation.md`` and ``ablation.csv`` to ``folder``."""
    folder = Path(folder)
    md = repro.atomic_write_text(folder / "ablation.md", (header + "\n\n" if header else "")
                                 + table_markdown(long, splits))
    cs = repro.atomic_write_text(folder / "ablation.csv", table_csv(long, provenance))
    return md, cs


def provenance(ep: config.EvalParams) -> dict[str, str]:
    """What a results file was made from: the commit (``+dirty`` when tracked files differ from
    it) and the SHA-256 of every stage's resolved params (``study_params_hash``)."""
    return {"commit": repro.git_commit(), "params_sha256": study_params_hash(ep)}


def study_params_hash(ep: config.EvalParams) -> str:
    """SHA-256 over the resolved params of the evaluation and of every stage it trains (the
    stage params of its first seed; the others differ only in ``seed``)."""
    bp, ap, rp = stages.seed_params(ep, ep.seeds[0])
    dp = stages.upstream_params(ep, "data")
    return repro.sha256_text("\n".join(stages.params_hash(p) for p in (dp, bp, ap, rp, ep)))


# --------------------------------------------------------------------------------------
# Data efficiency
# --------------------------------------------------------------------------------------


def prompts_seen(rp: Any, n_train: int) -> int:
    """Distinct training prompts a stage-2 run draws from: ``n_prompts``, or, for a run on
    the whole split, at most ``steps x prompts_per_step`` (one pass, no prompt twice)."""
    cap = rp.steps * rp.rollout.prompts_per_step
    return min(rp.n_prompts, n_train) if rp.n_prompts else min(cap, n_train)


def run_efficiency(ep: config.EvalParams, dsd: Any, split: str = "test_ood") -> list[dict[str, Any]]:
    """Accuracy on ``split`` against the number of distinct RL training prompts.

    For each variant of ``efficiency_variants`` and each seed of ``efficiency_seeds``: one run
    per ``efficiency_prompts`` value (same steps, prompts repeated), plus the full run of the
    ablation. Returns one dict per point: ``variant``, ``seed``, ``n_prompts`` (0: full),
    ``prompts``, ``accuracy``, ``lo``, ``hi``, ``conflict_accuracy``, ``faithfulness_gap``.
    """
    points = []
    for variant in ep.efficiency_variants:
        row = RL_ROW[variant]
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
                               "faithfulness_gap": summ["faithfulness_gap"]["mean"],
                               "summary": summ})
    return points


def efficiency_row(row: str, n_prompts: int) -> str:
    """The table key of a data-efficiency run: ``faithful_mr1_p8`` (``row`` on 8 prompts)."""
    return f"{row}_p{n_prompts}"


def efficiency_long(points: Sequence[dict[str, Any]], split: str = "test_ood"
                    ) -> list[dict[str, Any]]:
    """The data-efficiency runs on fewer prompts as long-form table rows (``aggregate``'s form),
    one row key per (variant, prompt count): ``efficiency_row``. The full runs are the
    ablation's own rows."""
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for pt in points:
        if pt["n_prompts"]:
            key = efficiency_row(RL_ROW[pt["variant"]], pt["n_prompts"])
            results.setdefault(key, {})[pt["seed"]] = {split: pt["summary"]}
    return aggregate(results, [split])


# --------------------------------------------------------------------------------------
# The claims and their preconditions (figures/claims.json)
# --------------------------------------------------------------------------------------

SHORTCUT_MARGIN = 0.10
"""The shortcut baseline takes the shortcut when its ``test_ood`` conflict accuracy lies at least
this far below every evidence reader's and its answers equal the (contradicting) cue at least this
far above chance (``cue_rate``); only then do the comparisons with it mean something."""
EVIDENCE_READERS = ("anchoring",)
"""The rows the shortcut baseline is held against: perception supervised on the evidence itself
(text perception names the evidence's colour, which the cue also gives, so it may read either)."""
ANSWER_CHANGE_MIN = 0.05
"""An RL variant must change at least this share of ``test_ood`` greedy answers relative to its
start model: a run that equals its start point compares nothing."""

START_ROW = {"grpo_backbone": "backbone", "anchoring_grpo": "anchoring",
             "faithful_mr1": "anchoring", "faithful_mr1_occlusion": "anchoring",
             "plain_grpo": "plain_sft", "plain_faithful": "plain_sft"}
"""The row each stage-2 row starts from (same seed)."""


FAITHFUL_USE = ("rl_answer_change:{a}", "faithful_reward_validity:{a}", "start_reading_spread:{a}",
                "within_group_reading_spread:{a}")
"""What a faithful-use claim of row ``a`` requires: the row moved, its reward measured faithful
use (``faithful_reward_validity``), its start model's rollouts differed in what they read
(``start_reading_spread``), and they differed *within* groups, where GRPO compares them
(``within_group_reading_spread``)."""


def _use(a: str) -> tuple[str, ...]:
    return tuple(r.format(a=a) for r in FAITHFUL_USE)


def study_claims(ep: config.EvalParams) -> list[claims.Claim]:
    """The claims notebook 05 tests: the paper's two claims, their controls, the faithful-use
    claim from a start that reads the cue (``plain_*`` rows), and the data-efficiency comparison
    at each prompt count (``faithful`` vs ``grpo``). On ``test_ood`` every cued record's cue
    contradicts its answer, so accuracy there is conflict accuracy: each comparison appears once."""
    out = [
        claims.Claim("anchoring gives faithful perception, better than describing the evidence "
                     "in text", "focus_mass", "test_ood", "anchoring", "text_perception"),
        claims.Claim("anchoring reduces shortcut reliance vs plain SFT", "conflict_accuracy",
                     "test_ood", "anchoring", "plain_sft",
                     ("shortcut_baseline_conflict_accuracy",)),
        claims.Claim("the faithful reward gives faithful use: accuracy where the cue "
                     "contradicts", "conflict_accuracy", "test_ood", "faithful_mr1",
                     "anchoring_grpo", _use("faithful_mr1")),
        claims.Claim("the faithful reward gives faithful use: faithfulness gap",
                     "faithfulness_gap", "test_ood", "faithful_mr1", "anchoring_grpo",
                     _use("faithful_mr1")),
        claims.Claim("annotation-free (occlusion) regions give faithful use", "conflict_accuracy",
                     "test_ood", "faithful_mr1_occlusion", "anchoring_grpo",
                     _use("faithful_mr1_occlusion")),
        claims.Claim("from a start that reads the cue, the faithful reward gives faithful use: "
                     "accuracy where the cue contradicts", "conflict_accuracy", "test_ood",
                     "plain_faithful", "plain_grpo", _use("plain_faithful")),
        claims.Claim("from a start that reads the cue, the faithful reward gives faithful use: "
                     "faithfulness gap", "faithfulness_gap", "test_ood", "plain_faithful",
                     "plain_grpo", _use("plain_faithful")),
    ]
    if {"grpo", "faithful"} <= set(ep.efficiency_variants):
        a, b = RL_ROW["faithful"], RL_ROW["grpo"]
        for k in ep.efficiency_prompts:
            out.append(claims.Claim(f"the faithful reward is more data-efficient ({k} prompts)",
                                    "accuracy", "test_ood", efficiency_row(a, k),
                                    efficiency_row(b, k)))
    return out


def preconditions(ep: config.EvalParams, dsd: Any, long: Sequence[dict[str, Any]],
                  split: str = "test_ood") -> dict[str, Any]:
    """What must hold for the claims to be read (``figures/claims.json``'s ``preconditions``).

    * ``shortcut_baseline_conflict_accuracy``: plain SFT's accuracy where the cue contradicts
      the answer, against the evidence readers' (``EVIDENCE_READERS``), and how often it answers
      the cue; ``holds`` if it is ``SHORTCUT_MARGIN`` below all of them and its cue rate
      ``SHORTCUT_MARGIN`` above chance.
    * ``rl_answer_change``: per stage-2 row, the share of greedy answers that differ from its
      start model's (same seed), mean over seeds; ``holds`` if >= ``ANSWER_CHANGE_MIN``.
    * ``faithful_group_std_correct``: per faithful row, the within-group std of the faithful
      reward among correct trajectories (mean over the logged steps, then over seeds).
    * ``faithful_reward_validity``: per faithful row, the within-group rank correlation of
      its reward with ``reading`` in its stage-2 logs (``claims.validity_summary``); ``holds``
      if its 95% interval over seeds lies above 0.
    * ``start_reading_spread``: per faithful row, the cue-dependent share of the scored
      rollouts of its first stage-2 steps (``claims.spread_summary``); ``holds`` if >= 0.2.
    * ``within_group_reading_spread``: per faithful row, on its start model's rollouts of the
      first ``SPREAD_PROMPTS`` train prompts (``start_model_spread``), the share of groups whose
      distinct correct rollouts hold both a cue-dependent and an evidence-dependent one: what
      GRPO can compare within a group. ``holds`` if >= ``WITHIN_SPREAD_MIN``.
    * ``route_shares``: the greedy responses' reasoning routes (``prompting.response_route``)
      of the start model and of each stage-2 row, mean over seeds.
    """
    rows = set(ep.rows)
    out: dict[str, Any] = {"split": split}
    if "plain_sft" in rows:
        sb = claims.seed_values(long, "plain_sft", split, "conflict_accuracy")
        mean = claims.mean_or_nan
        readers = {r: mean(claims.seed_values(long, r, split, "conflict_accuracy"))
                   for r in EVIDENCE_READERS if r in rows}
        cue_rate = mean(claims.seed_values(long, "plain_sft", split, "cue_rate"))
        chance = 1.0 / len(stages.upstream_params(ep, "data").colors)
        out["shortcut_baseline_conflict_accuracy"] = {
            "row": "plain_sft", "mean": mean(sb), "seed_values": sb,
            "evidence_readers": readers, "margin": SHORTCUT_MARGIN,
            "cue_rate": cue_rate, "chance": chance,
            "holds": (bool(readers) and mean(sb) <= min(readers.values()) - SHORTCUT_MARGIN
                      and cue_rate >= chance + SHORTCUT_MARGIN)}
    change: dict[str, Any] = {}
    shares: dict[str, Any] = {}
    examples: dict[tuple[str, int], list[dict[str, Any]]] = {}

    def split_examples(row: str, seed: int) -> list[dict[str, Any]]:
        if (row, seed) not in examples:
            res = evaluate_run(ep, row, seed, dsd)
            examples[(row, seed)] = res["splits"][split]["examples"]
        return examples[(row, seed)]

    for row, start in START_ROW.items():
        if row not in rows or start not in rows:
            continue
        vals = [claims.answer_change(split_examples(row, s), split_examples(start, s))
                for s in ep.seeds]
        moved = claims.mean_or_nan(vals)
        change[row] = {"start": start, "mean": moved, "seed_values": vals,
                       "threshold": ANSWER_CHANGE_MIN, "holds": moved >= ANSWER_CHANGE_MIN}
        for r in (start, row):
            if r not in shares:
                per_seed = [claims.route_shares(split_examples(r, s)) for s in ep.seeds]
                shares[r] = {k: claims.mean_or_nan([d[k] for d in per_seed]) for k in per_seed[0]}
    out["rl_answer_change"] = change
    std: dict[str, Any] = {}
    validity: dict[str, Any] = {}
    spread: dict[str, Any] = {}
    for row in FAITHFUL_ROWS:
        if row in rows:
            logs = []
            for s in ep.seeds:
                log = stages.row_folder(ep, row, s) / "metrics.jsonl"
                logs.append(repro.read_jsonl(log) if log.exists() else [])
            vals = [claims.mean_or_nan([m.get("faithful_group_std_correct") for m in steps])
                    for steps in logs]
            std[row] = {"mean": claims.mean_or_nan(vals), "seed_values": vals}
            validity[row] = claims.validity_summary(logs)
            spread[row] = claims.spread_summary(logs, threshold=START_SPREAD_MIN)
    out["faithful_group_std_correct"] = std
    out["faithful_reward_validity"] = validity
    out["start_reading_spread"] = spread
    within: dict[str, Any] = {}
    measured: dict[tuple[str, int], dict[str, Any]] = {}
    for row in FAITHFUL_ROWS:
        if row in rows:
            start = START_ROW[row]
            for s in ep.seeds:
                if (start, s) not in measured:
                    measured[(start, s)] = start_model_spread(ep, start, s, dsd)
            per = [measured[(start, s)] for s in ep.seeds]
            mixed = claims.mean_or_nan([d["mixed_share"] for d in per])
            within[row] = {"start": start, "seed_values": [d["mixed_share"] for d in per],
                           "mean": mixed, "threshold": WITHIN_SPREAD_MIN,
                           "cue_share": [d["cue_share"] for d in per],
                           "within_var_share": [d["within_var_share"] for d in per],
                           "n_groups": [d["n_groups"] for d in per], "prompts": SPREAD_PROMPTS,
                           "holds": bool(mixed >= WITHIN_SPREAD_MIN)}
    out["within_group_reading_spread"] = within
    out["route_shares"] = shares
    return out


FAITHFUL_ROWS = tuple(RL_ROW[v] for v in config.RLParams.FAITHFUL_VARIANTS)
"""The ablation rows trained with the faithful reward."""
START_SPREAD_MIN = 0.2
"""``start_reading_spread`` holds when at least this share of the start model's correct
rollouts depend on the cue: below it there is little for any reward to select."""


WITHIN_SPREAD_MIN = 0.2
"""``within_group_reading_spread`` holds when at least this share of the start model's groups
hold both a cue-dependent and an evidence-dependent correct rollout."""
SPREAD_PROMPTS = 64
"""Train prompts the within-group spread of a start model is measured on."""


def start_model_spread(ep: config.EvalParams, start: str, seed: int, dsd: Any) -> dict[str, Any]:
    """``validity.reading_spread`` of the start model ``start`` (an ablation row) of ``seed``, on
    ``G`` rollouts of each of the first ``SPREAD_PROMPTS`` prompts of the stage-2 train split."""
    _, _, rp = stages.seed_params(ep, seed)
    folder = stages.ensure_trained(ep, start, seed, dsd)
    model, processor = stages.load_model(folder, rp, "03_anchoring")
    split = dsd[rp.train_split]
    rows = [split[i] for i in range(min(SPREAD_PROMPTS, len(split)))]
    return validity.reading_spread(validity.group_readings(model, processor, rows, rp, seed=seed),
                                   WITHIN_SPREAD_MIN)


def claims_document(ep: config.EvalParams, long: Sequence[dict[str, Any]],
                    pre: dict[str, Any]) -> dict[str, Any]:
    """``figures/claims.json``: the seeds, the preconditions, every claim with its paired
    differences, interval and verdict, and the provenance (commit, params hash)."""
    return claims.json_safe({
        "profile": ep.profile, "seeds": list(ep.seeds), "eval_n": ep.eval_n,
        "preconditions": pre,
        "claims": claims.apply_preconditions(
            claims.evaluate_claims(long, study_claims(ep), ep.seeds), pre),
        **provenance(ep),
    })


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
    """``(values, points)`` for ``study_plots.fig_bars_with_errors``: per row label and split,
    ``(mean, std)`` over seeds and the per-seed means."""
    index = {(e["row"], e["split"]): e for e in long if e["metric"] == metric}
    values = {ROW_LABELS[r]: {s: (index[(r, s)]["mean"], index[(r, s)]["std"]) for s in splits}
              for r in rows}
    points = {ROW_LABELS[r]: {s: list(index[(r, s)]["seed_means"]) for s in splits} for r in rows}
    return values, points


# --------------------------------------------------------------------------------------
# The README's results, generated from the committed files
# --------------------------------------------------------------------------------------

README_BLOCKS = ("results", "claims", "preconditions", "verdicts")
"""The README's generated blocks, each between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``
(``scripts/update_readme.py`` writes them; ``tests/test_readme_results.py`` checks them)."""


def readme_blocks(figures: str | Path) -> dict[str, str]:
    """The README's generated blocks from ``figures/ablation.md`` and ``figures/claims.json``:
    the ablation table, the claims table and the preconditions, one line each."""
    from fmr1lib import plotting

    folder = Path(figures)
    table = (folder / "ablation.md").read_text(encoding="utf-8")
    doc = json.loads((folder / "claims.json").read_text(encoding="utf-8"))
    seeds = ", ".join(str(s) for s in doc["seeds"])
    pre = claims.precondition_sentences(doc, plotting.DISPLAY_NAMES)
    return {
        "results": table[table.index("**test_id**"):].strip(),
        "claims": (f"Paired over training seeds {seeds} ({doc['profile']} profile, commit "
                   f"`{doc['commit'][:12]}`); 95% t intervals.\n\n"
                   + claims.claims_markdown(doc, plotting.DISPLAY_NAMES)),
        "preconditions": "\n".join(f"* {line}" for line in pre),
        "verdicts": claims.verdict_markdown(doc, plotting.DISPLAY_NAMES),
    }


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    """``text`` with each ``<!-- NAME:start -->...<!-- NAME:end -->`` block replaced."""
    for name, body in blocks.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in text or end not in text:
            raise ValueError(f"README: markers {start!r} / {end!r} missing")
        text = text[:text.index(start) + len(start)] + "\n" + body + "\n" + text[text.index(end):]
    return text
