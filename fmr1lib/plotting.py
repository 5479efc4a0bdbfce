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
