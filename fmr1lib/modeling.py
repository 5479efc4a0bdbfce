"""Backbones: the tiny Qwen2.5-VL built locally, real checkpoints, ``<Focus>``, LoRA, geometry.

* ``build_tiny_backbone``: a byte-level BPE tokenizer trained on the FocusShapes vocabulary,
  a Qwen2.5-VL processor that works without torchvision, and a randomly initialised
  ``Qwen2_5_VLForConditionalGeneration`` from a small config: the same class and code path
  as the real 3B/7B models, with no network at all.
* ``load_backbone``: the real path (hub id or local folder) through ``from_pretrained``,
  then ``add_focus_token``.
* Geometry (docs/design.md §4): Qwen2.5-VL resizes an image so both sides are multiples of
  28 (patch 14 x merge 2); ``image_grid_thw = (1, Hr/14, Wr/14)`` and the k-th
  ``<|image_pad|>`` of an image is the merged cell ``(k // (Wr/28), k % (Wr/28))``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
)

from fmr1lib import prompting
from fmr1lib.config import ModelParams

logger = logging.getLogger(__name__)

PATCH, MERGE, TEMPORAL_PATCH = 14, 2, 2
CELL = PATCH * MERGE
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen-style chat template (the real checkpoints bring their own)."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------
# Tokenizer and processor
# --------------------------------------------------------------------------------------


def tokenizer_corpus(colors: Iterable[str] = (), shapes: Iterable[str] = ()) -> list[str]:
    """Texts the tiny tokenizer is trained on: prompts, questions, answers, templates."""
    colors = list(colors) or ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink"]
    shapes = list(shapes) or ["circle", "square", "triangle", "diamond", "cross"]
    positions = ["top left", "top right", "bottom left", "bottom right", "top", "bottom", "left",
                 "right", "center"]
    lines = [prompting.SYSTEM_PROMPT, "system", "user", "assistant", "object", "objects",
             "look at the image", "find", "check", "locate", "yes", "no", "the", "and", "a"]
    for c in colors:
        for s in shapes:
            lines += [f"What color is the {s}?", f"What shape is the {c} object?",
                      f"How many {c} shapes are there?", f"Is there a {c} {s}?",
                      f"look at the {s}", f"look at the {c} object", f"look at a {c} {s}",
                      f"find the {s}", f"check the {s}", f"locate the {s}",
                      f"the {c} {s}", f"the {c} shapes"]
            lines += [f"the {c} {s}, {p}" for p in positions]
        lines += [c, f" {c}", f"{c}."]
    for s1 in shapes:
        lines += [s1, f" {s1}"]
        for s2 in shapes:
            lines += [f"Is the {s1} left of the {s2}?", f"look at the {s1} and the {s2}"]
    lines += [str(i) for i in range(20)]
    # Both routes of ``two_route`` reasoning (``prompting.route_think``), so that neither is
    # spelled in single characters: the cue route's names were missing, which made it twice as
    # many tokens as the evidence route and filled the faithful reward's top-kappa slots with
    # near-zero-dependency characters (docs/design.md §6.6).
    answers = colors + shapes + ["yes", "no"] + [str(i) for i in range(10)]
    subjects = [f"the {s}" for s in shapes] + [f"the {c} object" for c in colors] + [
        f"the {c} shapes" for c in colors] + [f"a {c} {s}" for c in colors for s in shapes]
    lines += [f"{subj} is {a}" for subj in subjects for a in answers]
    lines += [f"{name} is {v}" for name in prompting.CUE_NAMES.values() for v in colors + shapes]
    # Repeat so the answer words become single merged tokens.
    return lines * 4


def build_tokenizer(corpus: Sequence[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus``, with Qwen's special tokens and tags.

    Args:
        corpus: training texts.
        vocab_size: requested size; BPE on a small corpus stops below it (docs/design.md §10.3).

    Returns:
        A left-padding ``PreTrainedTokenizerFast`` with the chat template set.
    """
    special = list(QWEN_SPECIAL_TOKENS) + list(prompting.TAG_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None, padding_side="left",
        additional_special_tokens=list(prompting.TAG_TOKENS) + list(VISION_TOKENS),
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


class TinyQwenProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without a video processor (which needs torchvision).

    The stock processor insists on its ``video_processor`` argument; images are all
    this project feeds it.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor=image_processor, tokenizer=tokenizer,
                         video_processor=None, chat_template=chat_template, **kwargs)

    @classmethod
    def get_attributes(cls) -> list[str]:  # only what we have
        return ["image_processor", "tokenizer"]


def build_processor(tokenizer: PreTrainedTokenizerFast, min_pixels: int,
                    max_pixels: int) -> TinyQwenProcessor:
    """A Qwen2.5-VL processor (PIL image processor, no torchvision) around ``tokenizer``."""
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                               patch_size=PATCH, merge_size=MERGE,
                                               temporal_patch_size=TEMPORAL_PATCH)
    return TinyQwenProcessor(image_processor=image_processor, tokenizer=tokenizer,
                             chat_template=CHAT_TEMPLATE)


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def tiny_config(params: ModelParams, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    """A small ``Qwen2_5_VLConfig`` whose special-token ids match ``tokenizer``."""
    head_dim = params.hidden_size // params.num_heads
    half = head_dim // 2
    # mrope_section splits the rotary half-dimension into (t, h, w) and must sum to head_dim/2.
    section = [half - 2 * (half // 4), half // 4, half // 4]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": params.hidden_size,
        "intermediate_size": params.intermediate_size,
        "num_hidden_layers": params.num_layers,
        "num_attention_heads": params.num_heads,
        "num_key_value_heads": params.num_kv_heads,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "mrope_section": section},
        "tie_word_embeddings": True,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": params.vision_depth,
        "hidden_size": params.vision_hidden,
        "intermediate_size": 2 * params.vision_hidden,
        "num_heads": params.vision_heads,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": TEMPORAL_PATCH,
        "window_size": 112,
        "out_hidden_size": params.hidden_size,
        "fullatt_block_indexes": [params.vision_depth - 1],
    }
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def build_tiny_backbone(params: ModelParams, colors: Iterable[str] = (), shapes: Iterable[str] = (),
                        seed: int = 0) -> tuple[Qwen2_5_VLForConditionalGeneration, TinyQwenProcessor]:
    """Tokenizer, processor and a randomly initialised tiny Qwen2.5-VL, all built locally.

    Returns:
        ``(model, processor)``; the model is in train mode, fp32 unless ``params.dtype`` says
        otherwise, with ``params.attn_implementation``.
    """
    tokenizer = build_tokenizer(tokenizer_corpus(colors, shapes), params.vocab_size)
    processor = build_processor(tokenizer, params.image_min_pixels, params.image_max_pixels)
    config = tiny_config(params, tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.set_attn_implementation(params.attn_implementation)
    model.to(DTYPES[params.dtype])
    set_generation_defaults(model, processor)
    return model, processor


# Decoding settings a checkpoint's ``generation_config.json`` may carry (Qwen2.5-VL-Instruct
# ships ``top_k=1``, ``top_p=0.001``, ``repetition_penalty=1.05``, ``temperature=0.1``). None of
# them may reach a rollout or an evaluation: ``set_generation_defaults`` drops them and
# ``generate`` sets every one of them itself (``decoding_kwargs``).
INHERITED_DECODING = ("do_sample", "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p",
                      "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
                      "encoder_repetition_penalty", "no_repeat_ngram_size", "min_length",
                      "min_new_tokens", "num_beams", "length_penalty", "bad_words_ids",
                      "sequence_bias", "begin_suppress_tokens", "forced_bos_token_id",
                      "forced_eos_token_id", "exponential_decay_length_penalty", "guidance_scale",
                      "diversity_penalty", "renormalize_logits")
"""``GenerationConfig`` fields that change which token is emitted."""


def set_generation_defaults(model: Any, processor: Any) -> None:
    """A clean generation config: stop at ``<|im_end|>``, pad with the tokenizer's pad id, and
    none of the checkpoint's decoding settings (``INHERITED_DECODING``; they are logged)."""
    from transformers import GenerationConfig

    tok = processor.tokenizer
    old = model.generation_config.to_diff_dict() if model.generation_config is not None else {}
    dropped = {k: v for k, v in old.items() if k in INHERITED_DECODING and v is not None}
    if dropped:
        logger.info("generation config: dropped the checkpoint's decoding settings %s", dropped)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
        bos_token_id=None)


def add_focus_token(model: Any, processor: Any) -> list[str]:
    """Add ``<Focus>`` and the tag tokens where missing; new embedding rows = mean of the old.

    Returns:
        The tokens that were added (empty if all were there).
    """
    tok = processor.tokenizer
    vocab = tok.get_vocab()
    missing = [t for t in prompting.TAG_TOKENS if t not in vocab]
    n_tok_old = len(tok)
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing},
                               replace_extra_special_tokens=False)
    n_old = model.get_input_embeddings().weight.shape[0]
    # Real checkpoints pad the embedding beyond the tokenizer (Qwen2.5-VL-3B: 151936 rows for
    # 151665 tokens), so added ids can land on untrained padding rows without any resize:
    # initialise the added ids' rows as well as any rows the resize creates.
    new_rows = sorted(set(tok.convert_tokens_to_ids(missing)) | set(range(n_old, len(tok))))
    if len(tok) > n_old:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    if new_rows:
        n_src = min(n_tok_old, n_old)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[new_rows] = emb[:n_src].mean(0, keepdim=True)
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != emb.data_ptr():
                out.weight[new_rows] = out.weight[:n_src].mean(0, keepdim=True)
    if missing:
        logger.info("added tokens %s (embeddings: mean of existing rows)", missing)
    return missing


def load_backbone(name_or_path: str, params: ModelParams) -> tuple[Any, Any]:
    """Load a real Qwen2.5-VL (hub id or local folder) and add ``<Focus>``.

    ``trust_remote_code`` stays off unless ``params.trust_remote_code`` is set; weights are
    read from safetensors only.
    """
    kw = {"trust_remote_code": params.trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(name_or_path, min_pixels=params.image_min_pixels,
                                                  max_pixels=params.image_max_pixels, **kw)
    except (ImportError, ValueError, TypeError) as exc:
        # No torchvision: fall back on the PIL image processor and no video processor.
        logger.info("AutoProcessor failed (%s); using the PIL processor", exc)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name_or_path, padding_side="left", **kw)
        processor = build_processor(tokenizer, params.image_min_pixels, params.image_max_pixels)
        if getattr(tokenizer, "chat_template", None):
            processor.chat_template = tokenizer.chat_template
    processor.tokenizer.padding_side = "left"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        name_or_path, dtype=DTYPES[params.dtype], attn_implementation=params.attn_implementation,
        use_safetensors=True, **kw)
    add_focus_token(model, processor)
    set_generation_defaults(model, processor)
    return model, processor


def load_processor(folder: str | Path) -> Any:
    """Load a processor saved by ``save_backbone`` (tiny or real)."""
    folder = Path(folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    ip = Qwen2VLImageProcessorPil.from_pretrained(folder)
    proc = TinyQwenProcessor(image_processor=ip, tokenizer=tokenizer,
                             chat_template=tokenizer.chat_template or CHAT_TEMPLATE)
    return proc


def save_backbone(model: Any, processor: Any, folder: str | Path,
                  state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save model (safetensors) and processor; written to a temp folder, then swapped in.

    The temp folder is fsynced before the swap (``repro.swap_folder``) and gets the umask's
    permissions; temp folders of killed saves (``.<name>.*``) are deleted first, and a swap
    killed between its renames is undone (``repro.recover_interrupted_swap``).

    Args:
        state_dict: the weights to write instead of ``model``'s own (under FSDP / ZeRO-3: the
            full state gathered from every process's shard, ``train.full_state_dict``).
    """
    from fmr1lib import repro

    folder = Path(folder)
    with repro.staged_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        processor.tokenizer.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)
    return folder


def load_saved_backbone(folder: str | Path, params: ModelParams) -> tuple[Any, Any]:
    """Load a backbone written by ``save_backbone`` (safetensors, no remote code).

    Raises:
        FileNotFoundError: no ``config.json`` in ``folder``, or no safetensors weights (a
            ``.bin`` / pickle checkpoint is never loaded); the message names the folder.
    """
    from fmr1lib import repro

    folder = Path(folder)
    repro.recover_interrupted_swap(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no backbone at {folder}: run notebooks/02_backbone.ipynb "
                                f"(or `python -m fmr1lib backbone --params ...`)")
    if not any(folder.glob("*.safetensors")):
        others = sorted(f.name for f in folder.iterdir()
                        if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        found = f" (found {', '.join(others)})" if others else ""
        raise FileNotFoundError(
            f"no safetensors weights in {folder}{found}: only safetensors are loaded, never "
            f"pickle (.bin) checkpoints; convert the weights to safetensors "
            f"(save_pretrained(..., safe_serialization=True))")
    processor = load_processor(folder)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        folder, dtype=DTYPES[params.dtype], attn_implementation=params.attn_implementation,
        use_safetensors=True, trust_remote_code=False)
    set_generation_defaults(model, processor)
    return model, processor


def new_token_ids(processor: Any) -> list[int]:
    """Ids of the tokens ``add_focus_token`` adds: ``<Focus>`` and the tag tokens."""
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(list(prompting.TAG_TOKENS))
    if tok.unk_token_id is not None and tok.unk_token_id in ids:
        raise ValueError(f"tokenizer lacks some of {prompting.TAG_TOKENS}: run add_focus_token first")
    return ids


def wrap_lora(model: Any, params: ModelParams, processor: Any) -> Any:
    """LoRA adapters on the language model's ``params.lora_targets`` (vision tower untouched),
    and the new tokens' embedding rows trainable.

    The regex keeps the vision tower's modules (which share names like ``qkv``/``proj``)
    out; whether the vision tower trains is ``params.freeze_vision``. ``<Focus>`` and the tag
    tokens start as identical rows (the mean of the old ones, ``add_focus_token``) and the model
    must emit the tags, so their rows train under LoRA: in the input embedding, and in the output
    head when it is not tied to it (7B), through peft's trainable tokens; all other rows stay
    frozen. ``merge_and_unload`` writes the trained rows into the merged model.
    """
    from peft import LoraConfig, get_peft_model

    targets = "|".join(params.lora_targets)
    ids = new_token_ids(processor)
    embed = _module_name(model, model.get_input_embeddings())
    rows = {embed: ids}
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        rows[_module_name(model, head)] = ids
    # A trained vision tower is saved with the adapter (modules_to_save), so that the
    # adapter folder alone reproduces the model.
    cfg = LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha,
                     lora_dropout=params.lora_dropout,
                     target_modules=rf".*language_model.*\.({targets})$",
                     modules_to_save=None if params.freeze_vision else ["visual"],
                     trainable_token_indices=rows)
    return get_peft_model(model, cfg)


def _module_name(model: Any, module: Any) -> str:
    """The qualified name of ``module`` inside ``model``."""
    return next(n for n, m in model.named_modules() if m is module)


def freeze_vision(model: Any, freeze: bool = True) -> None:
    """Set ``requires_grad`` of the vision tower (and merger) to ``not freeze``."""
    for name, p in model.named_parameters():
        if ".visual." in f".{name}" or name.startswith("visual."):
            p.requires_grad_(not freeze)


def count_parameters(model: Any) -> dict[str, int]:
    """Total, trainable, vision-tower and language-model parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vision = sum(p.numel() for n, p in model.named_parameters() if "visual" in n)
    return {"total": total, "trainable": trainable, "vision": vision, "language": total - vision}


# --------------------------------------------------------------------------------------
# Inputs and generation
# --------------------------------------------------------------------------------------


def vision_token_ids(processor: Any) -> list[int]:
    """Ids that generation must never emit (image/video pads, vision start/end)."""
    return [processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]


GREEDY_TOP_K = 50
"""The ``top_k`` passed with greedy decoding: transformers' own default, which it does not flag as
a sampling-only setting (greedy decoding takes the argmax and never applies it)."""


def decoding_kwargs(do_sample: bool, temperature: float = 1.0, top_p: float = 1.0,
                    top_k: int = 0, min_new_tokens: int = 0) -> dict[str, Any]:
    """Every ``generate`` argument that decides which token is emitted, set explicitly.

    ``transformers`` fills each decoding field left at ``None`` from the model's
    ``generation_config`` and then from its own defaults (``top_k=50``), so a field not passed
    here is a field the checkpoint decides. Sampling therefore draws from exactly
    ``softmax(logits / temperature)`` (restricted by ``top_p`` < 1 or ``top_k`` > 0 only when
    asked), the distribution the GRPO loss scores; greedy decoding is the plain argmax. No
    repetition penalty and no n-gram ban in either mode.
    """
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or min_new_tokens < 0:
        raise ValueError(f"top_k and min_new_tokens must be >= 0, got {top_k}, {min_new_tokens}")
    return {"do_sample": do_sample, "num_beams": 1,
            "temperature": float(temperature) if do_sample else 1.0,
            # Greedy decoding never reads top_k; 50 is the value transformers treats as unset
            # there (any other one logs "generation flags are not valid ... ['top_k']").
            "top_p": float(top_p) if do_sample else 1.0, "top_k": int(top_k) if do_sample else GREEDY_TOP_K,
            "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
            "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0, "min_new_tokens": int(min_new_tokens),
            "renormalize_logits": False}


# Decoding fields with no neutral value to pass: they must be unset on the model itself.
_UNSET_ONLY = ("min_p", "top_h", "bad_words_ids", "sequence_bias", "begin_suppress_tokens",
               "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
               "guidance_scale", "diversity_penalty")


def _rope_owner(model: Any) -> Any:
    """The submodule holding Qwen2.5-VL's cached 3D-rope offsets (``rope_deltas``), or None."""
    return next((m for m in model.modules() if hasattr(m, "rope_deltas")), None)


def prefill_once(model: Any, inputs: dict[str, torch.Tensor],
                 repeats: int) -> dict[str, Any] | None:
    """Run each prompt's prefill once for ``repeats`` returned sequences.

    ``generate(num_return_sequences=G)`` copies every prompt G times before its prefill, so the
    language model reads each prompt (image tokens included) G times. Here the prompt without
    its last token goes through the model once (the vision tower included), the KV cache and the
    3D-rope offsets are repeated G times, and ``generate`` continues from the last prompt token:
    the same logits at every step, so the same samples from the same random state (checked in
    ``tests/test_once_per_prompt.py``).

    Returns:
        The keyword arguments of a ``generate`` call with ``num_return_sequences=1`` (the
        repeated prompts and the cache), or None when the model keeps no rope offsets (another
        architecture: generate as usual).
    """
    owner = _rope_owner(model)
    if owner is None or inputs["input_ids"].shape[1] < 2:
        return None
    head = {k: (v[:, :-1] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
            for k, v in inputs.items()}
    out = model(**head, use_cache=True)
    name = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
    cache = getattr(out, name)
    cache.batch_repeat_interleave(repeats)
    owner.rope_deltas = owner.rope_deltas.repeat_interleave(repeats, dim=0)
    rest = {k: v.repeat_interleave(repeats, dim=0) for k, v in inputs.items()
            if k not in ("pixel_values", "image_grid_thw")}
    rest["image_grid_thw"] = inputs["image_grid_thw"].repeat_interleave(repeats, dim=0)
    rest[name] = cache
    return rest


@dataclass(frozen=True)
class Decoding:
    """How ``generate`` picks each token, and how many completions it returns per prompt."""

    do_sample: bool = False
    """Sample; False: greedy (the argmax)."""
    temperature: float = 1.0
    """Sampling draws from ``softmax(logits / temperature)``."""
    top_p: float = 1.0
    """Nucleus sampling (1: off)."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
    min_new_tokens: int = 0
    """End-of-sequence is not emitted before this many new tokens."""
    num_return_sequences: int = 1
    """Completions per prompt."""


@torch.no_grad()
def generate(model: Any, processor: Any, inputs: dict[str, torch.Tensor], max_new_tokens: int = 24,
             decoding: Decoding | None = None,
             share_prefill: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Generate completions with the vision tokens suppressed and every decoding setting explicit.

    ``decoding`` defaults to greedy, one completion per prompt. Nothing is inherited from the checkpoint's generation config (``decoding_kwargs``): sampling
    is ``softmax(logits / temperature)`` with nucleus ``top_p`` and, only if ``top_k`` > 0,
    top-k; greedy is the argmax. Decoding fields that have no neutral value (``min_p``, ...) are
    cleared on ``model.generation_config`` if set. With several returned sequences per prompt
    and ``share_prefill``, each prompt is prefilled once (``prefill_once``).

    Returns:
        ``(completion_ids [B * decoding.num_return_sequences, T], texts)``; texts keep the tag
        tokens (they are the format) and drop padding and ``<|im_end|>``.
    """
    gc = model.generation_config
    for name in _UNSET_ONLY:
        if getattr(gc, name, None) is not None:
            logger.info("generation config: clearing %s=%r", name, getattr(gc, name))
            setattr(gc, name, None)
    d = decoding or Decoding()
    kw = decoding_kwargs(d.do_sample, d.temperature, d.top_p, d.top_k, d.min_new_tokens)
    kw.update(max_new_tokens=max_new_tokens, suppress_tokens=vision_token_ids(processor))
    repeats = d.num_return_sequences
    shared = prefill_once(model, inputs, repeats) if share_prefill and repeats > 1 else None
    if shared is not None:
        out = model.generate(**shared, **kw)
    else:
        out = model.generate(**inputs, **kw, num_return_sequences=repeats)
    completion = out[:, inputs["input_ids"].shape[1]:]
    return completion, decode_completions(processor, completion)


def decode_completions(processor: Any, completion_ids: torch.Tensor) -> list[str]:
    """Decode completions keeping tag tokens, cutting at the first ``<|im_end|>``."""
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    texts = []
    for row in completion_ids.tolist():
        if eos in row:
            row = row[: row.index(eos)]
        row = [t for t in row if t != tok.pad_token_id]
        texts.append(tok.decode(row, skip_special_tokens=False))
    return texts


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


def image_token_cells(input_ids: torch.Tensor, image_grid_thw: torch.Tensor, sample: int,
                      image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of one sample's image tokens and their (row, col) merged cells.

    Assumes one image per sample, the layout of every prompt in this project.

    Args:
        input_ids: ``[B, S]``.
        image_grid_thw: ``[n_images, 3]`` in 14-px patches, one row per sample here.
        sample: batch index.

    Returns:
        ``(positions [N], cells [N, 2])`` with N = (H/28) * (W/28).
    """
    positions = (input_ids[sample] == image_token_id).nonzero(as_tuple=True)[0]
    _, h, w = (int(v) for v in image_grid_thw[sample])
    cols = w // MERGE
    n = (h // MERGE) * cols
    if positions.numel() != n:
        raise ValueError(f"sample {sample}: {positions.numel()} image tokens, grid {h}x{w} "
                         f"implies {n}")
    k = torch.arange(n)
    return positions, torch.stack([k // cols, k % cols], dim=1)


def boxes_to_grid(boxes: Sequence[Sequence[float]], image_size: tuple[int, int],
                  grid_thw: Sequence[int], smooth_sigma: float = 0.0) -> torch.Tensor:
    """Original-pixel boxes -> a normalised target over the merged cells.

    Each cell's weight is the area of its overlap with the boxes (in resized pixels);
    optional Gaussian smoothing (in cells), then normalised to sum 1. No boxes (or no
    overlap) gives an all-zero grid, which callers treat as "no target".

    Args:
        boxes: ``[[x0, y0, x1, y1], ...]`` in original pixels.
        image_size: original ``(width, height)``.
        grid_thw: ``(t, H/14, W/14)`` of the resized image.

    Returns:
        ``[rows, cols]`` float tensor (rows = H/28, cols = W/28).

    >>> boxes_to_grid([[0, 0, 28, 14]], (56, 56), (1, 4, 4)).tolist()
    [[1.0, 0.0], [0.0, 0.0]]
    """
    w0, h0 = image_size
    _, gh, gw = (int(v) for v in grid_thw)
    rows, cols = gh // MERGE, gw // MERGE
    sx, sy = cols * CELL / w0, rows * CELL / h0
    grid = np.zeros((rows, cols), dtype=np.float64)
    edges_x = np.arange(cols + 1) * CELL
    edges_y = np.arange(rows + 1) * CELL
    for x0, y0, x1, y1 in boxes:
        bx0, bx1, by0, by1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
        ox = np.clip(np.minimum(edges_x[1:], bx1) - np.maximum(edges_x[:-1], bx0), 0, None)
        oy = np.clip(np.minimum(edges_y[1:], by1) - np.maximum(edges_y[:-1], by0), 0, None)
        grid += np.outer(oy, ox)
    if smooth_sigma > 0 and grid.sum() > 0:
        r = np.arange(rows)[:, None] - np.arange(rows)[None, :]
        c = np.arange(cols)[:, None] - np.arange(cols)[None, :]
        kr, kc = np.exp(-0.5 * (r / smooth_sigma) ** 2), np.exp(-0.5 * (c / smooth_sigma) ** 2)
        grid = kr @ grid @ kc.T
    total = grid.sum()
    if total > 0:
        grid = grid / total
    return torch.tensor(grid, dtype=torch.float32)
