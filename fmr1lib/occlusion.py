"""Annotation-free causal regions: which image cells the reference answer depends on (§6.1).

The region ``C`` of the faithful reward without evidence boxes is the ``n_cells`` merged 28-px
cells whose removal most lowers the log-probability of the reference answer (``<think>`` from
the question, the ground-truth answer, ``<|im_end|>``; the answer tokens are scored). Four
searches find them (``choices.OcclusionSearch``, ``RewardParams.occlusion_search``):

* ``exhaustive``: every cell is occluded in turn and the occluded copy teacher-forced; one
  forward per cell, so its cost grows as (cells) x (cost of a forward);
* ``coarse_to_fine`` (the default): a quadtree beam search. The grid is split into up to 4 blocks, each
  block is occluded as a whole, the ``beam`` most damaging blocks are split again, down to
  single cells; about ``4 + 4 * beam * (log2(side) - 1)`` forwards per image;
* ``gradient``: no occluded copy at all. One forward and one backward of the reference answer's
  log-probability with respect to the image-token embeddings ``e`` (the merger's outputs), and
  one vision-tower pass on the image with every cell removed (``e'``); a cell's score is the
  first-order change of the log-probability when its embedding is replaced, ``g_k . (e'_k -
  e_k)``;
* ``budgeted``: the ``budget`` cells that ``gradient`` ranks first are occluded exactly (one
  forward each) and ranked by the true drop; a fixed number of forwards whatever the image size.

Every search returns, per record, ``n_cells`` boxes in original-image pixels, most damaging
first; the cells are those of ``cell_boxes`` (row-major, the order of the image tokens).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from fmr1lib import attention, batching, counterfactual, modeling, prompting, records
from fmr1lib.choices import Intervention, OcclusionSearch, options

SEARCHES = options(OcclusionSearch)
"""The searches, in the order of the module docstring."""
PAD = 0
"""Pixels grown around an occluded cell: none, so that only the cell's own pixels change."""

Block = tuple[int, int, int, int]
"""Cells ``[r0, r1) x [c0, c1)`` of an image's cell grid."""


def cell_boxes(image_size: tuple[int, int], grid_thw: Sequence[int]) -> list[list[float]]:
    """The merged image-token cells of an image as boxes in original-pixel coordinates.

    Cell ``(r, c)`` covers resized pixels ``[28c, 28c+28) x [28r, 28r+28)``; scaled back to the
    original size it is ``[c W/cols, r H/rows, (c+1) W/cols, (r+1) H/rows]``. Listed row-major,
    the order of the image tokens.

    >>> cell_boxes((112, 56), (1, 4, 8))[:2]
    [[0.0, 0.0, 28.0, 28.0], [28.0, 0.0, 56.0, 28.0]]
    """
    rows, cols = cell_grid(grid_thw)
    return [block_box(image_size, (rows, cols), (r, r + 1, c, c + 1))
            for r in range(rows) for c in range(cols)]


def cell_grid(grid_thw: Sequence[int]) -> tuple[int, int]:
    """``(rows, cols)`` of merged cells of an image (``image_grid_thw`` row in 14-px patches)."""
    _, gh, gw = (int(v) for v in grid_thw)
    return gh // modeling.MERGE, gw // modeling.MERGE


def block_box(image_size: tuple[int, int], shape: tuple[int, int], block: Block) -> list[float]:
    """The box ``[x0, y0, x1, y1]`` (original pixels) covering a block of cells.

    >>> block_box((112, 112), (4, 4), (0, 2, 2, 4))
    [56.0, 0.0, 112.0, 56.0]
    """
    w0, h0 = image_size
    rows, cols = shape
    r0, r1, c0, c1 = block
    return [c0 * w0 / cols, r0 * h0 / rows, c1 * w0 / cols, r1 * h0 / rows]


def split_block(block: Block) -> list[Block]:
    """A block's children: its rows and columns halved (a side of one cell is not split).

    >>> split_block((0, 4, 0, 4))
    [(0, 2, 0, 2), (0, 2, 2, 4), (2, 4, 0, 2), (2, 4, 2, 4)]
    >>> split_block((0, 1, 0, 3))
    [(0, 1, 0, 1), (0, 1, 1, 3)]
    """
    r0, r1, c0, c1 = block
    rs = [(r0, r1)] if r1 - r0 == 1 else [(r0, (r0 + r1) // 2), ((r0 + r1) // 2, r1)]
    cs = [(c0, c1)] if c1 - c0 == 1 else [(c0, (c0 + c1) // 2), ((c0 + c1) // 2, c1)]
    return [(a, b, c, d) for a, b in rs for c, d in cs]


def coarse_to_fine_forwards(rows: int, cols: int, beam: int) -> int:
    """Occluded copies ``coarse_to_fine`` teacher-forces for one image of ``rows x cols`` cells.

    >>> coarse_to_fine_forwards(4, 4, 2), coarse_to_fine_forwards(16, 16, 2)
    (12, 28)
    """
    frontier, total = [(0, rows, 0, cols)], 0
    while frontier:
        children = [ch for b in frontier for ch in split_block(b)]
        total += len(children)
        frontier = [b for b in children if (b[1] - b[0]) * (b[3] - b[2]) > 1][:beam]
    return total


# --------------------------------------------------------------------------------------
# Scoring occluded copies
# --------------------------------------------------------------------------------------


def _answer_ids(processor: Any) -> tuple[int, int]:
    tok = processor.tokenizer
    return (tok.convert_tokens_to_ids(prompting.ANSWER_OPEN),
            tok.convert_tokens_to_ids(prompting.ANSWER_CLOSE))


def _reference_batch(processor: Any, rows: Sequence[dict[str, Any]], device: Any
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Prompt + reference response of each record on ``device``: the inputs, and the targets
    and answer-token mask of the response positions (``[B, n_resp]``)."""
    open_id, close_id = _answer_ids(processor)
    batch = batching.encode_batch(rows, processor, "plain", with_response=True)
    labels = batch.labels
    n_resp = int((labels != -100).sum(1).max())
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    targets = labels[:, -n_resp:].clamp_min(0).to(device)
    keep = batching.answer_token_mask(labels, open_id, close_id)[:, -n_resp:].to(device)
    return inputs, targets, keep


def answer_logprobs(model: Any, processor: Any, copies: Sequence[dict[str, Any]],
                    chunk_size: int = 64) -> torch.Tensor:
    """Log-probability of the reference answer tokens of each record (eval mode, no grad).

    Args:
        copies: records (image, question, answer, meta) to teacher-force.
        chunk_size: records per forward.

    Returns:
        ``[len(copies)]`` summed log-probabilities of the answer tokens.
    """
    device = next(model.parameters()).device
    scores = torch.empty(len(copies))
    with batching.eval_mode(model):
        for start in range(0, len(copies), chunk_size):
            part = copies[start:start + chunk_size]
            inputs, targets, keep = _reference_batch(processor, part, device)
            logits = batching.completion_logits(model, inputs, targets.shape[1])
            scores[start:start + len(part)] = batching.token_logprobs(logits, targets, keep).sum(1).cpu()
    return scores


def intervention_kwargs(row: dict[str, Any]) -> dict[str, Any]:
    """The seed and background fill of a record's interventions (from its meta)."""
    meta = records.decode_meta(row.get("meta"))
    kw: dict[str, Any] = {"seed": int(meta.get("seed", 0))}
    if meta.get("background") is not None:
        kw["fill"] = tuple(int(v) for v in meta["background"])
    return kw


def _occluded(row: dict[str, Any], image: Any, boxes: Sequence[Sequence[float]],
              method: str) -> dict[str, Any]:
    """The record with ``boxes`` removed from its image (no evidence boxes: plain prompt)."""
    out = counterfactual.intervene(image, [list(b) for b in boxes], method, pad=PAD,
                                   **intervention_kwargs(row))
    return {"image": out, "question": row["question"], "answer": row["answer"],
            "evidence_boxes": [], "meta": row.get("meta")}


def _score_boxes(model: Any, processor: Any, rows: Sequence[dict[str, Any]], images: Sequence[Any],
                 boxes_per_row: Sequence[Sequence[Sequence[float]]], method: str,
                 chunk_size: int) -> list[list[float]]:
    """Per row, the answer log-probability with each of its boxes occluded (one copy per box),
    all rows' copies in the same batched forwards."""
    copies, owner = [], []
    for i, (row, image, boxes) in enumerate(zip(rows, images, boxes_per_row, strict=True)):
        for box in boxes:
            copies.append(_occluded(row, image, [box], method))
            owner.append(i)
    scores = answer_logprobs(model, processor, copies, chunk_size).tolist() if copies else []
    out: list[list[float]] = [[] for _ in rows]
    for i, s in zip(owner, scores, strict=True):
        out[i].append(float(s))
    return out


def _lowest(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` lowest scores, lowest first (ties: the earlier index)."""
    return sorted(range(len(scores)), key=lambda j: (scores[j], j))[:k]


# --------------------------------------------------------------------------------------
# The searches
# --------------------------------------------------------------------------------------


def exhaustive_scores(model: Any, processor: Any, rows: Sequence[dict[str, Any]],
                      method: str = "background", chunk_size: int = 64) -> list[list[float]]:
    """Per row, the answer log-probability with each cell occluded (row-major cell order)."""
    images, grids = _images_and_grids(processor, rows)
    cells = [cell_boxes(im.size, g) for im, g in zip(images, grids, strict=True)]
    return _score_boxes(model, processor, rows, images, cells, method, chunk_size)


def _images_and_grids(processor: Any, rows: Sequence[dict[str, Any]]) -> tuple[list[Any], torch.Tensor]:
    images = [r["image"].convert("RGB") for r in rows]
    return images, processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"]


def coarse_to_fine_cells(model: Any, processor: Any, rows: Sequence[dict[str, Any]], n_cells: int,
                         method: str = "background", beam: int = 2,
                         chunk_size: int = 64) -> list[list[int]]:
    """Per row, the ``n_cells`` most damaging cells (row-major indices) of the quadtree search.

    Each level occludes every child of the kept blocks (all rows' copies batched together),
    keeps the ``max(beam, n_cells)`` blocks with the lowest answer log-probability and splits
    them, until the children are single cells; the result is the lowest of the single cells
    scored on the way.
    """
    images, grids = _images_and_grids(processor, rows)
    shapes = [cell_grid(g) for g in grids]
    keep = max(beam, n_cells)
    frontier: list[list[Block]] = [[(0, r, 0, c)] for r, c in shapes]
    singles: list[dict[int, float]] = [{} for _ in rows]
    while any(frontier):
        children = [[ch for b in level for ch in split_block(b)] for level in frontier]
        boxes = [[block_box(im.size, sh, b) for b in ch]
                 for im, sh, ch in zip(images, shapes, children, strict=True)]
        scores = _score_boxes(model, processor, rows, images, boxes, method, chunk_size)
        frontier = []
        for i, (ch, sc) in enumerate(zip(children, scores, strict=True)):
            cols = shapes[i][1]
            coarse = []
            for b, s in zip(ch, sc, strict=True):
                if (b[1] - b[0]) * (b[3] - b[2]) == 1:
                    singles[i][b[0] * cols + b[2]] = s
                else:
                    coarse.append((s, b))
            coarse.sort(key=lambda t: t[0])
            frontier.append([b for _, b in coarse[:keep]])
    return [sorted(found, key=lambda k: (found[k], k))[:n_cells] for found in singles]


def gradient_scores(model: Any, processor: Any, rows: Sequence[dict[str, Any]],
                    method: str = "background") -> list[list[float]]:
    """Per row, the first-order change of the answer log-probability when each cell's
    image-token embedding ``e_k`` is replaced by ``e'_k``, its embedding in the image with every
    cell removed: ``g_k . (e'_k - e_k)`` with ``g`` the gradient at ``e``.

    One vision-tower pass on the real and on the removed images, one forward and one backward of
    the language model (gradients with respect to the embeddings only; the model's parameters
    get no gradient).
    """
    base = attention.unwrap_model(model)
    inner = base.model
    device = next(model.parameters()).device
    images, grids = _images_and_grids(processor, rows)
    removed = [_occluded(r, im, cell_boxes(im.size, g), method)["image"]
               for r, im, g in zip(rows, images, grids, strict=True)]
    inputs, targets, keep = _reference_batch(processor, rows, device)
    grid = inputs["image_grid_thw"]
    pv_removed = processor.image_processor(images=removed, return_tensors="pt")["pixel_values"]
    split = (grid.prod(-1) // modeling.MERGE ** 2).tolist()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            e_removed = torch.cat(inner.get_image_features(
                pv_removed.to(device, inputs["pixel_values"].dtype), grid, return_dict=True).pooler_output)
            e = torch.cat(inner.get_image_features(inputs.pop("pixel_values"), grid,
                                                   return_dict=True).pooler_output)
        e, e_removed = e.float().requires_grad_(True), e_removed.float()
        feats = tuple(x.to(inner.visual.dtype) for x in torch.split(e, split))
        with torch.enable_grad():
            out = base(**inputs, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)},
                       logits_to_keep=targets.shape[1] + 1, use_cache=False)
            total = batching.token_logprobs(out.logits[:, :-1].float(), targets, keep).sum()
            (g,) = torch.autograd.grad(total, e)
    finally:
        model.train(was_training)
    delta = (g * (e_removed - e.detach())).sum(-1)
    return [d.tolist() for d in torch.split(delta.cpu(), split)]


@dataclass(frozen=True)
class Search:
    """How ``search`` finds a region."""

    n_cells: int = 2
    """Cells kept per record."""
    method: Intervention = "background"
    """How a cell is removed (``choices.Intervention``)."""
    how: OcclusionSearch = "coarse_to_fine"
    """Which search (the module docstring)."""
    budget: int = 2
    """``budgeted``: cells occluded exactly (at least ``n_cells``)."""
    beam: int = 2
    """``coarse_to_fine``: blocks refined per level (at least ``n_cells``)."""
    chunk_size: int = 64
    """Occluded copies per forward."""


def search(model: Any, processor: Any, rows: Sequence[dict[str, Any]],
           settings: Search | None = None) -> list[list[list[float]]]:
    """The annotation-free causal region of each record (the module docstring's searches).

    Args:
        model: the policy (run in eval mode; its parameters get no gradient).
        processor: its processor.
        rows: records with image, question, answer (and meta for the intervention seed/fill).
        settings: which search, how many cells, how they are removed.

    Returns:
        Per record, ``settings.n_cells`` boxes ``[x0, y0, x1, y1]`` in original-image pixels,
        most damaging cell first.
    """
    settings = settings or Search()
    n_cells, method, how = settings.n_cells, settings.method, settings.how
    budget, beam, chunk_size = settings.budget, settings.beam, settings.chunk_size
    if how not in SEARCHES:
        raise ValueError(f"unknown occlusion search {how!r}; use one of {SEARCHES}")
    if not rows:
        return []
    images, grids = _images_and_grids(processor, rows)
    cells = [cell_boxes(im.size, g) for im, g in zip(images, grids, strict=True)]
    if how == "exhaustive":
        scores = _score_boxes(model, processor, rows, images, cells, method, chunk_size)
        chosen = [_lowest(s, n_cells) for s in scores]
    elif how == "coarse_to_fine":
        chosen = coarse_to_fine_cells(model, processor, rows, n_cells, method, beam, chunk_size)
    else:
        approx = gradient_scores(model, processor, rows, method)
        chosen = [_lowest(s, n_cells) for s in approx]
        if how == "budgeted":
            short = [_lowest(s, max(budget, n_cells)) for s in approx]
            exact = _score_boxes(model, processor, rows, images,
                                 [[c[k] for k in ks] for c, ks in zip(cells, short, strict=True)],
                                 method, chunk_size)
            chosen = [sorted(ks, key=lambda k: (dict(zip(ks, s, strict=False))[k], k))[:n_cells]
                      for ks, s in zip(short, exact, strict=True)]
    return [[list(c[k]) for k in ks] for c, ks in zip(cells, chosen, strict=True)]


def agreement(model: Any, processor: Any, rows: Sequence[dict[str, Any]], n_cells: int = 2,
              method: str = "background", searches: Sequence[str] = SEARCHES,
              budget: int = 2) -> dict[str, dict[str, float]]:
    """How each search's cells compare with the exhaustive search's on ``rows``.

    Returns:
        Per search: ``top_cell_agreement`` (share of rows whose most damaging cell is in the
        exhaustive top 2), ``overlap`` (mean share of the ``n_cells`` cells the exhaustive search
        also selects) and ``time_per_image_s`` (the search alone).
    """
    reference = exhaustive_scores(model, processor, rows, method)
    images, grids = _images_and_grids(processor, rows)
    best = [_lowest(s, n_cells) for s in reference]
    out = {}
    for how in searches:
        t0 = time.perf_counter()
        regions = search(model, processor, rows,
                         Search(n_cells=n_cells, method=method, how=how, budget=budget))
        dt = time.perf_counter() - t0
        chosen = [chosen_cells(b, im.size, g) for b, im, g in zip(regions, images, grids, strict=True)]
        out[how] = {
            "top_cell_agreement": sum(top_cell_agreement(c, s) for c, s in
                                      zip(chosen, reference, strict=True)) / len(rows),
            "overlap": sum(len(set(c) & set(b)) / n_cells for c, b in
                           zip(chosen, best, strict=True)) / len(rows),
            "time_per_image_s": dt / len(rows)}
    return out


def forwards_per_image(how: str, rows: int, cols: int, n_cells: int = 2, budget: int = 2,
                       beam: int = 2) -> float:
    """Occluded copies teacher-forced per image (``gradient``: 0, it runs one forward + one
    backward of the unoccluded prompt instead).

    >>> [forwards_per_image(h, 16, 16) for h in SEARCHES]
    [256, 28, 0, 2]
    """
    if how == "exhaustive":
        return rows * cols
    if how == "coarse_to_fine":
        return coarse_to_fine_forwards(rows, cols, max(beam, n_cells))
    if how == "gradient":
        return 0
    return min(rows * cols, max(budget, n_cells))


def top_cell_agreement(chosen: Sequence[int], reference_scores: Sequence[float], k: int = 2) -> bool:
    """Whether ``chosen[0]`` (a search's most damaging cell) is among the ``k`` most damaging
    cells of the exhaustive search (``reference_scores``: answer log-probability per cell).

    >>> top_cell_agreement([3, 0], [0.0, -1.0, -0.5, -2.0])
    True
    >>> top_cell_agreement([0, 3], [0.0, -1.0, -0.5, -2.0])
    False
    """
    return bool(chosen) and chosen[0] in _lowest(reference_scores, k)


def chosen_cells(boxes: Sequence[Sequence[float]], image_size: tuple[int, int],
                 grid_thw: Sequence[int]) -> list[int]:
    """Row-major cell indices of boxes returned by ``search`` (inverse of ``cell_boxes``)."""
    rows, cols = cell_grid(grid_thw)
    w0, h0 = image_size
    out = []
    for x0, y0, _, _ in boxes:
        r = int(math.floor(y0 * rows / h0 + 1e-6))
        c = int(math.floor(x0 * cols / w0 + 1e-6))
        out.append(r * cols + c)
    return out
