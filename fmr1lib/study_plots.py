"""The study's summary figures: the ablation across seeds and rows (notebook 05) and the README's.

Notebook 05 draws the ablation from what the runs wrote: ``fig_headline`` from
``figures/ablation.csv`` alone (``read_ablation_csv``), ``fig_bars_with_errors`` per row and
split, ``fig_data_efficiency`` against the number of RL prompts, ``fig_stage_curves`` every
stage's training curves over seeds, and ``fig_claims`` the claims of ``claims.json``, the README's
headline figure; ``fig_method``, the README's method figure, is drawn by notebook 01 on a real
example. Each is drawn, saved and shown as every figure of ``plotting``, with its theme, names,
colours and overlays.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from fmr1lib.plotting import (
    EVIDENCE_COLOR,
    _cells_inside,
    _draw_boxes,
    _legend_below,
    _overlay,
    _overlay_handles,
    _save,
    _smooth_window,
    _step_label,
    _wrap,
    color_of,
    display_name,
    metric_name,
    smooth,
    theme,
)

# --------------------------------------------------------------------------------------
# Notebook 05: the ablation over seeds
# --------------------------------------------------------------------------------------


def fig_bars_with_errors(values: Mapping[str, Mapping[str, tuple[float, float]]],
                         path: str | Path | None = None, title: str = "", ylabel: str = "",
                         points: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> plt.Figure:
    """Grouped bars with error bars: ``values[group][series] = (mean, std)``.

    ``points`` (same keys) overlays the individual values (e.g. one dot per seed). A NaN std
    draws no error bar; a zero line is drawn. Groups are variants or ablation rows (shown by
    their display names), series are splits.
    """
    groups = list(values)
    series = list(dict.fromkeys(s for g in groups for s in values[g]))
    labels = [display_name(g) for g in groups]
    split_colors = dict(zip(series, sns.color_palette("deep", len(series)), strict=True))
    width = 0.8 / max(1, len(series))
    dots_labelled = False
    with theme():
        fig, ax = plt.subplots(figsize=(2.0 + 0.75 * len(groups) * max(1, len(series)) ** 0.5, 4.0))
        for i, s in enumerate(series):
            xs = np.arange(len(groups)) - 0.4 + width * (i + 0.5)
            means = np.array([values[g].get(s, (np.nan, np.nan))[0] for g in groups], dtype=float)
            errs = np.array([values[g].get(s, (np.nan, np.nan))[1] for g in groups], dtype=float)
            ax.bar(xs, np.nan_to_num(means), width, label=s, color=split_colors[s])
            ok = ~np.isnan(errs) & ~np.isnan(means)
            if ok.any():
                ax.errorbar(xs[ok], means[ok], yerr=errs[ok], fmt="none", ecolor="#333333",
                            elinewidth=1, capsize=3)
            if points:
                for x, g in zip(xs, groups, strict=True):
                    ys = [v for v in points.get(g, {}).get(s, []) if not np.isnan(v)]
                    ax.scatter([x] * len(ys), ys, s=14, color="black", zorder=3, linewidths=0,
                               label=None if dots_labelled or not ys else "seeds")
                    dots_labelled = dots_labelled or bool(ys)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(np.arange(len(groups)), [_wrap(lab, 14) for lab in labels])
        ax.grid(axis="x", visible=False)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        fig.tight_layout()
        h, lab = ax.get_legend_handles_labels()
        _legend_below(fig, h, lab)
    return _save(fig, path)


def fig_data_efficiency(points: Sequence[Mapping[str, Any]], path: str | Path | None = None,
                        title: str = "", key: str = "accuracy", chance: float | None = None) -> plt.Figure:
    """``key`` against the number of distinct RL training prompts, one line per variant.

    ``points`` are dicts with ``variant``, ``prompts`` and ``key`` (several seeds per
    x average, the spread shown as a band when there are several).
    """
    with theme():
        fig, ax = plt.subplots(figsize=(5.4, 3.8))
        for variant in dict.fromkeys(p["variant"] for p in points):
            xs = sorted({p["prompts"] for p in points if p["variant"] == variant})
            ys = [[p[key] for p in points if p["variant"] == variant and p["prompts"] == x] for x in xs]
            mean = np.array([np.mean(y) for y in ys])
            color = color_of(variant)
            ax.plot(xs, mean, marker="o", lw=1.8, color=color, label=display_name(variant))
            if any(len(y) > 1 for y in ys):
                sd = np.array([np.std(y, ddof=1) if len(y) > 1 else 0.0 for y in ys])
                ax.fill_between(xs, mean - sd, mean + sd, color=color, alpha=0.2)
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", lw=1.2, label="chance")
        ax.set_xscale("log")
        # Ticked at the prompt counts that were run (a log axis alone ticks 10, 100, ...).
        counts = sorted({int(p["prompts"]) for p in points})
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.minorticks_off()
        ax.set_xlabel("distinct RL training prompts")
        ax.set_ylabel(metric_name(key))
        ax.set_title(title)
        fig.tight_layout()
        h, lab = ax.get_legend_handles_labels()
        _legend_below(fig, h, lab, ncol=3)
    return _save(fig, path)


def fig_stage_curves(panels: Sequence[tuple[str, Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], str]],
                     path: str | Path | None = None, title: str = "") -> plt.Figure:
    """One panel per ``(title, {name: [metrics rows of each seed]}, key)``: ``key`` against step.

    Per name, in the name's colour: each seed as a thin line and the mean over seeds (at the
    steps every seed logged) as a thick one; long curves (over ``plotting.SMOOTH_POINTS``
    points) are moving averages over a tenth of the run. One legend below the panels names every
    run once.
    """
    with theme():
        fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels), 3.4), squeeze=False)
        handles: dict[str, Any] = {}
        for ax, (name, logs, key) in zip(axes[0], panels, strict=True):
            window = 1
            for run, seeds in logs.items():
                curves = []
                for rows in seeds:
                    pts = dict((r["step"], r[key]) for r in rows if r.get(key) is not None)
                    if pts:
                        curves.append(pts)
                if not curves:
                    continue
                color = color_of(run)
                for pts in curves:
                    xs = sorted(pts)
                    w = _smooth_window(len(xs))
                    window = max(window, w)
                    ax.plot(xs, smooth([pts[x] for x in xs], w), color=color,
                            **({"lw": 0.7, "alpha": 0.35} if len(curves) > 1 else {"lw": 1.6}))
                common = sorted(set.intersection(*(set(p) for p in curves)))
                if len(curves) > 1 and common:
                    w = _smooth_window(len(common))
                    mean = [float(np.mean([p[x] for p in curves])) for x in common]
                    ax.plot(common, smooth(mean, w), lw=2.0, color=color)
                handles.setdefault(display_name(run), Line2D([], [], color=color, lw=2.0))
            ax.set_xlabel(_wrap(_step_label(window).replace("; faint: raw", ""), 40))
            ax.set_title(_wrap(f"{name}: {metric_name(key)}", 30))
        if title:
            fig.suptitle(title, fontsize=12)
        fig.tight_layout()
        if handles:
            n_seeds = max((len(s) for _, logs, _ in panels for s in logs.values()), default=1)
            if n_seeds > 1:
                handles[f"thin: each of {n_seeds} seeds; thick: their mean"] = Line2D(
                    [], [], color="#555555", lw=0.7)
            _legend_below(fig, list(handles.values()), list(handles), ncol=min(len(handles), 4))
    return _save(fig, path)


# --------------------------------------------------------------------------------------
# The README's figures: the headline numbers and the method
# --------------------------------------------------------------------------------------

HEADLINE_PANELS: tuple[tuple[str, str], ...] = (
    ("focus_mass", "test_id"), ("focus_mass", "test_ood"),
    ("conflict_accuracy", "test_ood"), ("faithfulness_gap", "test_ood"),
)
"""The ablation's key metrics (metric, split) shown by ``fig_headline``."""


VERDICT_COLORS = {"supported": "#029e73", "refuted": "#d55e00", "inconclusive": "#949494",
                  "untestable": "#cc78bc"}
"""How the claims figure colours each status (``claims.STATUSES``)."""


def fig_claims(doc: Mapping[str, Any] | str | Path, path: str | Path | None = None,
               title: str = "") -> plt.Figure:
    """The claims of ``claims.json`` (a path or the document): per claim the mean paired
    difference ``a - b`` over seeds (dot), its 95% t interval (bar) and each seed's difference
    (small dots), coloured by status (the verdict, or ``untestable`` where a precondition
    fails), against the zero line."""
    if isinstance(doc, (str, Path)):
        doc = json.loads(Path(doc).read_text(encoding="utf-8"))
    items = list(doc["claims"])
    with theme():
        fig, ax = plt.subplots(figsize=(9.5, 0.9 + 0.55 * max(1, len(items))))
        for i, c in enumerate(items):
            y = len(items) - 1 - i
            status = c.get("status", c["verdict"])
            color = VERDICT_COLORS.get(status, "#333333")
            lo, hi = (np.nan if v is None else v for v in c["ci95"])
            mean = np.nan if c["diff_mean"] is None else c["diff_mean"]
            if not (np.isnan(lo) or np.isnan(hi)):
                ax.plot([lo, hi], [y, y], color=color, lw=3, solid_capstyle="butt", alpha=0.6)
            ax.scatter([mean], [y], color=color, s=40, zorder=3)
            seeds = [d for d in c.get("seed_diffs", []) if d is not None]
            ax.scatter(seeds, [y + 0.18] * len(seeds), color=color, s=9, zorder=3, alpha=0.8)
            ax.text(1.02, y, status, transform=ax.get_yaxis_transform(),
                    va="center", color=color, fontsize=9, fontweight="bold")
        ax.axvline(0.0, color="#333333", lw=1)
        ax.set_yticks(range(len(items)))
        ax.set_yticklabels([f"{display_name(c['a'])} − {display_name(c['b'])}\n"
                            f"{display_name(c['metric'])} ({c['split']})" for c in items[::-1]],
                           fontsize=8)
        ax.set_xlabel(f"paired difference a − b (mean over {len(doc.get('seeds', []))} seeds, "
                      f"95% t interval; small dots: seeds)")
        ax.set_title(title or "The claims, tested")
        fig.tight_layout()
    return _save(fig, path)


def read_ablation_csv(path: str | Path) -> list[dict[str, Any]]:
    """``figures/ablation.csv`` (``ablation.table_csv``) back as long-form rows: ``row``,
    ``split``, ``metric``, ``mean``, ``std``, ``n_seeds`` and ``seed_means`` (floats)."""
    with open(path, encoding="utf-8", newline="") as fh:
        out = []
        for r in csv.DictReader(fh):
            out.append({"row": r["row"], "split": r["split"], "metric": r["metric"],
                        "mean": float(r["mean"]), "std": float(r["std"]),
                        "n_seeds": int(r["n_seeds"]),
                        "seed_means": [float(v) for v in r["seed_means"].split()]})
    return out


def fig_headline(ablation: str | Path | Sequence[Mapping[str, Any]], path: str | Path | None = None,
                 panels: Sequence[tuple[str, str]] = HEADLINE_PANELS,
                 chance: Mapping[str, float] | None = None, title: str = "") -> plt.Figure:
    """The ablation's key metrics, one panel per ``(metric, split)``: per row the mean over
    seeds (bar) ± std (error bar) and each seed's value (dots).

    Args:
        ablation: the path of ``ablation.csv`` (so the figure can be drawn from the CSV alone)
            or the long-form rows of ``ablation.aggregate`` / ``read_ablation_csv``.
        chance: metric -> chance level, drawn as a dotted line in that metric's panels.
    """
    long = read_ablation_csv(ablation) if isinstance(ablation, (str, Path)) else list(ablation)
    index = {(e["row"], e["split"], e["metric"]): e for e in long}
    rows = list(dict.fromkeys(e["row"] for e in long))
    n_seeds = max([int(e["n_seeds"]) for e in long] + [1])
    with theme():
        fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels) + 2.2, 0.42 * len(rows) + 1.6),
                                 squeeze=False, sharey=True)
        ys = np.arange(len(rows))
        for ax, (metric, split) in zip(axes[0], panels, strict=True):
            for y, row in zip(ys, rows, strict=True):
                e = index.get((row, split, metric))
                if e is None or np.isnan(e["mean"]):
                    ax.text(0.02, y, "n/a", va="center", fontsize=8, color="grey",
                            transform=ax.get_yaxis_transform())
                    continue
                ax.barh(y, e["mean"], height=0.65, color=color_of(row), alpha=0.85)
                if not np.isnan(e["std"]):
                    ax.errorbar(e["mean"], y, xerr=e["std"], fmt="none", ecolor="#333333",
                                elinewidth=1, capsize=3)
                seeds = [v for v in e["seed_means"] if not np.isnan(v)]
                if len(seeds) > 1:
                    ax.scatter(seeds, [y] * len(seeds), s=16, color="black", zorder=3, linewidths=0)
            if chance and metric in chance:
                ax.axvline(chance[metric], color="grey", ls=":", lw=1.2)
                ax.text(chance[metric], len(rows) - 0.45, " chance", color="grey", fontsize=8,
                        va="bottom")
            ax.axvline(0, color="#555555", lw=0.8)
            ax.set_title(_wrap(f"{metric_name(metric)} ({split})", 26))
            ax.grid(axis="y", visible=False)
        axes[0, 0].set_yticks(ys, [display_name(r) for r in rows])
        axes[0, 0].invert_yaxis()
        seeds = f"{n_seeds} training seeds" if n_seeds > 1 else "1 training seed"
        fig.suptitle(title or f"Ablation: bars the mean over {seeds}, whiskers ± std, dots the seeds",
                     fontsize=11)
        fig.tight_layout()
    return _save(fig, path)


def _box(ax: plt.Axes, xy: tuple[float, float], text: str, color: str = "#f2f2f2",
         edge: str = "#555555", fontsize: float = 9.5,
         size: tuple[float | None, float] = (None, 0.075), **kw: Any) -> None:
    """A rounded box with ``text`` centred at ``xy`` (axes coordinates); ``size`` is
    ``(width, height)``, a width of None fitting the text."""
    x, y = xy
    width, height = size
    w = width if width is not None else 0.012 * len(text) + 0.03
    ax.add_patch(FancyBboxPatch((x - w / 2, y - height / 2), w, height,
                                boxstyle="round,pad=0.008,rounding_size=0.015",
                                fc=color, ec=edge, lw=1.0, transform=ax.transAxes))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, transform=ax.transAxes, **kw)


def _arrow(ax: plt.Axes, a: tuple[float, float], b: tuple[float, float], color: str = "#555555",
           lw: float = 1.3, rad: float = 0.0, coords: Any = None) -> None:
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=11, color=color, lw=lw,
                                 connectionstyle=f"arc3,rad={rad}",
                                 transform=coords if coords is not None else ax.transAxes))


def fig_method(row: Mapping[str, Any], path: str | Path | None = None,
               cell_px: int = 28) -> plt.Figure:
    """The method on one real example: stage 1 supervises the ``<Focus>`` token's attention
    over the image-token grid with the evidence box; stage 2 samples trajectories, compares
    the policy on ``I`` and on the counterfactual ``I'`` (evidence removed) token by token
    (``s_t``), and rewards correct trajectories whose vision-dependent tokens attend to ``C``.

    Args:
        row: a record with ``image``, ``image_cf_evidence``, ``evidence_boxes``, ``question``,
            ``answer`` and ``meta`` (for the cue).
        cell_px: pixels per merged image token (28 for Qwen2.5-VL).
    """
    img = row["image"]
    w, h = img.size
    rows_, cols_ = max(1, round(h / cell_px)), max(1, round(w / cell_px))
    inside = _cells_inside(row["evidence_boxes"], (rows_, cols_), (w, h))
    with theme():
        fig = plt.figure(figsize=(13.5, 5.6))
        canvas = fig.add_axes((0, 0, 1, 1))
        canvas.axis("off")
        canvas.set_xlim(0, 1)
        canvas.set_ylim(0, 1)
        # Stage panels.
        for x0, wd, color, label in ((0.01, 0.39, "#e8f5e9", "Stage 1 · Anchoring (SFT)"),
                                     (0.42, 0.57, "#fff3e0", "Stage 2 · Reinforcing (GRPO from the stage-1 model)")):
            canvas.add_patch(FancyBboxPatch((x0, 0.03), wd, 0.9, boxstyle="round,pad=0.005,rounding_size=0.02",
                                            fc=color, ec="#bbbbbb", lw=1))
            canvas.text(x0 + 0.015, 0.955, label, fontsize=13, fontweight="bold", va="center")
        # Stage 1: image with the token grid, the evidence box and q; the <Focus> token.
        ax1 = fig.add_axes((0.03, 0.36, 0.2, 0.5))
        ax1.imshow(img)
        for r in range(rows_):
            for c in range(cols_):
                if inside[r, c]:
                    ax1.add_patch(Rectangle((c * w / cols_ - 0.5, r * h / rows_ - 0.5), w / cols_, h / rows_,
                                            fc=EVIDENCE_COLOR, alpha=0.25, ec="none"))
        for r in range(rows_ + 1):
            ax1.axhline(r * h / rows_ - 0.5, color="white", lw=0.8)
        for c in range(cols_ + 1):
            ax1.axvline(c * w / cols_ - 0.5, color="white", lw=0.8)
        _overlay(ax1, row)
        ax1.set_title("I, its image tokens, q = evidence cells", fontsize=9.5)
        ax1.axis("off")
        _box(canvas, (0.13, 0.24), "<Focus>", color="#c8e6c9", edge=EVIDENCE_COLOR, fontsize=11,
             size=(0.09, 0.075), fontweight="bold")
        canvas.text(0.13, 0.16, _wrap(f"{row['question']}  →  <Focus> <think>…</think> "
                                      f"<answer>{row['answer']}</answer>", 44),
                    ha="center", va="center", fontsize=8.5, family="monospace")
        r_ev, c_ev = np.argwhere(inside)[0] if inside.any() else (0, 0)
        target = ((c_ev + 0.5) * w / cols_, (r_ev + 0.5) * h / rows_)
        fig_pt = fig.transFigure.inverted().transform(ax1.transData.transform(target))
        fig.add_artist(FancyArrowPatch((0.13, 0.28), tuple(fig_pt), arrowstyle="-|>", mutation_scale=16,
                                       color=EVIDENCE_COLOR, lw=2.6, connectionstyle="arc3,rad=-0.3",
                                       transform=fig.transFigure, zorder=10))
        canvas.text(0.255, 0.76, "p: the attention of <Focus>\nover the image tokens", fontsize=9.5,
                    va="center")
        canvas.text(0.255, 0.58, "L = CE(response)\n   + λ · KL(q ‖ p)", fontsize=11, va="center",
                    family="monospace")
        canvas.text(0.255, 0.4, _wrap("perception becomes a subtask before reasoning: the "
                                      "<Focus> learns to look at the evidence", 26), fontsize=8.5,
                    va="center", color="#333333")
        # Stage 2: I and I', the policy on each, s_t, c, the reward.
        ax2 = fig.add_axes((0.44, 0.5, 0.13, 0.33))
        ax2.imshow(img)
        _overlay(ax2, row)
        ax2.set_title("I", fontsize=10)
        ax2.axis("off")
        ax3 = fig.add_axes((0.44, 0.09, 0.13, 0.33))
        ax3.imshow(row["image_cf_evidence"])
        _draw_boxes(ax3, row["evidence_boxes"], EVIDENCE_COLOR, ls=":")
        ax3.set_title("I': evidence C removed", fontsize=10)
        ax3.axis("off")
        _box(canvas, (0.65, 0.665), "π(· | I, y<t)", color="white", size=(0.1, 0.075))
        _box(canvas, (0.65, 0.255), "π(· | I', y<t)", color="white", size=(0.1, 0.075))
        _arrow(canvas, (0.58, 0.665), (0.598, 0.665))
        _arrow(canvas, (0.58, 0.255), (0.598, 0.255))
        xc, bw = 0.868, 0.215
        steps = [(0.83, "1. sample G trajectories y ~ π(· | I)", "#ffe0b2", 0.075),
                 (0.64, "2. per token: s_t = KL(π(·|I, y<t) ‖ π(·|I', y<t))", "white", 0.075),
                 (0.44, _wrap("3. c = attention share inside C of the top-κ tokens by s_t", 34),
                  "white", 0.1),
                 (0.235, _wrap("4. r = r_acc + r_format + 1[correct] · r_faithful(c)", 32),
                  "#ffcc80", 0.1)]
        for y, text, color, hh in steps:
            _box(canvas, (xc, y), text, color=color, size=(bw, hh), fontsize=9.2,
                 fontweight="bold" if text.startswith("4.") else "normal")
        for (y0, *_, h0), (y1, *_, h1) in zip(steps, steps[1:], strict=False):
            _arrow(canvas, (xc, y0 - h0 / 2 - 0.008), (xc, y1 + h1 / 2 + 0.008))
        _arrow(canvas, (0.70, 0.68), (xc - bw / 2 - 0.008, 0.83), rad=-0.2)
        _arrow(canvas, (0.70, 0.655), (xc - bw / 2 - 0.008, 0.64))
        _arrow(canvas, (0.70, 0.27), (xc - bw / 2 - 0.008, 0.625), rad=0.25)
        canvas.text(xc, 0.12, "→ group-normalised advantages, policy update", fontsize=9,
                    ha="center", va="center", color="#333333")
        canvas.legend(handles=_overlay_handles(), loc="lower left", bbox_to_anchor=(0.015, 0.035),
                      fontsize=8.5, frameon=False, ncol=2)
    return _save(fig, path)
