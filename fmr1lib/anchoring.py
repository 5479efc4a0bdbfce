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



def _global_means(acc: Any, ce: torch.Tensor, n_tok: int, attn: torch.Tensor | None, n_tgt: int,
                  mass: float) -> tuple[float, float, float, float, float]:
    """Batch-wide means over all processes, and the factors that make DDP reproduce them.

    DDP averages the processes' gradients, so a process whose loss is the mean over its own
    ``n_tok`` response tokens is reweighted by ``world * n_tok / N_tok``: the objective is then
    the CE over every response token of the global batch (and the attention loss over every
    sample with a target), as in one process with that batch.

    Returns:
        ``(ce_weight, attn_weight, ce, attn, mass)``: loss factors for this process, and the
        global means for logging (NaN where no process had a term).
    """
    attn_v = float(attn.detach()) if attn is not None else 0.0
    mass_v = 0.0 if math.isnan(mass) else mass
    local = torch.tensor([float(ce.detach()) * n_tok, float(n_tok), attn_v * n_tgt, float(n_tgt),
                          mass_v * n_tgt, float(n_tgt if not math.isnan(mass) else 0)],
                         dtype=torch.float64, device=acc.device)
    tot = acc.reduce(local, "sum").cpu().tolist()
    world = acc.num_processes
    ce_w = world * n_tok / tot[1] if tot[1] else 1.0
    attn_w = world * n_tgt / tot[3] if tot[3] else 1.0
    nan = float("nan")
    return (ce_w, attn_w, tot[0] / tot[1] if tot[1] else nan, tot[2] / tot[3] if tot[3] else nan,
            tot[4] / tot[5] if tot[5] else nan)


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
    micro = np.array_split(np.arange(len(rows)), params.grad_accum)
    ce_sum, attn_sum, mass_sum, n_mass = 0.0, 0.0, 0.0, 0
    grad_norm = None
    for mb in micro:
        batch = batching.encode_batch([rows[i] for i in mb], processor, variant,
                                      smooth_sigma=cfg["smooth_sigma"],
                                      reasoning=params.reasoning,
                                      cue_route_share=params.cue_route_share)
        inputs = {k: v.to(acc.device) for k, v in batch.inputs.items()}
        labels = batch.labels.to(acc.device)
        # With gradient checkpointing the backward recomputes the captured layers, so it
        # must run inside the capture block.
        cap_ctx = (attention.AttentionCapture(model, batch.focus_pos[:, None].to(acc.device),
                                              layers=layers, heads=cfg["head_select"])
                   if capture else contextlib.nullcontext())
        with acc.accumulate(model), cap_ctx as cap:
            out = model(**inputs, labels=labels)
            attn_l, mass = None, float("nan")
            if capture:
                dists = focus_distributions(cap.attentions, batch, image_token_id)
                attn_l, mass = batch_attention_loss(dists, batch.targets, cfg["attn_loss"],
                                                   batch.supports)
            ce_v = float(out.loss.detach())
            attn_v = float(attn_l.detach()) if attn_l is not None else None
            ce_w = attn_w = 1.0
            if acc.num_processes > 1:
                n_tok = int((labels[:, 1:] != -100).sum())
                n_tgt = sum(q is not None for q in batch.targets) if attn_l is not None else 0
                ce_w, attn_w, ce_v, attn_v, mass = _global_means(acc, out.loss, n_tok, attn_l,
                                                                 n_tgt, mass)
            loss = out.loss * ce_w if ce_w != 1.0 else out.loss
            if anchoring and attn_l is not None:
                loss = loss + cfg["lambda_attn"] * attn_w * attn_l
            state.backward(loss)
            norm = state.clip_and_step(params.grad_clip)
            grad_norm = norm if norm is not None else grad_norm
            if acc.sync_gradients:
                state.scheduler.step()
        ce_sum += ce_v
        if attn_v is not None and not math.isnan(attn_v):
            attn_sum += attn_v
        if not math.isnan(mass):
            mass_sum, n_mass = mass_sum + mass, n_mass + 1
    if not (log_now and acc.is_main_process):
        return None, {}
    return {"ce": ce_sum / len(micro), "lr": state.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm, "focus_mass": mass_sum / n_mass if n_mass else None,
            "attn_loss": attn_sum / len(micro) if anchoring else None}, {}


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
