"""Stage 2, Reinforcing: GRPO with the counterfactual faithful reward (DESIGN.md section 7).

Per step, for ``P`` prompts: sample ``G`` completions each (temperature ``T``, vision tokens
suppressed), score them (``rewards.py``), normalise the rewards within each group (GRPO; the
std division is optional, Dr.GRPO) and take ``num_iterations`` steps on the clipped objective

    L = -agg_t min(r_t A, clip(r_t, 1 - clip_low, 1 + clip_high) A) + beta * KL_k3(pi || pi_ref)

with ``r_t = pi(y_t | .) / pi_old(y_t | .)``, asymmetric clipping (DAPO clip-higher) and
``agg`` the token mean over the batch or the per-sequence mean.

The faithful reward (variants ``faithful`` and ``faithful_occlusion``) scores answer-correct
trajectories only. The causal region ``C`` is the record's evidence boxes (``faithful``) or the
cells whose occlusion most lowers the reference answer's log-probability (``faithful_occlusion``,
annotation-free, ``occlusion_region``). The counterfactual image ``I'`` has ``C`` removed; one
teacher-forced forward of the trajectories on ``I'`` gives each response token's visual
dependency ``s_t = KL(pi(.|I, y<t) || pi(.|I', y<t))``, and the concentration ``c`` is the mean
share, over the top-``kappa`` tokens by ``s_t``, of the token's image attention that lies inside
``C``. The attention rows are those of the *sampled* tokens (the row of the position that
predicts token ``t``), captured by ``attention.AttentionCapture`` in the same training forward
that gives the log-probabilities: the only extra pass is the one on ``I'``. (A reward built on
the ``<Focus>`` row would be the same for every sample of a group: see the stage-2 pitfalls in
DESIGN.md.)

Variant ``grpo_backbone`` is ``grpo`` started from the stage-0 backbone; the trainer treats the
two alike. ``grpo_step`` runs one rollout + update and returns its statistics, so benchmarks
can time a step with and without the faithful reward.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fmr1lib import (
    anchoring,
    attention,
    counterfactual,
    modeling,
    prompting,
    records,
    repro,
    rewards,
)

logger = logging.getLogger(__name__)

VARIANTS = ("grpo_backbone", "grpo", "faithful", "faithful_occlusion")
FAITHFUL_VARIANTS = ("faithful", "faithful_occlusion")
LOSS_AGGS = ("token_mean", "seq_mean")
REFILL_SEED_STRIDE = 7919
"""Refill round ``r`` of dynamic sampling draws prompts with seed ``seed + r * stride``."""
_REGION_EPS = 1e-6
"""Cells whose box-overlap weight is below this count as outside the region (float slivers)."""

ExtraReward = Callable[..., Sequence[float]]
"""``f(completions=list[str], completion_ids=list[list[int]], rows=list[dict]) -> list[float]``."""


# --------------------------------------------------------------------------------------
# Pure tensor pieces
# --------------------------------------------------------------------------------------


def group_advantages(rewards_flat: torch.Tensor, group_size: int, std_normalize: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages: reward minus its group mean, optionally over the group std.

    Args:
        rewards_flat: ``[P * G]`` rewards, the ``G`` samples of a prompt consecutive.
        group_size: ``G``.
        std_normalize: divide by the (unbiased) group std plus ``eps``; off is Dr.GRPO.
        eps: added to the std.

    Returns:
        ``[P * G]`` advantages; exactly 0 for every member of a group whose rewards are equal.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]), 4, eps=0).tolist()
    [1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0]
    >>> group_advantages(torch.tensor([1.0, 0.0]), 2, std_normalize=False).tolist()
    [0.5, -0.5]
    """
    r = torch.as_tensor(rewards_flat, dtype=torch.float32)
    if r.ndim != 1 or r.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(r.shape)} do not split into groups of {group_size}")
    grouped = r.view(-1, group_size)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if std_normalize:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(adv[:, :1])
        adv = adv / (std + eps)
    # Rounding in the mean must not turn a degenerate group into a tiny (then std-amplified) signal.
    flat = grouped.max(dim=1, keepdim=True).values == grouped.min(dim=1, keepdim=True).values
    return torch.where(flat, torch.zeros_like(adv), adv).reshape(-1)


def token_logprobs(logits: torch.Tensor, target_ids: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probability of each target token under ``logits`` (fp32), zero where masked.

    Args:
        logits: ``[N, T, V]``: row ``t`` is the distribution that predicts ``target_ids[:, t]``.
        target_ids: ``[N, T]``.
        mask: ``[N, T]`` valid tokens (default: all).

    Returns:
        ``[N, T]``.

    >>> token_logprobs(torch.zeros(1, 2, 4), torch.tensor([[0, 3]])).exp().tolist()
    [[0.25, 0.25]]
    """
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target_ids[..., None])[..., 0]
    if mask is not None:
        logp = logp * mask.to(logp.dtype)
    return logp


def token_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy (nats) of each token's predictive distribution, zero where masked.

    Args:
        logits: ``[N, T, V]``.
        mask: ``[N, T]`` valid tokens (default: all).

    Returns:
        ``[N, T]``.

    >>> round(float(token_entropy(torch.zeros(1, 1, 4))[0, 0]), 4) == round(math.log(4), 4)
    True
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    if mask is not None:
        ent = ent * mask.to(ent.dtype)
    return ent


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    m = mask.to(per_token.dtype)
    if loss_agg == "token_mean":
        return (per_token * m).sum() / m.sum().clamp_min(1.0)
    if loss_agg == "seq_mean":
        counts = m.sum(dim=1)
        per_seq = (per_token * m).sum(dim=1) / counts.clamp_min(1.0)
        has = (counts > 0).to(per_token.dtype)
        return (per_seq * has).sum() / has.sum().clamp_min(1.0)
    raise ValueError(f"unknown loss aggregation {loss_agg!r}; use one of {LOSS_AGGS}")


def clipped_policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.28,
                        loss_agg: str = "token_mean", logp_ref: torch.Tensor | None = None,
                        beta: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO / PPO clipped surrogate with asymmetric clipping and an optional k3 KL term.

    Per valid token: ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + beta * k3`` with
    ``r = exp(logp_new - logp_old)`` and ``k3 = exp(ref - new) - (ref - new) - 1``.

    Args:
        logp_new: ``[N, T]`` log-probs of the sampled tokens under the current policy.
        logp_old: ``[N, T]`` the same under the sampling policy (detached).
        advantages: ``[N]`` one advantage per sequence.
        mask: ``[N, T]`` valid completion tokens.
        clip_low: ``r`` is clipped below at ``1 - clip_low``.
        clip_high: ``r`` is clipped above at ``1 + clip_high``.
        loss_agg: ``token_mean`` (sum over the batch's valid tokens / their number) or
            ``seq_mean`` (mean over each sequence's valid tokens, then over sequences).
        logp_ref: ``[N, T]`` log-probs under the reference policy (needed when ``beta > 0``).
        beta: weight of the KL term.

    Returns:
        ``(loss, stats)``; stats: ``clip_frac`` (valid tokens whose clipped term is the active
        one), ``clip_low_frac``, ``clip_high_frac``, ``ratio_mean``, ``kl`` (k3 to the
        reference, NaN without one), ``pg_loss``.

    >>> lp = torch.zeros(1, 2)
    >>> loss, st = clipped_policy_loss(lp, lp, torch.tensor([2.0]), torch.ones(1, 2))
    >>> float(loss), st["ratio_mean"], st["clip_frac"]
    (-2.0, 1.0, 0.0)
    """
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss aggregation {loss_agg!r}; use one of {LOSS_AGGS}")
    m = mask.to(logp_new.dtype)
    adv = advantages.to(logp_new.dtype)[:, None]
    ratio = torch.exp((logp_new - logp_old) * m)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    pg_loss = _aggregate(per_token, mask, loss_agg)
    loss = pg_loss
    kl_value = float("nan")
    if logp_ref is not None:
        delta = (logp_ref - logp_new) * m
        k3 = torch.exp(delta) - delta - 1.0
        kl_value = float(_aggregate(k3.detach(), mask, "token_mean"))
        if beta:
            loss = loss + beta * _aggregate(k3, mask, loss_agg)
    elif beta:
        raise ValueError("beta > 0 needs logp_ref")
    with torch.no_grad():
        valid = mask.bool()
        n = valid.sum().clamp_min(1)
        low = (ratio < 1.0 - clip_low) & (adv < 0) & valid
        high = (ratio > 1.0 + clip_high) & (adv > 0) & valid
        stats = {"clip_frac": float((low | high).sum() / n), "clip_low_frac": float(low.sum() / n),
                 "clip_high_frac": float(high.sum() / n),
                 "ratio_mean": float((ratio * m).sum() / n), "kl": kl_value,
                 "pg_loss": float(pg_loss.detach())}
    return loss, stats


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
# Sequences: prompt + completion, image inputs repeated per sample
# --------------------------------------------------------------------------------------


def repeat_image_inputs(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                        repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each image ``repeats`` times, keeping images of a prompt consecutive.

    ``pixel_values`` concatenates the patches of all images (``t * h * w`` rows per image), so
    it is repeated per image block, not per row.

    Args:
        pixel_values: ``[sum_i t_i h_i w_i, D]``.
        image_grid_thw: ``[n_images, 3]``.
        repeats: copies per image.

    Returns:
        ``(pixel_values, image_grid_thw)`` for ``n_images * repeats`` images.

    >>> pv, thw = repeat_image_inputs(torch.arange(3.)[:, None], torch.tensor([[1, 1, 1], [1, 1, 2]]), 2)
    >>> pv[:, 0].tolist(), thw[:, 2].tolist()
    ([0.0, 0.0, 1.0, 2.0, 1.0, 2.0], [1, 1, 2, 2])
    """
    counts = image_grid_thw.prod(-1).tolist()
    blocks = torch.split(pixel_values, counts)
    pv = torch.cat([blk for blk in blocks for _ in range(repeats)])
    return pv, image_grid_thw.repeat_interleave(repeats, dim=0)


def completion_tokens(completion_ids: torch.Tensor, eos_id: int,
                      forbidden_ids: Sequence[int] = ()) -> tuple[list[list[int]], list[bool]]:
    """Cut sampled completions to their valid tokens.

    A completion keeps its tokens up to and including the first ``eos_id`` (all of them when it
    was truncated). A completion that sampled a forbidden (vision) token is cut before it and
    flagged: it gets reward 0, and re-processing it never sees a vision token.

    Args:
        completion_ids: ``[N, T]`` as returned by ``modeling.generate``.
        eos_id: id of ``<|im_end|>``.
        forbidden_ids: ids that must not appear (vision tokens).

    Returns:
        ``(tokens, ok)``: per completion its valid token ids, and False where a forbidden
        token was sampled.

    >>> completion_tokens(torch.tensor([[5, 6, 2, 0], [5, 9, 7, 7]]), eos_id=2, forbidden_ids=[9])
    ([[5, 6, 2], [5]], [True, False])
    """
    forbidden = set(int(i) for i in forbidden_ids)
    out, ok = [], []
    for row in completion_ids.tolist():
        if eos_id in row:
            row = row[: row.index(eos_id) + 1]
        bad = next((k for k, t in enumerate(row) if t in forbidden), None)
        ok.append(bad is None)
        out.append(row if bad is None else row[:bad])
    return out, ok


@dataclass
class Group:
    """One prompt and its ``G`` sampled completions, scored with the model-free rewards."""

    row: dict[str, Any]
    tokens: list[list[int]]
    texts: list[str]
    ok: list[bool]
    accuracy: list[float]
    format: list[float]
    extra: list[float] | None = None

    def base_rewards(self, w_acc: float, w_fmt: float) -> list[float]:
        """``w_acc * accuracy + w_fmt * format (+ extra)`` per completion."""
        extra = self.extra or [0.0] * len(self.texts)
        return [w_acc * a + w_fmt * f + e for a, f, e in zip(self.accuracy, self.format, extra,
                                                               strict=True)]

    @property
    def correct(self) -> list[bool]:
        """Answer-correct completions."""
        return [a > 0 for a in self.accuracy]

    def distinct_correct(self) -> list[list[int]]:
        """Indices of the correct completions, grouped by identical token sequence.

        Identical trajectories get identical attention, ``s_t`` and concentration, so the
        faithful reward is computed once per distinct sequence.
        """
        seen: dict[tuple[int, ...], list[int]] = {}
        for k, (toks, ok) in enumerate(zip(self.tokens, self.correct, strict=True)):
            if ok:
                seen.setdefault(tuple(toks), []).append(k)
        return list(seen.values())


@dataclass
class SequenceBatch:
    """Prompt + completion sequences of some groups, ready for a forward."""

    inputs: dict[str, torch.Tensor]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    prompt_len: int
    group_size: int
    image_sizes: list[tuple[int, int]]
    grid_thw: torch.Tensor
    focus_targets: list[torch.Tensor | None]

    @property
    def query_positions(self) -> torch.Tensor:
        """``[N, T]``: the position whose logits predict completion token ``t`` (``S - 1 + t``).

        Its attention row is the token's query row for the faithful reward.
        """
        n, t = self.completion_ids.shape
        return (self.prompt_len - 1 + torch.arange(t)).expand(n, t)

    def to(self, device: Any) -> SequenceBatch:
        """The batch on ``device``."""
        moved = {k: v.to(device) for k, v in self.inputs.items()}
        return SequenceBatch(moved, self.completion_ids.to(device),
                             self.completion_mask.to(device), self.prompt_len, self.group_size,
                             self.image_sizes, self.grid_thw, self.focus_targets)


def build_sequences(groups: Sequence[Group], processor: Any) -> SequenceBatch:
    """Left-padded prompts + right-padded completions for every sample of ``groups``.

    Args:
        groups: groups of equal size ``G``.
        processor: the model's processor.

    Returns:
        A ``SequenceBatch`` of ``len(groups) * G`` sequences; the image inputs of each prompt
        are repeated ``G`` times.
    """
    rows = [g.row for g in groups]
    g_size = len(groups[0].tokens)
    if any(len(g.tokens) != g_size for g in groups):
        raise ValueError("all groups must have the same number of completions")
    batch = anchoring.encode_batch(rows, processor, "plain", with_response=False)
    enc = batch.inputs
    pad_id = processor.tokenizer.pad_token_id
    n = len(rows) * g_size
    t = max(1, max(len(c) for g in groups for c in g.tokens))
    comp = torch.full((n, t), pad_id, dtype=torch.long)
    cmask = torch.zeros((n, t), dtype=torch.long)
    for i, toks in enumerate(c for g in groups for c in g.tokens):
        if toks:
            comp[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            cmask[i, : len(toks)] = 1
    prompt_ids = enc["input_ids"].repeat_interleave(g_size, dim=0)
    inputs = {
        "input_ids": torch.cat([prompt_ids, comp], dim=1),
        "attention_mask": torch.cat([enc["attention_mask"].repeat_interleave(g_size, dim=0),
                                     cmask], dim=1),
    }
    inputs["pixel_values"], inputs["image_grid_thw"] = repeat_image_inputs(
        enc["pixel_values"], enc["image_grid_thw"], g_size)
    if "mm_token_type_ids" in enc:  # kept when the encoder provides it (3D rope positions)
        inputs["mm_token_type_ids"] = torch.cat(
            [enc["mm_token_type_ids"].repeat_interleave(g_size, dim=0),
             torch.zeros_like(comp, dtype=enc["mm_token_type_ids"].dtype)], dim=1)
    return SequenceBatch(inputs=inputs, completion_ids=comp, completion_mask=cmask,
                         prompt_len=enc["input_ids"].shape[1], group_size=g_size,
                         image_sizes=[r["image"].size for r in rows],
                         grid_thw=enc["image_grid_thw"], focus_targets=batch.targets)


def completion_logits(model: Any, inputs: dict[str, torch.Tensor], n_completion: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """Logits that predict the last ``n_completion`` tokens of each sequence, fp32.

    Only the needed positions go through the LM head (``logits_to_keep``).

    Returns:
        ``[N, n_completion, V]``; row ``t`` predicts token ``seq - n_completion + t``.
    """
    out = model(**inputs, logits_to_keep=n_completion + 1, use_cache=False)
    logits = out.logits[:, :-1].float()
    return logits / temperature if temperature != 1.0 else logits


# --------------------------------------------------------------------------------------
# Causal regions and counterfactual images
# --------------------------------------------------------------------------------------


def cell_boxes(image_size: tuple[int, int], grid_thw: Sequence[int]) -> list[list[float]]:
    """The merged image-token cells of an image as boxes in original-pixel coordinates.

    Cell ``(r, c)`` covers resized pixels ``[28c, 28c+28) x [28r, 28r+28)``; scaled back to the
    original size it is ``[c W/cols, r H/rows, (c+1) W/cols, (r+1) H/rows]``. Listed row-major,
    the order of the image tokens.

    >>> cell_boxes((112, 56), (1, 4, 8))[:2]
    [[0.0, 0.0, 28.0, 28.0], [28.0, 0.0, 56.0, 28.0]]
    """
    w0, h0 = image_size
    _, gh, gw = (int(v) for v in grid_thw)
    rows, cols = gh // modeling.MERGE, gw // modeling.MERGE
    return [[c * w0 / cols, r * h0 / rows, (c + 1) * w0 / cols, (r + 1) * h0 / rows]
            for r in range(rows) for c in range(cols)]


def _intervention_kwargs(row: dict[str, Any]) -> dict[str, Any]:
    meta = records.decode_meta(row.get("meta"))
    kw: dict[str, Any] = {"seed": int(meta.get("seed", 0))}
    if meta.get("background") is not None:
        kw["fill"] = tuple(int(v) for v in meta["background"])
    return kw


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """No-grad, eval-mode block (no dropout, no gradient checkpointing), restoring the mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _answer_token_mask(labels: torch.Tensor, open_id: int, close_id: int) -> torch.Tensor:
    """Labelled tokens strictly between ``<answer>`` and ``</answer>`` (all labels if absent)."""
    out = torch.zeros_like(labels, dtype=torch.bool)
    for b, row in enumerate(labels.tolist()):
        idx = [k for k, v in enumerate(row) if v != -100]
        opens = [k for k in idx if row[k] == open_id]
        closes = [k for k in idx if row[k] == close_id]
        if opens and closes and closes[-1] > opens[-1] + 1:
            out[b, opens[-1] + 1: closes[-1]] = True
        else:
            out[b, idx] = True
    return out


def occlusion_region(model: Any, processor: Any, rows: Sequence[dict[str, Any]], n_cells: int = 2,
                     method: str = "background", chunk_size: int = 64) -> list[list[list[float]]]:
    """Annotation-free causal regions: the cells whose occlusion most lowers the answer.

    For each prompt, every merged 28-px cell of the resized image is occluded in turn
    (``counterfactual.intervene`` on the cell's box, no padding), and the reference response
    (``<think>`` from the question, the ground-truth answer, ``<|im_end|>``) is teacher-forced on
    all copies in batched forwards. The ``n_cells`` cells with the lowest log-probability of the
    answer tokens are the region.

    Args:
        model: the policy (run in eval mode, no grad).
        processor: its processor.
        rows: records with image, question, answer (and meta for the intervention seed/fill).
        n_cells: cells kept per prompt.
        method: intervention method (``counterfactual.METHODS``).
        chunk_size: occluded copies per forward.

    Returns:
        Per prompt, ``n_cells`` boxes ``[x0, y0, x1, y1]`` in original-image pixels, most
        damaging cell first.
    """
    if not rows:
        return []
    tok = processor.tokenizer
    open_id = tok.convert_tokens_to_ids(prompting.ANSWER_OPEN)
    close_id = tok.convert_tokens_to_ids(prompting.ANSWER_CLOSE)
    images = [r["image"].convert("RGB") for r in rows]
    grids = processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    copies: list[dict[str, Any]] = []
    owner: list[tuple[int, int]] = []
    all_cells = []
    for i, (row, image) in enumerate(zip(rows, images, strict=True)):
        cells = cell_boxes(image.size, grids[i])
        all_cells.append(cells)
        kw = _intervention_kwargs(row)
        for k, box in enumerate(cells):
            occluded = counterfactual.intervene(image, [box], method, pad=0, **kw)
            copies.append({"image": occluded, "question": row["question"], "answer": row["answer"],
                           "evidence_boxes": [], "meta": row.get("meta")})
            owner.append((i, k))
    device = next(model.parameters()).device
    scores = torch.empty(len(copies))
    with _eval_mode(model):
        for start in range(0, len(copies), chunk_size):
            part = copies[start:start + chunk_size]
            batch = anchoring.encode_batch(part, processor, "plain", with_response=True)
            labels = batch.labels
            n_resp = int((labels != -100).sum(1).max())
            inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            logits = completion_logits(model, inputs, n_resp)
            targets = labels[:, -n_resp:].clamp_min(0).to(device)
            keep = _answer_token_mask(labels, open_id, close_id)[:, -n_resp:].to(device)
            logp = token_logprobs(logits, targets, keep)
            scores[start:start + len(part)] = logp.sum(1).cpu()
    regions: list[list[list[float]]] = []
    for i in range(len(rows)):
        idx = [j for j, (o, _) in enumerate(owner) if o == i]
        order = sorted(range(len(idx)), key=lambda k: (float(scores[idx[k]]), k))[:n_cells]
        regions.append([list(all_cells[i][owner[idx[k]][1]]) for k in order])
    return regions


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
        inside = grid[cells[:, 0], cells[:, 1]] > _REGION_EPS
        mask[b, positions[inside].to(mask.device)] = True
    return mask


def counterfactual_pixels(rows: Sequence[dict[str, Any]], regions: Sequence[Sequence[Sequence[float]]],
                          processor: Any, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Image inputs of the counterfactual views ``I'`` (regions removed, 1 px padding).

    Returns:
        ``(pixel_values, image_grid_thw)`` for one image per row.
    """
    images = [counterfactual.intervene(r["image"], [list(b) for b in reg], method, pad=1,
                                       **_intervention_kwargs(r))
              for r, reg in zip(rows, regions, strict=True)]
    enc = processor.image_processor(images=images, return_tensors="pt")
    return enc["pixel_values"], enc["image_grid_thw"]


# --------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------


@dataclass
class GRPOContext:
    """Everything one GRPO step needs: model, optimiser, schedule, settings."""

    model: Any
    processor: Any
    params: Any
    variant: str
    accelerator: Any
    optimizer: Any
    scheduler: Any
    trainable: list[torch.nn.Parameter]
    layers: list[int]
    ref_model: Any = None
    extra_reward: ExtraReward | None = None
    token_ids: dict[str, int] = field(default_factory=dict)
    start_step: int = 0
    """Steps already done (from the checkpoint loaded by ``setup_grpo``)."""

    @property
    def faithful(self) -> bool:
        """Whether the faithful reward is on."""
        return self.variant in FAITHFUL_VARIANTS and self.params.w_faith != 0


def _is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def setup_grpo(model: Any, processor: Any, params: Any, variant: str, accelerator: Any = None,
               extra_reward: ExtraReward | None = None,
               resume_from: str | Path | None = None) -> GRPOContext:
    """Optimiser, schedule, reference policy and accelerate wrapping for ``train_grpo``.

    Args:
        model: a Qwen2.5-VL (possibly peft-wrapped), the policy to train.
        processor: its processor.
        params: ``RLParams``.
        variant: one of ``VARIANTS``.
        accelerator: an ``accelerate.Accelerator`` (default: a new one with
            ``params.mixed_precision``).
        extra_reward: optional reward added to the total (see ``ExtraReward``).
        resume_from: checkpoint folder to load (weights, optimiser, schedule, RNG) before
            wrapping.

    Returns:
        A ``GRPOContext`` (``start_step``: the loaded checkpoint's step, else 0).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown RL variant {variant!r}; use one of {VARIANTS}")
    if params.loss_agg not in LOSS_AGGS:
        raise ValueError(f"key 'loss_agg': {params.loss_agg!r} not in {LOSS_AGGS}")
    acc = accelerator or anchoring.make_accelerator(params)
    if params.gradient_checkpointing:
        attention.unwrap_model(model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_model = None
    if params.beta > 0 and not _is_peft(model):
        # Copied before any checkpoint is loaded: the reference is the starting policy.
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    scheduler = anchoring._scheduler(optimizer, params.lr_schedule, params.lr_warmup_steps,
                                     params.steps)
    start = 0
    if resume_from is not None:
        meta = repro.load_checkpoint(resume_from, model, optimizer, scheduler)
        start = int(meta["step"])
        logger.info("resumed from %s (step %d)", resume_from, start)
    model.train()
    model, optimizer, scheduler = anchoring.prepare_training(
        acc, model, optimizer, scheduler,
        params.prompts_per_step * params.group_size // max(1, params.grad_accum))
    if ref_model is not None:
        ref_model = ref_model.to(acc.device)
    tok = processor.tokenizer
    ids = {"eos": tok.convert_tokens_to_ids("<|im_end|>"),
           "image": tok.convert_tokens_to_ids("<|image_pad|>")}
    return GRPOContext(model=model, processor=processor, params=params, variant=variant,
                       accelerator=acc, optimizer=optimizer, scheduler=scheduler,
                       trainable=trainable,
                       layers=anchoring.resolve_layers(params.reward_layers,
                                                       anchoring.num_text_layers(model)),
                       ref_model=ref_model, extra_reward=extra_reward, token_ids=ids,
                       start_step=start)


def _n_prompts(params: Any, dataset: Any) -> int:
    n = len(dataset)
    return min(n, params.n_prompts) if params.n_prompts > 0 else n


def rollout(ctx: GRPOContext, rows: Sequence[dict[str, Any]]) -> list[Group]:
    """Sample ``G`` completions per prompt and score them with the model-free rewards.

    A completion that samples a vision token or is malformed scores 0; nothing raises.
    With ``rollout_prompts`` > 0 the prompts are generated that many at a time (memory).
    """
    k = ctx.params.rollout_prompts or len(rows)
    return [g for start in range(0, len(rows), k) for g in _rollout(ctx, rows[start:start + k])]


def _rollout(ctx: GRPOContext, rows: Sequence[dict[str, Any]]) -> list[Group]:
    p, acc = ctx.params, ctx.accelerator
    batch = anchoring.encode_batch(rows, ctx.processor, "plain", with_response=False)
    inputs = {k: v.to(acc.device) for k, v in batch.inputs.items()}
    gen_model = acc.unwrap_model(ctx.model)
    with _eval_mode(gen_model):
        completion_ids, texts = modeling.generate(
            gen_model, ctx.processor, inputs, max_new_tokens=p.max_new_tokens, do_sample=True,
            temperature=p.temperature, top_p=p.top_p, num_return_sequences=p.group_size)
    tokens, ok = completion_tokens(completion_ids.cpu(), ctx.token_ids["eos"],
                                   modeling.vision_token_ids(ctx.processor))
    g = p.group_size
    groups = []
    for i, row in enumerate(rows):
        sl = slice(i * g, (i + 1) * g)
        t_i, ok_i, x_i = tokens[sl], ok[sl], texts[sl]
        a = rewards.accuracy_reward(x_i, [row["answer"]] * g, [row.get("answer_type") or "word"] * g)
        f = rewards.format_reward(x_i)
        a = [v if k else 0.0 for v, k in zip(a, ok_i, strict=True)]
        f = [v if k else 0.0 for v, k in zip(f, ok_i, strict=True)]
        extra = None
        if ctx.extra_reward is not None:
            extra = [float(v) if k else 0.0 for v, k in zip(
                ctx.extra_reward(completions=x_i, completion_ids=t_i, rows=[row] * g), ok_i,
                strict=True)]
        groups.append(Group(row=row, tokens=t_i, texts=x_i, ok=ok_i, accuracy=a, format=f,
                            extra=extra))
    return groups


def _faithful_eligible(ctx: GRPOContext, g: Group) -> bool:
    """Whether the faithful reward of a group can be non-zero.

    It needs a causal region, and a correct trajectory (``raw``) or two distinct correct
    trajectories (``group_tanh``: identical ones have equal concentrations, so z = 0).
    """
    if not ctx.faithful:
        return False
    if ctx.variant != "faithful_occlusion" and not g.row["evidence_boxes"]:
        return False
    need = 2 if ctx.params.faithful_form == "group_tanh" else 1
    return len(g.distinct_correct()) >= need


def _group_may_vary(ctx: GRPOContext, g: Group) -> bool:
    """Whether a group can give a non-zero advantage (dynamic sampling keeps it).

    Equal accuracy + format rewards mean all or none are correct; then only two distinct
    correct trajectories can make the faithful reward differ within the group.
    """
    base = g.base_rewards(ctx.params.w_acc, ctx.params.w_fmt)
    if max(base) != min(base):
        return True
    return _faithful_eligible(ctx, g) and len(g.distinct_correct()) >= 2


@contextlib.contextmanager
def _process_sampling_rng(acc: Any, seed: int, step: int) -> Iterator[None]:
    """On several processes, sample from an RNG seeded by ``(seed, step, rank)``.

    The processes share one seed, so without this their rollouts would draw the same random
    numbers. Seeding per step also makes every process's sampling resume exactly, although a
    checkpoint holds the main process's RNG state only. One process keeps its running RNG.
    """
    if acc.num_processes == 1:
        yield
        return
    devices = [acc.device.index or 0] if acc.device.type == "cuda" else []
    state = np.random.SeedSequence([seed, step, acc.process_index]).generate_state(1)[0]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(state))
        yield


def collect_groups(ctx: GRPOContext, dataset: Any, step: int) -> tuple[list[Group], int]:
    """The step's prompts (deterministic in ``step`` and ``seed``), rolled out.

    With dynamic sampling, groups that cannot carry an advantage are dropped and refilled from
    further prompts for up to ``max_refill`` rounds; if none survives, the first batch is kept
    (its advantages are zero).

    Returns:
        ``(groups, refill_rounds)``.
    """
    with _process_sampling_rng(ctx.accelerator, ctx.params.seed, step):
        return _collect_groups(ctx, dataset, step)


def _collect_groups(ctx: GRPOContext, dataset: Any, step: int) -> tuple[list[Group], int]:
    p, acc = ctx.params, ctx.accelerator
    n = _n_prompts(p, dataset)
    idx = anchoring.batch_indices(n, p.prompts_per_step, step, p.seed, acc.process_index,
                                  acc.num_processes)
    first = rollout(ctx, [dataset[i] for i in idx])
    if not p.dynamic_sampling:
        return first, 0
    kept = [g for g in first if _group_may_vary(ctx, g)]
    rounds = 0
    while len(kept) < len(first) and rounds < p.max_refill:
        rounds += 1
        more = anchoring.batch_indices(n, p.prompts_per_step, step,
                                       p.seed + REFILL_SEED_STRIDE * rounds,
                                       acc.process_index, acc.num_processes)
        more = more[: len(first) - len(kept)]
        kept += [g for g in rollout(ctx, [dataset[i] for i in more]) if _group_may_vary(ctx, g)]
    return (kept if kept else first), rounds


@dataclass
class _Chunk:
    """A group-aligned slice of the step's batch, with what later iterations reuse."""

    groups: list[Group]
    batch: SequenceBatch
    weight: float
    advantages: torch.Tensor | None = None
    logp_old: torch.Tensor | None = None
    logp_ref: torch.Tensor | None = None
    faithful: list[float] | None = None
    overall: list[float] | None = None


def _reference_logprobs(ctx: GRPOContext, batch: SequenceBatch) -> torch.Tensor:
    t = batch.completion_ids.shape[1]
    if ctx.ref_model is not None:
        with _eval_mode(ctx.ref_model):
            logits = completion_logits(ctx.ref_model, batch.inputs, t, ctx.params.temperature)
    else:
        model = ctx.accelerator.unwrap_model(ctx.model)
        with _eval_mode(model), model.disable_adapter():
            logits = completion_logits(model, batch.inputs, t, ctx.params.temperature)
    return token_logprobs(logits, batch.completion_ids, batch.completion_mask)


@dataclass
class _FaithfulPrep:
    """What the faithful reward needs besides the training forward."""

    selected: torch.Tensor          # [n_sel] one trajectory per distinct correct sequence
    copies: list[list[int]]         # per selected one, all chunk trajectories it stands for
    logits_cf: torch.Tensor         # [n_sel, T, V]
    region_mask: torch.Tensor       # [n_sel, seq]
    image_mask: torch.Tensor        # [n_sel, seq]


def _prepare_faithful(ctx: GRPOContext, chunk: _Chunk) -> _FaithfulPrep | None:
    """Regions, counterfactual images and the teacher-forced forward on ``I'`` (no grad)."""
    p = ctx.params
    g_size = chunk.batch.group_size
    eligible = [i for i, g in enumerate(chunk.groups) if _faithful_eligible(ctx, g)]
    if not eligible:
        return None
    model = ctx.accelerator.unwrap_model(ctx.model)
    rows = [chunk.groups[i].row for i in eligible]
    if ctx.variant == "faithful_occlusion":
        regions = occlusion_region(model, ctx.processor, rows, p.occlusion_cells, p.intervention)
    else:
        regions = [[list(b) for b in r["evidence_boxes"]] for r in rows]
    pv_cf, thw_cf = counterfactual_pixels(rows, regions, ctx.processor, p.intervention)
    blocks = torch.split(pv_cf, thw_cf.prod(-1).tolist())
    batch = chunk.batch
    ids = batch.inputs["input_ids"]
    sel, copies, pv_parts, thw_parts, reg_per_sel = [], [], [], [], []
    grid_per_sel, size_per_sel = [], []
    for e, gi in enumerate(eligible):
        for same in chunk.groups[gi].distinct_correct():
            sel.append(gi * g_size + same[0])
            copies.append([gi * g_size + k for k in same])
            pv_parts.append(blocks[e])
            thw_parts.append(thw_cf[e])
            reg_per_sel.append(regions[e])
            grid_per_sel.append(batch.grid_thw[gi])
            size_per_sel.append(batch.image_sizes[gi])
    selected = torch.tensor(sel, dtype=torch.long, device=ids.device)
    cf_inputs = {k: v.index_select(0, selected) for k, v in batch.inputs.items()
                 if k not in ("pixel_values", "image_grid_thw")}
    cf_inputs["pixel_values"] = torch.cat(pv_parts).to(ids.device, batch.inputs["pixel_values"].dtype)
    cf_inputs["image_grid_thw"] = torch.stack(thw_parts).to(ids.device)
    t = batch.completion_ids.shape[1]
    with _eval_mode(model):
        logits_cf = completion_logits(model, cf_inputs, t, p.temperature)
    sel_ids = cf_inputs["input_ids"]
    region_mask = region_token_mask(sel_ids, torch.stack(grid_per_sel), reg_per_sel, size_per_sel,
                                    ctx.token_ids["image"]).to(ids.device)
    image_mask = attention.image_token_mask(sel_ids, ctx.token_ids["image"])
    return _FaithfulPrep(selected=selected, copies=copies, logits_cf=logits_cf,
                         region_mask=region_mask, image_mask=image_mask)


def _faithful_rewards(ctx: GRPOContext, chunk: _Chunk, prep: _FaithfulPrep | None,
                      logits: torch.Tensor, attn: torch.Tensor | None,
                      stats: dict[str, list[float]]) -> list[float]:
    """Faithful reward per trajectory of the chunk (0 where not answer-correct / no region)."""
    p = ctx.params
    g_size = chunk.batch.group_size
    n = len(chunk.groups) * g_size
    conc = [0.0] * n
    scored = [False] * n
    if prep is not None and attn is not None:
        sel = prep.selected
        mask = chunk.batch.completion_mask.index_select(0, sel)
        s_t = visual_dependency(logits.detach().index_select(0, sel), prep.logits_cf, mask)
        share = region_share(attn.detach().index_select(0, sel), prep.region_mask, prep.image_mask)
        for j, same in enumerate(prep.copies):
            c = rewards.concentration(s_t[j], share[j], mask[j], p.kappa)
            m = mask[j].bool()
            for i in same:
                conc[i], scored[i] = c, True
                stats["concentration"].append(c)
                stats["s_t"].append(float(s_t[j][m].mean()) if m.any() else 0.0)
                stats["share"].append(float(share[j][m].mean()) if m.any() else 0.0)
            stats["distinct"].append(1.0)
    out: list[float] = []
    for gi in range(len(chunk.groups)):
        sl = slice(gi * g_size, (gi + 1) * g_size)
        out += rewards.faithful_from_concentration(conc[sl], scored[sl], p.faithful_form)
    return out


def _focus_anchor_loss(ctx: GRPOContext, batch: SequenceBatch,
                       attn: torch.Tensor) -> torch.Tensor | None:
    """Auxiliary anchoring term on the ``<Focus>`` row (the first query row) during RL."""
    first = torch.arange(0, attn.shape[0], batch.group_size, device=attn.device)
    ids = batch.inputs["input_ids"].index_select(0, first)
    dists = [r[:, 0, :] for r in attention.rows_over_image_tokens(
        attn.index_select(0, first)[:, :, :1], ids, ctx.token_ids["image"])]
    loss, _ = anchoring.batch_attention_loss(dists, batch.focus_targets, "kl")
    return loss


def _std(x: Sequence[float]) -> float | None:
    return float(np.std(x)) if len(x) else None


def _mean(x: Sequence[float | None]) -> float | None:
    vals = [v for v in x if v is not None]
    return float(np.mean(vals)) if vals else None


def grpo_step(ctx: GRPOContext, dataset: Any, step: int,
              poison: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One GRPO step: rollouts, rewards, ``num_iterations`` clipped updates, one schedule step.

    Args:
        ctx: from ``setup_grpo``.
        dataset: rows with image, question, answer, answer_type, evidence_boxes, meta.
        step: the step index (selects the prompts).
        poison: test hook: make the loss NaN.

    Returns:
        ``(stats, samples)``: the step's metrics (see ``train_grpo``) and per completion of the
        first groups a small dict (question, answer, completion, rewards).

    Raises:
        anchoring.NonFiniteLossError: the loss is NaN/inf.
    """
    p, acc, model = ctx.params, ctx.accelerator, ctx.model
    t_start = time.perf_counter()
    groups, refills = collect_groups(ctx, dataset, step)
    t_rollout = time.perf_counter() - t_start
    g_size = p.group_size
    n_chunks = max(1, min(p.grad_accum, len(groups)))
    parts = [list(map(int, c)) for c in np.array_split(np.arange(len(groups)), n_chunks)]
    counts = []
    for part in parts:
        toks = [len(c) for i in part for c in groups[i].tokens]
        counts.append(sum(toks) if p.loss_agg == "token_mean" else sum(t > 0 for t in toks))
    total = max(1, sum(counts))
    if acc.num_processes > 1:
        # DDP averages the processes' gradients: dividing by the mean count per process makes the
        # loss the mean over every token (or sequence) of the global batch, as in one process.
        n_all = acc.reduce(torch.tensor(float(sum(counts)), device=acc.device), "sum")
        total = max(1.0, float(n_all) / acc.num_processes)
    chunks = [_Chunk(groups=[groups[i] for i in part],
                     batch=build_sequences([groups[i] for i in part], ctx.processor).to(acc.device),
                     weight=c / total) for part, c in zip(parts, counts, strict=True)]
    stats_lists: dict[str, list[float]] = {k: [] for k in (
        "concentration", "s_t", "share", "clip_frac", "clip_low_frac", "clip_high_frac",
        "ratio_mean", "kl", "entropy", "loss", "attn_rl", "distinct")}
    t_faith = 0.0
    grad_norm = None
    for it in range(p.num_iterations):
        for ci, chunk in enumerate(chunks):
            batch = chunk.batch
            first = it == 0
            prep = None
            if first:
                if p.beta > 0:
                    chunk.logp_ref = _reference_logprobs(ctx, batch)
                if ctx.faithful:
                    t0 = time.perf_counter()
                    prep = _prepare_faithful(ctx, chunk)
                    t_faith += time.perf_counter() - t0
            capture = (first and prep is not None) or p.lambda_attn_rl > 0
            cap_ctx = (attention.AttentionCapture(model, batch.query_positions.to(acc.device),
                                                  layers=ctx.layers)
                       if capture else contextlib.nullcontext())
            sync = contextlib.nullcontext() if ci == len(chunks) - 1 else acc.no_sync(model)
            # With gradient checkpointing the backward recomputes the captured layers, so it
            # runs inside the capture block.
            with sync, cap_ctx as cap:
                t = batch.completion_ids.shape[1]
                logits = completion_logits(model, batch.inputs, t, p.temperature)
                logp = token_logprobs(logits, batch.completion_ids, batch.completion_mask)
                attn = cap.attentions if capture else None
                if first:
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        ent = token_entropy(logits.detach(), batch.completion_mask)
                        m = batch.completion_mask.sum().clamp_min(1)
                        stats_lists["entropy"].append(float(ent.sum() / m))
                        faith = (_faithful_rewards(ctx, chunk, prep, logits, attn, stats_lists)
                                 if ctx.faithful else None)
                    if ctx.faithful:
                        t_faith += time.perf_counter() - t0
                    base = [r for g in chunk.groups for r in g.base_rewards(p.w_acc, p.w_fmt)]
                    chunk.faithful = faith or [0.0] * len(base)
                    chunk.overall = [b + p.w_faith * f for b, f in zip(base, chunk.faithful,
                                                                        strict=True)]
                    chunk.advantages = group_advantages(
                        torch.tensor(chunk.overall), g_size, p.std_normalize).to(acc.device)
                    chunk.logp_old = logp.detach()
                loss, st = clipped_policy_loss(
                    logp, chunk.logp_old, chunk.advantages, batch.completion_mask, p.clip_low,
                    p.clip_high, p.loss_agg, chunk.logp_ref, p.beta)
                for k, v in st.items():
                    if k in stats_lists and not (isinstance(v, float) and math.isnan(v)):
                        stats_lists[k].append(v)
                # The policy term is weighted by the chunk's share of tokens (or sequences), the
                # anchoring term by its share of prompts, so chunking leaves both means unchanged.
                loss = loss * chunk.weight
                if p.lambda_attn_rl > 0 and attn is not None:
                    aux = _focus_anchor_loss(ctx, batch, attn)
                    if aux is not None:
                        loss = loss + p.lambda_attn_rl * aux * len(chunk.groups) / len(groups)
                        stats_lists["attn_rl"].append(float(aux.detach()))
                if poison:
                    loss = loss * float("nan")
                if not torch.isfinite(loss):
                    raise anchoring.NonFiniteLossError(
                        f"non-finite GRPO loss {float(loss.detach())} at step {step} ({ctx.variant})")
                stats_lists["loss"].append(float(loss.detach()))
                acc.backward(loss)
        if p.grad_clip > 0:
            grad_norm = acc.clip_grad_norm_(ctx.trainable, p.grad_clip)
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
    lr = ctx.scheduler.get_last_lr()[0]
    ctx.scheduler.step()

    overall = [r for c in chunks for r in c.overall or []]
    faithful = [r for c in chunks for r in c.faithful or []]
    acc_r = [r for g in groups for r in g.accuracy]
    fmt_r = [r for g in groups for r in g.format]
    lengths = [len(t) for g in groups for t in g.tokens]
    faith_groups = [faithful[i * g_size:(i + 1) * g_size] for i in range(len(groups))]
    faith_correct = [[f for f, ok in zip(fg, g.correct, strict=True) if ok]
                     for fg, g in zip(faith_groups, groups, strict=True)]
    stats: dict[str, Any] = {
        "reward_mean": _mean(overall), "reward_std": _std(overall),
        "accuracy": _mean(acc_r), "accuracy_std": _std(acc_r),
        "format": _mean(fmt_r), "format_std": _std(fmt_r),
        "faithful_mean": _mean(faithful), "faithful_std": _std(faithful),
        "faithful_group_std": _mean([_std(fg) for fg in faith_groups]),
        "faithful_group_std_correct": _mean([_std(fc) for fc in faith_correct if len(fc) >= 2]),
        "completion_len": _mean(lengths),
        "vision_token_rate": _mean([0.0 if ok else 1.0 for g in groups for ok in g.ok]),
        "concentration": _mean(stats_lists["concentration"]),
        "s_t_mean": _mean(stats_lists["s_t"]),
        "region_share": _mean(stats_lists["share"]),
        "n_faithful_scored": len(stats_lists["concentration"]),
        "n_faithful_distinct": len(stats_lists["distinct"]),
        "clip_frac": _mean(stats_lists["clip_frac"]),
        "clip_high_frac": _mean(stats_lists["clip_high_frac"]),
        "clip_low_frac": _mean(stats_lists["clip_low_frac"]),
        "ratio_mean": _mean(stats_lists["ratio_mean"]),
        "kl": _mean(stats_lists["kl"]), "entropy": _mean(stats_lists["entropy"]),
        "loss": sum(stats_lists["loss"]) / max(1, p.num_iterations),
        "attn_rl_loss": _mean(stats_lists["attn_rl"]),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "lr": lr,
        "n_groups": len(groups), "refill_rounds": refills,
        "rollout_s": t_rollout, "faithful_s": t_faith,
        "step_s": time.perf_counter() - t_start,
    }
    if groups[0].extra is not None:
        extra = [r for g in groups for r in g.extra or []]
        stats["extra_mean"], stats["extra_std"] = _mean(extra), _std(extra)
    samples = []
    for gi, g in enumerate(groups[: max(1, math.ceil(p.n_show / g_size))]):
        for k in range(g_size):
            i = gi * g_size + k
            if len(samples) >= p.n_show:
                break
            samples.append({"id": g.row.get("id", ""), "question": g.row["question"],
                            "answer": g.row["answer"], "completion": g.texts[k],
                            "accuracy": g.accuracy[k], "format": g.format[k],
                            "faithful": faithful[i], "overall": overall[i]})
    return stats, samples


def train_grpo(model: Any, processor: Any, dataset: Any, params: Any, out_dir: str | Path,
               variant: str = "grpo", accelerator: Any = None, stop_after: int | None = None,
               fail_at_step: int | None = None,
               extra_reward: ExtraReward | None = None) -> anchoring.TrainResult:
    """Stage 2: GRPO (``grpo``, ``grpo_backbone``) or GRPO + faithful reward, with resume.

    Every step appends to ``out_dir/metrics.jsonl`` the reward components (mean and std), the
    within-group std of the faithful reward (overall and among correct trajectories, to show
    it carries signal beyond the correctness gate), accuracy, format rate, completion length,
    clip fractions, KL, entropy, the mean concentration and mean ``s_t`` of the scored
    (correct) trajectories, lr and timings; every ``log_every`` steps ``n_show`` sample
    completions go to ``out_dir/samples.jsonl``. Checkpoints (weights, optimiser, schedule,
    RNG) every ``checkpoint_every`` steps; ``params.resume`` continues from the latest, and
    because the RNG is restored, sampling continues as in an uninterrupted run.

    Args:
        model: the start policy (a Qwen2.5-VL, possibly peft-wrapped).
        processor: its processor.
        dataset: rows with image, question, answer, answer_type, evidence_boxes, meta.
        params: ``RLParams``.
        out_dir: run folder.
        variant: ``grpo``, ``grpo_backbone``, ``faithful`` or ``faithful_occlusion``.
        accelerator: optional ``accelerate.Accelerator``.
        stop_after: test hook: return after this many steps, as if the run were killed.
        fail_at_step: test hook: make the loss NaN at this step.
        extra_reward: optional reward added to the total (tests, custom tasks).

    Returns:
        ``anchoring.TrainResult`` (out_dir, logged metrics, wall time, steps done).

    Raises:
        anchoring.NonFiniteLossError: the loss became NaN/inf; the last good checkpoint stays.
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    log = repro.MetricsLog(out_dir / "metrics.jsonl")
    sample_log = repro.MetricsLog(out_dir / "samples.jsonl")
    ck = repro.latest_checkpoint(ckpt_dir) if params.resume else None
    ctx = setup_grpo(model, processor, params, variant, accelerator, extra_reward, ck)
    acc = ctx.accelerator
    start = ctx.start_step
    if ck is not None:
        # Drop rows written after the checkpoint, so the logs match an uninterrupted run.
        for lg in (log, sample_log):
            kept = [r for r in lg.read() if r["step"] <= start]
            if acc.is_main_process:
                repro.write_jsonl(lg.path, kept)
    elif acc.is_main_process:
        log = repro.MetricsLog(out_dir / "metrics.jsonl", reset=True)
        sample_log = repro.MetricsLog(out_dir / "samples.jsonl", reset=True)

    t0 = time.perf_counter()
    step = start - 1
    bar = tqdm(range(start, params.steps), desc=f"{variant} GRPO", initial=start,
               total=params.steps, disable=not acc.is_main_process)
    for step in bar:
        stats, samples = grpo_step(ctx, dataset, step,
                                   poison=fail_at_step is not None and step == fail_at_step)
        done = step + 1
        if acc.is_main_process:
            log.log(done, **stats, time_s=time.perf_counter() - t0)
            if params.log_every and (done % params.log_every == 0 or done == 1):
                for s in samples:
                    sample_log.log(done, **s)
            bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", acc=f"{stats['accuracy']:.2f}")
        if params.checkpoint_every and done % params.checkpoint_every == 0 and done < params.steps:
            if acc.is_main_process:
                repro.save_checkpoint(ckpt_dir, done, acc.unwrap_model(ctx.model), ctx.optimizer,
                                      ctx.scheduler, extra={"variant": variant})
            acc.wait_for_everyone()
        if stop_after is not None and done >= stop_after:
            break
    wall = time.perf_counter() - t0
    final = step + 1 if params.steps > start else start
    if acc.is_main_process and final >= params.steps:
        repro.save_checkpoint(ckpt_dir, final, acc.unwrap_model(ctx.model), ctx.optimizer,
                              ctx.scheduler, extra={"variant": variant})
    model = acc.unwrap_model(ctx.model)
    model.eval()
    return anchoring.TrainResult(out_dir=out_dir, metrics=log.read(), wall_time_s=wall,
                                 steps=final)


# --------------------------------------------------------------------------------------
# Worked example and stage runs (notebook 04, ``python -m fmr1lib rl``)
# --------------------------------------------------------------------------------------


@torch.no_grad()
def explain_trajectories(model: Any, processor: Any, row: dict[str, Any], completions: Sequence[str],
                         region: Sequence[Sequence[float]] | None = None,
                         method: str = "background", layers: Any = "last_half",
                         kappa: int = 4) -> list[dict[str, Any]]:
    """The faithful reward's ingredients for hand-picked completions of one prompt.

    For each completion (teacher-forced): its tokens, the visual dependency ``s_t`` of every
    token (KL between the policy on ``I`` and on ``I'`` with the region removed), the share of
    each token's image attention inside the region, and the concentration ``c`` over the
    top-``kappa`` tokens. ``region`` defaults to the record's evidence boxes.

    Returns:
        One dict per completion: ``tokens``, ``s_t``, ``share``, ``concentration``, ``correct``.
    """
    tok = processor.tokenizer
    region = [list(b) for b in (row["evidence_boxes"] if region is None else region)]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    token_lists = [tok(c, add_special_tokens=False)["input_ids"] + [eos] for c in completions]
    acc_r = rewards.accuracy_reward(list(completions), [row["answer"]] * len(completions),
                                    [row.get("answer_type") or "word"] * len(completions))
    group = Group(row=row, tokens=token_lists, texts=list(completions), ok=[True] * len(completions),
                  accuracy=acc_r, format=rewards.format_reward(list(completions)))
    batch = build_sequences([group], processor)
    t = batch.completion_ids.shape[1]
    idx = anchoring.resolve_layers(layers, anchoring.num_text_layers(model))
    with _eval_mode(model), attention.AttentionCapture(model, batch.query_positions, idx) as cap:
        logits = completion_logits(model, batch.inputs, t)
    pv_cf, thw_cf = counterfactual_pixels([row], [region], processor, method)
    cf_inputs = dict(batch.inputs)
    cf_inputs["pixel_values"], cf_inputs["image_grid_thw"] = repeat_image_inputs(
        pv_cf, thw_cf, len(completions))
    with _eval_mode(model):
        logits_cf = completion_logits(model, cf_inputs, t)
    s_t = visual_dependency(logits, logits_cf, batch.completion_mask)
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    ids = batch.inputs["input_ids"]
    reg_mask = region_token_mask(ids, batch.inputs["image_grid_thw"], [region] * len(completions),
                                 [row["image"].size] * len(completions), image_id)
    share = region_share(cap.attentions, reg_mask, attention.image_token_mask(ids, image_id))
    out = []
    for j, toks in enumerate(token_lists):
        n = len(toks)
        out.append({
            "completion": completions[j],
            "tokens": [tok.decode([x], skip_special_tokens=False) for x in toks],
            "s_t": s_t[j, :n].tolist(), "share": share[j, :n].tolist(),
            "concentration": rewards.concentration(s_t[j], share[j], batch.completion_mask[j], kappa),
            "correct": bool(acc_r[j]),
        })
    return out


def rl_dir(p: Any, variant: str) -> Path:
    """``runs/<profile>/rl/<variant>[_seed<k>][_n<prompts>]``."""
    name = variant if p.seed == 0 else f"{variant}_seed{p.seed}"
    if p.n_prompts:
        name += f"_n{p.n_prompts}"
    return repro.run_dir(p, "rl", name)


def start_model(p: Any, variant: str) -> tuple[Any, Any]:
    """The start policy of a variant: the stage-0 backbone for ``grpo_backbone``, else the
    stage-1 ``focus_anchor`` model (each built by its notebook's step if missing)."""
    from fmr1lib import config

    ap = config.load_params(config.AnchorParams, repro.resolve_path(p.anchor_params_file),
                            run_root=p.run_root, profile=p.profile, seed=p.seed)
    if variant == "grpo_backbone":
        model, processor = anchoring.ensure_backbone(ap)
    else:
        folder = anchoring.anchor_dir(ap, "focus_anchor") / "model"
        if not (folder / "config.json").exists():
            logger.info("no stage-1 model at %s: training it (notebook 03)", folder)
            anchoring.anchor_stage(ap, "focus_anchor")
        model, processor = modeling.load_saved_backbone(folder, p)
    return model, processor


def rl_stage(p: Any, variant: str, dsd: Any = None) -> tuple[Any, Any, anchoring.TrainResult]:
    """Train one stage-2 variant from its start point and save it under ``rl_dir``."""
    # Under ``accelerate launch`` every process runs this; only the main one writes.
    acc = anchoring.make_accelerator(p)
    dsd = anchoring.stage_data(p, acc, dsd)
    out = rl_dir(p, variant)
    if acc.is_main_process:
        repro.save_params(p, out)
    repro.seed_everything(p.seed)
    model, processor = start_model(p, variant)
    model = anchoring.prepare_trainable(model, p)
    result = train_grpo(model, processor, dsd[p.train_split], p, out, variant, accelerator=acc)
    model = anchoring.save_stage(model, processor, p, acc, out, variant, result)
    return model, processor, result
