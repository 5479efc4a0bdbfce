"""The pieces every stage's parameters are built of: the checks, the numeric ranges, and the
settings several stages share (a profile and run root, a seed, how a model is built, loaded and
adapted, the optimiser, the supervised batch). ``stage_params`` composes them into the stages'
dataclasses; ``config`` loads those from files.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from fmr1lib import repro
from fmr1lib.choices import (
    AttnImplementation,
    Dtype,
    LayerSelection,
    LrSchedule,
    MixedPrecision,
    Reasoning,
    options,
)

PARAMS_ROOT = Path(__file__).resolve().parents[1]
"""The checkout holding ``fmr1lib/`` and ``params/``: where ``notebook_params`` looks by default."""


class ParamsError(ValueError):
    """A parameter file or mapping that does not fit its dataclass."""


def check_layers(key: str, value: str | list[int]) -> None:
    """A layer selection is ``last_half``, ``all`` or a non-empty list of distinct indices
    (ValueError naming ``key``); whether the backbone has them is checked by ``check_indices``."""
    if isinstance(value, str):
        if value not in options(LayerSelection):
            raise ValueError(f"key {key!r}: {value!r}: use last_half, all or indices")
        return
    if not value:
        raise ValueError(f"key {key!r}: an empty list selects no layer; use last_half, all or "
                         f"indices")
    check_distinct(key, value)


def check_distinct(key: str, values: list[Any], allow_empty: bool = False) -> None:
    """``values`` is non-empty (unless ``allow_empty``) and holds no value twice."""
    if not values and not allow_empty:
        raise ValueError(f"key {key!r}: must not be empty")
    twice = sorted({v for v in values if values.count(v) > 1}, key=str)
    if twice:
        raise ValueError(f"key {key!r}: {twice} listed more than once in {values}")


def check_variants(key: str, values: list[str], known: tuple[str, ...],
                   allow_empty: bool = False) -> None:
    """``values`` are distinct names out of ``known`` (non-empty unless ``allow_empty``)."""
    bad = [v for v in values if v not in known]
    if bad:
        raise ValueError(f"key {key!r}: unknown {bad}; known {list(known)}")
    check_distinct(key, values, allow_empty)


def check_at_least(params: Any, low: float, *keys: str) -> None:
    """Each of ``keys`` of ``params`` is >= ``low`` (ValueError naming the first that is not)."""
    for key in keys:
        value = getattr(params, key)
        if value < low:
            raise ValueError(f"key {key!r}: must be >= {low}, got {value}")


RANGES: dict[str, tuple[float, float, str]] = {
    "seed": (0, 2**32 - 1, "numpy seeds are 0..2**32-1, and a seed names its run folder"),
    "steps": (1, 10**7, "optimiser steps of one run"),
    "grad_accum": (1, 2**16, "micro-batches per optimiser step"),
    "batch_size": (1, 2**16, "examples per optimiser step and process"),
    "lr": (0, 1.0, "a learning rate above 1 makes AdamW diverge"),
    "weight_decay": (0, 10.0, "AdamW's decoupled decay; above 10 it erases the weights"),
    "lr_warmup_steps": (0, 10**7, "warm-up steps of one run"),
    "grad_clip": (0, 10**6, "a gradient-norm bound (0: off)"),
    "log_every": (0, 10**7, "steps between two logs"),
    "checkpoint_every": (0, 10**7, "steps between two checkpoints"),
    "eval_n": (0, 10**7, "examples per test split"),
    "eval_batch_size": (1, 2**16, "examples per generation batch"),
    "max_new_tokens": (1, 2**15, "generated tokens per response"),
    "prompts_per_step": (1, 2**16, "prompts per GRPO step"),
    "group_size": (2, 2**12, "completions per prompt"),
    "num_iterations": (1, 100, "policy updates per rollout batch"),
    "clip_low": (0, 1.0, "the ratio's lower clip is 1 - clip_low"),
    "clip_high": (0, 1.0, "the ratio's upper clip is 1 + clip_high; above 2x it bounds nothing"),
    "beta": (0, 100.0, "the KL penalty's weight"),
    "w_acc": (0, 100.0, "a negative reward weight rewards the opposite behaviour"),
    "w_fmt": (0, 100.0, "a negative reward weight rewards the opposite behaviour"),
    "w_faith": (0, 100.0, "a negative reward weight rewards the opposite behaviour"),
    "lambda_attn": (0, 1000.0, "the anchoring loss's weight"),
    "lambda_attn_rl": (0, 1000.0, "the auxiliary anchoring loss's weight"),
    "temperature": (0, 100.0, "the sampling temperature"),
    "n_boot": (1, 10**6, "bootstrap resamples"),
    "n_train": (1, 10**8, "examples of a split"),
    "n_warmup": (0, 10**8, "examples of a split"),
    "n_test_id": (1, 10**8, "examples of a split"),
    "n_test_ood": (1, 10**8, "examples of a split"),
}
"""``field: (low, high, why)``: every numeric field of that name, in any stage's params, lies in
``[low, high]`` (``lr`` and ``temperature``: ``(low, high]``); a value outside is refused with the
reason."""

_OPEN_LOW = frozenset({"lr", "temperature"})


def check_ranges(params: Any) -> None:
    """Every field of ``params`` named in ``RANGES`` is in its range (ValueError naming the key,
    the range and why)."""
    values = repro.params_dict(params)
    for key, (low, high, why) in RANGES.items():
        value = values.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        above = value > low if key in _OPEN_LOW else value >= low
        if not (above and value <= high):
            bracket = "(" if key in _OPEN_LOW else "["
            raise ValueError(f"key {key!r}: {value!r} is not in {bracket}{low:g}, {high:g}] ({why})")


ADDED_AT: dict[str, Any] = {
    "allow_outside_root": False,
    "rollout_backend": "hf", "vllm_gpu_memory_utilization": 0.3,
    "is_correction": "none", "is_cap": 3.0,
}
"""Keys added after results were stamped and runs were made, with the value those results and
runs were made with (each key's default). At that value a key is left out of the results' stamp
(``stages.params_hash``) and of a run's fingerprint (``train.trajectory_params``,
``stages.content_hash``), so adding a key keeps every earlier stamp, run folder and checkpoint
valid; set to anything else, it enters both."""


def without_added_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (flat, ``repro.params_dict``) less the ``ADDED_AT`` keys at their value.

    >>> without_added_defaults({"lr": 0.1, "rollout_backend": "hf", "is_cap": 2.0})
    {'lr': 0.1, 'is_cap': 2.0}
    """
    return {k: v for k, v in values.items() if k not in ADDED_AT or v != ADDED_AT[k]}


PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
"""A profile is a plain folder name under ``params/`` (no separators, no ``..``)."""


@dataclasses.dataclass
class CommonParams:
    """Fields every stage shares."""

    profile: str = "tiny"
    """Profile name: artifacts go to ``<run_root>/<profile>/``, parameters come from ``params/<profile>/``."""
    run_root: str = "runs"
    """Root of all run artifacts, relative to the project root unless absolute."""
    figures_dir: str | None = None
    """Where figures are written, relative to the project root unless absolute; None:
    ``<run_root>/<profile>/figures``. The study profile, the README's, writes to ``figures``."""

    def validate_common(self) -> None:
        """The profile is a plain folder name (it names ``params/<profile>/`` and a run folder)."""
        check_profile_name(self.profile)


@dataclasses.dataclass
class SeedParams:
    """The seed of a stage that draws random numbers (data generation, training)."""

    seed: int = 0
    """Seed for python, numpy and torch."""


def check_profile_name(profile: str, where: str = "key 'profile'") -> None:
    """A profile is a plain folder name (ValueError naming ``where`` otherwise)."""
    if not PROFILE_NAME.fullmatch(profile):
        raise ValueError(f"{where}: {profile!r} is not a profile name (a plain folder name under "
                         f"params/: letters, digits, '_', '-', '.'; no '/' and no leading '.')")


@dataclasses.dataclass
class ModelLoadParams:
    """How a saved model is loaded: every stage that trains or evaluates one reads these."""

    dtype: Dtype = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    attn_implementation: AttnImplementation = "sdpa"
    """Attention kernel of the model (capture works on top of sdpa; never switch to eager)."""


@dataclasses.dataclass
class BuildParams:
    """How the backbone is made: the processor's image size, and the tiny stand-in's shape."""

    image_min_pixels: int = 3136
    """Smallest image area (pixels) after the processor's resize."""
    image_max_pixels: int = 12544
    """Largest image area (pixels) after the processor's resize; bounds the image-token count."""
    hidden_size: int = 128
    """Tiny only: text hidden size."""
    num_layers: int = 2
    """Tiny only: decoder layers."""
    num_heads: int = 4
    """Tiny only: attention heads."""
    num_kv_heads: int = 2
    """Tiny only: key/value heads (GQA)."""
    intermediate_size: int = 256
    """Tiny only: MLP width."""
    vision_depth: int = 2
    """Tiny only: vision transformer blocks."""
    vision_hidden: int = 64
    """Tiny only: vision hidden size."""
    vision_heads: int = 2
    """Tiny only: vision attention heads."""
    vocab_size: int = 1024
    """Tiny only: requested BPE vocabulary size (BPE may stop below it on a small corpus)."""

    def validate_build(self) -> None:
        """Value checks of the build settings."""
        check_at_least(self, 1, "image_min_pixels", "hidden_size", "num_layers", "num_heads",
                       "num_kv_heads", "intermediate_size", "vision_depth", "vision_hidden",
                       "vision_heads", "vocab_size")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("keys 'hidden_size'/'num_heads'/'num_kv_heads': hidden_size must divide "
                             "by num_heads, and num_heads by num_kv_heads")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError("key 'hidden_size': head_dim (hidden_size / num_heads) must be a "
                             "multiple of 4 for the multimodal rope sections")
        if self.image_min_pixels > self.image_max_pixels:
            raise ValueError("keys 'image_min_pixels'/'image_max_pixels': min exceeds max")


@dataclasses.dataclass
class AdapterParams:
    """What trains: LoRA adapters or the full model, with or without the vision tower."""

    lora: bool = False
    """Wrap the language model in LoRA adapters instead of full fine-tuning."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_targets: list[str] = dataclasses.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names (of the language model only) that get adapters."""
    freeze_vision: bool = False
    """Freeze the vision tower (and its merger) during training."""

    def validate_adapter(self) -> None:
        """Value checks of the LoRA settings."""
        check_at_least(self, 1, "lora_r", "lora_alpha")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"key 'lora_dropout': {self.lora_dropout} is not in [0, 1)")
        if self.lora:
            check_distinct("lora_targets", self.lora_targets)


@dataclasses.dataclass
class ModelParams(AdapterParams, BuildParams, ModelLoadParams):
    """Which backbone, and how to build or load it (stage 0 builds it; later stages load it)."""

    model_name: str = "tiny"
    """``tiny`` builds the stand-in locally; otherwise a hub id or a local checkpoint folder."""
    trust_remote_code: bool = False
    """Allow code from the checkpoint folder (off unless you trust it)."""

    def validate_model(self) -> None:
        """Value checks of the loading, build and adapter settings."""
        self.validate_build()
        self.validate_adapter()


@dataclasses.dataclass
class EvalSettings:
    """Greedy-decoding evaluation. Notebooks 03-05 evaluate with the same settings, so notebook 05
    reuses the evaluations that 03 and 04 cached."""

    eval_n: int = 200
    """Examples per test split (0: all)."""
    eval_batch_size: int = 50
    """Examples per generation batch."""
    max_new_tokens: int = 24
    """Longest response generated (greedy evaluation; stage 2 also caps its rollouts with it)."""

    def validate_eval(self) -> None:
        """Value checks of the evaluation settings."""
        check_at_least(self, 0, "eval_n")
        check_at_least(self, 1, "eval_batch_size", "max_new_tokens")


TRACKERS: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "trackio": ("trackio",),
    "wandb": ("wandb",),
}
"""accelerate trackers ``log_with`` may name -> the packages that provide each (any one)."""


def tracker_installed(name: str) -> bool:
    """Whether a package providing tracker ``name`` (``TRACKERS``) can be imported."""
    import importlib.util

    return any(importlib.util.find_spec(pkg) is not None for pkg in TRACKERS[name])


@dataclasses.dataclass
class OptimParams(EvalSettings):
    """Optimisation, logging and checkpointing of every training stage, and its quick evaluations."""

    steps: int = 300
    """Optimiser steps."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step."""
    lr: float = 0.002
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_schedule: LrSchedule = "cosine"
    """constant, linear or cosine decay after the warm-up."""
    lr_warmup_steps: int = 20
    """Linear learning-rate warm-up steps."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    mixed_precision: MixedPrecision = "no"
    """accelerate mixed precision: no, bf16, fp16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    log_every: int = 25
    """Log metrics every this many steps (0: off)."""
    checkpoint_every: int = 100
    """Write a resumable checkpoint every this many steps (0: only at the end)."""
    resume: bool = False
    """Continue from the latest checkpoint of the run folder if there is one."""
    log_with: list[str] = dataclasses.field(default_factory=list)
    """Experiment trackers that also get every ``metrics.jsonl`` row (accelerate's trackers):
    any of tensorboard, trackio, wandb; empty (the default): ``metrics.jsonl`` only. Each needs
    its package (tensorboard: the ``trackers`` extra, ``pip install -e ".[trackers]"``), checked
    when the parameters load.
    tensorboard writes to ``<run folder>/tensorboard``, wandb to ``<run folder>/wandb``; trackio
    keeps its own local store."""

    def validate_optim(self) -> None:
        """Value checks for the optimisation settings."""
        check_variants("log_with", self.log_with, tuple(TRACKERS), allow_empty=True)
        missing = [t for t in self.log_with if not tracker_installed(t)]
        if missing:
            pkgs = " ".join(TRACKERS[t][0] for t in missing)
            raise ValueError(f"key 'log_with': tracker {missing} needs a package that is not "
                             f"installed: pip install {pkgs} (or drop it from log_with)")
        self.validate_eval()
        check_at_least(self, 1, "steps", "grad_accum")
        if not self.lr > 0:
            raise ValueError(f"key 'lr': must be > 0, got {self.lr}")
        check_at_least(self, 0, "weight_decay", "lr_warmup_steps", "grad_clip", "log_every",
                       "checkpoint_every")


@dataclasses.dataclass
class TrainParams(OptimParams):
    """The supervised stages (0 and 1): optimisation plus the size of a batch of examples."""

    batch_size: int = 16
    """Examples per optimiser step and process; they are split into ``grad_accum``
    micro-batches of ``batch_size / grad_accum`` (so ``grad_accum`` <= ``batch_size``)."""
    reasoning: Reasoning = "look"
    """Reasoning of the reference responses: ``look`` ("look at the circle"), or ``two_route``:
    "the circle is red" (the evidence route) or "the corner patch is red" (the cue route, on a
    share ``cue_route_share`` of the records whose cue agrees with the answer), so that reading
    the evidence and reading the cue are different token sequences (docs/design.md §5.1)."""
    cue_route_share: float = 0.5
    """``two_route``: share of the cue-agreeing records whose reference takes the cue route."""

    def validate_train(self) -> None:
        """Value checks for the optimisation settings and the batch size."""
        self.validate_optim()
        check_at_least(self, 1, "batch_size")
        if not 0.0 <= self.cue_route_share <= 1.0:
            raise ValueError(f"key 'cue_route_share': {self.cue_route_share} is not in [0, 1]")
        if self.grad_accum > self.batch_size:
            raise ValueError(f"key 'grad_accum': {self.grad_accum} micro-batches of a batch of "
                             f"{self.batch_size} examples would leave some empty; batch_size "
                             f"counts the examples of a whole optimiser step (grad_accum <= batch_size)")


