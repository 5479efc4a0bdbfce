"""The paper's contribution in one file: the counterfactual faithful reward (docs/design.md §6).

For an answer-correct trajectory ``y`` of a prompt with image ``I``:

1. **Causal region** ``C``: the record's evidence boxes (``boxes``), or, without annotation, the
   cells whose occlusion most lowers the reference answer's log-probability (``occlusion``,
   ``occlusion_region``; four searches, ``fmr1lib.occlusion``).
2. **Counterfactual image** ``I'``: ``I`` with ``C`` removed (``counterfactual_pixels``, one of
   ``choices.Intervention``).
3. **Visual dependency** of each response token, from one teacher-forced forward on ``I'``:
   ``s_t = KL(pi(.|I, y<t) || pi(.|I', y<t))`` (``visual_dependency``).
4. **Concentration** ``c``: the mean, over the top-``kappa`` tokens by ``s_t``, of the share of
   the token's image attention that lies inside ``C`` (``region_share``, ``concentration``).
   The attention rows are those of the *sampled* tokens, captured in the training forward that
   also gives the log-probabilities (a reward built on the ``<Focus>`` row would be the same for
   every sample of a group).
5. **Reward**: ``c`` (``raw``) or ``0.5 tanh(z)`` of ``c`` standardised among the group's
   correct trajectories (``group_tanh``); 0 for incorrect ones (``faithful_from_concentration``).

``counterfactual_view`` and ``faithful_rewards`` are the two calls ``grpo.grpo_step`` makes;
``explain_trajectories`` computes every ingredient for hand-picked completions (notebook 04).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fmr1lib import attention, batching, counterfactual, modeling, occlusion, rewards
from fmr1lib.choices import Concentration, FaithfulForm, Region, options
from fmr1lib.config import RewardParams

REGION_EPS = 1e-6
"""Cells whose box-overlap weight is below this count as outside the region (float slivers)."""
INTERVENTION_PAD = 0
"""Pixels grown around the causal region before it is removed in the reward's ``I'``: none, so
the edited pixels are exactly the region's (half-open boxes, §3.1) and every edited pixel lies in
a cell that ``region_token_mask`` scores. (Growing it by 1 px edited neighbouring cells in about
8% of occlusion cells and, with ``noise`` / ``blur``, in 55 of 200 evidence examples.)"""


# --------------------------------------------------------------------------------------
# Visual dependency and attention share (tensors)
# --------------------------------------------------------------------------------------


def visual_dependency(logits_I: torch.Tensor, logits_I_cf: torch.Tensor,  # noqa: N803
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token visual dependency ``s_t = KL(pi(.|I, y<t) || pi(.|I', y<t))``.

    Args:
        logits_I: ``[N, T, V]`` logits on the real image (row ``t`` predicts token ``t``).
        logits_I_cf: ``[N, T, V]`` logits of the same tokens on the counterfactual image.
        mask: ``[N, T]`` valid tokens (default: all).

    Returns:
        ``[N, T]`` non-negative, zero where masked.

    >>> x = torch.randn(2, 3, 5)
    >>> float(visual_dependency(x, x).abs().max()) < 1e-6
    True
    """
    lp = torch.log_softmax(logits_I.float(), dim=-1)
    lq = torch.log_softmax(logits_I_cf.float(), dim=-1)
    s = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)
    if mask is not None:
        s = s * mask.to(s.dtype)
    return s


def region_share(attn_rows: torch.Tensor, region_token_mask: torch.Tensor,
                 image_token_mask: torch.Tensor) -> torch.Tensor:
    """Share of each query row's image attention that lies on image tokens inside the region.

    Each row is restricted to the sample's image tokens and renormalised, the mass on the
    region's tokens is summed, and (for per-layer rows) averaged over layers.

    Args:
        attn_rows: ``[N, n_layers, T, seq]`` or ``[N, T, seq]`` attention rows.
        region_token_mask: ``[N, seq]`` image tokens inside the causal region ``C``.
        image_token_mask: ``[N, seq]`` all image tokens of the sample.

    Returns:
        ``[N, T]`` in ``[0, 1]`` (0 for a row with no mass on the image).

    >>> rows = torch.tensor([[[0.5, 0.3, 0.1, 0.1]]])
    >>> img = torch.tensor([[False, True, True, True]])
    >>> reg = torch.tensor([[False, True, False, False]])
    >>> region_share(rows, reg, img).tolist()
    [[0.6000000238418579]]
    """
    if attn_rows.ndim not in (3, 4):
        raise ValueError(f"attn_rows must be [N, L, T, seq] or [N, T, seq], got {tuple(attn_rows.shape)}")
    a = attn_rows.float()
    img = image_token_mask.to(a.device, a.dtype)
    reg = (region_token_mask.bool() & image_token_mask.bool()).to(a.device, a.dtype)
    shape = (a.shape[0],) + (1,) * (a.ndim - 2) + (a.shape[-1],)
    total = (a * img.view(shape)).sum(-1)
    inside = (a * reg.view(shape)).sum(-1)
    share = torch.where(total > 0, inside / total.clamp_min(torch.finfo(a.dtype).tiny),
                        torch.zeros_like(total))
    return share.mean(dim=1) if a.ndim == 4 else share


# --------------------------------------------------------------------------------------
# Concentration and the reward (numbers)
# --------------------------------------------------------------------------------------


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensors
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def concentration(s_t: Any, share_in_region: Any, mask: Any = None, kappa: int = 4,
                  how: str = "top_kappa", rho: float = 0.5, min_dependency: float = 0.0) -> float:
    """How much of the trajectory's visually dependent attention lies inside the causal region.

    ``how`` (``choices.Concentration``) picks which tokens count, and how much:

    - ``top_kappa``: the mean share over the ``kappa`` valid tokens with the largest ``s_t``
      (ties: the earlier token), the paper's literal reading. When one token carries the
      dependency, the other ``kappa - 1`` slots are filled by tokens whose ``s_t`` is noise.
    - ``weighted``: ``sum_t s_t share_t / sum_t s_t``: every token counts by its dependency, so
      a token with ``s_t`` near 0 contributes near 0.
    - ``relative``: the mean share over the tokens with ``s_t >= rho * max s_t``.
    - ``dependency``: ``sum_t s_t share_t``, not normalised (nats): the visual dependency on
      the region carried by tokens that attend to it. A trajectory whose answer barely depends
      on the region scores near 0 however its attention is spread.

    ``min_dependency``: when the largest ``s_t`` of the valid tokens is below it, removing the
    region changed nothing the trajectory says, so no attention of it counts as use of the
    region: ``c = 0``.

    Args:
        s_t: ``[T]`` visual dependency of each response token.
        share_in_region: ``[T]`` share of each token's image attention inside the region.
        mask: ``[T]`` valid response tokens (default: all).
        kappa: ``top_kappa``: number of tokens averaged.
        how: ``top_kappa``, ``weighted`` or ``relative``.
        rho: ``relative``: the share of the largest ``s_t`` a token needs.
        min_dependency: nats; below it ``c = 0``.

    Returns:
        The concentration ``c``, in ``[0, 1]`` (``dependency``: in nats, >= 0); 0.0 when no
        token is valid.

    >>> round(concentration([0.1, 0.9, 0.5, 0.0], [0.2, 0.8, 0.4, 1.0], kappa=2), 6)
    0.6
    >>> concentration([0.1, 0.9], [0.2, 0.8], mask=[1, 0], kappa=2)
    0.2
    >>> round(concentration([3.0, 0.0, 0.0, 0.0], [0.5, 1.0, 1.0, 1.0], how="weighted"), 6)
    0.5
    >>> round(concentration([3.0, 2.0, 0.1], [0.5, 0.7, 1.0], how="relative"), 6)
    0.6
    >>> concentration([1e-4, 2e-4], [0.9, 0.9], min_dependency=0.01)
    0.0
    """
    if how not in options(Concentration):
        raise ValueError(f"unknown concentration {how!r}; use one of {options(Concentration)}")
    if kappa < 1:
        raise ValueError(f"kappa must be >= 1, got {kappa}")
    s = _as_array(s_t)
    share = _as_array(share_in_region)
    if s.shape != share.shape:
        raise ValueError(f"s_t {s.shape} and share_in_region {share.shape} differ in shape")
    valid = np.ones_like(s, dtype=bool) if mask is None else _as_array(mask) > 0
    idx = np.flatnonzero(valid & np.isfinite(s) & np.isfinite(share))
    if idx.size == 0 or s[idx].max() < min_dependency:
        return 0.0
    if how == "dependency":
        return float((s[idx] * share[idx]).sum())
    if how == "weighted":
        total = s[idx].sum()
        return float((s[idx] * share[idx]).sum() / total) if total > 0 else 0.0
    if how == "relative":
        keep = idx[s[idx] >= rho * s[idx].max()]
        return float(share[keep].mean())
    order = idx[np.argsort(-s[idx], kind="stable")][:kappa]
    return float(share[order].mean())


def faithful_from_concentration(c: Sequence[float], correct: Sequence[bool],
                                form: str = "group_tanh", std_floor: float = 0.01) -> list[float]:
    """Faithful reward of ONE group of trajectories from their concentrations.

    Args:
        c: concentration of each trajectory of the group (ignored where incorrect).
        correct: whether each trajectory's answer is correct.
        form: ``raw`` (reward = c) or ``group_tanh`` (reward = 0.5 * tanh(z), z = (c - mean) /
            max(std, std_floor) over the group's correct trajectories, population std; neutral 0
            when fewer than two trajectories are correct).
        std_floor: ``group_tanh`` only. Concentrations (shares of attention, in [0, 1]) that all
            lie within ``std_floor`` of each other count as equal (reward 0 for all), and the
            group std is floored at it, so that differences of numerical noise (1e-4) cannot
            become rewards of +-0.4 and flip the sign of advantages.

    Returns:
        One reward per trajectory; 0.0 for incorrect ones.

    >>> faithful_from_concentration([0.9, 0.1, 0.5], [True, True, False], "raw")
    [0.9, 0.1, 0.0]
    >>> [round(r, 3) for r in faithful_from_concentration([0.9, 0.1, 0.5], [True, True, False])]
    [0.381, -0.381, 0.0]
    >>> faithful_from_concentration([0.9, 0.1], [True, False])
    [0.0, 0.0]
    >>> faithful_from_concentration([0.50000, 0.50007], [True, True])
    [0.0, 0.0]
    """
    if form not in options(FaithfulForm):
        raise ValueError(f"unknown faithful form {form!r}; use one of {options(FaithfulForm)}")
    if len(c) != len(correct):
        raise ValueError(f"{len(c)} concentrations but {len(correct)} correctness flags")
    if not std_floor >= 0:
        raise ValueError(f"std_floor must be >= 0, got {std_floor}")
    ok = [bool(k) for k in correct]
    vals = [float(v) if math.isfinite(float(v)) else 0.0 for v in c]
    if form == "raw":
        return [v if k else 0.0 for v, k in zip(vals, ok, strict=True)]
    chosen = np.array([v for v, k in zip(vals, ok, strict=True) if k], dtype=np.float64)
    if chosen.size < 2 or chosen.max() - chosen.min() <= std_floor:
        return [0.0] * len(vals)
    mean, std = chosen.mean(), max(float(chosen.std()), std_floor, 1e-12)
    return [float(0.5 * math.tanh((v - mean) / std)) if k else 0.0
            for v, k in zip(vals, ok, strict=True)]


# --------------------------------------------------------------------------------------
# Causal regions and counterfactual images
# --------------------------------------------------------------------------------------


cell_boxes = occlusion.cell_boxes
intervention_kwargs = occlusion.intervention_kwargs


def occlusion_region(model: Any, processor: Any, rows: Sequence[dict[str, Any]],
                     reward: RewardParams, chunk_size: int = 64) -> list[list[list[float]]]:
    """Annotation-free causal regions: the cells whose occlusion most lowers the answer.

    ``reward.occlusion_search`` picks how they are found (``choices.OcclusionSearch``):
    ``exhaustive`` occludes every merged 28-px cell in turn and teacher-forces the reference
    response on each copy; ``coarse_to_fine``, ``gradient`` and ``budgeted`` are cheaper
    (``fmr1lib.occlusion``). ``reward.occlusion_cells`` cells are kept, removed by
    ``reward.intervention``.

    Returns:
        Per prompt, ``occlusion_cells`` boxes ``[x0, y0, x1, y1]`` in original-image pixels,
        most damaging cell first.
    """
    how = occlusion.Search(n_cells=reward.occlusion_cells, method=reward.intervention,
                           how=reward.occlusion_search, budget=reward.occlusion_budget,
                           chunk_size=chunk_size)
    return occlusion.search(model, processor, rows, how)


def region_token_mask(input_ids: torch.Tensor, grid_thw: torch.Tensor,
                      regions: Sequence[Sequence[Sequence[float]]],
                      image_sizes: Sequence[tuple[int, int]], image_token_id: int) -> torch.Tensor:
    """Image tokens whose cell overlaps the sample's region.

    Args:
        input_ids: ``[B, seq]``.
        grid_thw: ``[B, 3]`` one image per sample.
        regions: per sample, boxes in original pixels (empty: no token).
        image_sizes: per sample, original ``(width, height)``.
        image_token_id: id of ``<|image_pad|>``.

    Returns:
        BoolTensor ``[B, seq]``.
    """
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    ids_cpu = input_ids.cpu()
    for b, boxes in enumerate(regions):
        if not boxes:
            continue
        positions, cells = modeling.image_token_cells(ids_cpu, grid_thw.cpu(), b, image_token_id)
        grid = modeling.boxes_to_grid([list(bx) for bx in boxes], image_sizes[b], grid_thw[b])
        inside = grid[cells[:, 0], cells[:, 1]] > REGION_EPS
        mask[b, positions[inside].to(mask.device)] = True
    return mask


def counterfactual_images(rows: Sequence[dict[str, Any]],
                          regions: Sequence[Sequence[Sequence[float]]], method: str) -> list[Any]:
    """The counterfactual images ``I'``: each row's image with its region removed by ``method``
    (``INTERVENTION_PAD`` pixels of padding)."""
    return [counterfactual.intervene(r["image"], [list(b) for b in reg], method,
                                     pad=INTERVENTION_PAD, **intervention_kwargs(r))
            for r, reg in zip(rows, regions, strict=True)]


def counterfactual_pixels(rows: Sequence[dict[str, Any]], regions: Sequence[Sequence[Sequence[float]]],
                          processor: Any, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Image inputs of the counterfactual views ``I'`` (``counterfactual_images``).

    Returns:
        ``(pixel_values, image_grid_thw)`` for one image per row.
    """
    enc = processor.image_processor(images=counterfactual_images(rows, regions, method),
                                    return_tensors="pt")
    return enc["pixel_values"], enc["image_grid_thw"]


def causal_regions(model: Any, processor: Any, rows: Sequence[dict[str, Any]], region: Region,
                   reward: RewardParams) -> list[list[list[float]]]:
    """The causal region ``C`` of each record: its evidence boxes, or the occlusion search's cells
    (``occlusion_region``)."""
    if region not in options(Region):
        raise ValueError(f"unknown causal region {region!r}; use one of {options(Region)}")
    if region == "occlusion":
        return occlusion_region(model, processor, rows, reward)
    return [[list(b) for b in r["evidence_boxes"]] for r in rows]


# --------------------------------------------------------------------------------------
# The reward of a batch of groups
# --------------------------------------------------------------------------------------


def distinct_correct(tokens: Sequence[Sequence[int]], correct: Sequence[bool]) -> list[list[int]]:
    """Indices of the correct completions of a group, grouped by identical token sequence.

    Identical trajectories get identical attention, ``s_t`` and concentration, so the
    faithful reward is computed once per distinct sequence.

    >>> distinct_correct([[1, 2], [3], [1, 2]], [True, True, True])
    [[0, 2], [1]]
    """
    seen: dict[tuple[int, ...], list[int]] = {}
    for k, (toks, ok) in enumerate(zip(tokens, correct, strict=True)):
        if ok:
            seen.setdefault(tuple(toks), []).append(k)
    return list(seen.values())


def faithful_eligible(row: dict[str, Any], distinct: Sequence[Sequence[int]], region: str,
                      form: str) -> bool:
    """Whether the faithful reward of a group can be non-zero.

    It needs a causal region (evidence boxes unless ``region`` is ``occlusion``), and a correct
    trajectory (``raw``) or two distinct correct trajectories (``group_tanh``: identical ones
    have equal concentrations, so z = 0).
    """
    if region != "occlusion" and not row["evidence_boxes"]:
        return False
    return len(distinct) >= (2 if form == "group_tanh" else 1)


@dataclass
class CounterfactualView:
    """What the faithful reward needs besides the training forward."""

    selected: torch.Tensor          # [n_sel] one trajectory per distinct correct sequence
    copies: list[list[int]]         # per selected one, all batch trajectories it stands for
    logits_cf: torch.Tensor         # [n_sel, T, V] on I'
    region_mask: torch.Tensor       # [n_sel, seq] image tokens inside C
    image_mask: torch.Tensor        # [n_sel, seq] all image tokens
    logits: torch.Tensor | None = None  # [n_sel, T, V] on I in eval mode (models with dropout)
    attn: torch.Tensor | None = None    # [n_sel, n_layers, T, seq] its captured attention rows

    def on_original(self, logits: torch.Tensor) -> torch.Tensor:
        """The selected trajectories' eval-mode logits on ``I``: the view's own when the model
        has dropout, else the training forward's (``logits``, all sequences)."""
        return self.logits if self.logits is not None else logits.detach().index_select(0, self.selected)


def has_active_dropout(model: Any) -> bool:
    """Whether a train-mode forward of ``model`` differs from an eval-mode one (a dropout with
    ``p`` > 0, e.g. LoRA's ``lora_dropout``, or a non-zero ``attention_dropout``)."""
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    if float(getattr(text_cfg, "attention_dropout", 0.0) or 0.0) > 0:
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def candidate_mask(completion_mask: torch.Tensor, focus_row: bool = False) -> torch.Tensor:
    """The rows that may enter the concentration: the completion tokens, without the first row
    (the ``<Focus>`` position, identical across a group) unless ``focus_row``.

    >>> candidate_mask(torch.tensor([[1, 1, 1, 0]])).tolist()
    [[0, 1, 1, 0]]
    """
    if focus_row:
        return completion_mask
    out = completion_mask.clone()
    out[:, :1] = 0
    return out


def counterfactual_view(model: Any, processor: Any, batch: batching.SequenceBatch,
                        rows: Sequence[dict[str, Any]], distinct: Sequence[Sequence[Sequence[int]]],
                        reward: RewardParams, region: Region = "boxes",
                        temperature: float = 1.0) -> CounterfactualView | None:
    """Regions, counterfactual images and the teacher-forced forward on ``I'`` (eval, no grad).

    ``s_t`` compares the policy on ``I`` with the policy on ``I'`` in the same mode: the ``I'``
    forward runs in eval mode, so when the model has an active dropout (``has_active_dropout``;
    LoRA with ``lora_dropout`` > 0) the ``I`` side of the selected trajectories is recomputed in
    eval mode too (``view.logits``, and ``view.attn`` captured at ``reward.reward_layers``),
    instead of taking
    the training forward's logits, which carry dropout noise. Without dropout the two modes give
    the same numbers and the training forward is reused.

    Args:
        model: the policy (unwrapped).
        processor: its processor.
        batch: the sequences of ``len(rows)`` groups of ``G`` trajectories.
        rows: the groups' records.
        distinct: per group, its distinct correct trajectories (``distinct_correct``); empty for
            a group that is not to be scored.
        reward: the region's search and intervention, and the reward's layers (``view.attn``
            is captured at them for models with dropout).
        region: ``boxes`` or ``occlusion``.
        temperature: the sampling temperature (the logits are divided by it, as in the loss).

    Returns:
        The view, or None when no group is scored.
    """
    eligible = [i for i, d in enumerate(distinct) if d]
    if not eligible:
        return None
    g_size = batch.group_size
    regions = causal_regions(model, processor, [rows[i] for i in eligible], region, reward)
    pv_cf, thw_cf = counterfactual_pixels([rows[i] for i in eligible], regions, processor,
                                          reward.intervention)
    ids = batch.inputs["input_ids"]
    sel, copies, image_of_sel, reg_per_sel = [], [], [], []
    grid_per_sel, size_per_sel = [], []
    for e, gi in enumerate(eligible):
        for same in distinct[gi]:
            sel.append(gi * g_size + same[0])
            copies.append([gi * g_size + k for k in same])
            image_of_sel.append(e)
            reg_per_sel.append(regions[e])
            grid_per_sel.append(batch.grid_thw[gi])
            size_per_sel.append(batch.image_sizes[gi])
    selected = torch.tensor(sel, dtype=torch.long, device=ids.device)
    # One I' per scored group, encoded once for all of its distinct trajectories.
    cf_inputs = batching.select_sequences(batch.inputs, selected, pv_cf, thw_cf,
                                          torch.tensor(image_of_sel))
    with batching.eval_mode(model):
        logits_cf = batching.completion_logits(model, cf_inputs, batch.completion_ids.shape[1],
                                               temperature)
    logits_i = attn_i = None
    if has_active_dropout(model):
        layers = attention.resolve_layers(reward.reward_layers, attention.num_text_layers(model))
        logits_i, attn_i = _eval_forward_on_original(model, batch, selected, layers, temperature)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    sel_ids = cf_inputs["input_ids"]
    region_mask = region_token_mask(sel_ids, torch.stack(grid_per_sel), reg_per_sel, size_per_sel,
                                    image_id).to(ids.device)
    return CounterfactualView(selected=selected, copies=copies, logits_cf=logits_cf,
                              region_mask=region_mask,
                              image_mask=attention.image_token_mask(sel_ids, image_id),
                              logits=logits_i, attn=attn_i)


def _eval_forward_on_original(model: Any, batch: batching.SequenceBatch, selected: torch.Tensor,
                              layers: Sequence[int] | None,
                              temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eval-mode logits (and attention rows at ``layers``) of the selected trajectories on ``I``."""
    if batching.IMAGE_INDEX in batch.inputs:
        inputs = batching.select_sequences(batch.inputs, selected)
    else:
        blocks = torch.split(batch.inputs["pixel_values"],
                             batch.inputs["image_grid_thw"].prod(-1).tolist())
        inputs = batching.select_sequences(
            batch.inputs, selected, torch.cat([blocks[i] for i in selected.tolist()]),
            batch.inputs["image_grid_thw"].index_select(0, selected), torch.arange(len(selected)))
    t = batch.completion_ids.shape[1]
    queries = batch.query_positions.index_select(0, selected.to(batch.query_positions.device))
    capture = (attention.AttentionCapture(model, queries.to(selected.device), layers=list(layers))
               if layers is not None else contextlib.nullcontext())
    with batching.eval_mode(model), capture as cap:
        logits = batching.completion_logits(model, inputs, t, temperature)
    return logits, (cap.attentions if layers is not None else None)


@dataclass
class Scored:
    """The reward's ingredients for the selected trajectories of a ``CounterfactualView``."""

    s_t: torch.Tensor           # [n_sel, T] visual dependency of each token
    share: torch.Tensor         # [n_sel, T] share of each token's image attention inside C
    mask: torch.Tensor          # [n_sel, T] candidate rows (``candidate_mask``)
    concentration: list[float]  # per selected trajectory


def score_selected(view: CounterfactualView, batch: batching.SequenceBatch, logits: torch.Tensor,
                   attn: torch.Tensor, reward: RewardParams) -> Scored:
    """``s_t``, attention shares and the concentration of every trajectory the view selected.

    Args:
        view: from ``counterfactual_view``.
        batch: the sequences.
        logits: ``[N, T, V]`` the forward's completion logits on ``I`` (all sequences).
        attn: ``[N, n_layers, T, seq]`` its captured attention rows.
        reward: the concentration's settings (``concentration``, ``kappa``, ``relative_rho``,
            ``min_dependency``, ``faithful_focus_row``).
    """
    sel = view.selected
    mask = candidate_mask(batch.completion_mask.index_select(0, sel), reward.faithful_focus_row)
    # Both sides of s_t in eval mode (``counterfactual_view``).
    on_i = view.on_original(logits)
    rows_i = view.attn if view.attn is not None else attn.detach().index_select(0, sel)
    s_t = visual_dependency(on_i, view.logits_cf, mask)
    share = region_share(rows_i, view.region_mask, view.image_mask)
    conc = [concentration(s_t[j], share[j], mask[j], reward.kappa, reward.concentration,
                          reward.relative_rho, reward.min_dependency) for j in range(len(sel))]
    return Scored(s_t=s_t, share=share, mask=mask, concentration=conc)


@dataclass
class FaithfulScores:
    """The faithful reward of a batch, and what it was made of (the step logs these)."""

    rewards: list[float]        # per trajectory of the batch (0 where not scored)
    concentration: list[float]  # per scored trajectory
    s_t: list[float]            # per scored trajectory: mean s_t over its candidate rows
    share: list[float]          # per scored trajectory: mean share inside C over them
    distinct: int = 0           # distinct sequences scored


def faithful_rewards(view: CounterfactualView | None, batch: batching.SequenceBatch,
                     logits: torch.Tensor, attn: torch.Tensor | None,
                     reward: RewardParams) -> FaithfulScores:
    """Faithful reward of every trajectory of ``batch`` (0 where not scored).

    Args:
        view: from ``counterfactual_view`` (None: nothing scored, all rewards 0).
        batch: the sequences (groups of ``batch.group_size``).
        logits: ``[N, T, V]`` the training forward's completion logits on ``I``.
        attn: ``[N, n_layers, T, seq]`` the sampled tokens' captured attention rows.
        reward: concentration and group form. Its ``faithful_focus_row``: whether the first
            candidate row, the ``<Focus>`` position (it predicts the first response token),
            enters the selection. It belongs to the prompt, so its ``s_t`` and attention are the
            same for every trajectory of a group: it cannot prefer one over another, only take a
            slot from a reasoning token. Off by default.

    Returns:
        The ``N`` rewards with the scored trajectories' ingredients.
    """
    g_size = batch.group_size
    n = batch.completion_ids.shape[0]
    conc = [0.0] * n
    scored = [False] * n
    out = FaithfulScores(rewards=[], concentration=[], s_t=[], share=[])
    if view is not None and attn is not None:
        got = score_selected(view, batch, logits, attn, reward)
        for j, same in enumerate(view.copies):
            m = got.mask[j].bool()
            for i in same:
                conc[i], scored[i] = got.concentration[j], True
                out.concentration.append(got.concentration[j])
                out.s_t.append(float(got.s_t[j][m].mean()) if m.any() else 0.0)
                out.share.append(float(got.share[j][m].mean()) if m.any() else 0.0)
            out.distinct += 1
    for start in range(0, n, g_size):
        sl = slice(start, start + g_size)
        out.rewards += faithful_from_concentration(conc[sl], scored[sl], reward.faithful_form,
                                                   reward.faithful_std_floor)
    return out


# --------------------------------------------------------------------------------------
# The worked example (notebook 04)
# --------------------------------------------------------------------------------------


@torch.no_grad()
def explain_trajectories(model: Any, processor: Any, row: dict[str, Any], completions: Sequence[str],
                         reward: RewardParams, region: Region = "boxes",
                         temperature: float = 1.0) -> list[dict[str, Any]]:
    """The faithful reward's ingredients for hand-picked completions of one prompt.

    The completions are teacher-forced as one group and scored by the training reward's own
    calls (``counterfactual_view``, ``score_selected``): the same ``I'`` (no padding, the
    record's intervention seed), temperature, layers and concentration (``reward``). Every
    completion is explained, correct or not.

    Returns:
        One dict per completion: ``tokens``, ``s_t``, ``share``, ``concentration``, ``correct``.
    """
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    token_lists = [tok(c, add_special_tokens=False)["input_ids"] + [eos] for c in completions]
    n = len(completions)
    acc_r = rewards.accuracy_reward(list(completions), [row["answer"]] * n,
                                    [row.get("answer_type") or "word"] * n, [row.get("choices")] * n)
    batch = batching.build_sequences([row], [token_lists], processor)
    idx = attention.resolve_layers(reward.reward_layers, attention.num_text_layers(model))
    with batching.eval_mode(model), attention.AttentionCapture(model, batch.query_positions, idx) as cap:
        logits = batching.completion_logits(model, batch.inputs, batch.completion_ids.shape[1],
                                            temperature)
    view = counterfactual_view(model, processor, batch, [row], [[[k] for k in range(n)]], reward,
                               region, temperature)
    if view is None:
        raise ValueError(f"record {row.get('id', '')!r}: no causal region to explain")
    got = score_selected(view, batch, logits, cap.attentions, reward)
    out = []
    for j, toks in enumerate(token_lists):
        k = len(toks)
        out.append({
            "completion": completions[j],
            "tokens": [tok.decode([x], skip_special_tokens=False) for x in toks],
            "s_t": got.s_t[j, :k].tolist(), "share": got.share[j, :k].tolist(),
            "concentration": got.concentration[j],
            "correct": bool(acc_r[j]),
        })
    return out
