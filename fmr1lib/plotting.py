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

The study's summary figures (notebook 05's ablation over seeds, the README's claims and method
figures) are in ``study_plots``, drawn the same way with this module's theme and helpers.
"""

from __future__ import annotations

import io
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
from matplotlib.patches import Rectangle

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
