"""Supervised stages: stage-0 warm-up (tiny only), text-perception SFT and Stage 1 Anchoring.

Stage 1 (DESIGN.md section 7) trains

    L = CE(response) + lambda_attn * mean_l L_attn(q, p^l)

where ``q`` is the record's evidence boxes mapped onto the merged image-token grid
(``modeling.boxes_to_grid``) and ``p^l`` is the ``<Focus>`` query's attention at anchor layer
``l``, head-averaged, restricted to that sample's image tokens and renormalised. ``p`` comes
from the *same* forward that gives the CE loss (``attention.AttentionCapture``), so anchoring
costs one forward per batch. ``L_attn`` is ``KL(q || p)`` (``kl``) or ``-log sum_{j in box} p_j``
(``mass``). Records without evidence boxes contribute CE only.

Variants:
  * ``plain``: CE only (stage 0 and the SFT baseline);
  * ``focus_anchor``: CE + attention loss (the paper's anchoring);
  * ``text_perception``: CE only, but the response describes the evidence in words right
    after ``<Focus>`` ("the red triangle, top left"): perception supervised through text.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fmr1lib import attention, modeling, prompting, records, repro

logger = logging.getLogger(__name__)

VARIANTS = ("plain", "focus_anchor", "text_perception")
ATTN_LOSSES = ("kl", "mass")
EPS = 1e-8


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------
# Targets and losses (pure)
# --------------------------------------------------------------------------------------


def anchoring_loss(p: torch.Tensor, q: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Attention loss between a predicted distribution ``p`` and a target ``q``.

    Args:
        p: ``[..., N]`` attention over one sample's image tokens (sums to 1 on the last axis).
        q: ``[N]`` target over the same tokens (sums to 1).
        kind: ``kl`` for KL(q || p), ``mass`` for -log of p's mass where q > 0.

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
        mass = (p * (q > 0).to(p.dtype)).sum(-1)
        return -torch.log(mass.clamp_min(EPS))
    raise ValueError(f"unknown attention loss {kind!r}; use one of {ATTN_LOSSES}")


_POSITIONS = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left",
              (1, 1): "center", (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom",
              (2, 2): "bottom right"}


def position_words(box: Sequence[float], image_size: tuple[int, int]) -> str:
    """Coarse position of a box in a 3x3 split of the image.

    >>> position_words([0, 0, 10, 10], (112, 112))
    'top left'
    """
    w, h = image_size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return _POSITIONS[(min(2, int(3 * cy / h)), min(2, int(3 * cx / w)))]


def perception_text(meta: dict[str, Any], image_size: tuple[int, int]) -> str:
    """Words for the evidence of a FocusShapes record ("the red triangle, top left")."""
    objs = [meta["objects"][i] for i in meta.get("evidence_objects", [])]
    if not objs:
        return "nothing"
    parts = []
    for o in objs:
        color = o["color"] or "grey"
        parts.append(f"the {color} {o['shape']}, {position_words(o['box'], image_size)}")
    return " and ".join(parts)


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Model inputs plus what the losses need."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    focus_pos: torch.Tensor
    targets: list[torch.Tensor | None]
    ids: list[str] = field(default_factory=list)


def encode_batch(rows: Sequence[dict[str, Any]], processor: Any, variant: str = "plain",
                 with_response: bool = True, smooth_sigma: float = 0.0) -> Batch:
    """Tokenise prompt (+ response) and image for each record.

    The response tokens (and the closing ``<|im_end|>``) are the only labelled ones; the
    ``<Focus>`` token is the last prompt token. Relies on left padding.

    Returns:
        ``Batch`` with ``labels [B, S]`` (-100 outside responses), ``focus_pos [B]`` and, per
        sample, the target ``q`` over its image tokens (None when it has no evidence boxes).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")
    tok = processor.tokenizer
    prompts, responses, images = [], [], []
    for r in rows:
        image = r["image"].convert("RGB")
        images.append(image)
        prompts.append(prompting.prompt_text(processor, r["question"]))
        if with_response:
            perception = None
            if variant == "text_perception":
                perception = perception_text(records.decode_meta(r["meta"]), image.size)
            responses.append(prompting.response_text(
                r["answer"], prompting.think_text(r["question"], prompting.think_variant(str(r.get("id", "")))),
                perception) + "<|im_end|>")
        else:
            responses.append("")
    enc = processor(text=[p + s for p, s in zip(prompts, responses, strict=True)], images=images,
                    return_tensors="pt", padding=True)
    ids = enc["input_ids"]
    seq = ids.shape[1]
    labels = torch.full_like(ids, -100)
    focus_id = tok.convert_tokens_to_ids(prompting.FOCUS)
    focus_pos = torch.empty(len(rows), dtype=torch.long)
    image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    targets: list[torch.Tensor | None] = []
    for b, resp in enumerate(responses):
        n_resp = len(tok(resp, add_special_tokens=False)["input_ids"]) if resp else 0
        if n_resp:
            labels[b, seq - n_resp:] = ids[b, seq - n_resp:]
        focus_pos[b] = seq - n_resp - 1
        if int(ids[b, focus_pos[b]]) != focus_id:
            raise ValueError(f"record {rows[b].get('id')}: <Focus> not at the end of the prompt "
                             f"(tokenisation of prompt + response is not additive)")
        boxes = [list(bx) for bx in rows[b]["evidence_boxes"]]
        if boxes:
            grid = modeling.boxes_to_grid(boxes, images[b].size, enc["image_grid_thw"][b],
                                          smooth_sigma)
            n_img = int((ids[b] == image_token_id).sum())
            q = grid.flatten()
            targets.append(q if q.sum() > 0 and q.numel() == n_img else None)
        else:
            targets.append(None)
    return Batch(inputs=dict(enc), labels=labels, focus_pos=focus_pos, targets=targets,
                 ids=[r.get("id", "") for r in rows])


def resolve_layers(spec: Any, num_layers: int) -> list[int]:
    """``"last_half"``, ``"all"`` or a list of (possibly negative) indices -> sorted indices.

    >>> resolve_layers("last_half", 4)
    [2, 3]
    >>> resolve_layers([-1], 4)
    [3]
    """
    if spec == "all":
        return list(range(num_layers))
    if spec == "last_half":
        return list(range(num_layers // 2, num_layers))
    if isinstance(spec, str):
        raise ValueError(f"anchor layers {spec!r}: use 'last_half', 'all' or a list of indices")
    out = sorted({i % num_layers for i in spec})
    if any(not -num_layers <= i < num_layers for i in spec):
        raise ValueError(f"anchor layers {spec} out of range for {num_layers} layers")
    return out


def num_text_layers(model: Any) -> int:
    """Number of language-model decoder layers."""
    return len(attention.language_attention_modules(model))


def focus_distributions(attn: torch.Tensor, batch: Batch, image_token_id: int) -> list[torch.Tensor]:
    """Per sample ``[n_layers, N_b]``: Focus attention over its image tokens, renormalised."""
    rows = attention.rows_over_image_tokens(attn, batch.inputs["input_ids"], image_token_id)
    return [r[:, 0, :] for r in rows]  # one query (the Focus token) per sample


def batch_attention_loss(dists: list[torch.Tensor], targets: list[torch.Tensor | None],
                         kind: str) -> tuple[torch.Tensor | None, float]:
    """Mean over samples with a target of (mean over layers of L_attn), and their Focus mass."""
    losses, masses = [], []
    for p, q in zip(dists, targets, strict=True):
        if q is None:
            continue
        q = q.to(p.device, p.dtype)
        losses.append(anchoring_loss(p, q, kind).mean())
        masses.append(float((p.detach() * (q > 0)).sum(-1).mean()))
    if not losses:
        return None, float("nan")
    return torch.stack(losses).mean(), float(np.mean(masses))


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------


def _scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - frac if kind == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_accelerator(params: Any, **kwargs: Any) -> Any:
    """The ``accelerate.Accelerator`` of a training stage (mixed precision from ``params``).

    On a machine without an accelerator device, processes started by ``accelerate launch``
    (``WORLD_SIZE > 1``) form a CPU process group (gloo) only when the CPU is asked for
    explicitly; otherwise each would train alone on its own copy of the data.

    Args:
        params: stage parameters with ``mixed_precision``.
        **kwargs: further ``Accelerator`` arguments (e.g. ``gradient_accumulation_steps``).
    """
    from accelerate import Accelerator

    cpu_group = (int(os.environ.get("WORLD_SIZE", "1")) > 1
                 and not torch.accelerator.is_available())
    return Accelerator(mixed_precision=params.mixed_precision, cpu=True if cpu_group else None,
                       **kwargs)


def prepare_training(acc: Any, model: Any, optimizer: Any, scheduler: Any,
                     micro_batch: int = 1) -> tuple[Any, Any, Any]:
    """Wrap model and optimiser with accelerate; the schedule steps once per optimiser step.

    A scheduler handed to ``accelerate.prepare`` steps ``num_processes`` times per call (unless
    the accelerator splits batches). Here ``batch_size`` is per process, so the schedule must
    advance once per optimiser step on every process: a run on N processes then follows the
    learning-rate curve of a single-process run with the same global batch.

    Args:
        micro_batch: sequences per backward pass on one process; DeepSpeed needs it and, with
            no DataLoader to prepare, accelerate cannot infer it.

    Returns:
        ``(model, optimizer, scheduler)``.
    """
    from accelerate.scheduler import AcceleratedScheduler

    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = max(1, micro_batch)
    model, optimizer = acc.prepare(model, optimizer)
    return model, optimizer, AcceleratedScheduler(scheduler, optimizer, split_batches=True)


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


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0,
                  world: int = 1) -> list[int]:
    """The example indices of optimiser step ``step``: seeded epoch permutations, sharded.

    Deterministic in ``(n, batch_size, step, seed)``, so a resumed run sees the same data.

    >>> batch_indices(10, 4, 0, seed=0) == batch_indices(10, 4, 0, seed=0)
    True
    """
    global_bs = batch_size * world
    per_epoch = max(1, n // global_bs)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    chunk = order[k * global_bs:(k + 1) * global_bs]
    return [int(i) for i in chunk[rank::world]]


@dataclass
class TrainResult:
    """What a training run leaves behind."""

    out_dir: Path
    metrics: list[dict[str, Any]]
    wall_time_s: float
    steps: int


def train_supervised(model: Any, processor: Any, dataset: Any, params: Any, out_dir: str | Path,
                     variant: str = "plain", lambda_attn: float = 0.0, attn_loss: str = "kl",
                     anchor_layers: Any = "last_half", head_select: Any = "mean",
                     smooth_sigma: float = 0.0, accelerator: Any = None,
                     fail_at_step: int | None = None, stop_after: int | None = None) -> TrainResult:
    """SFT with an optional anchoring term, on accelerate, with checkpoints and resume.

    Args:
        model: a Qwen2.5-VL (possibly peft-wrapped).
        processor: its processor.
        dataset: rows with image, question, answer, evidence_boxes, meta.
        params: a ``TrainParams`` (steps, batch_size, lr, checkpoint_every, resume, ...).
        out_dir: run folder: ``metrics.jsonl`` and ``checkpoints/`` go here.
        variant: ``plain``, ``focus_anchor`` or ``text_perception``.
        lambda_attn: weight of the attention loss (used by ``focus_anchor`` only).
        fail_at_step: test hook: make the loss NaN at this step.
        stop_after: test hook: return after this many steps, as if the run were killed.

    Returns:
        ``TrainResult`` with the logged metrics.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; the last good checkpoint stays on disk.
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    acc = accelerator or make_accelerator(params, gradient_accumulation_steps=params.grad_accum)
    anchoring = variant == "focus_anchor" and lambda_attn > 0
    if variant != "focus_anchor" and lambda_attn:
        logger.info("variant %s ignores lambda_attn=%s", variant, lambda_attn)
    if params.gradient_checkpointing:
        modeling_model = attention.unwrap_model(model)
        modeling_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = resolve_layers(anchor_layers, num_text_layers(model))
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    scheduler = _scheduler(optimizer, params.lr_schedule, params.lr_warmup_steps, params.steps)
    model.train()
    start = 0
    log = repro.MetricsLog(out_dir / "metrics.jsonl")
    if params.resume and (ck := repro.latest_checkpoint(ckpt_dir)) is not None:
        meta = repro.load_checkpoint(ck, model, optimizer, scheduler)
        start = int(meta["step"])
        # Drop log rows written after the checkpoint, so the log matches an uninterrupted run.
        kept = [r for r in log.read() if r["step"] <= start]
        if acc.is_main_process:
            repro.write_jsonl(log.path, kept)
        logger.info("resumed from %s (step %d)", ck, start)
    elif acc.is_main_process:
        log = repro.MetricsLog(out_dir / "metrics.jsonl", reset=True)
    model, optimizer, scheduler = prepare_training(acc, model, optimizer, scheduler,
                                                   params.batch_size // params.grad_accum)

    n = len(dataset)
    t0 = time.perf_counter()
    bar = tqdm(range(start, params.steps), desc=f"{variant} training", initial=start,
               total=params.steps, disable=not acc.is_main_process)
    for step in bar:
        idx = batch_indices(n, params.batch_size, step, params.seed, acc.process_index,
                            acc.num_processes)
        rows = [dataset[i] for i in idx]
        capture = anchoring or (params.log_every and (step + 1) % params.log_every == 0)
        micro = np.array_split(np.arange(len(rows)), params.grad_accum)
        ce_sum, attn_sum, mass_sum, n_mass = 0.0, 0.0, 0.0, 0
        grad_norm = None
        for mb in micro:
            batch = encode_batch([rows[i] for i in mb], processor, variant,
                                 smooth_sigma=smooth_sigma)
            inputs = {k: v.to(acc.device) for k, v in batch.inputs.items()}
            labels = batch.labels.to(acc.device)
            # With gradient checkpointing the backward recomputes the captured layers, so it
            # must run inside the capture block.
            ctx = (attention.AttentionCapture(model, batch.focus_pos[:, None].to(acc.device),
                                              layers=layers, heads=head_select)
                   if capture else contextlib.nullcontext())
            with acc.accumulate(model), ctx as cap:
                out = model(**inputs, labels=labels)
                attn_l, mass = None, float("nan")
                if capture:
                    dists = focus_distributions(cap.attentions, batch, image_token_id)
                    attn_l, mass = batch_attention_loss(dists, batch.targets, attn_loss)
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
                    loss = loss + lambda_attn * attn_w * attn_l
                if fail_at_step is not None and step == fail_at_step:
                    loss = loss * float("nan")
                if not torch.isfinite(loss):
                    last = repro.latest_checkpoint(ckpt_dir)
                    raise NonFiniteLossError(
                        f"non-finite loss {float(loss)} at step {step} ({variant}); last good "
                        f"checkpoint: {last or 'none'}. Lower the learning rate or check the data.")
                acc.backward(loss)
                if acc.sync_gradients and params.grad_clip > 0:
                    grad_norm = acc.clip_grad_norm_(trainable, params.grad_clip)
                optimizer.step()
                if acc.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            ce_sum += ce_v
            if attn_v is not None and not math.isnan(attn_v):
                attn_sum += attn_v
            if not math.isnan(mass):
                mass_sum, n_mass = mass_sum + mass, n_mass + 1
        done = step + 1
        if params.log_every and done % params.log_every == 0 and acc.is_main_process:
            row = {"ce": ce_sum / len(micro), "lr": scheduler.get_last_lr()[0],
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "focus_mass": mass_sum / n_mass if n_mass else None,
                   "attn_loss": attn_sum / len(micro) if anchoring else None,
                   "time_s": time.perf_counter() - t0}
            log.log(done, **row)
            bar.set_postfix(ce=f"{row['ce']:.3f}",
                            mass=f"{row['focus_mass']:.2f}" if row["focus_mass"] else "-")
        if params.checkpoint_every and done % params.checkpoint_every == 0 and done < params.steps:
            if acc.is_main_process:
                repro.save_checkpoint(ckpt_dir, done, acc.unwrap_model(model), optimizer, scheduler,
                                      extra={"variant": variant})
            acc.wait_for_everyone()
        if stop_after is not None and done >= stop_after:
            break
    wall = time.perf_counter() - t0
    final = step + 1 if params.steps > start else start
    if acc.is_main_process and final >= params.steps:
        repro.save_checkpoint(ckpt_dir, final, acc.unwrap_model(model), optimizer, scheduler,
                              extra={"variant": variant})
    model = acc.unwrap_model(model)
    model.eval()
    return TrainResult(out_dir=out_dir, metrics=log.read(), wall_time_s=wall, steps=final)


# --------------------------------------------------------------------------------------
# Stage 0: the backbone (notebook 02, ``python -m fmr1lib backbone``)
# --------------------------------------------------------------------------------------


def backbone_stage(p: Any, dsd: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """Build (tiny) or load (real) the backbone, warm it up (tiny), and save it.

    The tiny backbone stands in for an Instruct checkpoint: plain SFT on the ``warmup``
    split, which teaches the format and vocabulary without the shortcut cue.

    Args:
        p: ``BackboneParams``.
        dsd: the FocusShapes ``DatasetDict`` (loaded or built from ``p.data_params_file``
            when None).

    Returns:
        ``(model, processor, info)``; the backbone is saved under ``runs/<profile>/backbone/``.
    """
    from fmr1lib import config, data

    # Under ``accelerate launch`` every process runs this; only the main one writes.
    acc = make_accelerator(p, gradient_accumulation_steps=p.grad_accum)
    out = repro.run_dir(p, "backbone")
    if acc.is_main_process:
        repro.save_params(p, out)
    repro.seed_everything(p.seed)
    info: dict[str, Any] = {"model_name": p.model_name}
    t0 = time.perf_counter()
    if p.model_name == "tiny":
        data_p = config.load_params(config.DataParams, repro.resolve_path(p.data_params_file))
        if dsd is None:
            with acc.main_process_first():
                dsd = data.load_or_make(data_p)
        model, processor = modeling.build_tiny_backbone(p, data_p.colors, data_p.shapes, p.seed)
        if p.warmup:
            res = train_supervised(model, processor, dsd["warmup"], p, out / "warmup",
                                   variant="plain", accelerator=acc)
            info["warmup_wall_time_s"] = res.wall_time_s
            info["warmup_final_ce"] = res.metrics[-1]["ce"] if res.metrics else None
    else:
        model, processor = modeling.load_backbone(p.model_name, p)
    model.eval()
    info["parameters"] = modeling.count_parameters(model)
    info["vocab_size"] = len(processor.tokenizer)
    if acc.is_main_process:
        modeling.save_backbone(model, processor, out / "model")
        info["total_time_s"] = time.perf_counter() - t0
        repro.atomic_write_json(out / "info.json", info)
    acc.wait_for_everyone()  # no process reads the folder before it is complete
    return model, processor, info


def load_stage_backbone(p: Any) -> tuple[Any, Any]:
    """The backbone saved by ``backbone_stage`` for ``p``'s profile (clear error if missing)."""
    return modeling.load_saved_backbone(repro.run_dir(p, "backbone", create=False) / "model", p)


# --------------------------------------------------------------------------------------
# Stage 1 runs (notebook 03, ``python -m fmr1lib anchor``)
# --------------------------------------------------------------------------------------


def backbone_folder(p: Any) -> Path:
    """Folder of the profile's saved stage-0 backbone (``p.backbone_params_file`` names its params)."""
    from fmr1lib import config

    bp = config.load_params(config.BackboneParams, repro.resolve_path(p.backbone_params_file),
                            run_root=p.run_root, profile=p.profile)
    return repro.run_dir(bp, "backbone", create=False) / "model"


def ensure_backbone(p: Any) -> tuple[Any, Any]:
    """Load the profile's saved backbone, building it (notebook 02's step) if it is missing."""
    from fmr1lib import config

    bp = config.load_params(config.BackboneParams, repro.resolve_path(p.backbone_params_file),
                            run_root=p.run_root, profile=p.profile)
    folder = backbone_folder(p)
    if not (folder / "config.json").exists():
        logger.info("no backbone at %s: building it (notebook 02)", folder)
        backbone_stage(bp)
    return modeling.load_saved_backbone(folder, p)


def anchor_dir(p: Any, variant: str) -> Path:
    """``runs/<profile>/anchor/<variant>[_seed<k>]``; seed 0 keeps the plain name."""
    name = variant if p.seed == 0 else f"{variant}_seed{p.seed}"
    return repro.run_dir(p, "anchor", name)


def anchor_stage(p: Any, variant: str, dsd: Any = None) -> tuple[Any, Any, TrainResult]:
    """Train one stage-1 variant from the saved backbone and save the result.

    Args:
        p: ``AnchorParams``.
        variant: ``plain``, ``text_perception`` or ``focus_anchor``.
        dsd: the FocusShapes ``DatasetDict`` (loaded from the profile when None).

    Returns:
        ``(model, processor, result)``; the model is saved under ``anchor_dir(p, variant)/model``
        (merged weights when LoRA was used, so later stages load one folder).
    """
    # Under ``accelerate launch`` every process runs this; only the main one writes.
    acc = make_accelerator(p, gradient_accumulation_steps=p.grad_accum)
    dsd = stage_data(p, acc, dsd)
    out = anchor_dir(p, variant)
    if acc.is_main_process:
        repro.save_params(p, out)
    repro.seed_everything(p.seed)
    model, processor = ensure_backbone(p)
    model = prepare_trainable(model, p)
    result = train_supervised(model, processor, dsd[p.train_split], p, out, variant=variant,
                              lambda_attn=p.lambda_attn, attn_loss=p.attn_loss,
                              anchor_layers=p.anchor_layers, head_select=p.head_select,
                              smooth_sigma=p.smooth_sigma, accelerator=acc)
    model = save_stage(model, processor, p, acc, out, variant, result)
    return model, processor, result


def stage_data(p: Any, acc: Any = None, dsd: Any = None) -> Any:
    """``dsd``, or the FocusShapes ``DatasetDict`` named by ``p.data_params_file`` in ``p``'s
    profile (built if missing; under accelerate the main process builds it first)."""
    if dsd is not None:
        return dsd
    from fmr1lib import config, data

    dp = config.load_params(config.DataParams, repro.resolve_path(p.data_params_file),
                            run_root=p.run_root, profile=p.profile)
    with acc.main_process_first() if acc is not None else contextlib.nullcontext():
        return data.load_or_make(dp)


def prepare_trainable(model: Any, p: Any) -> Any:
    """LoRA-wrap the model (``p.lora``) or freeze its vision tower (``p.freeze_vision``)."""
    if p.lora:
        return modeling.wrap_lora(model, p)
    if p.freeze_vision:
        modeling.freeze_vision(model)
    return model


def save_stage(model: Any, processor: Any, p: Any, acc: Any, out: Path, variant: str,
               result: TrainResult) -> Any:
    """Save a trained stage under ``out``: the adapter (LoRA), the merged model in ``model/``
    and ``info.json``; the main process writes, every process waits for it.

    Returns:
        The model in eval mode (merged when LoRA was used).
    """
    if p.lora:
        if acc.is_main_process:
            model.save_pretrained(out / "adapter")  # the adapter alone, safetensors
        model = model.merge_and_unload()
    model.eval()
    if acc.is_main_process:
        modeling.save_backbone(model, processor, out / "model")
        repro.atomic_write_json(out / "info.json", {"variant": variant,
                                                    "wall_time_s": result.wall_time_s,
                                                    "steps": result.steps})
    acc.wait_for_everyone()  # the next stage loads this folder on every process
    return model


def load_anchor_model(p: Any, variant: str) -> tuple[Any, Any]:
    """A stage-1 model saved by ``anchor_stage`` (clear error naming notebook 03 if missing)."""
    folder = anchor_dir(p, variant) / "model"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no stage-1 model at {folder}: run notebooks/03_anchoring.ipynb")
    return modeling.load_saved_backbone(folder, p)
