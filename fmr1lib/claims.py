"""The paper's claims as paired comparisons over training seeds (notebook 05, docs/design.md §8.4).

A claim compares two rows of the ablation table (``figures/ablation.csv``) on one metric and
split. Both rows are trained with the same seeds, so the comparison is paired: the per-seed
difference ``a - b``, its mean, and a 95% t interval over seeds (a bootstrap over five seeds
would understate the spread). The verdict reads the interval: ``supported`` when it lies above
0, ``refuted`` when it lies below, ``inconclusive`` otherwise (or with fewer than two seeds).

A comparison means something only when its preconditions hold: the shortcut baseline really
takes the shortcut, each RL variant really moved away from its start model, the faithful reward
really varies between correct trajectories. ``preconditions`` measures them from the recorded
evaluations and training logs; ``figures/claims.json`` holds both, with the commit and a hash of
the parameters they were made from (``provenance``), so a stale file is told from a fresh one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fmr1lib import prompting, scoring

VERDICTS = ("supported", "refuted", "inconclusive")
STATUSES = (*VERDICTS, "untestable")
"""What a claim reads as: its verdict when every precondition it requires holds, else
``untestable`` (``apply_preconditions``)."""

# Two-sided 95% quantiles of Student's t, by degrees of freedom (standard tables).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
         17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000,
         120: 1.980}


@dataclasses.dataclass(frozen=True)
class Claim:
    """One comparison: ``a - b`` on ``metric`` over ``split``, paired by seed."""

    claim: str
    metric: str
    split: str
    a: str
    b: str
    requires: tuple[str, ...] = ()
    """Preconditions that must hold for the verdict to be read, as ``"<key>"`` or
    ``"<key>:<row>"`` paths into ``preconditions`` (``apply_preconditions``)."""


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (table, conservative
    between its entries; the normal 1.96 beyond 120).

    >>> t975(4)
    2.776
    >>> t975(22) == t975(20)
    True
    """
    if df < 1:
        raise ValueError(f"t975: degrees of freedom must be >= 1, got {df}")
    if df > 120:
        return 1.96
    return _T975[max(k for k in _T975 if k <= df)]


def t_interval(diffs: Sequence[float]) -> tuple[float, float]:
    """The 95% t interval of the mean of ``diffs`` (NaN, NaN with fewer than two values).

    >>> lo, hi = t_interval([1.0, 2.0, 3.0])
    >>> round(lo, 3), round(hi, 3)
    (-0.484, 4.484)
    """
    d = np.asarray([x for x in diffs if not math.isnan(x)], dtype=float)
    if d.size < 2:
        return float("nan"), float("nan")
    half = t975(d.size - 1) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return float(d.mean()) - half, float(d.mean()) + half


def verdict(lo: float, hi: float) -> str:
    """``supported`` if ``lo > 0``, ``refuted`` if ``hi < 0``, else ``inconclusive``.

    >>> verdict(0.01, 0.2), verdict(-0.3, -0.1), verdict(-0.1, 0.1), verdict(float("nan"), 1.0)
    ('supported', 'refuted', 'inconclusive', 'inconclusive')
    """
    if lo > 0:
        return "supported"
    if hi < 0:
        return "refuted"
    return "inconclusive"


def seed_values(long: Sequence[Mapping[str, Any]], row: str, split: str,
                metric: str) -> list[float]:
    """The per-seed means of one (row, split, metric) entry of the long table."""
    for e in long:
        if (e["row"], e["split"], e["metric"]) == (row, split, metric):
            return [float(v) for v in e["seed_means"]]
    raise KeyError(f"the ablation table has no entry ({row!r}, {split!r}, {metric!r})")


def compare(long: Sequence[Mapping[str, Any]], c: Claim, seeds: Sequence[int]) -> dict[str, Any]:
    """One claim's record: the paired differences over ``seeds``, their mean, t interval and
    verdict. A row shared by every seed (one value, the stage-0 backbone) is paired with each."""
    a, b = seed_values(long, c.a, c.split, c.metric), seed_values(long, c.b, c.split, c.metric)
    a = a * len(b) if len(a) == 1 else a
    b = b * len(a) if len(b) == 1 else b
    if len(a) != len(b):
        raise ValueError(f"claim {c.claim!r}: rows {c.a!r} and {c.b!r} have {len(a)} and "
                         f"{len(b)} seeds; a paired comparison needs the same seeds")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    finite = [d for d in diffs if not math.isnan(d)]
    lo, hi = t_interval(finite)
    return {**dataclasses.asdict(c),
            "diff_mean": float(np.mean(finite)) if finite else float("nan"),
            "ci95": [lo, hi], "n_seeds": len(finite), "verdict": verdict(lo, hi),
            "seed_diffs": diffs, "seeds": list(seeds)[:len(diffs)]}


def evaluate_claims(long: Sequence[Mapping[str, Any]], claims: Sequence[Claim],
                    seeds: Sequence[int]) -> list[dict[str, Any]]:
    """``compare`` for every claim whose rows are in the table (the others are left out)."""
    rows = {e["row"] for e in long}
    return [compare(long, c, seeds) for c in claims if c.a in rows and c.b in rows]


def apply_preconditions(records: Sequence[dict[str, Any]],
                        pre: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each claim record with ``preconditions`` (required path -> holds) and ``status``: its
    verdict when all hold, else ``untestable`` (a missing precondition does not hold).

    >>> rec = {"verdict": "supported", "requires": ["rl_answer_change:x"]}
    >>> apply_preconditions([rec], {"rl_answer_change": {"x": {"holds": False}}})[0]["status"]
    'untestable'
    """
    out = []
    for rec in records:
        held = {}
        for path in rec.get("requires") or ():
            key, _, row = path.partition(":")
            entry = pre.get(key) or {}
            entry = entry.get(row) if row else entry
            held[path] = bool(entry and entry.get("holds"))
        out.append({**rec, "preconditions": held,
                    "status": rec["verdict"] if all(held.values()) else "untestable"})
    return out


def validity_summary(seed_steps: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """``faithful_reward_validity`` of one faithful row from its stage-2 logs, one list of
    step records per seed: per seed the within-group rank correlation of the faithful reward
    with ``reading`` (mean over its steps' groups, each step weighted by its number of groups),
    their mean over seeds with a 95% t interval, the share of all groups where it is positive,
    and ``holds`` when the interval lies above 0.

    >>> s = validity_summary([[{"reward_reading_spearman": 0.5, "reward_reading_groups": 2,
    ...                          "reward_reading_positive": 1.0}]] * 3)
    >>> s["mean"], s["holds"]
    (0.5, False)
    """
    per_seed, pos, groups = [], [], []
    for steps in seed_steps:
        w = [(m.get("reward_reading_spearman"), m.get("reward_reading_groups") or 0,
              m.get("reward_reading_positive")) for m in steps]
        w = [x for x in w if x[0] is not None and x[1] > 0]
        n = sum(x[1] for x in w)
        per_seed.append(sum(x[0] * x[1] for x in w) / n if n else float("nan"))
        pos += [(x[2] if x[2] is not None else float("nan"), x[1]) for x in w]
        groups.append(n)
    lo, hi = t_interval(per_seed)
    finite = [(p, n) for p, n in pos if not math.isnan(p)]
    share = (sum(p * n for p, n in finite) / sum(n for _, n in finite)) if finite else float("nan")
    return {"seed_values": per_seed, "mean": mean_or_nan(per_seed), "ci95": [lo, hi],
            "positive_share": share, "n_groups": groups, "holds": bool(lo > 0)}


def spread_summary(seed_steps: Sequence[Sequence[Mapping[str, Any]]], first: int = 5,
                   threshold: float = 0.2) -> dict[str, Any]:
    """``start_reading_spread`` of one faithful row: per seed the share of the scored correct
    rollouts of its first ``first`` stage-2 steps that are cue-dependent (``reading`` < 0; the
    start model's, nearly), their mean, and ``holds`` when it is at least ``threshold``.

    >>> spread_summary([[{"reading_cue_share": 0.4}], [{"reading_cue_share": 0.2}]])["holds"]
    True
    """
    per_seed = [mean_or_nan([m.get("reading_cue_share") for m in steps[:first]])
                for steps in seed_steps]
    mean = mean_or_nan(per_seed)
    return {"seed_values": per_seed, "mean": mean, "first_steps": first, "threshold": threshold,
            "holds": bool(mean >= threshold)}


# --------------------------------------------------------------------------------------
# Preconditions
# --------------------------------------------------------------------------------------


def answer_change(examples: Sequence[Mapping[str, Any]],
                  start: Sequence[Mapping[str, Any]]) -> float:
    """Share of the examples whose greedy answer differs from the start model's (matched by id;
    two unparsable answers count as equal).

    >>> answer_change([{"id": 1, "pred": "red"}, {"id": 2, "pred": "blue"}],
    ...               [{"id": 1, "pred": "red"}, {"id": 2, "pred": "green"}])
    0.5
    """
    before = {e["id"]: e.get("pred") for e in start}
    pairs = [(e.get("pred"), before[e["id"]]) for e in examples if e["id"] in before]
    if not pairs:
        return float("nan")
    changed = [not (x == y or scoring.answers_match(x, y)) for x, y in pairs]
    return float(np.mean(changed))


def route_shares(examples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Share of greedy responses per reasoning route (``prompting.response_route``) and
    ``none`` for the rest.

    >>> route_shares([{"response": "<think>the corner patch is red</think><answer>red</answer>"},
    ...               {"response": "<think>the circle is red</think><answer>red</answer>"}])
    {'evidence': 0.5, 'cue': 0.5, 'none': 0.0}
    """
    return prompting.route_shares([e.get("response") for e in examples])


def mean_or_nan(values: Sequence[float | None]) -> float:
    """Mean of the finite values (NaN if none)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else float("nan")


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN / inf float replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------
# Reading them
# --------------------------------------------------------------------------------------


def _num(x: Any, sign: str = "+") -> str:
    """Two decimals, signed unless ``sign`` is ``""``; ``–`` for a missing value."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{sign}.2f}"


def claims_markdown(doc: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """The claims of a ``claims.json`` document as a markdown table (the README's)."""
    labels = labels or {}
    lines = ["| claim | metric (split) | a − b | mean diff | 95% CI | seeds | verdict | "
             "preconditions | reads as |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in doc["claims"]:
        lo, hi = c["ci95"]
        held = c.get("preconditions") or {}
        pre = ", ".join(f"{k.replace(':', ' ')} {'holds' if v else 'fails'}"
                        for k, v in held.items()) or "–"
        lines.append(f"| {c['claim']} | {c['metric']} ({c['split']}) | "
                     f"{labels.get(c['a'], c['a'])} − {labels.get(c['b'], c['b'])} | "
                     f"{_num(c['diff_mean'])} | [{_num(lo)}, {_num(hi)}] | {c['n_seeds']} | "
                     f"{c['verdict']} | {pre} | **{c.get('status', c['verdict'])}** |")
    return "\n".join(lines)


def claims_sentences(doc: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> list[str]:
    """One sentence per claim, from the numbers (what notebook 05 prints)."""
    labels = labels or {}
    out = []
    for c in doc["claims"]:
        lo, hi = c["ci95"]
        failed = [k for k, v in (c.get("preconditions") or {}).items() if not v]
        why = (f"; untestable: {', '.join(k.replace(':', ' of ') for k in failed)} does not hold"
               if failed else "")
        out.append(f"{c['claim']}: {labels.get(c['a'], c['a'])} − {labels.get(c['b'], c['b'])} "
                   f"on {c['metric']} ({c['split']}) = {_num(c['diff_mean'])} "
                   f"(95% CI [{_num(lo)}, {_num(hi)}], {c['n_seeds']} seeds): {c['verdict']}{why}.")
    return out


def _held(entry: Mapping[str, Any]) -> str:
    """How a precondition sentence ends."""
    return "holds" if entry["holds"] else "DOES NOT HOLD"


def precondition_sentences(doc: Mapping[str, Any], labels: Mapping[str, str] | None = None
                           ) -> list[str]:
    """One line per precondition of a ``claims.json`` document, with whether it holds."""
    labels = labels or {}
    pre = doc["preconditions"]
    split = pre.get("split", "test_ood")
    out = []

    def f(x: Any) -> str:
        return _num(x, sign="")

    sb = pre.get("shortcut_baseline_conflict_accuracy")
    if sb:
        readers = ", ".join(f"{labels.get(r, r)} {f(v)}" for r, v in sb["evidence_readers"].items())
        out.append(f"shortcut baseline: {labels.get(sb['row'], sb['row'])} conflict accuracy "
                   f"({split}) {f(sb['mean'])} vs the evidence readers' {readers} "
                   f"(needs >= {sb['margin']:.2f} below all), answers the cue on "
                   f"{f(sb['cue_rate'])} (chance {f(sb['chance'])}, needs >= {sb['margin']:.2f} "
                   f"above): {_held(sb)}")
    for row, ch in pre.get("rl_answer_change", {}).items():
        seeds = " ".join(f(v) for v in ch["seed_values"])
        out.append(f"{labels.get(row, row)} changed {f(ch['mean'])} of its start model's "
                   f"({labels.get(ch['start'], ch['start'])}) greedy {split} answers (seeds: "
                   f"{seeds}; needs >= {ch['threshold']:.2f}): "
                   f"{_held(ch)}")
    for row, st in pre.get("faithful_group_std_correct", {}).items():
        out.append(f"{labels.get(row, row)}: within-group std of the faithful reward among "
                   f"correct trajectories {f(st['mean'])}")
    for row, v in pre.get("faithful_reward_validity", {}).items():
        lo, hi = v["ci95"]
        out.append(f"{labels.get(row, row)}: within-group rank correlation of the faithful reward "
                   f"with reading {_num(v['mean'])} (95% CI [{_num(lo)}, {_num(hi)}]; positive in "
                   f"{f(v['positive_share'])} of the groups; needs the interval above 0): "
                   f"{_held(v)}")
    for row, v in pre.get("start_reading_spread", {}).items():
        out.append(f"{labels.get(row, row)}: cue-dependent share of the start model's correct "
                   f"rollouts (first {v['first_steps']} steps) {f(v['mean'])} (needs >= "
                   f"{v['threshold']:.2f}): {_held(v)}")
    for row, v in pre.get("within_group_reading_spread", {}).items():
        share = " ".join(f(x) for x in v["within_var_share"])
        out.append(f"{labels.get(row, row)}: groups of its start model ({labels.get(v['start'], v['start'])}, "
                   f"{v['prompts']} train prompts) whose correct rollouts hold both a cue-dependent "
                   f"and an evidence-dependent one {f(v['mean'])} (needs >= {v['threshold']:.2f}; "
                   f"within-group share of reading's variance per seed: {share}): "
                   f"{_held(v)}")
    for row, sh in pre.get("route_shares", {}).items():
        out.append(f"{labels.get(row, row)} greedy routes ({split}): "
                   + ", ".join(f"{k} {f(v)}" for k, v in sh.items()))
    return out


def _holds(pre: Mapping[str, Any], labels: Mapping[str, str]) -> list[tuple[str, bool]]:
    """``(what, holds)`` for every precondition of a ``claims.json`` that has a verdict."""
    out = []
    sb = pre.get("shortcut_baseline_conflict_accuracy")
    if sb:
        out.append(("the shortcut baseline takes the shortcut", bool(sb["holds"])))
    for row, ch in pre.get("rl_answer_change", {}).items():
        out.append((f"{labels.get(row, row)} moved away from its start model", bool(ch["holds"])))
    for row, v in pre.get("faithful_reward_validity", {}).items():
        out.append((f"the faithful reward of {labels.get(row, row)} ranks trajectories as their "
                    "reading does", bool(v["holds"])))
    for row, v in pre.get("start_reading_spread", {}).items():
        out.append((f"the start model of {labels.get(row, row)} has rollouts that read the cue",
                    bool(v["holds"])))
    for row, v in pre.get("within_group_reading_spread", {}).items():
        out.append((f"the start model of {labels.get(row, row)} has groups whose rollouts differ in "
                    "what they read", bool(v["holds"])))
    return out


def results_markdown(doc: Mapping[str, Any], long: Sequence[Mapping[str, Any]] = (),
                     labels: Mapping[str, str] | None = None, split: str = "test_id") -> str:
    """"What the results say": notebook 05's closing section, generated from a ``claims.json``
    document (its preconditions and claims) and, when given, the ablation's long-form rows
    (for what the stage-0 backbone is on this profile). Nothing in it is typed by hand, so it
    is true on every profile and for every outcome.

    Args:
        doc: the ``claims.json`` document (``ablation.claims_document``).
        long: ``ablation.aggregate`` rows; the backbone and anchoring rows' Focus mass on
            ``split`` say whether "from backbone" means "without anchoring" here.
        labels: display names of rows (``plotting.DISPLAY_NAMES``).
    """
    labels = labels or {}

    def name(row: str) -> str:
        return labels.get(row, row)

    seeds = list(doc.get("seeds", []))
    items = list(doc.get("claims", []))
    counts = {v: sum(c.get("status", c["verdict"]) == v for c in items) for v in STATUSES}
    lines = ["## What the results say", "",
             f"Generated from `claims.json` ({doc.get('profile', '?')} profile, {len(seeds)} "
             f"training seed{'s' if len(seeds) != 1 else ''}: {', '.join(map(str, seeds))}).", ""]
    checks = _holds(doc.get("preconditions", {}), labels)
    failed = [what for what, ok in checks if not ok]
    if checks and not failed:
        lines.append(f"**Preconditions.** All {len(checks)} hold, so each comparison below "
                     "compares models that did what their row says.")
    elif failed:
        lines.append(f"**Preconditions.** {len(failed)} of {len(checks)} do not hold; it is not "
                     "the case " + "; nor ".join(f"that {w}" for w in failed) + ". A claim that "
                     "rests on one of them is not tested by this run, whatever its verdict.")
    lines.append("")
    lines += [f"* {s}" for s in precondition_sentences(doc, labels)]
    lines.append("")
    by_row = {(e["row"], e["split"], e["metric"]): e for e in long}
    back = by_row.get(("backbone", split, "focus_mass"))
    anch = by_row.get(("anchoring", split, "focus_mass"))
    if back is not None and anch is not None and back["mean"] == back["mean"]:
        perceives = anch["mean"] > 0 and back["mean"] >= 0.5 * anch["mean"]
        lines.append(f"**The start model.** The stage-0 backbone puts {back['mean']:.2f} of its "
                     f"`<Focus>` attention inside the evidence on {split}, against "
                     f"{anch['mean']:.2f} after anchoring: "
                     + (f"it already perceives on this profile, so *{name('grpo_backbone')}* "
                        "starts from a model that looks at the evidence and is not a "
                        "no-anchoring baseline here." if perceives else
                        f"it does not yet look at the evidence, so *{name('grpo_backbone')}* is "
                        "the no-anchoring baseline here."))
        lines.append("")
    if not items:
        lines.append("**Claims.** None could be tested.")
        return "\n".join(lines)
    lines.append(f"**Claims.** {counts['supported']} supported, {counts['refuted']} refuted, "
                 f"{counts['inconclusive']} inconclusive, {counts['untestable']} untestable (a "
                 "verdict reads the 95% t interval of the paired differences over seeds; a claim "
                 "whose preconditions fail is untestable, whatever its interval"
                 + ("; with one seed there is no interval, so every verdict is inconclusive"
                    if len(seeds) < 2 else "") + ").")
    lines.append("")
    meaning = {"supported": "the data support it", "refuted": "the data contradict it",
               "inconclusive": "these seeds cannot tell",
               "untestable": "a precondition fails, so this run does not test it"}
    for c, sentence in zip(items, claims_sentences(doc, labels), strict=True):
        status = c.get("status", c["verdict"])
        lines.append(f"* **{status}** ({meaning[status]}): {sentence}")
    return "\n".join(lines)


def _failed_reason(pre: Mapping[str, Any], path: str, labels: Mapping[str, str]) -> str:
    """Why one required precondition (``"<key>"`` or ``"<key>:<row>"``) fails, from its numbers."""
    key, _, row = path.partition(":")
    entry = pre.get(key) or {}
    entry = (entry.get(row) if row else entry) or {}
    name = labels.get(row, row)

    def f(x: Any) -> str:
        return _num(x, sign="")

    if not entry:
        return f"{key} was not measured"
    if key == "faithful_reward_validity":
        lo, hi = entry["ci95"]
        return (f"the faithful reward of {name} does not follow what its trajectories read: "
                f"within-group rank correlation with reading {_num(entry['mean'])} "
                f"[{_num(lo)}, {_num(hi)}], needs the interval above 0")
    if key == "start_reading_spread":
        return (f"{f(entry['mean'])} of {name}'s start-model rollouts depend on the cue (needs >= "
                f"{entry['threshold']:.2f}): there is little for the reward to select")
    if key == "within_group_reading_spread":
        return (f"within a group, {name}'s start-model rollouts read alike: {f(entry['mean'])} of "
                f"its groups hold both a cue-dependent and an evidence-dependent rollout (needs >= "
                f"{entry['threshold']:.2f}), so GRPO has no within-group difference in reading for "
                "the reward to select")
    if key == "rl_answer_change":
        return (f"{name} changed {f(entry['mean'])} of its start model's answers (needs >= "
                f"{entry['threshold']:.2f})")
    if key == "shortcut_baseline_conflict_accuracy":
        return (f"the shortcut baseline does not clearly take the shortcut (conflict accuracy "
                f"{f(entry['mean'])}, cue rate {f(entry['cue_rate'])}, chance {f(entry['chance'])})")
    return f"{path} does not hold"


def verdict_markdown(doc: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """The claims grouped by what they read as (``STATUSES``), each with its numbers and, for an
    untestable one, which precondition failed and by how much: the README's "what they say"."""
    labels = labels or {}
    groups: dict[str, list[Mapping[str, Any]]] = {s: [] for s in STATUSES}
    for c in doc["claims"]:
        groups[c.get("status", c["verdict"])].append(c)
    lines = []
    for status in STATUSES:
        if not groups[status]:
            continue
        lines.append(f"**{status.capitalize()}** ({len(groups[status])} of {len(doc['claims'])}):")
        for c in groups[status]:
            lo, hi = c["ci95"]
            text = (f"* {c['claim']}: {labels.get(c['a'], c['a'])} − {labels.get(c['b'], c['b'])} "
                    f"on {c['metric']} ({c['split']}) {_num(c['diff_mean'])} "
                    f"[{_num(lo)}, {_num(hi)}]")
            failed = [k for k, v in (c.get("preconditions") or {}).items() if not v]
            if failed:
                text += (f" (interval alone: {c['verdict']}); not tested because "
                         + "; and ".join(_failed_reason(doc["preconditions"], k, labels)
                                         for k in failed))
            lines.append(text)
        lines.append("")
    return "\n".join(lines).strip()
