"""Figures: one ``fig_*`` function per figure, one theme, one name per variant.

Each function takes data (datasets, dicts of numbers, arrays), draws one figure, saves
it when ``path`` is given as PNG and, beside it, as PDF for print (atomically, through a temp
file, with fixed metadata so that the bytes repeat), shows it in the output of the notebook
cell that drew it (``show``: in every Jupyter kernel, whatever matplotlib backend the
environment chose, ``MPLBACKEND=Agg`` in headless runs included) and returns the
``matplotlib.figure.Figure``.

Every figure is drawn inside ``theme()`` (seaborn's ``whitegrid`` style and ``notebook``
context, applied as an rc context so the global matplotlib state is left alone). Variants and
ablation rows are shown under one name each (``DISPLAY_NAMES``, the labels of the ablation
table) and in one colour each (``color_of``), in every figure. Overlays use one scheme:
evidence boxes solid green, the shortcut cue dashed magenta, control regions dotted blue.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.colors import PowerNorm
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from fmr1lib import records
from fmr1lib.config import ABLATION_ROW_LABELS
from fmr1lib.repro import atomic_write_bytes

# --------------------------------------------------------------------------------------
# Theme, names, colours
# --------------------------------------------------------------------------------------

THEME = {"style": "whitegrid", "context": "notebook", "font_scale": 0.9, "palette": "colorblind"}
"""The one seaborn theme of every figure (``theme()``)."""

_RC_EXTRA = {
    "figure.dpi": 100,
    "savefig.dpi": 110,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titleweight": "normal",
    "legend.frameon": False,
    "image.interpolation": "nearest",
}

DISPLAY_NAMES: dict[str, str] = {
    **ABLATION_ROW_LABELS,
    # stage 0
    "warm-up": "stage-0 warm-up",
    "warmup": "stage-0 warm-up",
    "stage 0 warm-up": "stage-0 warm-up",
    # stage-1 and stage-2 variant names (notebooks 03-04) under their ablation row's label
    "plain": "plain SFT",
    "focus_anchor": ABLATION_ROW_LABELS["anchoring"],
    "anchored (start)": ABLATION_ROW_LABELS["anchoring"],
    "grpo": ABLATION_ROW_LABELS["anchoring_grpo"],
    "faithful": ABLATION_ROW_LABELS["faithful_mr1"],
    "faithful_occlusion": ABLATION_ROW_LABELS["faithful_mr1_occlusion"],
    "grpo_plain": ABLATION_ROW_LABELS["plain_grpo"],
    "faithful_plain": ABLATION_ROW_LABELS["plain_faithful"],
    "plain SFT (start)": ABLATION_ROW_LABELS["plain_sft"],
}
"""One display name per variant / ablation row, used by every figure. The ablation rows keep
the table's labels (``config.ABLATION_ROW_LABELS``), so figures and tables agree."""

METRIC_NAMES: dict[str, str] = {
    "accuracy": "accuracy",
    "focus_mass": "Focus mass in evidence",
    "pointing": "pointing game",
    "cue_rate": "cue rate",
    "format_rate": "format rate",
    "conflict_accuracy": "conflict accuracy",
    "faithfulness_gap": "faithfulness gap",
    "answer_mass": "answer-token mass in evidence",
    "consistency": "perception-use consistency",
    "ce": "cross-entropy",
    "attn_loss": "attention loss",
    "reward_mean": "mean reward",
    "completion_len": "completion length",
    "faithful_mean": "faithful reward",
    "concentration": "concentration c",
    "s_t_mean": "mean s_t (scored)",
    "faithful_group_std": "within-group std (faithful)",
    "grad_norm": "gradient norm",
    "lr": "learning rate",
}
"""How figures name metrics and log keys (a key not listed shows as itself)."""

COLORS: dict[str, str] = {
    "stage-0 backbone": "#949494",
    "stage-0 warm-up": "#595959",
    "plain SFT": "#de8f05",
    "text-perception SFT": "#8c613c",
    "anchoring (stage 1)": "#029e73",
    "GRPO from backbone": "#6a3d9a",
    "anchoring + GRPO": "#0173b2",
    "Faithful-MR1 (boxes)": "#d55e00",
    "Faithful-MR1 (occlusion)": "#cc78bc",
    "plain SFT + GRPO": "#56b4e9",
    "plain SFT + faithful reward": "#ece133",
}
"""One colour per display name, the same in every figure: seaborn's colorblind palette, with a
dark brown and a purple where two rows would otherwise share a hue family (the two SFT
baselines, the two GRPO rows)."""

EVIDENCE_COLOR = "#00a844"
CUE_COLOR = "#d500f9"
CONTROL_COLOR = "#2962ff"
HEATMAP_CMAP = "rocket"


def _theme_rc() -> dict[str, Any]:
    rc = dict(sns.axes_style(THEME["style"]))
    rc.update(sns.plotting_context(THEME["context"], font_scale=THEME["font_scale"]))
    rc["axes.prop_cycle"] = plt.cycler(color=sns.color_palette(THEME["palette"]))
    rc.update(_RC_EXTRA)
    return rc


THEME_RC: dict[str, Any] = _theme_rc()


@contextmanager
def theme() -> Iterator[None]:
    """The figures' seaborn theme, as an rc context (every ``fig_*`` draws inside it).

    Leaving the context restores every rc value except ``interactive``: the first figure of a
    Jupyter session resolves the inline backend, whose hook switches interactive mode on inside
    the context; restoring the old ``False`` there left every later figure of the session,
    plain ``plt.subplots()`` ones included, undisplayed.
    """
    with plt.rc_context(THEME_RC):
        try:
            yield
        finally:
            interactive = mpl.rcParams["interactive"]
    mpl.rcParams["interactive"] = interactive


def display_name(name: str) -> str:
    """The figure name of a variant or ablation row (unknown names, labels included, as is);
    a data-efficiency row ``<row>_p<k>`` shows as ``<row's name>, <k> prompts``.

    >>> display_name("faithful_mr1_p8")
    'Faithful-MR1 (boxes), 8 prompts'
    """
    m = re.fullmatch(r"(.+)_p(\d+)", name)
    if name not in DISPLAY_NAMES and m and m.group(1) in DISPLAY_NAMES:
        return f"{DISPLAY_NAMES[m.group(1)]}, {m.group(2)} prompts"
    return DISPLAY_NAMES.get(name, name)


def metric_name(key: str) -> str:
    """The figure name of a metric or log key, with the split appended as ``key (split)``."""
    if key.endswith(")") and " (" in key:
        base, split = key[:-1].split(" (", 1)
        return f"{METRIC_NAMES.get(base, base)} ({split})"
    return METRIC_NAMES.get(key, key)


_PALETTE = [tuple(c) for c in sns.color_palette(THEME["palette"], 10)]


def color_of(name: str) -> Any:
    """The colour of a variant: fixed per display name (``COLORS``), the same in every figure."""
    label = display_name(name)
    if label in COLORS:
        return COLORS[label]
    # Names outside the table: a stable colour from the name's characters.
    return _PALETTE[sum(label.encode()) % len(_PALETTE)]


def _wrap(text: str, width: int = 14) -> str:
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)) or text


# Fixed metadata keeps the bytes identical across runs (no software version, no date).
_METADATA = {"png": {"Software": None},
             "pdf": {"Creator": None, "Producer": None, "CreationDate": None, "ModDate": None}}

VECTOR_FORMAT = "pdf"
"""Every saved figure is also written in this vector format, beside the PNG (same name)."""


def _render(fig: plt.Figure, fmt: str) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, bbox_inches="tight", metadata=_METADATA[fmt])
    return buf.getvalue()


def _kernel() -> Any:
    """The running IPython kernel's shell, or None outside a Jupyter kernel."""
    if "IPython" not in sys.modules:  # never imported: not inside IPython
        return None
    from IPython import get_ipython

    shell = get_ipython()
    return shell if getattr(shell, "kernel", None) is not None else None


def show(fig: plt.Figure, png: bytes | None = None) -> bool:
    """Show ``fig`` in the current cell's output when running in a Jupyter kernel, and close it.

    The PNG is displayed directly rather than left to the matplotlib backend: headless runs set
    ``MPLBACKEND=Agg`` (``make reproduce``, ``make test``), which displays nothing, and an
    interactive kernel's inline backend shows a figure only at the end of the cell. Closing it
    keeps the inline backend from showing it a second time.

    Returns:
        True when the figure was displayed (in a kernel), False elsewhere (scripts, tests).
    """
    if _kernel() is None:
        return False
    from IPython.display import display

    title = fig.get_suptitle()
    alt = f"<Figure: {title}>" if title else "<Figure>"
    display({"image/png": png if png is not None else _render(fig, "png"), "text/plain": alt},
            raw=True)
    plt.close(fig)
    return True


def vector_path(path: str | Path) -> Path:
    """Where the vector copy of a figure saved at ``path`` goes (``VECTOR_FORMAT``)."""
    return Path(path).with_suffix("." + VECTOR_FORMAT)


def _save(fig: plt.Figure, path: str | Path | None) -> plt.Figure:
    png = None
    if path is not None:
        png = _render(fig, "png")
        atomic_write_bytes(path, png)
        atomic_write_bytes(vector_path(path), _render(fig, VECTOR_FORMAT))
    show(fig, png)
    return fig


# --------------------------------------------------------------------------------------
# Overlays (one scheme)
# --------------------------------------------------------------------------------------


def _draw_boxes(ax: plt.Axes, boxes: Sequence[Sequence[float]], color: str, lw: float = 1.8,
                ls: str = "-") -> None:
    for x0, y0, x1, y1 in boxes:
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                               edgecolor=color, linewidth=lw, linestyle=ls))


def _cue_box(row: Mapping[str, Any]) -> list[float] | None:
    try:
        cue = records.decode_meta(row.get("meta")).get("cue")
    except ValueError:
        return None
    return list(cue["box"]) if cue else None


def _overlay(ax: plt.Axes, row: Mapping[str, Any], cue: bool = True) -> None:
    """Evidence boxes (solid green) and, when the record has one, the cue (dashed magenta)."""
    _draw_boxes(ax, row["evidence_boxes"], EVIDENCE_COLOR)
    box = _cue_box(row) if cue else None
    if box is not None:
        _draw_boxes(ax, [box], CUE_COLOR, lw=1.6, ls="--")


def _overlay_handles(cue: bool = True, control: bool = False) -> list[Line2D]:
    handles = [Line2D([], [], color=EVIDENCE_COLOR, lw=2, label="evidence box")]
    if cue:
        handles.append(Line2D([], [], color=CUE_COLOR, lw=2, ls="--", label="shortcut cue"))
    if control:
        handles.append(Line2D([], [], color=CONTROL_COLOR, lw=2, ls=":", label="control region"))
    return handles


def _legend_below(fig: plt.Figure, handles: Sequence[Any], labels: Sequence[str] | None = None,
                  ncol: int | None = None) -> None:
    labels = [h.get_label() for h in handles] if labels is None else list(labels)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=ncol or min(len(handles), 5), frameon=False)


# --------------------------------------------------------------------------------------
# Notebook 01: data
# --------------------------------------------------------------------------------------


def fig_sample_grid(rows: Sequence[Mapping[str, Any]], path: str | Path | None = None,
                    ncols: int = 6) -> plt.Figure:
    """Scenes with their question/answer, evidence boxes and the cue (labelled whether it
    agrees with the answer).

    Args:
        rows: records with ``image``, ``question``, ``answer``, ``evidence_boxes`` and a
            ``meta`` (dict or JSON string).
    """
    n = len(rows)
    nrows = max(1, int(np.ceil(n / ncols)))
    with theme():
        fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols, 2.75 * nrows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, row in zip(axes.flat, rows, strict=False):
            meta = records.decode_meta(row.get("meta"))
            ax.imshow(row["image"])
            _overlay(ax, row)
            cue = meta.get("cue")
            if cue is not None:
                agree = meta.get("shortcut_agrees")
                ax.text(cue["box"][0], cue["box"][1] - 2, "cue = " + ("answer" if agree else "other"),
                        color=CUE_COLOR, fontsize=8, fontweight="bold")
            ax.set_title(_wrap(f"{row['question']} → {row['answer']}", 24)
                         + f"\n[{meta.get('split', '')}]", fontsize=9)
        fig.suptitle("FocusShapes scenes", fontsize=12)
        fig.tight_layout()
        _legend_below(fig, _overlay_handles())
    return _save(fig, path)


def fig_data_summary(task_counts: Mapping[str, Mapping[str, int]],
                     answer_counts: Mapping[str, Mapping[str, int]],
                     agreement: Mapping[str, float], path: str | Path | None = None) -> plt.Figure:
    """Question families and answers per split, and the cue's agreement rate per split.

    With a single question family there is nothing to compare: the family is named in the
    answers panel's title instead of drawing one bar per split at 1.0.
    """
    splits = list(task_counts)
    fams = sorted({f for c in task_counts.values() for f in c})
    answers = sorted({a for c in answer_counts.values() for a in c})
    split_colors = dict(zip(splits, sns.color_palette("deep", len(splits)), strict=True))
    answers_title = "answers" if len(fams) > 1 else f"answers (every question: {', '.join(fams) or 'none'})"
    panels = [(answer_counts, answers, answers_title)]
    ratios = [len(answers) + 1, 4]
    if len(fams) > 1:
        panels.insert(0, (task_counts, fams, "question families"))
        ratios.insert(0, len(fams) + 1)
    with theme():
        fig, axes = plt.subplots(1, len(ratios), figsize=(4.5 * len(ratios) + 0.5, 3.8),
                                 gridspec_kw={"width_ratios": ratios})
        legend_ax = axes[len(panels) - 1]
        for ax, (counts, cats, title) in zip(axes, panels, strict=False):
            x, y, hue = [], [], []
            for s in splits:
                tot = max(1, sum(counts[s].values()))
                for c in cats:
                    x.append(c)
                    y.append(counts[s].get(c, 0) / tot)
                    hue.append(s)
            sns.barplot(x=x, y=y, hue=hue, order=cats, hue_order=splits, palette=split_colors,
                        ax=ax, legend=ax is legend_ax)
            ax.set_title(title)
            ax.set_ylabel("share of split")
            ax.set_xlabel("")
            if len(cats) > 4:
                ax.tick_params(axis="x", rotation=45)
        legend_ax.legend(title="split", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        vals = [agreement[s] for s in splits]
        ax = axes[-1]
        ax.bar(splits, [0 if np.isnan(v) else v for v in vals],
               color=["#999999" if np.isnan(v) else CUE_COLOR for v in vals])
        for j, v in enumerate(vals):
            ax.text(j, (0 if np.isnan(v) else v) + 0.02, "no cue" if np.isnan(v) else f"{v:.2f}",
                    ha="center", fontsize=9)
        ax.set_ylim(0, 1.12)
        ax.set_ylabel("share of cued examples")
        ax.set_title("cue agrees with the answer")
        fig.tight_layout()
    return _save(fig, path)


def fig_interventions(rows: Sequence[Mapping[str, Any]], path: str | Path | None = None) -> plt.Figure:
    """Original, evidence-intervened and control-intervened views side by side."""
    n = len(rows)
    with theme():
        fig, axes = plt.subplots(n, 3, figsize=(7.4, 2.5 * n), squeeze=False)
        for r, row in enumerate(rows):
            views = [("original I", row["image"], row["evidence_boxes"], EVIDENCE_COLOR, "-"),
                     ("I': evidence removed", row["image_cf_evidence"], row["evidence_boxes"],
                      EVIDENCE_COLOR, "-"),
                     ("control removed", row["image_cf_control"], row["control_boxes"], CONTROL_COLOR, ":")]
            for c, (title, img, boxes, color, ls) in enumerate(views):
                ax = axes[r, c]
                ax.imshow(img)
                _draw_boxes(ax, boxes, color, ls=ls)
                ax.axis("off")
                ax.set_title(title if c else _wrap(f"{row['question']} → {row['answer']}", 26),
                             fontsize=9)
        fig.tight_layout()
        _legend_below(fig, _overlay_handles(cue=False, control=True))
    return _save(fig, path)


# --------------------------------------------------------------------------------------
# Notebook 02-03: the token grid and attention heatmaps
# --------------------------------------------------------------------------------------


def fig_token_grid(image: Any, grid_thw: Sequence[int], boxes: Sequence[Sequence[float]] = (),
                   target: Any = None, path: str | Path | None = None) -> plt.Figure:
    """The merged image-token grid over an image, token index per cell, and the target q."""
    _, gh, gw = (int(v) for v in grid_thw)
    rows, cols = gh // 2, gw // 2
    w, h = image.size
    with theme():
        n = 2 if target is not None else 1
        fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False)
        ax = axes[0, 0]
        ax.imshow(image)
        for r in range(rows + 1):
            ax.axhline(r * h / rows - 0.5, color="white", lw=0.8)
        for c in range(cols + 1):
            ax.axvline(c * w / cols - 0.5, color="white", lw=0.8)
        for r in range(rows):
            for c in range(cols):
                ax.text((c + 0.5) * w / cols, (r + 0.5) * h / rows, str(r * cols + c),
                        color="black", ha="center", va="center", fontsize=9, alpha=0.6)
        _draw_boxes(ax, boxes, EVIDENCE_COLOR)
        ax.set_title(_wrap(f"{rows}x{cols} image tokens: token k is cell (k // {cols}, k % {cols})", 34))
        ax.axis("off")
        if target is not None:
            im = axes[0, 1].imshow(np.asarray(target), cmap=HEATMAP_CMAP, vmin=0)
            axes[0, 1].set_title("anchoring target q\n(box overlap per cell)")
            axes[0, 1].axis("off")
            cb = fig.colorbar(im, ax=axes[0, 1], fraction=0.046)
            cb.set_label("q")
        fig.tight_layout()
        _legend_below(fig, _overlay_handles(cue=False))
    return _save(fig, path)


def fig_attention_maps(rows: Sequence[Mapping[str, Any]], maps: Mapping[str, Sequence[Any]],
                       path: str | Path | None = None, title: str = "") -> plt.Figure:
    """Focus attention heatmaps (one column per model/variant) over the same test images.

    One colour scale for every panel (a square-root scale, so the uniform level of a diffuse
    map stays visible), with its colour bar; evidence boxes and the cue drawn on every panel.

    Args:
        rows: records with ``image``, ``question``, ``answer``, ``evidence_boxes`` and
            ``meta`` (for the cue; dict or JSON string).
        maps: variant name -> one ``[rows, cols]`` attention grid per record.
    """
    names = list(maps)
    n = len(rows)
    grids = {name: [np.asarray(g, dtype=float) for g in maps[name]] for name in names}
    vmax = max([float(g.max()) for gs in grids.values() for g in gs] + [1e-6])
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=vmax)
    ncols = len(names) + 1
    with theme():
        fig, axes = plt.subplots(n, ncols, figsize=(2.35 * ncols + 0.8, 2.55 * n + 0.6),
                                 squeeze=False)
        im = None
        for i, row in enumerate(rows):
            ax = axes[i, 0]
            ax.imshow(row["image"])
            _overlay(ax, row)
            ax.set_title(_wrap(f"{row['question']} → {row['answer']}", 22), fontsize=9)
            ax.axis("off")
            w, h = row["image"].size
            gray = np.asarray(row["image"].convert("L"), dtype=float)
            for j, name in enumerate(names):
                grid = grids[name][i]
                ax = axes[i, j + 1]
                ax.imshow(gray, cmap="gray", vmin=0, vmax=255)
                im = ax.imshow(grid, cmap=HEATMAP_CMAP, norm=norm, alpha=0.78,
                               extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
                _overlay(ax, row)
                mass = float(grid[_cells_inside(row["evidence_boxes"], grid.shape, (w, h))].sum())
                head = _wrap(display_name(name), 22) + "\n" if i == 0 else ""
                ax.set_title(f"{head}mass in evidence {mass:.2f}", fontsize=9)
                ax.axis("off")
        if title:
            fig.suptitle(title, fontsize=12)
        fig.tight_layout(rect=(0, 0, 0.93, 1))
        if im is not None:
            cax = fig.add_axes((0.945, 0.25, 0.012, 0.5))
            cb = fig.colorbar(im, cax=cax)
            cb.set_label("<Focus> attention share per cell (sqrt scale)")
        _legend_below(fig, _overlay_handles())
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


# --------------------------------------------------------------------------------------
# Curves and bars
# --------------------------------------------------------------------------------------


SMOOTH_POINTS = 15
"""Curves with more points than this are drawn smoothed (``smooth``), the raw values faint."""


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (over the points so far at the start).

    >>> smooth([0.0, 2.0, 4.0, 6.0], 2).tolist()
    [0.0, 1.0, 3.0, 5.0]
    """
    ys = np.asarray(values, dtype=float)
    if window <= 1 or ys.size == 0:
        return ys
    c = np.cumsum(np.insert(ys, 0, 0.0))
    idx = np.arange(1, ys.size + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def _smooth_window(n: int) -> int:
    return max(1, n // 10) if n > SMOOTH_POINTS else 1


def _step_label(window: int) -> str:
    return "step" if window <= 1 else f"step (moving average of {window} logged steps; faint: raw)"


def fig_training_curves(logs: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str],
                        path: str | Path | None = None, title: str = "") -> plt.Figure:
    """One panel per metric key, one line per run (rows of a ``metrics.jsonl``), in the run's
    colour; long curves (over ``SMOOTH_POINTS`` points) drawn as a moving average over a tenth
    of the run with the raw values faint behind. The legend sits below the panels."""
    with theme():
        fig, axes = plt.subplots(1, len(keys), figsize=(3.9 * len(keys), 3.3), squeeze=False)
        handles: dict[str, Any] = {}
        for ax, key in zip(axes[0], keys, strict=True):
            window = 1
            for name, rows in logs.items():
                pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    w = _smooth_window(len(ys))
                    window = max(window, w)
                    if w > 1:
                        ax.plot(xs, ys, lw=0.7, alpha=0.25, color=color_of(name))
                    line, = ax.plot(xs, smooth(ys, w), lw=1.8, color=color_of(name),
                                    label=display_name(name))
                    handles.setdefault(display_name(name), line)
            ax.set_xlabel(_wrap(_step_label(window), 40))
            ax.set_title(_wrap(metric_name(key), 30))
        if title:
            fig.suptitle(title, fontsize=12)
        fig.tight_layout()
        if handles:
            _legend_below(fig, list(handles.values()), list(handles))
    return _save(fig, path)


def _group_bars(ax: plt.Axes, groups: Sequence[str], series: Sequence[str],
                mean: Mapping[tuple[str, str], float], err: Mapping[tuple[str, str], float] | None = None,
                points: Mapping[tuple[str, str], Sequence[float]] | None = None,
                annotate: bool = False) -> None:
    """Grouped bars (groups on x, one bar per series in its colour), error bars and dots."""
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        xs = np.arange(len(groups)) - 0.4 + width * (i + 0.5)
        ys = np.array([mean.get((g, s), np.nan) for g in groups], dtype=float)
        es = np.array([(err or {}).get((g, s), np.nan) for g in groups], dtype=float)
        ax.bar(xs, np.nan_to_num(ys), width, color=color_of(s), label=display_name(s),
               edgecolor="white", linewidth=0.5)
        ok = ~np.isnan(es) & ~np.isnan(ys)
        if ok.any():
            ax.errorbar(xs[ok], ys[ok], yerr=es[ok], fmt="none", ecolor="#333333", elinewidth=1,
                        capsize=3)
        if points:
            for x, g in zip(xs, groups, strict=True):
                pts = [v for v in points.get((g, s), []) if not np.isnan(v)]
                ax.scatter([x] * len(pts), pts, s=14, color="black", zorder=3, linewidths=0)
        if annotate:
            for x, y in zip(xs, ys, strict=True):
                if not np.isnan(y):
                    ax.text(x, y + 0.012, f"{y:.2f}", ha="center", va="bottom", fontsize=7.5)
    ax.set_xticks(np.arange(len(groups)), [_wrap(g, 16) for g in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.grid(axis="x", visible=False)


def fig_metric_bars(values: Mapping[str, Mapping[str, float]], path: str | Path | None = None,
                    title: str = "", ylim: tuple[float, float] | None = (0, 1.05),
                    chance: Mapping[str, float] | None = None) -> plt.Figure:
    """Grouped bars: ``values[group][series]`` (e.g. ``"metric (split)"`` -> variant), with
    the value on each bar, wrapped group labels and the legend below; chance lines optional."""
    groups = list(values)
    series = list(dict.fromkeys(s for g in groups for s in values[g]))
    labels = [metric_name(g) for g in groups]
    with theme():
        fig, ax = plt.subplots(figsize=(1.5 + 0.42 * len(groups) * max(2, len(series)), 4.0))
        _group_bars(ax, labels, series,
                    {(metric_name(g), s): v for g in groups for s, v in values[g].items()}, annotate=True)
        if chance:
            for j, g in enumerate(groups):
                if g in chance:
                    ax.hlines(chance[g], j - 0.45, j + 0.45, colors="grey", linestyles=":",
                              label="chance" if j == 0 else None)
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_title(title)
        fig.tight_layout()
        h, lab = ax.get_legend_handles_labels()
        _legend_below(fig, h, lab, ncol=min(len(h), 4))
    return _save(fig, path)


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


def fig_visual_dependency(row: Mapping[str, Any], cf_image: Any,
                          explained: Sequence[Mapping[str, Any]], labels: Sequence[str],
                          path: str | Path | None = None, kappa: int | None = None,
                          focus_row: bool = False, equal_within: float = 0.01) -> plt.Figure:
    """The faithful reward's worked example: image, its counterfactual, and per trajectory each
    token's visual dependency ``s_t`` (bars, left axis, one scale for all trajectories) and its
    attention share inside the region (dots, right axis).

    With ``kappa``, the top-``kappa`` candidate tokens by ``s_t`` (those that make the
    concentration ``c``; the first row, the ``<Focus>`` position, is no candidate unless
    ``focus_row``) are drawn solid, the others pale. When every trajectory's ``c`` lies within
    ``equal_within`` (the faithful reward's ``std_floor``) of the others, the title says that
    the reward cannot tell them apart.
    """
    n = len(explained)
    st_max = max([max(ex["s_t"]) for ex in explained if ex["s_t"]] + [0.0])
    exp = int(np.floor(np.log10(st_max))) if st_max > 0 else 0
    scale = 10.0 ** exp
    conc = [float(ex["concentration"]) for ex in explained]
    equal = n > 1 and max(conc) - min(conc) <= equal_within
    # Shares are fractions: the right axis starts at 0 and ends just above the largest one.
    share_max = max([max(ex["share"]) for ex in explained if ex["share"]] + [0.0])
    share_top = min(1.05, max(0.25, 1.25 * share_max))
    with theme():
        fig = plt.figure(figsize=(12.5, 2.9 * max(1, n) + 0.9))
        gs = fig.add_gridspec(n, 3, width_ratios=[1, 1, 3.2])
        ax = fig.add_subplot(gs[:, 0])
        ax.imshow(row["image"])
        _overlay(ax, row)
        ax.set_title(_wrap(f"I: {row['question']} → {row['answer']}", 24), fontsize=10)
        ax.axis("off")
        ax = fig.add_subplot(gs[:, 1])
        ax.imshow(cf_image)
        _draw_boxes(ax, row["evidence_boxes"], EVIDENCE_COLOR, ls=":")
        ax.set_title("I': evidence removed", fontsize=10)
        ax.axis("off")
        first = None
        for i, (ex, label) in enumerate(zip(explained, labels, strict=True)):
            ax = fig.add_subplot(gs[i, 2], sharey=first)
            first = first or ax
            st = np.asarray(ex["s_t"], dtype=float)
            xs = np.arange(len(st))
            top = np.zeros(len(st), dtype=bool)
            if kappa:
                cand = np.arange(len(st)) >= (0 if focus_row else 1)
                order = [k for k in np.argsort(-st, kind="stable") if cand[k]][:kappa]
                top[order] = True
            else:
                top[:] = True
            ax.bar(xs[top], st[top] / scale, color="#e4572e",
                   label="s_t = KL(π(·|I) ‖ π(·|I')), top-κ tokens (they make c)" if kappa
                   else "s_t = KL(π(·|I) ‖ π(·|I'))")
            if (~top).any():
                ax.bar(xs[~top], st[~top] / scale, color="#e4572e", alpha=0.3,
                       label="s_t (other tokens)")
            ax.set_ylabel(f"s_t (×1e{exp} nats)" if exp else "s_t (nats)")
            ax.set_ylim(0, 1.15 * st_max / scale if st_max > 0 else 1)
            ax.grid(axis="x", visible=False)
            ax2 = ax.twinx()
            ax2.plot(xs, ex["share"], "o", color="#1e88e5", ms=5, label="attention share in C")
            ax2.set_ylim(0, share_top)
            ax2.set_ylabel("attention share in C")
            ax2.grid(False)
            ax2.spines["right"].set_visible(True)
            ax.set_xticks(xs, [t.replace("\n", "\\n") for t in ex["tokens"]], rotation=60,
                          fontsize=8, ha="right")
            ax.set_title(f"{label}: c = {ex['concentration']:.3f} "
                         f"({'correct' if ex['correct'] else 'wrong'})", fontsize=10)
            if i == 0:
                h1, l1 = ax.get_legend_handles_labels()
                h2, l2 = ax2.get_legend_handles_labels()
        head = "Faithful reward, worked example"
        if equal:
            head += (f": the trajectories' concentrations are equal (within {equal_within:g}), "
                     "so the faithful reward cannot tell them apart")
        fig.suptitle(_wrap(head, 110), fontsize=11)
        fig.tight_layout()
        if n:
            _legend_below(fig, h1 + h2, l1 + l2)
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
    steps every seed logged) as a thick one; long curves (over ``SMOOTH_POINTS`` points) are
    moving averages over a tenth of the run. One legend below the panels names every run once.
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
         edge: str = "#555555", fontsize: float = 9.5, width: float | None = None,
         height: float = 0.075, **kw: Any) -> None:
    x, y = xy
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
             width=0.09, fontweight="bold")
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
        _box(canvas, (0.65, 0.665), "π(· | I, y<t)", color="white", width=0.1)
        _box(canvas, (0.65, 0.255), "π(· | I', y<t)", color="white", width=0.1)
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
            _box(canvas, (xc, y), text, color=color, width=bw, height=hh, fontsize=9.2,
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
