"""Benchmark 4: the real Qwen2.5-VL-3B / 7B widths with two decoder layers, at 448 px.

The tiny backbone exercises every code path at hidden 128; this script runs them at the widths of
the real checkpoints, where shape assumptions, GQA ratios, the mrope split, the vision tower's
window attention and tied / untied heads are the real ones. The model is a randomly initialised
``Qwen2_5_VLForConditionalGeneration`` whose text and vision widths are those of the real config
(``real_config``), cut to 2 decoder layers and 2 vision blocks (block 1 full attention, block 0
window attention, as blocks 7/15/23/31 and the others of the real tower), with the locally trained
tokenizer and processor (``modeling.build_tokenizer``, ``modeling.build_processor``) and
``<Focus>`` added. fp32, on the first GPU if there is one, else the CPU. Phases, on FocusShapes
scenes of the profile's data file (448 px, 256 merged image tokens):

* ``capture_vs_eager``: the ``<Focus>`` row and the last 8 rows captured by
  ``attention.capture_attention`` (the path training uses) against eager attention with
  ``output_attentions=True`` on the same left-padded 448 px batch (docs/design.md §10.1: <= 1e-5);
* ``anchoring``: one ``anchoring.supervised_step`` (variant ``focus_anchor``, full fine-tuning,
  the profile's ``lambda_attn``, ``anchor_layers``, gradient checkpointing), batch 4: finite loss
  and changed parameters are checked;
* ``grpo``: one ``grpo.grpo_step``, variant ``faithful``, 2 prompts x 4 samples, 16 new tokens,
  LoRA as in the profile's stage-2 file (``stages.prepare_trainable``). A random model never
  answers correctly and the faithful reward scores correct trajectories only, so unless
  ``--true-accuracy`` is given every other completion of a group counts as correct
  (``rewards.accuracy_reward`` replaced for this step): the counterfactual pass on ``I'`` then
  runs for every group, and the accuracy advantages are not all zero;
* ``activations``: peak tensor memory of one forward + backward of one sequence of
  prompt + 256 tokens (stage 1: CE on the 256; stage 2: the GRPO training forward,
  ``batching.completion_logits`` + log-probs), LoRA r 64 on the profile's targets, vision frozen,
  with and without gradient checkpointing, at 2 and 4 decoder layers (the per-layer activation is
  half the difference), batch 1 and 2 (per sample vs fixed), with the local and the real
  vocabulary (the LM head and loss term);
  ``--skip-activations`` leaves it out;
* ``estimate``: parameter counts of the full real configs, built on the meta device (no memory),
  and the per-GPU memory estimate of ``params/accelerate/README.md`` from them and the measured
  activations.

Wall time and memory of each phase: tensor memory is the peak of tensor allocations during the
phase above what was allocated before (CPU: the torch profiler's allocation events, as
``common.peak_memory``; GPU: ``torch.cuda.max_memory_allocated``); the process's resident set is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak since the start, monotone) and psutil's
current RSS after the phase. On the CPU the wall times include the profiler's bookkeeping, which
is small next to the matmuls at these widths.

    python bench/real_width.py --width 3b                     # 10-20 min on 2 cores, peak RSS 7 GB
    python bench/real_width.py --width 7b --skip-activations  # about 4 min, peak RSS 12 GB
    python bench/real_width.py --width 7b                     # + about 20 min of activation runs
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

# common first: it silences tqdm, which torch imports.
try:
    from bench import common
except ImportError:  # run as a script: bench/ itself is on sys.path
    import common  # type: ignore[no-redef]

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from fmr1lib import (
    anchoring,
    attention,
    batching,
    config,
    data,
    grpo,
    modeling,
    occlusion,
    prompting,
    stages,
    train,
)

WIDTHS: dict[str, dict[str, Any]] = {
    # Text widths of the released config.json files (Qwen/Qwen2.5-VL-3B-Instruct, -7B-Instruct).
    "3b": {"profile": "qwen2_5_vl_3b", "hidden_size": 2048, "intermediate_size": 11008,
           "num_attention_heads": 16, "num_key_value_heads": 2, "num_hidden_layers": 36,
           "vocab_size": 151936, "tie_word_embeddings": True},
    "7b": {"profile": "qwen2_5_vl_7b", "hidden_size": 3584, "intermediate_size": 18944,
           "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28,
           "vocab_size": 152064, "tie_word_embeddings": False},
}
"""The text model of each checkpoint; head_dim is 128 in both (hidden / heads)."""

VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
          "patch_size": modeling.PATCH, "spatial_merge_size": modeling.MERGE,
          "temporal_patch_size": modeling.TEMPORAL_PATCH, "window_size": 112,
          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu"}
"""The vision tower of both checkpoints (their ``out_hidden_size`` is the text hidden size)."""

ROPE = {"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "rope_theta": 1000000.0}
"""Both checkpoints: mrope over (t, h, w) = 16 + 24 + 24 = head_dim / 2 rotary pairs."""

QWEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643,
            "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653}
"""Special-token ids of the real tokenizer (used for the meta-device parameter counts only)."""

LAYERS = 2
VISION_DEPTH = 2
IMAGE_SIZE = 448
MAX_PIXELS = 200704  # the profiles' image_max_pixels (448^2): 16 x 16 merged tokens
RESPONSE_TOKENS = 256  # the profiles' max_new_tokens
ANSWER_ROWS = 8
GRPO = {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 16}
GPU_GB = 80


# --------------------------------------------------------------------------------------
# Configs and models
# --------------------------------------------------------------------------------------


def real_config(width: str, num_layers: int | None = None, vision_depth: int | None = None,
                tokenizer: Any = None, vocab_size: int | None = None) -> Qwen2_5_VLConfig:
    """A ``Qwen2_5_VLConfig`` with the real checkpoint's widths.

    Args:
        width: ``3b`` or ``7b``.
        num_layers: decoder layers (default: the real count, 36 / 28).
        vision_depth: vision blocks (default 32). A cut tower keeps the real blocks' pattern
            (full attention at 7, 15, 23, 31; window attention elsewhere) and at least one
            full-attention block, its last.
        tokenizer: a tokenizer whose special-token ids the config takes, and its vocabulary
            size unless ``vocab_size`` is given; default the real ids and vocabulary.
        vocab_size: embedding rows (may exceed the tokenizer, as in the real checkpoints).
    """
    w = WIDTHS[width]
    depth = VISION["depth"] if vision_depth is None else vision_depth
    full = [i for i in VISION["fullatt_block_indexes"] if i < depth] or [depth - 1]
    if tokenizer is not None:
        tid = {t: tokenizer.convert_tokens_to_ids(t) for t in modeling.QWEN_SPECIAL_TOKENS}
        ids = {"bos_token_id": tid["<|endoftext|>"], "eos_token_id": tid["<|im_end|>"],
               "pad_token_id": tid["<|endoftext|>"], "image_token_id": tid["<|image_pad|>"],
               "video_token_id": tid["<|video_pad|>"],
               "vision_start_token_id": tid["<|vision_start|>"],
               "vision_end_token_id": tid["<|vision_end|>"]}
        vocab = vocab_size or len(tokenizer)
    else:
        ids, vocab = dict(QWEN_IDS), vocab_size or w["vocab_size"]
    token_ids = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    text = {"vocab_size": vocab, "hidden_size": w["hidden_size"],
            "intermediate_size": w["intermediate_size"],
            "num_hidden_layers": w["num_hidden_layers"] if num_layers is None else num_layers,
            "num_attention_heads": w["num_attention_heads"],
            "num_key_value_heads": w["num_key_value_heads"], "hidden_act": "silu",
            "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": w["tie_word_embeddings"], **ROPE, **token_ids}
    vision = {**VISION, "depth": depth, "fullatt_block_indexes": full,
              "out_hidden_size": w["hidden_size"]}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            tie_word_embeddings=w["tie_word_embeddings"], **ids)


def processor_for_bench() -> Any:
    """The repo's locally trained tokenizer and PIL processor, 448 px allowed (as the profiles)."""
    dp = data_params()
    tokenizer = modeling.build_tokenizer(modeling.tokenizer_corpus(dp.colors, dp.shapes), 1024)
    return modeling.build_processor(tokenizer, 3136, MAX_PIXELS)


def build_model(width: str, num_layers: int = LAYERS, vocab_size: int | None = None,
                seed: int = 0) -> tuple[Any, Any]:
    """A random real-width model with ``num_layers`` decoder layers and 2 vision blocks, fp32,
    SDPA, with the local tokenizer and ``<Focus>`` added; on :func:`common.device`."""
    processor = processor_for_bench()
    cfg = real_config(width, num_layers, VISION_DEPTH, processor.tokenizer, vocab_size)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.set_attn_implementation("sdpa")
    modeling.add_focus_token(model, processor)
    modeling.set_generation_defaults(model, processor)
    return model.to(common.device()), processor


def count_meta(width: str) -> dict[str, int]:
    """Parameter counts of the full real config (36 / 28 layers, vision depth 32, real vocab),
    built on the meta device: shapes only, nothing allocated.

    ``lora`` is what ``modeling.wrap_lora`` trains at the profile's ``lora_r`` and
    ``lora_targets``: ``r * (in + out)`` per targeted language-model linear, plus the trainable
    rows of the tokens ``add_focus_token`` adds (5; in the output head too when untied).
    """
    import re

    ap = anchor_params(width, lora=True)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(real_config(width))
    counts = modeling.count_parameters(model)
    pattern = re.compile(rf".*language_model.*\.({'|'.join(ap.lora_targets)})$")
    lora = sum(ap.lora_r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if pattern.match(n) and isinstance(m, torch.nn.Linear))
    heads = 1 if WIDTHS[width]["tie_word_embeddings"] else 2
    new_rows = len(prompting.TAG_TOKENS) * WIDTHS[width]["hidden_size"] * heads
    text = model.config.get_text_config()
    per_layer = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    embed = model.get_input_embeddings().weight.numel()
    counts.update(lora=lora, lora_new_token_rows=new_rows, decoder_layer=per_layer,
                  embedding=embed, lm_head=0 if heads == 1 else embed,
                  num_layers=text.num_hidden_layers, vocab_size=text.vocab_size)
    del model
    return counts


# --------------------------------------------------------------------------------------
# Parameters and data
# --------------------------------------------------------------------------------------


def _profile_file(width: str, name: str) -> str:
    return str(common.ROOT / "params" / WIDTHS[width]["profile"] / name)


def data_params(width: str = "3b") -> config.DataParams:
    return config.load_params(config.DataParams, _profile_file(width, "01_data_construction.yaml"))


# fp32 on the device, no mixed precision, no checkpoints or logs on disk; the rest as the files.
_RUN = {"dtype": "float32", "mixed_precision": "no", "checkpoint_every": 0, "resume": False,
        "image_max_pixels": MAX_PIXELS}


def anchor_params(width: str, **overrides: Any) -> config.AnchorParams:
    """The profile's stage-1 file, for one step: batch 4 in one micro-batch, full fine-tuning.

    ``grad_accum`` is 1: the files' ``grad_accum: 8`` with ``batch_size: 4`` splits 4 examples
    into 8 micro-batches, 4 of them empty (see the README of ``params/accelerate``).
    """
    base = {**_RUN, "lora": False, "freeze_vision": False, "batch_size": 4, "grad_accum": 1,
            "log_every": 1, "lr_warmup_steps": 0}
    base.update(overrides)
    return config.load_params(config.AnchorParams, _profile_file(width, "03_anchoring.yaml"),
                              **base)


def rl_params(width: str, **overrides: Any) -> config.RLParams:
    """The profile's stage-2 file (LoRA r 64, vision frozen), for one small step."""
    base = {**{k: v for k, v in _RUN.items() if k != "image_max_pixels"}, **GRPO,
            "log_every": 0, "n_show": 0, "reading_diagnostic": False}
    base.update(overrides)
    return config.load_params(config.RLParams, _profile_file(width, "04_counterfactual_rl.yaml"),
                              **base)


def make_rows(width: str, n: int) -> list[dict[str, Any]]:
    """``n`` FocusShapes training records of the profile's data file (448 px), with boxes."""
    ds = data.make_split(data_params(width), "train", n)
    rows = [ds[i] for i in range(len(ds))]
    if not all(r["evidence_boxes"] for r in rows):
        rows = [r for r in rows if r["evidence_boxes"]]
    return rows


# --------------------------------------------------------------------------------------
# Measuring a phase
# --------------------------------------------------------------------------------------


def rss_bytes() -> dict[str, int | None]:
    """Peak resident set since the start (``ru_maxrss``, KiB on Linux) and psutil's current RSS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        import psutil

        now = psutil.Process().memory_info().rss
    except ImportError:
        now = None
    return {"max_rss_bytes": peak, "rss_bytes": now}


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """The profiler's C++ side logs start/stop lines on stderr: keep them out of the output."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def measured(fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Run ``fn()`` once: its result, wall time, peak tensor bytes above the start, and RSS.

    The result is kept (unlike ``common.peak_memory``), so a result that holds tensors counts
    to the end of the phase.
    """
    gc.collect()
    dev = common.device()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base
        how = "torch.cuda.max_memory_allocated"
    else:
        from torch.profiler import ProfilerActivity, profile

        with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                         profile_memory=True) as prof:
            t0 = time.perf_counter()
            result = fn()
            wall = time.perf_counter() - t0
        events = sorted((e.start_ns(), i, e.nbytes()) for i, e in
                        enumerate(prof.profiler.kineto_results.events()) if e.name() == "[memory]")
        running = peak = 0
        for _, _, nbytes in events:
            running += nbytes
            peak = max(peak, running)
        how = "torch profiler allocation events"
    return result, {"wall_s": wall, "peak_tensor_bytes": int(peak), "tensor_memory": how,
                    **rss_bytes()}


def _params_snapshot(model: Any) -> dict[str, torch.Tensor]:
    """Copies of one tensor per part of the model (decoder, vision, merger, embedding)."""
    base = attention.unwrap_model(model)
    picks = {}
    for name, p in base.named_parameters():
        for part, key in (("decoder q_proj (layer 1)", "layers.1.self_attn.q_proj.weight"),
                          ("decoder mlp (layer 0)", "layers.0.mlp.down_proj.weight"),
                          ("vision block 0 qkv", "blocks.0.attn.qkv.weight"),
                          ("vision block 1 (full attention) mlp", "blocks.1.mlp.down_proj.weight"),
                          ("merger", "merger.mlp.0.weight"),
                          ("embedding", "embed_tokens.weight")):
            if name.endswith(key) and part not in picks:
                picks[part] = p.detach().clone()
    return picks


def _changes(model: Any, before: dict[str, torch.Tensor]) -> dict[str, float]:
    after = _params_snapshot(model)
    return {k: float((after[k] - v).abs().max()) for k, v in before.items()}


# --------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------


def capture_vs_eager(model: Any, processor: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Focus row + last 8 rows, every decoder layer: capture (SDPA) against eager attention."""
    enc = batching.encode_batch(rows, processor, "focus_anchor", with_response=True)
    dev = common.device()
    inputs = {k: v.to(dev) for k, v in enc.inputs.items()}
    seq = inputs["input_ids"].shape[1]
    batch = len(rows)
    tail = torch.arange(seq - ANSWER_ROWS, seq).expand(batch, ANSWER_ROWS)
    positions = torch.cat([enc.focus_pos[:, None], tail], dim=1).to(dev)
    layers = list(range(attention.num_text_layers(model)))
    model.eval()
    with torch.no_grad():
        out, rows_cap = attention.capture_attention(model, inputs, positions, layers=layers)
        logits_cap = out.logits.float()
        model.set_attn_implementation({"text_config": "eager"})
        try:
            ref = model(**inputs, output_attentions=True)
        finally:
            model.set_attn_implementation({"text_config": "sdpa"})
        maps = torch.stack(ref.attentions, dim=1).float().mean(dim=2)  # [B, L, S, S]
        index = positions[:, None, :, None].expand(-1, maps.shape[1], -1, maps.shape[-1])
        rows_eager = maps.gather(2, index)
    pad = (inputs["attention_mask"] == 0).sum(1).tolist()
    return {"batch": batch, "seq_len": seq, "left_padding": pad, "layers": layers,
            "query_rows": int(positions.shape[1]),
            "image_tokens_per_sample": int((inputs["input_ids"][0] == model.config.image_token_id).sum()),
            "image_grid_thw": inputs["image_grid_thw"].tolist(),
            "max_abs_diff_rows": float((rows_cap - rows_eager).abs().max()),
            "max_abs_diff_logits": float((logits_cap - ref.logits.float()).abs().max()),
            "row_sums_min": float(rows_cap.sum(-1).min()),
            "ok": bool((rows_cap - rows_eager).abs().max() <= 1e-5)}


def anchoring_step(width: str, model: Any, processor: Any,
                   rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``anchoring.supervised_step`` (focus_anchor, full fine-tuning) on 4 records."""
    p = anchor_params(width)
    variant = "focus_anchor"
    settings = anchoring.anchoring_settings(p, variant)
    acc = train.make_accelerator(p, gradient_accumulation_steps=p.grad_accum)
    state = train.setup_training(model, p, None, acc, micro_batch=p.batch_size // p.grad_accum)
    layers = attention.resolve_layers(settings["anchor_layers"], attention.num_text_layers(model))
    before = _params_snapshot(model)
    stats, _ = anchoring.supervised_step(state, 0, processor=processor, dataset=rows[:p.batch_size],
                                         params=p, variant=variant, settings=settings,
                                         layers=layers)
    changed = _changes(model, before)
    n_trainable = sum(t.numel() for t in state.trainable)
    del state
    finite = all(v is not None and math.isfinite(v) for v in (stats["ce"], stats["attn_loss"]))
    return {"variant": variant, "batch_size": p.batch_size, "lambda_attn": settings["lambda_attn"],
            "attn_loss_kind": settings["attn_loss"], "anchor_layers": layers,
            "gradient_checkpointing": p.gradient_checkpointing, "lr": p.lr,
            "trainable_params": n_trainable, "stats": stats, "loss_finite": finite,
            "max_abs_param_change": changed,
            "params_changed": all(v > 0 for v in changed.values()), "ok": finite and all(
                v > 0 for v in changed.values())}


def grpo_phase(width: str, model: Any, processor: Any, rows: list[dict[str, Any]],
               true_accuracy: bool) -> dict[str, Any]:
    """One ``grpo.grpo_step``, variant ``faithful``, LoRA as in the profile's stage-2 file."""
    p = rl_params(width)
    policy = stages.prepare_trainable(model, processor, p)
    ctx = grpo.setup_grpo(policy, processor, p, "faithful")
    n_trainable = sum(t.numel() for t in ctx.state.trainable)
    guard = contextlib.nullcontext() if true_accuracy else common.half_correct()
    with guard:
        stats, _ = grpo.grpo_step(ctx, rows, 0)
    del ctx
    keys = ("reward_mean", "accuracy", "format", "faithful_mean", "faithful_std",
            "n_faithful_distinct", "n_faithful_scored", "concentration", "s_t_mean",
            "region_share", "completion_len", "vision_token_rate", "entropy", "loss", "grad_norm",
            "lr", "rollout_s", "faithful_s", "step_s")
    row = {k: stats.get(k) for k in keys}
    finite = stats.get("loss") is not None and math.isfinite(stats["loss"])
    return {"variant": "faithful", **GRPO, "lora": p.lora, "lora_r": p.lora_r,
            "freeze_vision": p.freeze_vision, "gradient_checkpointing": p.gradient_checkpointing,
            "trainable_params": n_trainable, "reward_layers": attention.resolve_layers(
                p.reward.reward_layers, attention.num_text_layers(model)),
            "accuracy_stand_in": not true_accuracy, "stats": row, "loss_finite": finite,
            "faithful_pass_ran": bool(stats.get("n_faithful_distinct")),
            "ok": finite}


FAITHFUL_COST = {
    # name: (variant, occlusion_search, share_images)
    "grpo": ("grpo", None, True),
    "boxes": ("faithful", None, True),
    **{f"occlusion_{how}": ("faithful_occlusion", how, True) for how in occlusion.SEARCHES},
    "grpo_repeated": ("grpo", None, False),
}


def faithful_cost_phase(width: str, model: Any, processor: Any, rows: list[dict[str, Any]],
                        repeats: int) -> dict[str, Any]:
    """GRPO step time of each faithful variant (``FAITHFUL_COST``) over the plain step at 448
    px, on the LoRA policy of the profile's stage-2 file, every group scored
    (``common.half_correct``); ``grpo_repeated`` repeats the image per sample (the layout
    before images were encoded once). One untimed step first, then ``repeats`` interleaved rounds."""
    p = rl_params(width)
    policy = stages.prepare_trainable(model, processor, p)
    ctx = grpo.setup_grpo(policy, processor, p, "faithful")
    step = {"n": 0}
    faith: dict[str, list[float]] = {n: [] for n in FAITHFUL_COST}

    def make(name: str) -> Callable[[], Any]:
        variant, how, share = FAITHFUL_COST[name]

        def call() -> Any:
            ctx.variant, ctx.share_images = variant, share
            ctx.params = config.replace_values(p, **({"occlusion_search": how} if how else {}))
            stats, _ = grpo.grpo_step(ctx, rows, step["n"])
            step["n"] += 1
            return stats
        return call

    def record(name: str, stats: Any) -> None:
        faith[name].append(stats["faithful_s"])

    with common.half_correct():
        make("grpo")()  # warm-up
        times = common.interleaved({n: make(n) for n in FAITHFUL_COST}, repeats=repeats, warmup=0,
                                   on_result=record)
    med = {n: common.median(t) for n, t in times.items()}
    return {"median_s": med, "times_s": times,
            "added": {n: med[n] / med["grpo"] - 1.0 for n in FAITHFUL_COST},
            "faithful_s": {n: common.median(v) for n, v in faith.items()},
            "repeats": repeats, **GRPO}


# --------------------------------------------------------------------------------------
# Activation memory per layer and of the head (for the estimate)
# --------------------------------------------------------------------------------------


def _sequence(rows: list[dict[str, Any]], processor: Any, n_tokens: int, batch: int = 1) -> Any:
    """``batch`` copies of one prompt (448 px image) + ``n_tokens`` completion tokens (plain
    words, no EOS), as GRPO builds a group."""
    tok = processor.tokenizer
    word = tok(" circle", add_special_tokens=False)["input_ids"]
    comp = (word * n_tokens)[:n_tokens]
    return batching.build_sequences(rows[:1], [[comp] * batch], processor).to(common.device())


def _fwd_bwd(model: Any, seq: Any, stage: int) -> Callable[[], float]:
    """Forward + backward: stage 1 CE on the completion (the model's own loss, logits over the
    whole sequence), stage 2 the GRPO training forward (``completion_logits`` + log-probs)."""
    def run() -> float:
        t = seq.completion_ids.shape[1]
        if stage == 1:
            labels = seq.inputs["input_ids"].clone()
            labels[:, :-t] = -100
            loss = model(**seq.inputs, labels=labels).loss
        else:
            logits = batching.completion_logits(model, seq.inputs, t)
            logp = batching.token_logprobs(logits, seq.completion_ids, seq.completion_mask)
            loss = -logp.sum() / seq.completion_mask.sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())
    return run


def activations(width: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Peak tensor bytes of one forward + backward of prompt + 256 tokens, LoRA r 64 on the
    profile's targets (``stages.prepare_trainable``), vision frozen: at 2 and 4 decoder layers,
    batch 1 and 2, checkpointing on (and off, small vocabulary, batch 1), with the local
    vocabulary and with the real one."""
    p = rl_params(width)
    runs: list[dict[str, Any]] = []
    for layers, vocab in ((LAYERS, None), (2 * LAYERS, None),
                          (LAYERS, WIDTHS[width]["vocab_size"])):
        model, processor = build_model(width, layers, vocab_size=vocab)
        model = stages.prepare_trainable(model, processor, p)
        model.train()
        base = attention.unwrap_model(model)
        plan = [(True, 1)] + ([(True, 2)] if layers == LAYERS else [])
        plan += [(False, 1)] if vocab is None else []
        for checkpointing, batch in plan:
            if checkpointing:
                base.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_disable()
            seq = _sequence(rows, processor, RESPONSE_TOKENS, batch)
            for stage in (1, 2):
                fn = _fwd_bwd(model, seq, stage)
                fn()  # lazy first-call allocations must not count
                _, m = measured(fn)
                runs.append({"layers": layers, "vocab": vocab or len(processor.tokenizer),
                             "real_vocab": vocab is not None, "batch": batch,
                             "gradient_checkpointing": checkpointing, "stage": stage,
                             "seq_len": int(seq.inputs["input_ids"].shape[1]),
                             "completion_tokens": RESPONSE_TOKENS, **m})
                print(f"  activations: layers {layers}, vocab {runs[-1]['vocab']}, batch {batch}, "
                      f"checkpointing {checkpointing}, stage {stage}: "
                      f"{m['peak_tensor_bytes'] / 2**20:.1f} MiB peak, {m['wall_s']:.1f} s",
                      flush=True)
            del seq
        del model
        gc.collect()
    return {"runs": runs, **_decompose(runs)}


def _decompose(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Fit ``M(L, V, B) = fixed(V) + B * (L * layer + rest + head(V))`` to the runs (bytes, fp32).

    ``layer`` from the 4 - 2 layer difference at batch 1; the per-sample total at 2 layers from
    the batch 2 - 1 difference; ``fixed`` is what does not grow with the batch (at the real
    vocabulary mostly the embedding copies of peft's trainable tokens, one per forward).
    """
    def peak(stage: int, layers: int, batch: int, real: bool, gcp: bool = True) -> int | None:
        for r in runs:
            if (r["stage"], r["layers"], r["batch"], r["real_vocab"],
                    r["gradient_checkpointing"]) == (stage, layers, batch, real, gcp):
                return r["peak_tensor_bytes"]
        return None

    out: dict[str, Any] = {}
    for stage in (1, 2):
        layer = (peak(stage, 2 * LAYERS, 1, False) - peak(stage, LAYERS, 1, False)) / LAYERS
        d_small = peak(stage, LAYERS, 2, False) - peak(stage, LAYERS, 1, False)
        d_real = peak(stage, LAYERS, 2, True) - peak(stage, LAYERS, 1, True)
        nogc2, nogc4 = peak(stage, LAYERS, 1, False, False), peak(stage, 2 * LAYERS, 1, False, False)
        out[f"stage{stage}"] = {
            "per_layer_bytes": layer,
            "per_layer_no_checkpointing_bytes": (nogc4 - nogc2) / LAYERS if nogc2 and nogc4 else None,
            "per_sample_rest_bytes": d_small - LAYERS * layer,
            "per_sample_head_bytes": d_real - d_small,
            "fixed_real_vocab_bytes": peak(stage, LAYERS, 1, True) - d_real,
            "fixed_small_vocab_bytes": peak(stage, LAYERS, 1, False) - d_small}
    return out


# --------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------


def estimate(width: str, counts: dict[str, int], act: dict[str, Any] | None,
             prompt_len: int) -> dict[str, Any]:
    """Per-GPU memory of stage 1 (batch 4) and stage 2 (8 x 8 = 64 sequences), in GB (1e9).

    Activations (``_decompose``): ``fixed + batch * (layers * per_layer + rest + head)``, the
    fp32 figures measured on 2 and 4 layers halved for bf16, except the per-sample head term
    (logits and log-softmax over the vocabulary, which the code computes in fp32), as measured.
    """
    gb = 1e9
    n, n_lora = counts["total"], counts["lora"] + counts["lora_new_token_rows"]
    layers = counts["num_layers"]
    w = WIDTHS[width]
    kv_per_token = 2 * layers * w["num_key_value_heads"] * 128 * 2  # K and V, bf16
    seq = prompt_len + RESPONSE_TOKENS
    states = {
        "lora": 2 * n + 16 * n_lora,               # bf16 base; fp32 adapter, grad, m, v
        "ddp_full_bf16": 8 * n,                    # bf16 weights, grads, AdamW m, v (as loaded)
        "ddp_full_fp32_master": 16 * n,            # + fp32 master, fp32 m, v
        "fsdp8": 16 * n / 8,                       # fp32 sharded params, grads, m, v
        "zero3_8": 16 * n / 8,                     # bf16 params + grads, fp32 master, m, v
    }
    out: dict[str, Any] = {"params": counts, "prompt_len": prompt_len, "seq_len": seq,
                           "kv_cache_bytes_per_token": kv_per_token,
                           "states_gb": {k: v / gb for k, v in states.items()}}
    if act is None:
        return out
    per_sample = {}
    for stage in (1, 2):
        m = act[f"stage{stage}"]
        nogc = m["per_layer_no_checkpointing_bytes"]
        s = {"per_layer_gb": 0.5 * m["per_layer_bytes"] / gb,
             "rest_gb": 0.5 * m["per_sample_rest_bytes"] / gb,
             "head_gb": m["per_sample_head_bytes"] / gb,
             "fixed_gb": 0.5 * m["fixed_real_vocab_bytes"] / gb,
             "per_layer_no_checkpointing_gb": 0.5 * nogc / gb if nogc else None}
        s["sample_gb"] = layers * s["per_layer_gb"] + s["rest_gb"] + s["head_gb"]
        per_sample[stage] = s
    batches = {1: 4, 2: 64}
    rows = []
    for cfgname in ("lora", "ddp_full_bf16", "ddp_full_fp32_master", "fsdp8", "zero3_8"):
        for stage in (1, 2):
            b = batches[stage]
            act_gb = per_sample[stage]["fixed_gb"] + b * per_sample[stage]["sample_gb"]
            total = states[cfgname] / gb + act_gb
            rows.append({"config": cfgname, "stage": stage, "batch": b,
                         "states_gb": states[cfgname] / gb, "activations_gb": act_gb,
                         "total_gb": total, "fits_80gb": total <= 0.9 * GPU_GB})
    out.update(per_sample=per_sample, rows=rows,
               rollout_kv_cache_gb=batches[2] * seq * kv_per_token / gb)
    return out


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the phases, print the summary, write ``runs/bench/real_width_<width>.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", choices=sorted(WIDTHS), default="3b")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default, i.e. OMP_NUM_THREADS)")
    parser.add_argument("--skip-activations", action="store_true",
                        help="leave out the 2- vs 4-layer activation runs")
    parser.add_argument("--true-accuracy", action="store_true",
                        help="GRPO step with the real accuracy reward (the faithful pass then "
                             "runs only if the random model answers correctly)")
    parser.add_argument("--faithful-cost", type=int, default=0, metavar="REPEATS",
                        help="only build the model and time the faithful reward's variants "
                             "(boxes, each occlusion search) against the plain GRPO step, "
                             "REPEATS interleaved rounds; writes real_width_<width>_faithful_cost.json")
    args = parser.parse_args(argv)
    common.setup(args.threads)
    t_all = time.perf_counter()
    width = args.width
    phases: dict[str, Any] = {}
    print(f"real widths {width}: {LAYERS} decoder layers, {VISION_DEPTH} vision blocks, "
          f"{IMAGE_SIZE} px, on {common.device_name()}", flush=True)

    (model, processor), phases["build"] = measured(lambda: build_model(width))
    rows = make_rows(width, 8)
    phases["build"].update(modeling.count_parameters(model))
    phases["build"]["vocab"] = len(processor.tokenizer)
    phases["build"]["fullatt_block_indexes"] = list(model.config.vision_config.fullatt_block_indexes)
    print(f"build: {phases['build']['wall_s']:.1f} s, {phases['build']['total'] / 1e6:.1f} M "
          f"params", flush=True)
    if args.faithful_cost:
        return _faithful_cost_main(width, model, processor, rows, args.faithful_cost, t_all)

    res, m = measured(lambda: capture_vs_eager(model, processor, rows[:2]))
    phases["capture_vs_eager"] = {**res, **m}
    print(f"capture vs eager: max |diff| rows {res['max_abs_diff_rows']:.2e}, logits "
          f"{res['max_abs_diff_logits']:.2e}, seq {res['seq_len']}, {m['wall_s']:.1f} s",
          flush=True)

    res, m = measured(lambda: anchoring_step(width, model, processor, rows))
    phases["anchoring"] = {**res, **m}
    st = res["stats"]
    print(f"anchoring: ce {st['ce']:.4f}, attn_loss {st['attn_loss']:.4f}, grad_norm "
          f"{st['grad_norm']:.3g}, params changed {res['params_changed']}, {m['wall_s']:.1f} s",
          flush=True)

    res, m = measured(lambda: grpo_phase(width, model, processor, rows, args.true_accuracy))
    phases["grpo"] = {**res, **m}
    st = res["stats"]
    print(f"grpo (faithful): loss {st['loss']}, faithful passes {st['n_faithful_distinct']}, "
          f"{m['wall_s']:.1f} s", flush=True)
    model = None  # the activation runs build their own models
    gc.collect()

    act = None
    if not args.skip_activations:
        act, m = measured(lambda: activations(width, rows))
        phases["activations"] = {**act, **{k: v for k, v in m.items() if k != "peak_tensor_bytes"}}
    prompt_len = int(batching.encode_batch(rows[:1], processor, "plain",
                                           with_response=False).inputs["input_ids"].shape[1])
    est = estimate(width, count_meta(width), act, prompt_len)

    header = ["phase", "wall s", "peak tensor MiB", "max RSS MiB", "RSS after MiB", "check"]
    checks = {
        "build": f"{phases['build']['total'] / 1e6:.1f} M params",
        "capture_vs_eager": f"max |capture - eager| {phases['capture_vs_eager']['max_abs_diff_rows']:.1e}",
        "anchoring": "finite loss, params changed" if phases["anchoring"]["ok"] else "FAILED",
        "grpo": (f"ran, {phases['grpo']['stats']['n_faithful_distinct']} faithful passes"
                 if phases["grpo"]["ok"] else "FAILED"),
        "activations": "see per-layer figures",
    }
    table_rows = [[name, f"{ph['wall_s']:.1f}", _mib(ph.get("peak_tensor_bytes")),
                   _mib(ph["max_rss_bytes"]), _mib(ph["rss_bytes"]), checks[name]]
                  for name, ph in phases.items()]
    title = (f"Real widths {width} ({LAYERS} decoder layers, {VISION_DEPTH} vision blocks, "
             f"{IMAGE_SIZE} px, fp32) on {common.device_name()}")
    text = common.table(title, header, table_rows)
    print("\n" + text)
    print("\ngrpo stats: " + ", ".join(f"{k}={common.fmt(v, '.4g')}"
                                       for k, v in phases["grpo"]["stats"].items()))
    if act is not None:
        ps = est["per_sample"]
        print("\nper sample (bf16 = measured fp32 / 2; head as measured), GB: " + "; ".join(
            f"stage {s}: layer {v['per_layer_gb']:.4f} (no checkpointing "
            f"{common.fmt(v['per_layer_no_checkpointing_gb'], '.4f')}), rest {v['rest_gb']:.3f}, "
            f"head {v['head_gb']:.3f}, sample {v['sample_gb']:.3f}, fixed {v['fixed_gb']:.3f}"
            for s, v in ps.items()))
        est_text = common.table(
            f"Estimate per GPU ({width}, {est['params']['num_layers']} layers), GB",
            ["config", "stage", "batch", "states", "activations", "total", f"<= 0.9 x {GPU_GB}"],
            [[r["config"], r["stage"], r["batch"], r["states_gb"], r["activations_gb"],
              r["total_gb"], "yes" if r["fits_80gb"] else "no"] for r in est["rows"]])
        print("\n" + est_text)
    print(f"\nparameters (meta device, real config): {est['params']}")
    wall = time.perf_counter() - t_all
    path = common.write_json(f"real_width_{width}", {
        "width": width, "layers": LAYERS, "vision_depth": VISION_DEPTH, "image_px": IMAGE_SIZE,
        "dtype": "float32", "phases": phases, "estimate": est, "table": text, "wall_s": wall})
    print(f"\n{wall:.0f} s; wrote {path}")
    return {"phases": phases, "estimate": est}


def _faithful_cost_main(width: str, model: Any, processor: Any, rows: list[dict[str, Any]],
                        repeats: int, t_all: float) -> dict[str, Any]:
    res = faithful_cost_phase(width, model, processor, rows, repeats)
    lines = [[n, res["median_s"][n], res["added"][n], res["faithful_s"][n]] for n in FAITHFUL_COST]
    text = common.table(
        f"Faithful reward cost per GRPO step at the {width} widths ({LAYERS} decoder layers, "
        f"{VISION_DEPTH} vision blocks, {IMAGE_SIZE} px, LoRA, {GRPO['prompts_per_step']} x "
        f"{GRPO['group_size']} samples, every group scored) on {common.device_name()}; median of "
        f"{repeats}", ["variant", "step s", "added", "faithful s"], lines)
    print("\n" + text)
    wall = time.perf_counter() - t_all
    path = common.write_json(f"real_width_{width}_faithful_cost", {
        "width": width, "layers": LAYERS, "vision_depth": VISION_DEPTH, "image_px": IMAGE_SIZE,
        **res, "table": text, "wall_s": wall})
    print(f"\n{wall:.0f} s; wrote {path}")
    return res


if __name__ == "__main__":
    main()
