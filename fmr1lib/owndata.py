"""Own region-annotated data: the checks a JSONL source needs before any work, and the profile
that trains on it.

* ``check_warmup_source``: a stage-0 warm-up that is on needs a ``warmup`` records file.
* ``grid_report`` / ``warn_small_grids``: images that the processor turns into fewer than
  ``MIN_IMAGE_TOKENS`` image tokens, or whose evidence boxes touch every token cell (Focus mass
  is 1 there for every model), named in one line with the ``image_min_pixels`` that fixes them.
* ``foreign_pointers``: the ``*_params_file`` keys of a profile that lead out of its folder.
* ``new_profile``: ``params/<name>/`` for JSONL files, made from another profile
  (``python -m fmr1lib profile new``).
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from fmr1lib import config

logger = logging.getLogger(__name__)

TOKEN_PX = 28
"""Side in resized pixels of one merged image token (patch 14, merge 2)."""
MIN_IMAGE_TOKENS = 16
"""Fewer image tokens than this (a 4x4 grid) leave the box-based measures little to resolve."""
N_IDS_SHOWN = 5
"""Record ids a summary line names."""


# --------------------------------------------------------------------------------------
# Warm-up source
# --------------------------------------------------------------------------------------


def check_warmup_source(p: Any, origin: str) -> None:
    """A tiny backbone with ``warmup: true`` over JSONL data needs ``jsonl_files.warmup``.

    Raises:
        config.ParamsError: ``<origin>: key 'warmup': ...`` naming the data file and both fixes.
    """
    if getattr(p, "model_name", "tiny") != "tiny" or not getattr(p, "warmup", False):
        return
    name = p.data_params_file
    path = Path(name) if Path(name).is_absolute() else config.PARAMS_ROOT / name
    if not path.is_file():
        return  # the stage names the missing file when it reads it
    dp = config.load_pointed(config.DataParams, path, "data_params_file")
    if dp.source == "jsonl" and not dp.jsonl_files.get("warmup"):
        raise config.ParamsError(
            f"{origin}: key 'warmup': true, but the data params {name} (source: jsonl) name no "
            f"warmup records file: set warmup: false in {origin}, or add a warmup file to "
            f"jsonl_files in {name}")


# --------------------------------------------------------------------------------------
# Image-token grids
# --------------------------------------------------------------------------------------


def resized(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` after the Qwen2-VL processor's resize (``smart_resize``: sides
    multiples of ``TOKEN_PX``, area within ``[min_pixels, max_pixels]``)."""
    f = TOKEN_PX
    h_bar, w_bar = max(f, round(height / f) * f), max(f, round(width / f) * f)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return w_bar, h_bar


def covered_cells(boxes: Iterable[Iterable[float]], size: tuple[int, int],
                  grid: tuple[int, int]) -> int:
    """Token cells of a ``grid`` (cols, rows) that the ``boxes`` (original pixels of an image
    of ``size``) overlap."""
    (w, h), (cols, rows) = size, grid
    cells = set()
    for x0, y0, x1, y1 in boxes:
        c0, c1 = int(x0 / w * cols), math.ceil(x1 / w * cols)
        r0, r1 = int(y0 / h * rows), math.ceil(y1 / h * rows)
        cells.update((r, c) for r in range(max(r0, 0), min(max(r1, r0 + 1), rows))
                     for c in range(max(c0, 0), min(max(c1, c0 + 1), cols)))
    return len(cells)


def grid_report(items: Iterable[tuple[str, tuple[int, int], list]], min_pixels: int,
                max_pixels: int) -> dict[str, Any]:
    """What the processor makes of ``(id, (width, height), evidence boxes)`` items.

    Returns:
        ``records``, ``small`` (ids with fewer than ``MIN_IMAGE_TOKENS`` tokens), ``covered``
        (ids whose boxes touch every cell of a grid of more than one cell, or of any grid
        when small), ``fewest_tokens`` and ``smallest`` (the original size giving them).
    """
    out: dict[str, Any] = {"records": 0, "small": [], "covered": [], "fewest_tokens": None,
                           "smallest": None}
    for rid, (w, h), boxes in items:
        out["records"] += 1
        rw, rh = resized(w, h, min_pixels, max_pixels)
        grid = (rw // TOKEN_PX, rh // TOKEN_PX)
        tokens = grid[0] * grid[1]
        if out["fewest_tokens"] is None or tokens < out["fewest_tokens"]:
            out["fewest_tokens"], out["smallest"] = tokens, (w, h)
        if tokens < MIN_IMAGE_TOKENS:
            out["small"].append(rid)
        if boxes and covered_cells(boxes, (w, h), grid) >= tokens:
            out["covered"].append(rid)
    return out


def min_pixels_for(sizes: Iterable[tuple[int, int]], max_pixels: int,
                   tokens: int = MIN_IMAGE_TOKENS) -> int:
    """The smallest ``image_min_pixels`` (a whole number of token cells) that gives every image
    of ``sizes`` at least ``tokens`` image tokens under ``max(max_pixels, it)``."""
    sizes = list(sizes)
    cells = tokens
    while True:
        mp = cells * TOKEN_PX * TOKEN_PX
        if all(math.prod(resized(w, h, mp, max(max_pixels, mp))) >= tokens * TOKEN_PX ** 2
               for w, h in sizes):
            return mp
        cells += 1


def _shown(ids: list[str]) -> str:
    more = f", ... ({len(ids) - N_IDS_SHOWN} more)" if len(ids) > N_IDS_SHOWN else ""
    return ", ".join(repr(i) for i in ids[:N_IDS_SHOWN]) + more


def grid_warning(report: dict[str, Any], min_pixels: int, max_pixels: int, origin: str,
                 sizes: Iterable[tuple[int, int]] = ()) -> str | None:
    """The one line that names the records ``grid_report`` found (None when there are none)."""
    small, covered = report["small"], report["covered"]
    if not small and not covered:
        return None
    w, h = report["smallest"]
    fix = min_pixels_for(sizes or [(w, h)], max_pixels)
    parts = []
    if small:
        parts.append(f"{len(small)} of {report['records']} record(s) give fewer than "
                     f"{MIN_IMAGE_TOKENS} image tokens (fewest {report['fewest_tokens']}, from "
                     f"{w}x{h} px; first: {_shown(small)})")
    if covered:
        parts.append(f"{len(covered)} record(s) have evidence boxes on every token cell, so "
                     f"Focus mass is 1 there for every model (first: {_shown(covered)})")
    return (f"{origin}: {'; '.join(parts)}: raise image_min_pixels (now {min_pixels}) to "
            f"{fix}" + (f" and image_max_pixels to {fix}" if fix > max_pixels else ""))


def dataset_sizes(ds: Any) -> list[tuple[str, tuple[int, int], list]]:
    """``(id, (width, height), evidence boxes)`` of every row of a records dataset, reading
    only the image headers."""
    import datasets
    from PIL import Image

    raw = ds.cast_column("image", datasets.Image(decode=False))
    out = []
    for row in raw.select_columns(["id", "image", "evidence_boxes"]):
        img = row["image"]
        src = io.BytesIO(img["bytes"]) if img.get("bytes") else img["path"]
        with Image.open(src) as im:
            out.append((row["id"], im.size, [list(b) for b in row["evidence_boxes"]]))
    return out


def warn_small_grids(dsd: Any, p: Any, origin: str) -> str | None:
    """Log ``grid_warning`` over every split of ``dsd`` for the processor settings of ``p``
    (``image_min_pixels`` / ``image_max_pixels``); returns the line."""
    items = [it for split in dsd for it in dataset_sizes(dsd[split]) if len(dsd[split])]
    report = grid_report(items, p.image_min_pixels, p.image_max_pixels)
    line = grid_warning(report, p.image_min_pixels, p.image_max_pixels, origin,
                        sorted({size for _, size, _ in items}))
    if line:
        logger.warning("%s", line)
    return line


# --------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------

POINTER_KEYS = ("data_params_file", "backbone_params_file", "anchor_params_file",
                "rl_params_file")


def _resolve(name: str, root: Path) -> Path:
    return (Path(name) if Path(name).is_absolute() else root / name).resolve()


def foreign_pointers(path: Path, params: Any, root: Path) -> list[str]:
    """One line per ``*_params_file`` of ``params`` (loaded from ``path``, a file of
    ``params/<profile>/``) that points at a file outside that folder: the file, the key and
    the pointed-at path."""
    folder = Path(path).resolve().parent
    out = []
    for key in POINTER_KEYS:
        name = getattr(params, key, None)
        if name and _resolve(name, root).parent != folder:
            out.append(f"{path}: key {key!r} points at {name}, outside the profile folder "
                       f"{folder.name}/ (a copied profile still reading the original's file?)")
    return out


def _notebook_files(profile_dir: Path) -> dict[str, Path]:
    return {nb: profile_dir / f"{nb}.yaml" for nb in config.PARAMS_BY_NOTEBOOK
            if (profile_dir / f"{nb}.yaml").is_file()}


QUICK = ("03_anchoring:variants=[plain, focus_anchor]", "03_anchoring:steps=60",
         "04_counterfactual_rl:variants=[grpo, faithful]", "04_counterfactual_rl:steps=12",
         "05_evaluation:rows=[backbone, plain_sft, anchoring, anchoring_grpo, faithful_mr1]")
"""``profile new --quick``: the settings of a first look at new data, a few minutes on a CPU
(two stage-1 variants of 60 steps, two stage-2 variants of 12 steps, the ablation rows they
make). The own-data example ``params/jsonl_example/`` is made with it."""


def parse_sets(items: Sequence[str], notebooks: Sequence[str]) -> list[tuple[str, str, Any]]:
    """``profile new --set [NOTEBOOK:]KEY=VALUE`` items as ``(notebook, key, value)``, one per
    file they set: without ``NOTEBOOK:`` every file whose params have ``KEY``. ``VALUE`` is YAML.

    Raises:
        config.ParamsError: a malformed item, an unknown notebook, a key no file (or not the
            named file) has, or ``profile`` / a ``*_params_file`` pointer (the command sets those).

    >>> parse_sets(["03_anchoring:steps=50", "seed=3"], ["02_backbone", "03_anchoring"])
    [('03_anchoring', 'steps', 50), ('02_backbone', 'seed', 3), ('03_anchoring', 'seed', 3)]
    """
    out = []
    for item in items:
        head, eq, raw = item.partition("=")
        nb, colon, key = head.rpartition(":")
        where = f"profile new --set {item!r}"
        if not eq or not key:
            raise config.ParamsError(f"{where}: give [NOTEBOOK:]KEY=VALUE")
        if key == "profile" or key in POINTER_KEYS:
            raise config.ParamsError(f"{where}: the command sets {key!r} itself")
        if colon and nb not in notebooks:
            raise config.ParamsError(f"{where}: no notebook {nb!r}; one of {list(notebooks)}")
        have = [n for n in ([nb] if colon else notebooks)
                if key in config.section_of(config.PARAMS_BY_NOTEBOOK[n])]
        if not have:
            raise config.ParamsError(f"{where}: key {key!r} is not a parameter of "
                                     f"{nb if colon else 'any notebook'}")
        value = yaml.safe_load(raw)
        out += [(n, key, value) for n in have]
    return out


def new_profile(name: str, base: str, jsonl: dict[str, str], *, root: Path,
                params_root: Path | None = None, image_root: str | None = None,
                allow_outside_root: bool = False,
                sets: Sequence[str] = ()) -> tuple[Path, list[str]]:
    """Write ``<params_root>/<name>/``: every notebook file of ``<params_root>/<base>/``, with
    ``profile`` and every ``*_params_file`` pointing inside the new folder, and a data file
    over the JSONL files ``jsonl`` (``{split: path}``).

    Every record is validated (``records.load_jsonl``, images decoded) before anything is
    written; when the images would give fewer than ``MIN_IMAGE_TOKENS`` tokens,
    ``image_min_pixels`` (and ``image_max_pixels`` if needed) are raised in every file that has
    them, with a warning. The folder is written to a temp folder and renamed into place.

    Args:
        root: the project root (relative records paths and ``*_params_file`` values are
            relative to it).
        params_root: the folder holding the profiles (default ``root / "params"``).
        sets: ``[NOTEBOOK:]KEY=VALUE`` settings written into the files (``parse_sets``;
            ``QUICK`` for ``--quick``), after the base's values.

    Returns:
        ``(the new folder, the notes printed about it)``.

    Raises:
        config.ParamsError: the profile exists, the base has no files, a split is missing or
            unknown, a ``sets`` item is bad (``parse_sets``), or a file written does not load
            (nothing is left written).
        records.DataError: a bad record (nothing written).
    """
    from fmr1lib import records

    params_root = Path(params_root) if params_root is not None else root / "params"
    out, src = params_root / name, params_root / base
    try:
        config.check_profile_name(name, "profile new NAME")
    except ValueError as exc:
        raise config.ParamsError(str(exc)) from exc
    if out.exists():
        raise config.ParamsError(f"profile new: {out} exists; pick another name or remove it")
    files = _notebook_files(src)
    if "01_data_construction" not in files:
        raise config.ParamsError(f"profile new --from {base}: {src} holds no notebook files; "
                                 f"profiles: {config.profiles(params_root.parent)}")
    known = (*config.DataParams.JSONL_SPLITS, "warmup")
    bad = sorted(set(jsonl) - set(known)) or [s for s in config.DataParams.JSONL_SPLITS
                                              if s not in jsonl]
    if bad:
        raise config.ParamsError(f"profile new --jsonl: split(s) {bad} unknown or missing; "
                                 f"give {list(config.DataParams.JSONL_SPLITS)} (warmup optional)")
    chosen = parse_sets(sets, list(files))  # before any record is read
    rel = {split: _project_path(path, root) for split, path in jsonl.items()}
    img_root = _project_path(image_root, root) if image_root else None
    items = []
    for path in rel.values():
        recs, _ = records.load_jsonl(
            _resolve(path, root), _resolve(img_root, root) if img_root else None, "error",
            load_images=False, verify_images=True, allow_outside_root=allow_outside_root)
        items += _record_sizes(recs)

    data = {"profile": name, "source": "jsonl", "jsonl_files": rel}
    if img_root:
        data["image_root"] = img_root
    if allow_outside_root:
        data["allow_outside_root"] = True
    notes = []
    values: dict[str, dict[str, Any]] = {}
    for nb, path in files.items():
        v = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if nb == "01_data_construction":
            v = {k: x for k, x in v.items() if k not in config.DataParams.FOCUSSHAPES_ONLY}
            v = {**v, **data}
        else:
            v = {**v, "profile": name}
        cls = config.PARAMS_BY_NOTEBOOK[nb]
        fields = {f for f in cls.__dataclass_fields__}
        for key in POINTER_KEYS:
            if key in fields:
                target = {"data_params_file": "01_data_construction",
                          "backbone_params_file": "02_backbone", "anchor_params_file":
                          "03_anchoring", "rl_params_file": "04_counterfactual_rl"}[key]
                v[key] = _project_path(str(out / f"{target}.yaml"), root)
        if nb == "02_backbone" and "warmup" not in jsonl and v.get("warmup", True):
            v["warmup"] = False
            notes.append("no warmup file: stage 0 builds the backbone without its warm-up "
                         "(warmup: false in 02_backbone.yaml)")
        values[nb] = v
    for nb, key, value in chosen:
        values[nb][key] = value
    notes += _size_grid(values, items, name)

    params_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=params_root))
    try:
        for nb, v in values.items():
            header = (f"# Profile {name}: made by `python -m fmr1lib profile new` from profile "
                      f"{base}; every *_params_file points inside this folder.\n"
                      f"# Every parameter not named here comes from "
                      f"{config.PARAMS_BY_NOTEBOOK[nb].__name__} in fmr1lib/config.py.\n")
            own = list(dict.fromkeys(key for n, key, _ in chosen if n == nb))
            if own:
                header += f"# Set by the command (--set / --quick): {', '.join(own)}.\n"
            (tmp / f"{nb}.yaml").write_text(header + yaml.safe_dump(v, sort_keys=False),
                                            encoding="utf-8")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        for nb, path in _notebook_files(out).items():
            config.load_params(config.PARAMS_BY_NOTEBOOK[nb], path)
    except config.ParamsError:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out, notes


def _project_path(path: str, root: Path) -> str:
    """``path`` relative to the project root when it lies under it, else absolute."""
    p = Path(path).absolute()
    try:
        return str(p.relative_to(Path(root).absolute()))
    except ValueError:
        return str(p)


def _record_sizes(recs: list[dict[str, Any]]) -> list[tuple[str, tuple[int, int], list]]:
    from PIL import Image

    out = []
    for rec in recs:
        with Image.open(rec["image_path"]) as im:
            out.append((rec["id"], im.size, rec["evidence_boxes"]))
    return out


def _size_grid(values: dict[str, dict[str, Any]], items: list, name: str) -> list[str]:
    """Raise ``image_min_pixels`` (and ``image_max_pixels``) in every file of ``values`` that
    has them when the records' images would give fewer than ``MIN_IMAGE_TOKENS`` tokens."""
    defaults = config.BuildParams()
    bp = values.get("02_backbone", {})
    lo = bp.get("image_min_pixels", defaults.image_min_pixels)
    hi = bp.get("image_max_pixels", defaults.image_max_pixels)
    report = grid_report(items, lo, hi)
    if not report["small"]:
        return []
    sizes = sorted({size for _, size, _ in items})
    line = grid_warning(report, lo, hi, f"profile {name}", sizes)
    fix = min_pixels_for(sizes, hi)
    for nb, v in values.items():
        if "image_min_pixels" in config.PARAMS_BY_NOTEBOOK[nb].__dataclass_fields__:
            v["image_min_pixels"] = fix
            v["image_max_pixels"] = max(hi, fix)
    logger.warning("%s", line)
    return [f"image_min_pixels: {fix}, image_max_pixels: {max(hi, fix)} set in every file that "
            f"has them ({len(report['small'])} of {report['records']} records would give fewer "
            f"than {MIN_IMAGE_TOKENS} image tokens)"]
