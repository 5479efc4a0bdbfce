"""Stage 1, Anchoring (docs/design.md §5): the anchoring loss and the supervised step.

Stage 1 trains

    L = CE(response) + lambda_attn * mean_l L_attn(q, p^l)

where ``q`` is the record's evidence boxes mapped onto the merged image-token grid
(``modeling.boxes_to_grid``) and ``p^l`` is the ``<Focus>`` query's attention at anchor layer
``l``, head-averaged, restricted to that sample's image tokens and renormalised. ``p`` comes
from the *same* forward that gives the CE loss (``attention.AttentionCapture``), so anchoring
costs one forward per batch. ``L_attn`` is ``KL(q || p)`` (``kl``) or ``-log sum_{j in box} p_j``
(``mass``). Records without evidence boxes contribute CE only.

Variants (``batching.STAGE_VARIANTS``):
  * ``plain``: CE only (stage 0 and the SFT baseline);
  * ``focus_anchor``: CE + attention loss (the paper's anchoring);
  * ``text_perception``: CE only, but the response describes the evidence in words right
    after ``<Focus>`` ("the red triangle, top left"): perception supervised through text.

``supervised_step`` is one optimiser step of any of them; ``train_supervised`` runs it in the
training skeleton (``train.fit``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmr1lib import attention, batching, train
from fmr1lib.batching import Batch
from fmr1lib.choices import AttnLoss, options

logger = logging.getLogger(__name__)

VARIANTS = batching.STAGE_VARIANTS
ATTN_LOSSES = options(AttnLoss)
EPS = 1e-8


# --------------------------------------------------------------------------------------
# Targets and losses (pure)
# --------------------------------------------------------------------------------------


def anchoring_loss(p: torch.Tensor, q: torch.Tensor, kind: str = "kl",
                   support: torch.Tensor | None = None) -> torch.Tensor:
    """Attention loss between a predicted distribution ``p`` and a target ``q``.

    When ``q`` is one cell (every FocusShapes record without smoothing) the two kinds are the
    same number, ``-log p[cell]``; they differ only for targets wider than one token (several
    cells, or ``smooth_sigma`` > 0), where ``kl`` asks for ``q``'s shape and ``mass`` only for
    the mass inside the boxes.

    Args:
        p: ``[..., N]`` attention over one sample's image tokens (sums to 1 on the last axis).
        q: ``[N]`` target over the same tokens (sums to 1).
        kind: ``kl`` for KL(q || p), ``mass`` for -log of p's mass inside the boxes.
        support: ``[N]`` bool, the tokens inside the boxes (``Batch.supports``); default
            ``q > 0``, which a smoothed ``q`` would make every token.

    Returns:
        ``[...]`` per-row loss (zero when p == q for ``kl``; zero when all mass is in the box
        for ``mass``).

    >>> q = torch.tensor([0.5, 0.5, 0.0])
    >>> float(anchoring_loss(q.clone(), q))
    0.0
    >>> float(anchoring_loss(torch.tensor([0.25, 0.25, 0.5]), q, "mass")) > 0
    True
    """
    if kind == "kl":
        qpos = q > 0
        qq = q.clamp_min(EPS)
        terms = torch.where(qpos, q * (torch.log(qq) - torch.log(p.clamp_min(EPS))),
                            torch.zeros_like(p))
        return terms.sum(-1)
    if kind == "mass":
        inside = (q > 0) if support is None else support.to(p.device)
        mass = (p * inside.to(p.dtype)).sum(-1)
        return -torch.log(mass.clamp_min(EPS))
    raise ValueError(f"unknown attention loss {kind!r}; use one of {ATTN_LOSSES}")



def focus_distributions(attn: torch.Tensor, batch: Batch, image_token_id: int) -> list[torch.Tensor]:
    """Per sample ``[n_layers, N_b]``: Focus attention over its image tokens, renormalised."""
    rows = attention.rows_over_image_tokens(attn, batch.inputs["input_ids"], image_token_id)
    return [r[:, 0, :] for r in rows]  # one query (the Focus token) per sample


def batch_attention_loss(dists: list[torch.Tensor], targets: list[torch.Tensor | None],
                         kind: str, supports: list[torch.Tensor | None] | None = None,
                         ) -> tuple[torch.Tensor | None, float]:
    """Mean over samples with a target of (mean over layers of L_attn), and their Focus mass
    inside the boxes (``supports``; default ``q > 0``)."""
    losses, masses = [], []
    supports = supports or [None] * len(targets)
    for p, q, sup in zip(dists, targets, supports, strict=True):
        if q is None:
            continue
        q = q.to(p.device, p.dtype)
        inside = (q > 0) if sup is None else sup.to(p.device)
        losses.append(anchoring_loss(p, q, kind, inside).mean())
        masses.append(float((p.detach() * inside).sum(-1).mean()))
    if not losses:
        return None, float("nan")
    return torch.stack(losses).mean(), float(np.mean(masses))


# --------------------------------------------------------------------------------------
# The supervised step
# --------------------------------------------------------------------------------------


def anchoring_settings(params: Any, variant: str) -> dict[str, Any]:
    """The anchoring fields of ``params`` (stage-0 params have none: plain SFT).

    Returns:
        ``lambda_attn`` (0 unless the variant is ``focus_anchor``), ``attn_loss``,
        ``anchor_layers``, ``head_select``, ``smooth_sigma``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")
    lam = float(getattr(params, "lambda_attn", 0.0))
    if variant != "focus_anchor" and lam:
        logger.debug("variant %s ignores lambda_attn=%s", variant, lam)
    return {"lambda_attn": lam if variant == "focus_anchor" else 0.0,
            "attn_loss": getattr(params, "attn_loss", "kl"),
            "anchor_layers": getattr(params, "anchor_layers", "last_half"),
            "head_select": getattr(params, "head_select", "mean"),
            "smooth_sigma": float(getattr(params, "smooth_sigma", 0.0))}


def supervised_step(state: train.TrainState, step: int, *, processor: Any, dataset: Any,
                    params: Any, variant: str, settings: dict[str, Any],
                    layers: list[int]) -> tuple[dict[str, Any] | None, dict]:
    """One optimiser step of SFT (+ anchoring), over ``grad_accum`` micro-batches.

    Args:
        state: the training state (model, optimiser, schedule, accelerator).
        step: the step index (selects the records, ``batching.batch_indices``).
        processor: the model's processor.
        dataset: rows with image, question, answer, evidence_boxes, meta.
        params: the stage's params (``batch_size``, ``grad_accum``, ``grad_clip``, ``seed``,
            ``log_every``).
        variant: ``plain``, ``focus_anchor`` or ``text_perception``.
        settings: the variant's anchoring settings (``anchoring_settings``).
        layers: resolved anchor layers.

    Returns:
        ``(stats, {})``: ``ce``, ``lr``, ``grad_norm``, ``focus_mass``, ``attn_loss`` on logging
        steps (every ``log_every``), else ``(None, {})``.
    """
    cfg = settings
    acc, model = state.accelerator, state.model
    anchoring = cfg["lambda_attn"] > 0
    log_now = bool(params.log_every) and (step + 1) % params.log_every == 0
    capture = anchoring or log_now
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    idx = batching.batch_indices(len(dataset), params.batch_size, step, params.seed,
                                 acc.process_index, acc.num_processes)
    rows = [dataset[i] for i in idx]
    batches = [batching.encode_batch([rows[i] for i in mb], processor, variant,
                                     smooth_sigma=cfg["smooth_sigma"], reasoning=params.reasoning,
                                     cue_route_share=params.cue_route_share)
               for mb in np.array_split(np.arange(len(rows)), params.grad_accum)]
    # The CE is the mean over every response token of the global batch, the attention loss
    # over every sample with a target: each micro-batch's means are weighted by its share.
    ce_w = train.loss_shares(acc, [int((b.labels[:, 1:] != -100).sum()) for b in batches])
    attn_w = train.loss_shares(acc, [sum(q is not None for q in b.targets) for b in batches])
    logged = torch.zeros(3, dtype=torch.float64)  # weighted CE, attention loss, Focus mass
    for i, batch in enumerate(batches):
        inputs = {k: v.to(acc.device) for k, v in batch.inputs.items()}
        labels = batch.labels.to(acc.device)
        # With gradient checkpointing the backward recomputes the captured layers, so it
        # must run inside the capture block.
        cap_ctx = (attention.AttentionCapture(model, batch.focus_pos[:, None].to(acc.device),
                                              layers=layers, heads=cfg["head_select"])
                   if capture else contextlib.nullcontext())
        with train.micro_batch(acc, model, last=i == len(batches) - 1), cap_ctx as cap:
            out = model(**inputs, labels=labels)
            loss = out.loss * ce_w[i]
            logged[0] += float(out.loss.detach()) * ce_w[i]
            if capture:
                dists = focus_distributions(cap.attentions, batch, image_token_id)
                attn_l, mass = batch_attention_loss(dists, batch.targets, cfg["attn_loss"],
                                                   batch.supports)
                if attn_l is not None:
                    logged[1] += float(attn_l.detach()) * attn_w[i]
                    if anchoring:
                        loss = loss + cfg["lambda_attn"] * attn_w[i] * attn_l
                if not math.isnan(mass):
                    logged[2] += mass * attn_w[i]
            state.backward(loss)
    grad_norm = state.clip_and_step(params.grad_clip)
    state.scheduler.step()
    if not log_now:
        return None, {}
    # The weights make each process's sum its share of the global mean (loss_shares).
    scale = getattr(acc, "gradient_accumulation_steps", 1)
    if acc.num_processes > 1:
        logged = acc.reduce(logged.to(acc.device), "mean").cpu()
    ce, attn, mass = (float(v) / scale for v in logged)
    has_targets = any(w > 0 for w in attn_w)
    if not acc.is_main_process:
        return None, {}
    return {"ce": ce, "lr": state.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "focus_mass": mass if has_targets else None,
            "attn_loss": attn if anchoring and has_targets else None}, {}


def train_supervised(model: Any, processor: Any, dataset: Any, params: Any, out_dir: str | Path,
                     variant: str = "plain", accelerator: Any = None,
                     hooks: train.Hooks | None = None) -> train.TrainResult:
    """SFT with an optional anchoring term (``supervised_step``) in the training skeleton.

    Args:
        model: a Qwen2.5-VL (possibly peft-wrapped).
        processor: its processor.
        dataset: rows with image, question, answer, evidence_boxes, meta.
        params: ``BackboneParams`` (stage 0, plain SFT) or ``AnchorParams`` (its
            ``lambda_attn``, ``attn_loss``, ``anchor_layers``, ``head_select``, ``smooth_sigma``
            configure ``focus_anchor``).
        out_dir: run folder: ``metrics.jsonl`` and ``checkpoints/`` go here.
        variant: ``plain``, ``focus_anchor`` or ``text_perception``.
        accelerator: optional ``accelerate.Accelerator``.
        hooks: test hooks (``stop_after``, ``fail_at_step``).

    Returns:
        ``train.TrainResult`` with the logged metrics.

    Raises:
        train.NonFiniteLossError: the loss became NaN/inf; the last good checkpoint stays.
    """
    cfg = anchoring_settings(params, variant)
    acc = accelerator or train.make_accelerator(params,
                                                gradient_accumulation_steps=params.grad_accum)
    state = train.setup_training(model, params, out_dir, acc,
                                 micro_batch=params.batch_size // params.grad_accum)
    layers = attention.resolve_layers(cfg["anchor_layers"], attention.num_text_layers(model))
    step_fn = functools.partial(supervised_step, processor=processor, dataset=dataset,
                                params=params, variant=variant, settings=cfg, layers=layers)

    def postfix(row: dict[str, Any]) -> dict[str, str]:
        mass = row["focus_mass"]
        return {"ce": f"{row['ce']:.3f}", "mass": f"{mass:.2f}" if mass else "-"}

    loop = train.Loop(f"{variant} training", checkpoint_extra={"variant": variant},
                      postfix=postfix)
    return train.fit(state, params, out_dir, step_fn, loop, hooks or train.Hooks())
