"""Figures: one ``fig_*`` function per figure, one style.

Each function takes data (datasets, dicts of numbers, arrays), draws one figure, saves
it as PNG when ``path`` is given (atomically, through a temp file), and returns the
``matplotlib.figure.Figure`` so a notebook shows it inline.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from fmr1lib.repro import atomic_write_bytes

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 110,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
EVIDENCE_COLOR = "#00c853"
CUE_COLOR = "#d500f9"
CONTROL_COLOR = "#2962ff"


def _save(fig: plt.Figure, path: str | Path | None) -> plt.Figure:
    if path is not None:
        buf = io.BytesIO()
        # A fixed metadata dict keeps the PNG bytes identical across runs.
        fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
        atomic_write_bytes(path, buf.getvalue())
    return fig


def _draw_boxes(ax: plt.Axes, boxes: Sequence[Sequence[float]], color: str, lw: float = 1.5,
                ls: str = "-") -> None:
    for x0, y0, x1, y1 in boxes:
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                               edgecolor=color, linewidth=lw, linestyle=ls))


def fig_sample_grid(rows: Sequence[Mapping[str, Any]], path: str | Path | None = None,
                    ncols: int = 6) -> plt.Figure:
    """Scenes with their question/answer, evidence boxes (green) and the cue (magenta).

    Args:
        rows: records with ``image``, ``question``, ``answer``, ``evidence_boxes`` and a
            decoded ``meta`` dict.
    """
    n = len(rows)
    nrows = max(1, int(np.ceil(n / ncols)))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(2.1 * ncols, 2.45 * nrows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, row in zip(axes.flat, rows, strict=False):
            ax.imshow(row["image"])
            _draw_boxes(ax, row["evidence_boxes"], EVIDENCE_COLOR)
            cue = row["meta"].get("cue")
            if cue is not None:
                agree = row["meta"].get("shortcut_agrees")
                _draw_boxes(ax, [cue["box"]], CUE_COLOR, lw=1.2, ls="--")
                ax.text(cue["box"][0], cue["box"][1] - 2, "cue=" + ("ans" if agree else "other"),
                        color=CUE_COLOR, fontsize=6)
            ax.set_title(f"{row['question']}\n→ {row['answer']}  [{row['meta']['split']}]",
                         fontsize=7)
        fig.suptitle("FocusShapes: evidence boxes (green), shortcut cue (magenta)", fontsize=10)
        fig.tight_layout()
    return _save(fig, path)


def fig_data_summary(task_counts: Mapping[str, Mapping[str, int]],
                     answer_counts: Mapping[str, Mapping[str, int]],
                     agreement: Mapping[str, float], path: str | Path | None = None) -> plt.Figure:
    """Question families and answers per split, and the cue's agreement rate per split."""
    splits = list(task_counts)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
        fams = sorted({f for c in task_counts.values() for f in c})
        answers = sorted({a for c in answer_counts.values() for a in c})
        width = 0.8 / len(splits)
        for i, s in enumerate(splits):
            tot = max(1, sum(task_counts[s].values()))
            axes[0].bar(np.arange(len(fams)) + i * width, [task_counts[s].get(f, 0) / tot for f in fams],
                        width, label=s)
            tot = max(1, sum(answer_counts[s].values()))
            axes[1].bar(np.arange(len(answers)) + i * width,
                        [answer_counts[s].get(a, 0) / tot for a in answers], width, label=s)
        axes[0].set_xticks(np.arange(len(fams)) + 0.4 - width / 2, fams)
        axes[0].set_ylabel("share of split")
        axes[0].set_title("question families")
        axes[1].set_xticks(np.arange(len(answers)) + 0.4 - width / 2, answers, rotation=45)
        axes[1].set_title("answers")
        axes[1].legend(fontsize=7)
        vals = [agreement[s] for s in splits]
        axes[2].bar(splits, [0 if np.isnan(v) else v for v in vals],
                    color=["#888" if np.isnan(v) else "#d500f9" for v in vals])
        for j, v in enumerate(vals):
            axes[2].text(j, (0 if np.isnan(v) else v) + 0.02, "no cue" if np.isnan(v) else f"{v:.2f}",
                         ha="center", fontsize=8)
        axes[2].set_ylim(0, 1.1)
        axes[2].set_title("cue agrees with answer (cued examples)")
        fig.tight_layout()
    return _save(fig, path)


def fig_interventions(rows: Sequence[Mapping[str, Any]], path: str | Path | None = None) -> plt.Figure:
    """Original, evidence-intervened and control-intervened views side by side."""
    n = len(rows)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.2 * n), squeeze=False)
        for r, row in enumerate(rows):
            views = [("original", row["image"], row["evidence_boxes"], EVIDENCE_COLOR),
                     ("evidence removed", row["image_cf_evidence"], row["evidence_boxes"], EVIDENCE_COLOR),
                     ("control removed", row["image_cf_control"], row["control_boxes"], CONTROL_COLOR)]
            for c, (title, img, boxes, color) in enumerate(views):
                ax = axes[r, c]
                ax.imshow(img)
                _draw_boxes(ax, boxes, color, ls=":")
                ax.axis("off")
                ax.set_title(title if c else f"{row['question']} → {row['answer']}", fontsize=7)
        fig.tight_layout()
    return _save(fig, path)


def fig_token_grid(image: Any, grid_thw: Sequence[int], boxes: Sequence[Sequence[float]] = (),
                   target: Any = None, path: str | Path | None = None) -> plt.Figure:
    """The merged image-token grid over an image, token index per cell, and the target q."""
    _, gh, gw = (int(v) for v in grid_thw)
    rows, cols = gh // 2, gw // 2
    w, h = image.size
    with plt.rc_context(STYLE):
        n = 2 if target is not None else 1
        fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
        ax = axes[0, 0]
        ax.imshow(image)
        for r in range(rows + 1):
            ax.axhline(r * h / rows - 0.5, color="white", lw=0.8)
        for c in range(cols + 1):
            ax.axvline(c * w / cols - 0.5, color="white", lw=0.8)
        for r in range(rows):
            for c in range(cols):
                ax.text((c + 0.5) * w / cols, (r + 0.5) * h / rows, str(r * cols + c),
                        color="black", ha="center", va="center", fontsize=7, alpha=0.6)
        _draw_boxes(ax, boxes, EVIDENCE_COLOR)
        ax.set_title(f"{rows}x{cols} image tokens (k -> cell (k // {cols}, k % {cols}))")
        ax.axis("off")
        if target is not None:
            im = axes[0, 1].imshow(np.asarray(target), cmap="viridis", vmin=0)
            axes[0, 1].set_title("anchoring target q (box overlap)")
            axes[0, 1].axis("off")
            fig.colorbar(im, ax=axes[0, 1], fraction=0.046)
        fig.tight_layout()
    return _save(fig, path)


def fig_attention_maps(rows: Sequence[Mapping[str, Any]], maps: Mapping[str, Sequence[Any]],
                       path: str | Path | None = None, title: str = "") -> plt.Figure:
    """Focus attention heatmaps (one column per model/variant) over the same test images.

    Args:
        rows: records with ``image``, ``question``, ``answer``, ``evidence_boxes``.
        maps: variant name -> one ``[rows, cols]`` attention grid per record.
    """
    names = list(maps)
    n = len(rows)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(n, len(names) + 1, figsize=(2.2 * (len(names) + 1), 2.3 * n),
                                 squeeze=False)
        for i, row in enumerate(rows):
            ax = axes[i, 0]
            ax.imshow(row["image"])
            _draw_boxes(ax, row["evidence_boxes"], EVIDENCE_COLOR)
            ax.set_title(f"{row['question']}\n→ {row['answer']}", fontsize=7)
            ax.axis("off")
            w, h = row["image"].size
            for j, name in enumerate(names):
                grid = np.asarray(maps[name][i])
                ax = axes[i, j + 1]
                ax.imshow(row["image"], alpha=0.45)
                ax.imshow(grid, cmap="magma", alpha=0.65, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                          vmin=0, vmax=max(float(grid.max()), 1e-6), interpolation="nearest")
                _draw_boxes(ax, row["evidence_boxes"], EVIDENCE_COLOR, lw=1.0)
                mass = float(grid[_cells_inside(row["evidence_boxes"], grid.shape, (w, h))].sum())
                ax.set_title(f"{name}\nmass in evidence {mass:.2f}", fontsize=7)
                ax.axis("off")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
    return _save(fig, path)


def _cells_inside(boxes: Sequence[Sequence[float]], shape: tuple[int, int],
                  size: tuple[int, int]) -> np.ndarray:
    rows, cols = shape
    w, h = size
    mask = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        for r in range(rows):
            for c in range(cols):
                cx0, cx1 = c * w / cols, (c + 1) * w / cols
                cy0, cy1 = r * h / rows, (r + 1) * h / rows
                if min(cx1, x1) > max(cx0, x0) and min(cy1, y1) > max(cy0, y0):
                    mask[r, c] = True
    return mask


def fig_training_curves(logs: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str],
                        path: str | Path | None = None, title: str = "") -> plt.Figure:
    """One panel per metric key, one line per run (rows of a ``metrics.jsonl``)."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 2.8), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            for name, rows in logs.items():
                pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, label=name, lw=1.4)
            ax.set_xlabel("step")
            ax.set_title(key)
        axes[0, 0].legend(fontsize=7)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
    return _save(fig, path)


def fig_metric_bars(values: Mapping[str, Mapping[str, float]], path: str | Path | None = None,
                    title: str = "", ylim: tuple[float, float] | None = (0, 1.05),
                    chance: Mapping[str, float] | None = None) -> plt.Figure:
    """Grouped bars: ``values[group][series]`` (e.g. split -> metric), chance lines optional."""
    groups = list(values)
    series = list(dict.fromkeys(s for g in groups for s in values[g]))
    width = 0.8 / max(1, len(series))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(groups) * max(1, len(series)) / 2, 3))
        for i, s in enumerate(series):
            ys = [values[g].get(s, np.nan) for g in groups]
            xs = np.arange(len(groups)) + i * width
            ax.bar(xs, ys, width, label=s)
            for x, y in zip(xs, ys, strict=True):
                if not np.isnan(y):
                    ax.text(x, y + 0.01, f"{y:.2f}", ha="center", fontsize=6)
        if chance:
            for j, g in enumerate(groups):
                if g in chance:
                    ax.hlines(chance[g], j - width / 2, j + 0.8 - width / 2, colors="grey",
                              linestyles=":", label="chance" if j == 0 else None)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
        if ylim:
            ax.set_ylim(*ylim)
        ax.legend(fontsize=7)
        ax.set_title(title)
        fig.tight_layout()
    return _save(fig, path)


def fig_visual_dependency(row: Mapping[str, Any], cf_image: Any,
                          explained: Sequence[Mapping[str, Any]], labels: Sequence[str],
                          path: str | Path | None = None) -> plt.Figure:
    """The faithful reward's worked example: image, its counterfactual, and per-token ``s_t``
    (bars) with each token's attention share inside the region (dots), per trajectory."""
    n = len(explained)
    with plt.rc_context(STYLE):
        fig = plt.figure(figsize=(4.4 + 5.2, 2.6 * max(1, n)))
        gs = fig.add_gridspec(n, 3, width_ratios=[1, 1, 2.6])
        ax = fig.add_subplot(gs[:, 0])
        ax.imshow(row["image"])
        _draw_boxes(ax, row["evidence_boxes"], EVIDENCE_COLOR)
        ax.set_title(f"I: {row['question']} → {row['answer']}", fontsize=7)
        ax.axis("off")
        ax = fig.add_subplot(gs[:, 1])
        ax.imshow(cf_image)
        ax.set_title("I': evidence removed", fontsize=7)
        ax.axis("off")
        for i, (ex, label) in enumerate(zip(explained, labels, strict=True)):
            ax = fig.add_subplot(gs[i, 2])
            xs = np.arange(len(ex["tokens"]))
            ax.bar(xs, ex["s_t"], color="#ff7043", label="s_t = KL(π(·|I) ‖ π(·|I'))")
            ax.set_ylabel("s_t")
            ax2 = ax.twinx()
            ax2.plot(xs, ex["share"], "o", color="#1e88e5", ms=3, label="attention share in C")
            ax2.set_ylim(0, 1.05)
            ax.set_xticks(xs, [t.replace("\n", "\\n") for t in ex["tokens"]], rotation=70, fontsize=6)
            ax.set_title(f"{label}: c = {ex['concentration']:.2f} "
                         f"({'correct' if ex['correct'] else 'wrong'})", fontsize=8)
            if i == 0:
                h1, l1 = ax.get_legend_handles_labels()
                h2, l2 = ax2.get_legend_handles_labels()
                ax.legend(h1 + h2, l1 + l2, fontsize=6, loc="upper left")
        fig.tight_layout()
    return _save(fig, path)


def fig_bars_with_errors(values: Mapping[str, Mapping[str, tuple[float, float]]],
                         path: str | Path | None = None, title: str = "", ylabel: str = "",
                         points: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> plt.Figure:
    """Grouped bars with error bars: ``values[group][series] = (mean, std)``.

    ``points`` (same keys) overlays the individual values (e.g. one dot per seed). A NaN std
    draws no error bar; a zero line is drawn when the values change sign.
    """
    groups = list(values)
    series = list(dict.fromkeys(s for g in groups for s in values[g]))
    width = 0.8 / max(1, len(series))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(1.8 + 0.55 * len(groups) * max(1, len(series)), 3.2))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, s in enumerate(series):
            xs = np.arange(len(groups)) + i * width
            means = [values[g].get(s, (np.nan, np.nan))[0] for g in groups]
            errs = [values[g].get(s, (np.nan, np.nan))[1] for g in groups]
            ax.bar(xs, means, width, label=s, color=colors[i % len(colors)],
                   yerr=[0 if np.isnan(e) else e for e in errs], capsize=2, error_kw={"lw": 0.8})
            if points:
                for x, g in zip(xs, groups, strict=True):
                    ys = list(points.get(g, {}).get(s, []))
                    ax.scatter([x] * len(ys), ys, s=6, color="black", zorder=3)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=20, ha="right")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.set_title(title)
        fig.tight_layout()
    return _save(fig, path)


def fig_data_efficiency(points: Sequence[Mapping[str, Any]], path: str | Path | None = None,
                        title: str = "", key: str = "accuracy", chance: float | None = None) -> plt.Figure:
    """``key`` against the number of distinct RL training prompts, one line per variant.

    ``points`` are dicts with ``variant``, ``prompts`` and ``key`` (several seeds per
    x average, the spread shown as a band when there are several).
    """
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(4.2, 3.0))
        for variant in dict.fromkeys(p["variant"] for p in points):
            xs = sorted({p["prompts"] for p in points if p["variant"] == variant})
            ys = [[p[key] for p in points if p["variant"] == variant and p["prompts"] == x] for x in xs]
            mean = np.array([np.mean(y) for y in ys])
            line, = ax.plot(xs, mean, marker="o", lw=1.4, label=variant)
            if any(len(y) > 1 for y in ys):
                sd = np.array([np.std(y, ddof=1) if len(y) > 1 else 0.0 for y in ys])
                ax.fill_between(xs, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("distinct RL training prompts")
        ax.set_ylabel(key)
        ax.legend(fontsize=7)
        ax.set_title(title)
        fig.tight_layout()
    return _save(fig, path)


def fig_stage_curves(panels: Sequence[tuple[str, Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], str]],
                     path: str | Path | None = None, title: str = "") -> plt.Figure:
    """One panel per ``(title, {name: [metrics rows of each seed]}, key)``: ``key`` against step.

    Every seed of a name is drawn in the name's colour (thin lines), labelled once.
    """
    with plt.rc_context(STYLE):
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 2.9), squeeze=False)
        for ax, (name, logs, key) in zip(axes[0], panels, strict=True):
            for i, (run, seeds) in enumerate(logs.items()):
                for k, rows in enumerate(seeds):
                    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                    if pts:
                        xs, ys = zip(*pts, strict=True)
                        ax.plot(xs, ys, lw=0.9, alpha=0.8, color=colors[i % len(colors)],
                                label=run if k == 0 else None)
            ax.set_xlabel("step")
            ax.set_title(f"{name}: {key}")
            if logs:
                ax.legend(fontsize=6)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
    return _save(fig, path)
