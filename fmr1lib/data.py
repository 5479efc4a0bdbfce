"""The dataset of every stage: FocusShapes (generated here), or region-annotated JSONL records.

FocusShapes: procedural, region-annotated reasoning data with a built-in shortcut.

This is the tiny profile's stand-in for the paper's region-annotated perception data
(docs/design.md §3). Every scene is drawn from a per-example seed; every question
has a verifiable short answer and known evidence boxes; a *shortcut cue* (a saturated
square in a fixed corner cell that holds no object) agrees with the answer with
probability ``shortcut_p`` in ``train`` / ``test_id`` and contradicts it (or is at
chance) in ``test_ood``. A model that answers from the cue scores well on ``test_id``
and badly on ``test_ood``; a faithful one does well on both.

Splits: ``train`` (cue-laden), ``warmup`` (for the stage-0 backbone: cue absent or
uninformative), ``test_id`` and ``test_ood``. The test splits also carry their
counterfactual views: the evidence intervened (answer no longer supported) and a
control region of the same size intervened (answer unchanged).

JSONL (``DataParams.source: jsonl``, docs/design.md §3.1): the same four splits and columns
from records files (``records.load_jsonl``, every record validated before any training);
the test splits' counterfactual views are made from each record's evidence boxes. A record
without boxes gets no views (its ``control_boxes`` are empty): accuracy counts it, the
box-based metrics skip it. ``make_dataset`` picks the source; ``load_or_make`` caches the
result per profile.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw

from fmr1lib import counterfactual, progress, records, repro
from fmr1lib.choices import Split, TestSplit, options
from fmr1lib.config import DataParams
from fmr1lib.repro import atomic_write_json, run_dir, saved_params_equal

logger = logging.getLogger(__name__)

CELL = 28
"""Pixels per merged image token of Qwen2.5-VL (patch 14 x spatial merge 2)."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
    "cyan": (20, 190, 200),
    "pink": (240, 110, 180),
}
BLOB_COLOR = (128, 128, 128)
SHAPE_CUE_COLOR = (20, 20, 20)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SPLITS = options(Split)
_SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}
# Families whose answer set has a natural visual cue (a colour patch, a shape glyph).
CUED_FAMILIES = {"color": "color_patch", "shape": "shape_glyph"}


# --------------------------------------------------------------------------------------
# Geometry and drawing
# --------------------------------------------------------------------------------------


def cell_box(row: int, col: int) -> list[float]:
    """Pixel box of grid cell (row, col).

    >>> cell_box(1, 2)
    [56.0, 28.0, 84.0, 56.0]
    """
    return [float(col * CELL), float(row * CELL), float((col + 1) * CELL), float((row + 1) * CELL)]


def cue_cell(image_size: int, corner: str) -> tuple[int, int]:
    """Grid cell (row, col) of the shortcut cue.

    >>> cue_cell(112, "bottom_right")
    (3, 3)
    """
    last = image_size // CELL - 1
    return {"top_left": (0, 0), "top_right": (0, last), "bottom_left": (last, 0),
            "bottom_right": (last, last)}[corner]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: list[float],
                color: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = (int(v) for v in box)
    # PIL boxes are inclusive of their last pixel; ours are half-open.
    xe, ye = x1 - 1, y1 - 1
    xm, ym = (x0 + xe) / 2, (y0 + ye) / 2
    if shape == "circle" or shape == "blob":
        draw.ellipse([x0, y0, xe, ye], fill=color)
    elif shape == "square":
        draw.rectangle([x0, y0, xe, ye], fill=color)
    elif shape == "triangle":
        draw.polygon([(xm, y0), (x0, ye), (xe, ye)], fill=color)
    elif shape == "diamond":
        draw.polygon([(xm, y0), (xe, ym), (xm, ye), (x0, ym)], fill=color)
    elif shape == "cross":
        t = max(2, (x1 - x0) // 3)
        draw.rectangle([x0, ym - t / 2, xe, ym + t / 2], fill=color)
        draw.rectangle([xm - t / 2, y0, xm + t / 2, ye], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render_scene(meta: dict[str, Any], image_size: int) -> Image.Image:
    """Draw a scene from its description (``meta['objects']``, ``meta['cue']``, background).

    The generator draws every image through this function, so a scene can be re-rendered
    (and its answer recomputed) from the record alone.
    """
    image = Image.new("RGB", (image_size, image_size), tuple(meta["background"]))
    draw = ImageDraw.Draw(image)
    for obj in meta["objects"]:
        color = BLOB_COLOR if obj["color"] is None else PALETTE[obj["color"]]
        _draw_shape(draw, obj["shape"], obj["box"], color)
    cue = meta.get("cue")
    if cue is not None:
        if cue["kind"] == "color_patch":
            draw.rectangle([int(v) for v in cue["box"][:2]] + [int(v) - 1 for v in cue["box"][2:]],
                           fill=PALETTE[cue["value"]])
        else:
            _draw_shape(draw, cue["value"], cue["box"], SHAPE_CUE_COLOR)
    return image


# --------------------------------------------------------------------------------------
# Question families
# --------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, items: list[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _sample_without(rng: np.random.Generator, items: list[Any], exclude: set, k: int) -> list[Any]:
    pool = [x for x in items if x not in exclude]
    if k > len(pool):
        raise ValueError(f"need {k} items from {pool}")
    idx = rng.permutation(len(pool))[:k]
    return [pool[i] for i in idx]


def _family_objects(family: str, rng: np.random.Generator, p: DataParams) -> tuple[
        list[dict], str, str, dict]:
    """Objects (without positions), the question, the answer, and family facts.

    Each object dict has ``shape``, ``color`` (None for grey blobs) and ``evidence``.
    """
    colors, shapes = list(p.colors), list(p.shapes)
    objs: list[dict] = []
    facts: dict[str, Any] = {}
    if family == "color":
        shape = _choice(rng, list(p.target_shapes) or shapes)
        color = _choice(rng, colors)
        objs.append({"shape": shape, "color": color, "evidence": True})
        d_shapes = [_choice(rng, [s for s in shapes if s != shape]) for _ in range(p.n_distractors)]
        d_colors = _sample_without(rng, colors, {color}, min(p.n_distractors, len(colors) - 1))
        for i, s in enumerate(d_shapes):
            objs.append({"shape": s, "color": d_colors[i % len(d_colors)], "evidence": False})
        question, answer = f"What color is the {shape}?", color
    elif family == "shape":
        shape = _choice(rng, shapes)
        color = _choice(rng, colors)
        objs.append({"shape": shape, "color": color, "evidence": True})
        d_colors = _sample_without(rng, colors, {color}, min(p.n_distractors, len(colors) - 1))
        for i in range(p.n_distractors):
            objs.append({"shape": _choice(rng, [s for s in shapes if s != shape]),
                         "color": d_colors[i % len(d_colors)], "evidence": False})
        question, answer = f"What shape is the {color} object?", shape
    elif family == "count":
        color = _choice(rng, colors)
        k = int(rng.integers(1, 4))
        for _ in range(k):
            objs.append({"shape": _choice(rng, shapes), "color": color, "evidence": True})
        for _ in range(p.n_distractors):
            objs.append({"shape": _choice(rng, shapes),
                         "color": _choice(rng, [c for c in colors if c != color]),
                         "evidence": False})
        question, answer = f"How many {color} shapes are there?", str(k)
    elif family == "relation":
        s1, s2 = _sample_without(rng, shapes, set(), 2)
        objs.append({"shape": s1, "color": _choice(rng, colors), "evidence": True, "role": "a"})
        objs.append({"shape": s2, "color": _choice(rng, colors), "evidence": True, "role": "b"})
        for _ in range(p.n_distractors):
            objs.append({"shape": _choice(rng, [s for s in shapes if s not in (s1, s2)]),
                         "color": _choice(rng, colors), "evidence": False})
        question, answer = f"Is the {s1} left of the {s2}?", ""  # answer set after placement
    elif family == "exists":
        color, shape = _choice(rng, colors), _choice(rng, shapes)
        present = bool(rng.random() < 0.5)
        if present:
            objs.append({"shape": shape, "color": color, "evidence": True})
        for _ in range(p.n_distractors):
            # Distractors share the colour or the shape, never both: only binding answers.
            if rng.random() < 0.5:
                objs.append({"shape": _choice(rng, [s for s in shapes if s != shape]),
                             "color": color, "evidence": False})
            else:
                objs.append({"shape": shape, "color": _choice(rng, [c for c in colors if c != color]),
                             "evidence": False})
        question, answer = f"Is there a {color} {shape}?", "yes" if present else "no"
        facts["evidence_absent"] = not present
    else:
        raise ValueError(f"unknown task family {family!r}")
    for _ in range(p.n_blobs):
        objs.append({"shape": "blob", "color": None, "evidence": False})
    return objs, question, answer, facts


def answer_from_scene(family: str, question: str, objects: list[dict]) -> str:
    """Recompute the answer of a FocusShapes question from the scene's objects.

    >>> objs = [{"shape": "circle", "color": "red", "box": [0, 0, 10, 10]},
    ...         {"shape": "square", "color": "blue", "box": [30, 0, 40, 10]}]
    >>> answer_from_scene("color", "What color is the circle?", objs)
    'red'
    >>> answer_from_scene("relation", "Is the square left of the circle?", objs)
    'no'
    """
    words = question.rstrip("?").split()
    if family == "color":
        shape = words[-1]
        (obj,) = [o for o in objects if o["shape"] == shape]
        return obj["color"]
    if family == "shape":
        color = words[4]
        (obj,) = [o for o in objects if o["color"] == color]
        return obj["shape"]
    if family == "count":
        color = words[2]
        return str(sum(o["color"] == color for o in objects))
    if family == "relation":
        s1, s2 = words[2], words[-1]
        (a,) = [o for o in objects if o["shape"] == s1]
        (b,) = [o for o in objects if o["shape"] == s2]
        return "yes" if (a["box"][0] + a["box"][2]) < (b["box"][0] + b["box"][2]) else "no"
    if family == "exists":
        color, shape = words[3], words[4]
        return "yes" if any(o["color"] == color and o["shape"] == shape for o in objects) else "no"
    raise ValueError(f"unknown task family {family!r}")


# --------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------


def example_seed(seed: int, split: str, index: int) -> int:
    """The seed of one example, derived from the run seed, the split and the index."""
    ss = np.random.SeedSequence([seed, _SPLIT_CODE[split], index])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def _cue_value(split: str, answer: str, vocab: list[str], rng: np.random.Generator,
               p: DataParams) -> str | None:
    if split in ("train", "test_id"):
        if rng.random() < p.shortcut_p:
            return answer
        return _choice(rng, [v for v in vocab if v != answer])
    if split == "test_ood":
        if p.ood_cue == "contradict":
            return _choice(rng, [v for v in vocab if v != answer])
        return _choice(rng, vocab)
    if split == "warmup":
        return None if p.warmup_cue == "none" else _choice(rng, vocab)
    raise ValueError(f"unknown split {split!r}")


def make_example(p: DataParams, split: str, index: int) -> dict[str, Any]:
    """One FocusShapes record (schema of docs/design.md §3.1), fully determined by its seed."""
    ex_seed = example_seed(p.seed, split, index)
    rng = np.random.default_rng(ex_seed)
    names = list(p.tasks)
    weights = np.array([p.tasks[n] for n in names], dtype=float)
    family = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    objs, question, answer, facts = _family_objects(family, rng, p)

    grid = p.image_size // CELL
    cue_rc = cue_cell(p.image_size, p.cue_corner)
    free = [(r, c) for r in range(grid) for c in range(grid) if (r, c) != cue_rc]
    if len(objs) > len(free):
        raise ValueError(f"{len(objs)} objects do not fit in {len(free)} free cells; "
                         f"lower n_distractors / n_blobs or raise image_size")
    order = rng.permutation(len(free))[: len(objs)]
    lo, hi = p.object_size
    for obj, k in zip(objs, order, strict=True):
        r, c = free[int(k)]
        size = int(rng.integers(lo, hi + 1))
        slack = CELL - size
        x0 = c * CELL + int(rng.integers(0, slack + 1))
        y0 = r * CELL + int(rng.integers(0, slack + 1))
        obj["box"] = [float(x0), float(y0), float(x0 + size), float(y0 + size)]
        obj["cell"] = [r, c]
    if family == "relation":
        a = next(o for o in objs if o.get("role") == "a")
        b = next(o for o in objs if o.get("role") == "b")
        if a["cell"][1] == b["cell"][1]:  # same column: move b to a free cell in another column
            used = {tuple(o["cell"]) for o in objs}
            options = [rc for rc in free if rc[1] != a["cell"][1] and rc not in used]
            r, c = options[int(rng.integers(len(options)))]
            size = int(b["box"][2] - b["box"][0])
            x0, y0 = c * CELL + (CELL - size) // 2, r * CELL + (CELL - size) // 2
            b["box"], b["cell"] = [float(x0), float(y0), float(x0 + size), float(y0 + size)], [r, c]
        answer = "yes" if a["cell"][1] < b["cell"][1] else "no"

    cue = None
    cue_kind = CUED_FAMILIES.get(family)
    agrees: bool | None = None
    cue_box_full = cell_box(*cue_rc)
    if cue_kind is not None:
        vocab = list(p.colors) if family == "color" else list(p.shapes)
        value = _cue_value(split, answer, vocab, rng, p)
        if value is not None:
            off = (CELL - p.cue_size) // 2
            cx0, cy0 = cue_box_full[0] + off, cue_box_full[1] + off
            cue = {"kind": cue_kind, "value": value,
                   "box": [cx0, cy0, cx0 + p.cue_size, cy0 + p.cue_size]}
            agrees = value == answer

    objects = [{k: v for k, v in o.items() if k != "evidence"} for o in objs]
    evidence_boxes = [o["box"] for o in objs if o["evidence"]]
    meta = {
        "task": family,
        "split": split,
        "seed": ex_seed,
        "index": index,
        "objects": objects,
        "evidence_objects": [i for i, o in enumerate(objs) if o["evidence"]],
        "cue": cue,
        "cue_kind": cue_kind or "none",
        "cue_cell": list(cue_rc),
        "shortcut_color": cue["value"] if cue and cue_kind == "color_patch" else None,
        "shortcut_value": cue["value"] if cue else None,
        "shortcut_agrees": agrees,
        "background": list(p.background),
        "evidence_absent": facts.get("evidence_absent", False),
    }
    answer_type = {"color": "word", "shape": "word", "count": "number"}.get(family, "yesno")
    return {
        "id": f"fs-{split}-{index:05d}",
        "image": render_scene(meta, p.image_size),
        "question": question,
        "answer": answer,
        "answer_type": answer_type,
        "choices": None,
        "evidence_boxes": evidence_boxes,
        "meta": meta,
    }


def make_split(p: DataParams, split: str, n: int) -> datasets.Dataset:
    """``n`` validated records of one split as a ``datasets.Dataset``."""
    rows = []
    for i in progress.bar(range(n), desc=f"FocusShapes {split}", leave=False):
        rec = make_example(p, split, i)
        records.validate_record(rec, image_size=rec["image"].size)
        rows.append(rec)
    return records.records_to_dataset(rows)


def control_boxes_on_objects(boxes: list[list[float]], meta: dict[str, Any],
                            pad: int) -> list[list[float]]:
    """Control regions of a FocusShapes scene: one per evidence box, the same size, each on a
    scene object that does not decide the answer (a distractor or the grey blob).

    The box is centred on its object and kept inside the object's 28-px cell (``pad`` pixels in
    from its edges when the size allows), so the intervention changes pixels (the object's) and
    never touches the evidence or the cue, which lie in other cells. Objects are used in scene
    order, cycling when there are more evidence boxes than other objects.

    Returns:
        The boxes; empty when the scene has no object besides the evidence.

    >>> meta = {"objects": [{"box": [2, 2, 20, 20], "cell": [0, 0]},
    ...                     {"box": [30, 33, 46, 49], "cell": [1, 1]}], "evidence_objects": [0]}
    >>> control_boxes_on_objects([[2.0, 2.0, 20.0, 20.0]], meta, pad=1)
    [[29.0, 32.0, 47.0, 50.0]]
    """
    evidence = set(meta.get("evidence_objects") or [])
    others = [o for i, o in enumerate(meta["objects"]) if i not in evidence]
    if not others or not boxes:
        return []
    out = []
    for k, box in enumerate(boxes):
        obj = others[k % len(others)]
        r, c = obj["cell"]
        x0 = _start_in_cell((obj["box"][0] + obj["box"][2]) / 2, box[2] - box[0], c * CELL, pad)
        y0 = _start_in_cell((obj["box"][1] + obj["box"][3]) / 2, box[3] - box[1], r * CELL, pad)
        out.append([x0, y0, x0 + box[2] - box[0], y0 + box[3] - box[1]])
    return out


def _start_in_cell(centre: float, size: float, cell_start: int, pad: int) -> float:
    """Start of a ``size``-long span centred on ``centre``, kept inside the cell (``pad`` in)."""
    margin = pad if size <= CELL - 2 * pad else max(0.0, (CELL - size) / 2)
    start = min(max(centre - size / 2, cell_start + margin), cell_start + CELL - margin - size)
    return float(math.floor(start))


def _focus_shapes_views(image: Image.Image, boxes: list[list[float]], meta: dict[str, Any],
                        p: DataParams) -> tuple[Image.Image, Image.Image, list[list[float]]]:
    """The two views of a FocusShapes scene: the control intervenes on a distractor or the grey
    blob (``control_boxes_on_objects``), never on the evidence or the cue."""
    ctrl = control_boxes_on_objects(boxes, meta, p.intervention_pad)
    if not ctrl:
        return image, image, []
    kw = {"seed": meta["seed"], "pad": p.intervention_pad, "fill": tuple(p.background)}
    return (counterfactual.intervene(image, boxes, p.intervention, **kw),
            counterfactual.intervene(image, ctrl, p.intervention, **kw),
            [[float(v) for v in b] for b in ctrl])


def record_views(image: Image.Image, boxes: list[list[float]], meta: dict[str, Any],
                 p: DataParams, record_id: str = "") -> tuple[Image.Image, Image.Image,
                                                              list[list[float]]]:
    """The two views of a JSONL record, from its evidence boxes alone.

    Nothing else in a real image is known, so the control regions avoid only the (padded)
    evidence, and a candidate whose intervention would change no pixel (blank background) is
    drawn again. The seed is ``meta["seed"]``; the fill is ``meta["background"]`` when the record
    has one, else each image's border colour (``counterfactual.estimate_background``), as in
    the faithful reward (``faithful.intervention_kwargs``).

    Returns:
        ``(evidence view, control view, control boxes)``. A record without evidence boxes, or
        whose boxes leave no room for same-sized controls, has no views: both images are the
        original and the control boxes are empty (the evaluation skips it, ``row_has_views``).
    """
    if not boxes:
        return image, image, []
    seed = int(meta.get("seed", 0))
    m = 2 * p.intervention_pad
    padded = [[b[0] - m, b[1] - m, b[2] + m, b[3] + m] for b in boxes]
    kw: dict[str, Any] = {"seed": seed, "pad": p.intervention_pad}
    if meta.get("background") is not None:
        kw["fill"] = tuple(int(v) for v in meta["background"])
    original = np.asarray(image.convert("RGB"))

    def changes_pixels(box: Any) -> bool:
        # A control on blank background would leave the image as it was and test nothing.
        edited = counterfactual.intervene(image, [box], p.intervention, **kw)
        return not np.array_equal(np.asarray(edited), original)

    try:
        ctrl = counterfactual.control_boxes(image.size, boxes, np.random.default_rng(seed),
                                            avoid=padded, accept=changes_pixels)
    except ValueError as exc:
        logger.debug("record %r: no counterfactual views (%s)", record_id, exc)
        return image, image, []
    return (counterfactual.intervene(image, boxes, p.intervention, **kw),
            counterfactual.intervene(image, ctrl, p.intervention, **kw),
            [[float(v) for v in b] for b in ctrl])


def row_has_views(row: dict[str, Any]) -> bool:
    """Whether a test row has real counterfactual views: evidence boxes and one control box
    per evidence box (a record without boxes has neither)."""
    boxes = row.get("evidence_boxes") or []
    return bool(len(boxes)) and len(row.get("control_boxes") or []) == len(boxes)


def add_counterfactual_views(ds: datasets.Dataset, p: DataParams) -> datasets.Dataset:
    """Add ``image_cf_evidence``, ``image_cf_control`` and ``control_boxes`` columns.

    The evidence view intervenes on the evidence boxes (the answer is no longer
    supported); the control view intervenes on regions of the same sizes that overlap
    neither the evidence nor (FocusShapes) the other objects and the cue cell (the answer
    and the shortcut are unchanged). The intervention seed is the example's seed, stored in
    ``meta``. JSONL records get theirs from ``record_views``.
    """
    ev_imgs, ctl_imgs, ctl_boxes, no_views = [], [], [], []
    for row in progress.bar(ds, desc="counterfactual views", leave=False):
        meta = records.decode_meta(row["meta"])
        image = row["image"].convert("RGB")
        boxes = [list(b) for b in row["evidence_boxes"]]
        if p.source == "jsonl":
            ev, ctl, ctrl = record_views(image, boxes, meta, p, row["id"])
            if boxes and not ctrl:
                no_views.append(row["id"])
        else:
            ev, ctl, ctrl = _focus_shapes_views(image, boxes, meta, p)
        ev_imgs.append(ev)
        ctl_imgs.append(ctl)
        ctl_boxes.append(ctrl)
    if no_views:
        split = records.decode_meta(ds[0]["meta"]).get("split", "a split")
        more = f", ... ({len(no_views) - 5} more)" if len(no_views) > 5 else ""
        logger.warning("%s: %d record(s) with evidence boxes (of %d) have no counterfactual views "
                       "(no same-sized control region away from the evidence that changes the "
                       "image; the box-based metrics skip them): %s%s", split, len(no_views),
                       len(ds), ", ".join(map(repr, no_views[:5])), more)
    enc = datasets.Image().encode_example
    ds = ds.add_column("image_cf_evidence", [enc(im) for im in ev_imgs], feature=datasets.Image())
    ds = ds.add_column("image_cf_control", [enc(im) for im in ctl_imgs], feature=datasets.Image())
    ds = ds.add_column("control_boxes", ctl_boxes,
                       feature=datasets.List(datasets.List(datasets.Value("float32"))))
    return ds


def make_focus_shapes(p: DataParams) -> datasets.DatasetDict:
    """Generate all FocusShapes splits; test splits carry their counterfactual views."""
    if p.source != "focusshapes":
        raise ValueError(f"make_focus_shapes: the data params name source {p.source!r}; "
                         f"build the dataset with data.make_dataset")
    sizes = {"train": p.n_train, "warmup": p.n_warmup, "test_id": p.n_test_id,
             "test_ood": p.n_test_ood}
    out = {}
    for split in progress.bar(SPLITS, desc="FocusShapes splits"):
        ds = make_split(p, split, sizes[split])
        if split.startswith("test"):
            ds = add_counterfactual_views(ds, p)
        out[split] = ds
    return datasets.DatasetDict(out)


# --------------------------------------------------------------------------------------
# JSONL records (source: jsonl)
# --------------------------------------------------------------------------------------


def record_seed(seed: int, split: str, record_id: str) -> int:
    """The intervention seed of a JSONL record, from the run seed, the split and its id (not
    its line, so reordering a file changes no view)."""
    ss = np.random.SeedSequence([seed, _SPLIT_CODE[split], zlib.crc32(record_id.encode())])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def load_jsonl_split(p: DataParams, split: str) -> tuple[datasets.Dataset, int]:
    """One split from its records file (``p.jsonl_files[split]``), validated before use.

    Every record passes ``records.load_jsonl`` (each image decoded once; in error mode the
    first bad record raises ``records.DataError`` naming the file, line, record id and
    field). ``meta`` gains ``split`` and the intervention ``seed`` (``record_seed``) where the
    record does not set them. The images stay files until ``save_dataset`` embeds them. A
    split without a file (only ``warmup`` may lack one) is empty.

    Returns:
        ``(dataset, number of bad records skipped)``; test splits carry their views.

    Raises:
        records.DataError: a bad record (error mode), or a required split with no record left.
    """
    name = p.jsonl_files.get(split)
    if not name:
        return records.records_to_dataset([]), 0
    path = p.resolve(name)
    root = p.resolve(p.image_root) if p.image_root is not None else None
    recs, skipped = records.load_jsonl(path, root, p.on_bad_record, load_images=False,
                                       verify_images=True,
                                       allow_outside_root=p.allow_outside_root)
    if not recs:
        raise records.DataError(f"no valid record for split {split!r} ({skipped} skipped)",
                                path=path)
    for rec in recs:
        rec["meta"] = {"split": split, "seed": record_seed(p.seed, split, rec["id"]),
                       **rec["meta"]}
    ds = records.records_to_dataset(recs)
    if split.startswith("test"):
        ds = add_counterfactual_views(ds, p)
    return ds, skipped


file_sha256 = repro.file_sha256
"""Hex SHA-256 of a file's bytes (``repro.file_sha256``)."""


def source_files(p: DataParams) -> dict[str, str]:
    """``{split: sha256}`` of the records files of ``p`` (empty for FocusShapes): the part of
    a JSONL dataset's identity that its params do not hold. Images are not hashed: replace
    an image in place and delete ``runs/<profile>/data`` to rebuild."""
    if p.source != "jsonl":
        return {}
    return {split: file_sha256(p.resolve(name)) for split, name in sorted(p.jsonl_files.items())}


def make_jsonl_dataset(p: DataParams) -> tuple[datasets.DatasetDict, dict[str, int]]:
    """All four splits from the records files of ``p`` (``load_jsonl_split``).

    Returns:
        ``(DatasetDict, {split: bad records skipped})``.
    """
    if p.source != "jsonl":
        raise ValueError(f"make_jsonl_dataset: the data params name source {p.source!r}")
    out, skipped = {}, {}
    for split in progress.bar(SPLITS, desc="JSONL splits"):
        out[split], skipped[split] = load_jsonl_split(p, split)
    train_ids = set(out["train"]["id"])
    for split in options(TestSplit):
        shared = len(train_ids & set(out[split]["id"]))
        if shared:
            logger.warning("%d record id(s) of %s are also in train", shared, split)
    return datasets.DatasetDict(out), skipped


def dataset_counts(dsd: datasets.DatasetDict) -> dict[str, dict[str, int]]:
    """Per split: ``records``, ``with_boxes`` / ``without_boxes`` and, on splits that carry
    views, ``with_views`` / ``without_views`` (``row_has_views``).

    The box-based parts of both stages and of the evaluation skip the records without boxes
    (anchoring's attention loss, the faithful reward, Focus mass, the faithfulness gap).
    """
    out = {}
    for split, ds in dsd.items():
        boxes = ds["evidence_boxes"] if len(ds) else []
        n_boxes = sum(bool(len(b)) for b in boxes)
        counts = {"records": len(ds), "with_boxes": n_boxes, "without_boxes": len(ds) - n_boxes}
        if "control_boxes" in ds.column_names:
            views = sum(row_has_views({"evidence_boxes": b, "control_boxes": c})
                        for b, c in zip(boxes, ds["control_boxes"], strict=True))
            counts.update(with_views=views, without_views=len(ds) - views)
        out[split] = counts
    return out


def make_dataset(p: DataParams) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """The dataset ``p`` names: FocusShapes (``make_focus_shapes``) or JSONL records
    (``make_jsonl_dataset``), the four splits with the same columns either way.

    Returns:
        ``(DatasetDict, info)``; ``info`` holds ``source``, ``counts`` (``dataset_counts``),
        and for JSONL ``skipped`` (bad records per split) and ``files`` (``source_files``).
    """
    if p.source == "jsonl":
        dsd, skipped = make_jsonl_dataset(p)
        extra: dict[str, Any] = {"skipped": skipped, "files": source_files(p)}
    else:
        dsd, extra = make_focus_shapes(p), {}
    info = {"source": p.source, "counts": dataset_counts(dsd), **extra}
    for split, c in info["counts"].items():
        if c["without_boxes"] or c.get("without_views"):
            logger.info("%s: %d of %d record(s) without evidence boxes, %s without views",
                        split, c["without_boxes"], c["records"], c.get("without_views", "-"))
    return dsd, info


def data_dir(p: Any) -> Path:
    """``runs/<profile>/data``: where notebook 01 saves the dataset."""
    return run_dir(p, "data", create=False)


def save_dataset(dsd: datasets.DatasetDict, folder: str | Path, p: DataParams,
                 info: dict[str, Any] | None = None) -> Path:
    """``save_to_disk`` (images embedded) plus the resolved params that made the data and,
    when given, ``info.json`` (``make_dataset``'s info).

    The dataset is written to a temp folder next to ``folder`` (fsynced) and swapped in
    (``repro.staged_folder``): a rebuild that fails or is killed midway leaves the previous
    dataset and its ``params.json`` as they were. Temp folders of killed saves go first.
    """
    folder = Path(folder)
    with repro.staged_folder(folder) as tmp:
        # An empty split (``n_warmup: 0``, a JSONL source without a warm-up file) gets one
        # empty shard; by default it would get none, and ``load_from_disk`` fails on it.
        dsd.save_to_disk(str(tmp), num_shards={k: 1 for k, ds in dsd.items() if not len(ds)})
        if info is not None:
            atomic_write_json(tmp / "info.json", info)
        atomic_write_json(tmp / "params.json", {"class": "DataParams",
                                                "params": json.loads(json.dumps(p.__dict__))})
    return folder


def load_dataset_dir(folder: str | Path) -> datasets.DatasetDict:
    """Read a dataset saved by ``save_dataset`` (clear error if it is not there)."""
    folder = Path(folder)
    if not (folder / "dataset_dict.json").exists():
        raise FileNotFoundError(
            f"no dataset at {folder}: run notebooks/01_data_construction.ipynb "
            f"(or `python -m fmr1lib data --params params/<profile>/01_data_construction.yaml`)")
    return datasets.load_from_disk(str(folder))


def _same_source(folder: Path, p: DataParams) -> bool:
    """Whether the records files of ``p`` are those the saved dataset was made from."""
    if p.source != "jsonl":
        return True
    try:
        saved = json.loads((folder / "info.json").read_text()).get("files")
    except (OSError, json.JSONDecodeError):
        return False
    return saved == source_files(p)


def load_or_make(p: DataParams) -> datasets.DatasetDict:
    """The saved dataset of ``p``'s profile if present with the same params (and, for JSONL,
    the same records files), else build it (``make_dataset``)."""
    folder = data_dir(p)
    repro.recover_interrupted_swap(folder)
    if saved_params_equal(folder, p) and _same_source(folder, p):
        return load_dataset_dir(folder)
    if (folder / "params.json").exists():
        logger.info("dataset at %s was made with other params or files; rebuilding", folder)
    dsd, info = make_dataset(p)
    save_dataset(dsd, folder, p, info)
    return load_dataset_dir(folder)


# --------------------------------------------------------------------------------------
# Summaries (for notebook 01 and the tests)
# --------------------------------------------------------------------------------------


def shortcut_agreement(ds: datasets.Dataset) -> float:
    """Share of cued examples whose cue equals the answer (NaN if none is cued, e.g. JSONL
    records, whose meta has no ``shortcut_agrees``)."""
    flags = [m.get("shortcut_agrees") for m in map(records.decode_meta, ds["meta"])]
    cued = [f for f in flags if f is not None]
    return float(np.mean(cued)) if cued else float("nan")


NO_TASK = "(none)"
"""The family ``task_counts`` gives records whose meta names none (JSONL records)."""


def task_counts(ds: datasets.Dataset) -> dict[str, int]:
    """Number of examples per question family (``NO_TASK`` for records without one)."""
    out: dict[str, int] = {}
    for m in map(records.decode_meta, ds["meta"]):
        task = m.get("task", NO_TASK)
        out[task] = out.get(task, 0) + 1
    return out


def answer_counts(ds: datasets.Dataset) -> dict[str, int]:
    """Number of examples per answer string."""
    out: dict[str, int] = {}
    for a in ds["answer"]:
        out[a] = out.get(a, 0) + 1
    return dict(sorted(out.items()))
