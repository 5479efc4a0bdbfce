"""Typed parameters for every stage of the pipeline.

One dataclass per notebook / stage, and every parameter has exactly one default, documented
here: the method's setting, which is also the ``tiny`` profile. ``params/<profile>/NN_*.yaml``
hold only what a profile sets differently (plus ``profile`` and the pointers to the other
stages' files), and a notebook's ``parameters`` cell names only the few knobs its text is about,
set to ``None`` ("from the profile's file"). ``load_params`` builds a dataclass from a YAML file
or a dict; ``notebook_params`` is what the notebooks call: the profile's file, then the values
the notebook (or papermill) sets. Both reject unknown keys, values of the wrong type, values out
of range (counts, rates, probabilities; nan and inf anywhere), duplicate YAML keys and layer or
head indices the backbone does not have *before any work starts*, naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from fmr1lib import repro
from fmr1lib.choices import (
    AblationRow,
    AttnImplementation,
    AttnLoss,
    Concentration,
    CueCorner,
    DataSource,
    Dtype,
    FaithfulAdvantage,
    FaithfulForm,
    Intervention,
    LayerSelection,
    LossAgg,
    LrSchedule,
    MixedPrecision,
    OcclusionSearch,
    OnBadRecord,
    OodCue,
    Reasoning,
    RLVariant,
    Split,
    StageVariant,
    TestSplit,
    WarmupCue,
    WarmupVariant,
    options,
)

T = TypeVar("T")


class ParamsError(ValueError):
    """A parameter file or mapping that does not fit its dataclass."""


# --------------------------------------------------------------------------------------
# Stage parameter dataclasses
# --------------------------------------------------------------------------------------


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
    values = params_to_dict(params)
    for key, (low, high, why) in RANGES.items():
        value = values.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        above = value > low if key in _OPEN_LOW else value >= low
        if not (above and value <= high):
            bracket = "(" if key in _OPEN_LOW else "["
            raise ValueError(f"key {key!r}: {value!r} is not in {bracket}{low:g}, {high:g}] ({why})")


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


@dataclasses.dataclass
class DataParams(SeedParams, CommonParams):
    """The dataset of notebook 01: FocusShapes generation (docs/design.md §3.2), or region-annotated
    JSONL records (``source: jsonl``, §3.1)."""

    JSONL_SPLITS: typing.ClassVar[tuple[str, ...]] = ("train", "test_id", "test_ood")
    """Splits every ``jsonl_files`` must name (``warmup`` is optional)."""
    FOCUSSHAPES_ONLY: typing.ClassVar[tuple[str, ...]] = (
        "image_size", "n_train", "n_warmup", "n_test_id", "n_test_ood", "tasks", "target_shapes",
        "n_distractors", "n_blobs", "object_size", "cue_size", "cue_corner", "shortcut_p",
        "ood_cue", "warmup_cue", "background")
    """Keys of the generator: with ``source: jsonl`` they must keep their defaults."""

    source: DataSource = "focusshapes"
    """Where the records come from: ``focusshapes`` (generated from the keys below) or ``jsonl``
    (records files in the schema of docs/design.md §3.1, named by ``jsonl_files``)."""
    jsonl_files: dict[str, str] = dataclasses.field(default_factory=dict)
    """``source: jsonl``: the records file of each split, ``{train: ..., test_id: ..., test_ood: ...}``
    and optionally ``warmup`` (absent: an empty warm-up split); relative to the project root
    unless absolute."""
    image_root: str | None = None
    """``source: jsonl``: the folder the records' image paths are relative to (project root unless
    absolute); None: each records file's own folder."""
    on_bad_record: OnBadRecord = "error"
    """``source: jsonl``: ``error`` stops at the first bad record (``records.DataError`` naming the
    file, line, record id and field); ``skip`` leaves bad records out, logging each and the count."""
    allow_outside_root: bool = False
    """``source: jsonl``: allow image paths that lead outside the image root (absolute paths,
    ``..``, a symlinked image folder), as ``converters check --allow-outside-root`` does."""
    image_size: int = 112
    """Side of the square scene in pixels; a multiple of 28 (one merged image token per 28 px cell)."""
    n_train: int = 3000
    """Number of training examples (cue-laden, agreement ``shortcut_p``)."""
    n_warmup: int = 3000
    """Number of stage-0 warm-up examples (cue as set by ``warmup_cue``)."""
    n_test_id: int = 200
    """Number of in-distribution test examples (same cue statistics as train)."""
    n_test_ood: int = 200
    """Number of out-of-distribution test examples (cue at chance or contradicting)."""
    tasks: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"color": 1.0, "shape": 0.0, "count": 0.0, "relation": 0.0,
                                 "exists": 0.0}
    )
    """Sampling weights of the question families: color, shape, count, relation, exists."""
    colors: list[str] = dataclasses.field(
        default_factory=lambda: ["red", "green", "blue", "yellow"]
    )
    """Colour vocabulary (names must be known to ``fmr1lib.data.PALETTE``)."""
    shapes: list[str] = dataclasses.field(
        default_factory=lambda: ["circle", "square", "triangle", "diamond"]
    )
    """Shape vocabulary."""
    target_shapes: list[str] = dataclasses.field(default_factory=lambda: ["circle"])
    """Shapes the colour question asks about (empty: any of ``shapes``). Distractors never share the target's shape."""
    n_distractors: int = 2
    """Coloured distractor objects per scene, besides the target(s) and the grey blobs."""
    n_blobs: int = 1
    """Grey blobs per scene (objects with no colour that matter to no question)."""
    object_size: list[int] = dataclasses.field(default_factory=lambda: [16, 22])
    """Min and max object side in pixels."""
    cue_size: int = 24
    """Side of the shortcut cue square, placed in the fixed corner cell."""
    cue_corner: CueCorner = "bottom_right"
    """Corner cell of the cue: top_left, top_right, bottom_left, bottom_right."""
    shortcut_p: float = 1.0
    """Probability that the cue agrees with the answer in ``train`` and ``test_id``."""
    ood_cue: OodCue = "contradict"
    """Cue in ``test_ood``: ``contradict`` (never the answer) or ``random`` (uniform, chance)."""
    warmup_cue: WarmupCue = "none"
    """Cue in the warm-up split: ``none`` (absent) or ``random`` (uninformative)."""
    background: list[int] = dataclasses.field(default_factory=lambda: [235, 235, 235])
    """Background RGB colour of every scene."""
    intervention: Intervention = "background"
    """Counterfactual intervention method: mask, background, blur, noise."""
    intervention_pad: int = 1
    """Pixels added around each box before intervening."""
    n_show: int = 12
    """Examples shown in the sample-grid figure."""

    def validate(self) -> None:
        """Check value ranges that types alone cannot express."""
        self._validate_source()
        check_at_least(self, 1, "n_train", "n_test_id", "n_test_ood")
        check_at_least(self, 0, "n_warmup", "n_distractors", "n_blobs", "intervention_pad",
                       "n_show")
        if self.image_size % 28 or self.image_size < 56:
            raise ValueError(f"key 'image_size': {self.image_size} must be a multiple of 28 >= 56")
        families = {"color", "shape", "count", "relation", "exists"}
        bad = sorted(set(self.tasks) - families)
        if bad:
            raise ValueError(f"key 'tasks': unknown families {bad}; known: {sorted(families)}")
        if any(w < 0 for w in self.tasks.values()) or sum(self.tasks.values()) <= 0:
            raise ValueError("key 'tasks': weights must be >= 0 with a positive sum")
        if not 0.0 <= self.shortcut_p <= 1.0:
            raise ValueError(f"key 'shortcut_p': {self.shortcut_p} is not in [0, 1]")
        if len(self.object_size) != 2 or not 4 <= self.object_size[0] <= self.object_size[1] <= 26:
            raise ValueError(f"key 'object_size': {self.object_size} must be [min, max], 4 <= min <= max <= 26")
        if not 4 <= self.cue_size <= 28:
            raise ValueError(f"key 'cue_size': {self.cue_size} must be in [4, 28]")
        if len(self.colors) < 3 or len(set(self.colors)) != len(self.colors):
            raise ValueError(f"key 'colors': need at least 3 distinct colours, got {self.colors}")
        if len(self.shapes) < 3 or len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"key 'shapes': need at least 3 distinct shapes, got {self.shapes}")
        if not set(self.target_shapes) <= set(self.shapes):
            raise ValueError(f"key 'target_shapes': {self.target_shapes} not all in shapes {self.shapes}")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ValueError(f"key 'background': {self.background} must be 3 values in [0, 255]")

    @staticmethod
    def resolve(path: str) -> Path:
        """A path of ``jsonl_files`` / ``image_root``: as is if absolute, else under the project
        root (``PARAMS_ROOT``)."""
        out = Path(path)
        return out if out.is_absolute() else PARAMS_ROOT / out

    def _validate_source(self) -> None:
        """The source keys: for JSONL, every split's file present on disk."""
        if self.source == "focusshapes":
            for key in ("jsonl_files", "image_root", "allow_outside_root"):
                if getattr(self, key):
                    raise ValueError(f"key {key!r}: set, but source is 'focusshapes' "
                                     f"(set source: jsonl to read records files)")
            return
        defaults = DataParams()
        changed = [k for k in self.FOCUSSHAPES_ONLY if getattr(self, k) != getattr(defaults, k)]
        if changed:
            raise ValueError(f"key {changed[0]!r}: a FocusShapes setting, but source is 'jsonl' "
                             f"(remove {changed} or set source: focusshapes)")
        known = (*self.JSONL_SPLITS, "warmup")
        unknown = sorted(set(self.jsonl_files) - set(known))
        if unknown:
            raise ValueError(f"key 'jsonl_files': unknown split(s) {unknown}; known: {list(known)}")
        missing = [s for s in self.JSONL_SPLITS if not self.jsonl_files.get(s)]
        if missing:
            raise ValueError(f"key 'jsonl_files': no file for split(s) {missing} "
                             f"(source 'jsonl' needs {list(self.JSONL_SPLITS)}; warmup is optional)")
        for split, name in self.jsonl_files.items():
            path = self.resolve(name)
            if not path.is_file():
                raise ValueError(f"key 'jsonl_files': the {split} file {name!r} does not exist "
                                 f"(looked for {path})")
        if self.image_root is not None and not self.resolve(self.image_root).is_dir():
            raise ValueError(f"key 'image_root': {self.image_root!r} is not a folder "
                             f"(looked for {self.resolve(self.image_root)})")


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


@dataclasses.dataclass
class BackboneParams(TrainParams, ModelParams, SeedParams, CommonParams):
    """The backbone (notebook 02): build or load it, add ``<Focus>``, warm up (tiny only)."""

    data_params_file: str = "params/tiny/01_data_construction.yaml"
    """Parameters of the dataset (built if ``runs/<profile>/data`` is missing)."""
    warmup: bool = True
    """Stage 0: SFT of the freshly built tiny backbone on the cue-free ``warmup`` split."""
    warmup_variant: WarmupVariant = "plain"
    """Stage 0's objective: ``plain`` (SFT: the format, not the task, at the tiny size) or
    ``focus_anchor`` (SFT + the anchoring loss on the cue-free split: a start model that perceives,
    as the paper's Instruct checkpoint does; docs/design.md §5.0)."""
    lambda_attn: float = 1.0
    """Weight of the anchoring loss when ``warmup_variant`` is ``focus_anchor`` (on the default
    layers, ``last_half``, all heads, KL)."""

    def validate(self) -> None:
        """Value checks."""
        self.validate_model()
        self.validate_train()
        check_at_least(self, 0, "lambda_attn")


@dataclasses.dataclass
class AnchorParams(TrainParams, AdapterParams, BuildParams, ModelLoadParams, SeedParams,
                   CommonParams):
    """Stage 1, Anchoring (notebook 03): supervise the ``<Focus>`` attention with evidence boxes.

    The backbone comes from ``backbone_params_file`` (its ``model_name`` and the like are there).
    """

    VARIANTS: typing.ClassVar[tuple[str, ...]] = options(StageVariant)
    """The stage-1 variants (``variants``, ``python -m fmr1lib anchor --variants``)."""

    steps: int = 200
    """Optimiser steps per variant. Tiny: 200, what three seeds of every row allow within
    ``make reproduce``'s 10 minutes; plain SFT's cue route is partial at 200 steps, complete by ~800."""
    data_params_file: str = "params/tiny/01_data_construction.yaml"
    """Parameters of the dataset (built if ``runs/<profile>/data`` is missing)."""
    backbone_params_file: str = "params/tiny/02_backbone.yaml"
    """Parameters of the backbone (built if ``runs/<profile>/backbone`` is missing)."""
    train_split: Split = "train"
    """Split trained on (the cue-laden ``train`` in the headline)."""
    variants: list[StageVariant] = dataclasses.field(
        default_factory=lambda: ["plain", "text_perception", "focus_anchor"])
    """Variants trained from the same backbone with the same data and steps."""
    lambda_attn: float = 1.0
    """Weight of the attention loss (``focus_anchor`` only)."""
    attn_loss: AttnLoss = "kl"
    """``kl``: KL(q || p); ``mass``: -log of the Focus mass inside the boxes."""
    anchor_layers: LayerSelection | list[int] = "last_half"
    """Layers whose Focus attention is supervised: ``last_half``, ``all`` or indices."""
    head_select: Literal["mean"] | list[int] = "mean"
    """Heads averaged for ``p``: ``mean`` (all heads) or a list of head indices."""
    smooth_sigma: float = 0.0
    """Gaussian smoothing of the target ``q`` in cells (0: none)."""
    n_show: int = 4
    """Test images in the before/after heatmap figure."""

    def validate(self) -> None:
        """Value checks."""
        self.validate_build()
        self.validate_adapter()
        self.validate_train()
        check_distinct("variants", self.variants)
        check_layers("anchor_layers", self.anchor_layers)
        if not isinstance(self.head_select, str):
            check_distinct("head_select", self.head_select)
            if min(self.head_select) < 0:
                raise ValueError(f"key 'head_select': head indices must be >= 0, got "
                                 f"{self.head_select}")
        check_at_least(self, 0, "lambda_attn", "smooth_sigma", "n_show")


@dataclasses.dataclass
class RolloutParams:
    """Stage 2: how the rollouts are sampled (``grpo.rollout``, ``grpo.collect_groups``)."""

    prompts_per_step: int = 4
    """P: prompts per GRPO step."""
    group_size: int = 8
    """G: sampled completions per prompt."""
    rollout_prompts: int = 0
    """Prompts generated per ``generate`` call (0: all P at once); lower it when rollouts run out
    of memory. The training and counterfactual forwards are split by ``grad_accum``."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (the loss and the reward divide the logits by it too)."""
    top_p: float = 1.0
    """Nucleus sampling of rollouts."""
    top_k: int = 0
    """Top-k sampling of rollouts (0: off). Nothing else is inherited from the checkpoint's
    generation config (``modeling.decoding_kwargs``)."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal and refill from the data."""
    max_refill: int = 3
    """Refill rounds per step when dynamic sampling."""

    def validate(self) -> None:
        """Value checks."""
        if self.group_size < 2:
            raise ValueError("key 'group_size': GRPO needs at least 2 samples per prompt")
        check_at_least(self, 1, "prompts_per_step")
        check_at_least(self, 0, "rollout_prompts", "top_k", "max_refill")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"key 'top_p': {self.top_p} is not in (0, 1]")
        if not self.temperature > 0:
            raise ValueError(f"key 'temperature': must be > 0, got {self.temperature}")


@dataclasses.dataclass
class PolicyLossParams:
    """Stage 2: the clipped policy loss and its auxiliary terms (``grpo.clipped_policy_loss``)."""

    num_iterations: int = 1
    """Policy updates per rollout batch (ratios differ from 1 only when > 1)."""
    clip_low: float = 0.2
    """Lower clip of the importance ratio (1 - clip_low)."""
    clip_high: float = 0.28
    """Upper clip of the importance ratio (1 + clip_high), DAPO clip-higher."""
    loss_agg: LossAgg = "token_mean"
    """``token_mean`` over all completion tokens of the batch, or ``seq_mean`` per sequence."""
    std_normalize: bool = True
    """Divide group-centred rewards by the group std (off: Dr.GRPO)."""
    beta: float = 0.0
    """KL penalty to the reference policy (0: no reference pass)."""
    lambda_attn_rl: float = 0.0
    """Auxiliary anchoring loss during RL (ablation; 0 = off)."""

    def validate(self) -> None:
        """Value checks."""
        check_at_least(self, 1, "num_iterations")
        check_at_least(self, 0, "beta", "lambda_attn_rl", "clip_high")
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"key 'clip_low': {self.clip_low} is not in [0, 1) (the ratio's lower "
                             f"clip is 1 - clip_low)")


@dataclasses.dataclass
class RewardParams:
    """Stage 2: the rewards, and how the faithful one is computed (``fmr1lib.faithful``,
    ``grpo.combine_advantages``; docs/design.md §6.3)."""

    w_acc: float = 1.0
    """Weight of the accuracy reward."""
    w_fmt: float = 0.5
    """Weight of the format reward."""
    w_faith: float = 1.0
    """Weight of the faithful reward (faithful variants only)."""
    faithful_form: FaithfulForm = "group_tanh"
    """``raw``: concentration c; ``group_tanh``: 0.5 * tanh(z) of c within the group."""
    faithful_std_floor: float = 0.1
    """``group_tanh``: concentrations within this of each other count as equal (reward 0) and the
    group std is floored at it (``faithful.faithful_from_concentration``), in the concentration's
    units (nats for ``dependency``, where the deciding token's s_t is 3-7 nats; a share of
    attention for the others)."""
    kappa: int = 4
    """``concentration: top_kappa``: the kappa response tokens with the largest visual
    dependency s_t enter the concentration."""
    concentration: Concentration = "dependency"
    """Which tokens enter the concentration: ``top_kappa`` (the paper's literal reading),
    ``weighted`` (every token weighted by its s_t) or ``relative`` (tokens with
    s_t >= relative_rho * max s_t) or ``dependency`` (sum_t s_t share_t, in nats: the default,
    the only candidate whose within-group correlation with ``reading`` was positive on every
    seed of the study's plain-SFT start; docs/design.md §6.6)."""
    relative_rho: float = 0.5
    """``concentration: relative``: share of the largest s_t a token needs to count."""
    min_dependency: float = 0.0
    """Nats: a trajectory whose largest s_t is below this did not depend on the causal region,
    so its concentration is 0 (0: off)."""
    faithful_advantage: FaithfulAdvantage = "separate"
    """How the faithful reward enters the advantage (``choices.FaithfulAdvantage``)."""
    reading_diagnostic: bool = True
    """Log, per step, the causal ``reading`` of the scored trajectories and the within-group rank
    correlation of the faithful reward with it (``fmr1lib.reading``; records whose meta names a
    shortcut region only). An instrument: it never enters the reward."""
    faithful_focus_row: bool = False
    """Whether the ``<Focus>`` row (it predicts the first response token; the same for every
    trajectory of a group) may be one of the top-kappa tokens (``faithful.candidate_mask``)."""
    occlusion_cells: int = 2
    """Cells kept as the causal region by the occlusion search."""
    occlusion_search: OcclusionSearch = "coarse_to_fine"
    """How the occlusion region is found (``fmr1lib.occlusion``): ``exhaustive`` (one occluded
    forward per image cell), ``coarse_to_fine`` (quadtree beam; the default: the cheaper search
    that agrees with ``exhaustive``), ``gradient`` (one backward, no occluded forward),
    ``budgeted`` (the gradient's first ``occlusion_budget`` cells occluded exactly)."""
    occlusion_budget: int = 2
    """``budgeted``: cells occluded exactly per image (at least ``occlusion_cells`` are)."""
    intervention: Intervention = "background"
    """How the causal region is removed: mask, background, blur, noise."""
    reward_layers: LayerSelection | list[int] = "last_half"
    """Layers whose attention enters the concentration."""

    def validate(self) -> None:
        """Value checks."""
        check_at_least(self, 1, "kappa", "occlusion_cells", "occlusion_budget")
        check_at_least(self, 0, "faithful_std_floor", "min_dependency")
        if not 0 < self.relative_rho <= 1:
            raise ValueError(f"key 'relative_rho': {self.relative_rho} is not in (0, 1]")
        check_layers("reward_layers", self.reward_layers)


@dataclasses.dataclass
class RLParams(OptimParams, AdapterParams, ModelLoadParams, SeedParams, CommonParams):
    """Stage 2, Reinforcing (notebook 04): GRPO with the counterfactual faithful reward.

    The start models come from stage 1 (``anchor_params_file``) or its backbone; a step's batch
    is ``prompts_per_step`` x ``group_size`` completions. The method's settings are three
    sections, each handed whole to the code that uses it: ``rollout`` (``RolloutParams``),
    ``loss`` (``PolicyLossParams``) and ``reward`` (``RewardParams``). A parameter file names
    their keys flat (``temperature: 0.7``, not nested): every key belongs to one place
    (``section_of``).
    """

    VARIANTS: typing.ClassVar[tuple[str, ...]] = options(RLVariant)
    """The stage-2 variants (``variants``, ``efficiency_variants``, ``rl --variants``)."""
    START_VARIANTS: typing.ClassVar[dict[str, str | None]] = {
        "grpo_backbone": None, "grpo_plain": "plain", "faithful_plain": "plain"}
    """The stage-1 variant a stage-2 variant starts from (None: the stage-0 backbone; a variant
    not named here starts from ``focus_anchor``)."""
    FAITHFUL_VARIANTS: typing.ClassVar[tuple[str, ...]] = ("faithful", "faithful_occlusion",
                                                           "faithful_plain")
    """The variants trained with the faithful reward."""

    steps: int = 24
    """GRPO steps."""
    lr: float = 5.0e-05
    """Learning rate (AdamW). Tiny: 5e-4 wrecked the anchored model within a few steps and 1e-4
    let the faithful variant's greedy format fall to 0.67 (seed 0); 5e-5 keeps both."""
    lr_schedule: LrSchedule = "constant"
    """constant, linear or cosine decay after the warm-up."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    log_every: int = 10
    """Sample completions are logged every this many steps (metrics: every step)."""
    checkpoint_every: int = 20
    """Write a resumable checkpoint every this many steps (0: only at the end)."""
    data_params_file: str = "params/tiny/01_data_construction.yaml"
    """Parameters of the dataset."""
    anchor_params_file: str = "params/tiny/03_anchoring.yaml"
    """Parameters of stage 1 (its ``focus_anchor`` model is the default start point)."""
    train_split: Split = "train"
    """Split whose prompts RL samples (cue-laden ``train`` in the headline)."""
    n_prompts: int = 0
    """Use only the first this many prompts of the split (0: all); for data-efficiency curves."""
    variants: list[RLVariant] = dataclasses.field(
        default_factory=lambda: ["grpo_backbone", "grpo", "faithful", "faithful_occlusion"])
    """``grpo_backbone`` (accuracy+format from stage 0), ``grpo`` (from anchoring),
    ``faithful`` (+ faithful reward, boxes), ``faithful_occlusion`` (+ faithful reward, occlusion),
    ``grpo_plain`` / ``faithful_plain`` (GRPO / + faithful reward from stage-1 plain SFT, a start
    whose correct rollouts differ in which region they read; docs/design.md §12)."""
    rollout: RolloutParams = dataclasses.field(default_factory=RolloutParams)
    """How rollouts are sampled."""
    loss: PolicyLossParams = dataclasses.field(default_factory=PolicyLossParams)
    """The policy loss."""
    reward: RewardParams = dataclasses.field(default_factory=RewardParams)
    """The rewards."""
    n_show: int = 4
    """Sample completions logged per logging step."""

    def validate(self) -> None:
        """Value checks of the top-level keys (each section checks its own)."""
        self.validate_adapter()
        self.validate_optim()
        check_distinct("variants", self.variants)
        check_at_least(self, 0, "n_prompts", "n_show")


ABLATION_ROWS = options(AblationRow)
"""Rows of the ablation table, in order (``fmr1lib.stages.ROWS`` says what trains each)."""
ABLATION_ROW_LABELS: dict[str, str] = {
    "backbone": "stage-0 backbone",
    "plain_sft": "plain SFT",
    "text_perception": "text-perception SFT",
    "anchoring": "anchoring (stage 1)",
    "grpo_backbone": "GRPO from backbone",
    "anchoring_grpo": "anchoring + GRPO",
    "faithful_mr1": "Faithful-MR1 (boxes)",
    "faithful_mr1_occlusion": "Faithful-MR1 (occlusion)",
    "plain_grpo": "plain SFT + GRPO",
    "plain_faithful": "plain SFT + faithful reward",
}
"""How the ablation table and every figure name each row (``plotting.DISPLAY_NAMES``)."""


@dataclasses.dataclass
class EvalParams(EvalSettings, CommonParams):
    """Evaluation, the ablation over seeds and the data-efficiency curve (notebook 05).

    The training seeds of stages 1-2 are ``seeds``; the bootstrap intervals have a fixed seed.
    """

    data_params_file: str = "params/tiny/01_data_construction.yaml"
    """Parameters of the dataset."""
    backbone_params_file: str = "params/tiny/02_backbone.yaml"
    """Parameters of the stage-0 backbone (one backbone, shared by every seed)."""
    anchor_params_file: str = "params/tiny/03_anchoring.yaml"
    """Stage-1 parameters; every seed trains with these (only ``seed`` changes)."""
    rl_params_file: str = "params/tiny/04_counterfactual_rl.yaml"
    """Stage-2 parameters; every seed trains with these (only ``seed`` changes)."""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    """Training seeds of stages 1-2 per ablation row (runs that exist with the same params are reused)."""
    rows: list[AblationRow] = dataclasses.field(default_factory=lambda: list(ABLATION_ROWS[:8]))
    """Ablation rows to build."""
    splits: list[TestSplit] = dataclasses.field(default_factory=lambda: list(options(TestSplit)))
    """Splits every row is evaluated on."""
    eval_layers: LayerSelection | list[int] = "last_half"
    """Decoder layers whose attention the Focus and answer-token metrics average."""
    n_boot: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    efficiency_prompts: list[int] = dataclasses.field(default_factory=lambda: [8, 32])
    """Distinct RL training prompts for the data-efficiency curve (the full runs add the last point)."""
    efficiency_variants: list[RLVariant] = dataclasses.field(default_factory=lambda: ["grpo", "faithful"])
    """Stage-2 variants compared in the data-efficiency curve."""
    efficiency_seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    """Seeds of the data-efficiency runs."""
    n_show: int = 4
    """Test images in the heatmap figure."""
    smoke: bool = False
    """Quick check (``make test`` sets it through FMR1_SMOKE=1): first seed only and the first
    efficiency point only (evaluations of the seed-0 runs come from notebooks 03-04's cache)."""

    def validate(self) -> None:
        """Value checks."""
        self.validate_eval()
        check_distinct("rows", self.rows)
        check_distinct("seeds", self.seeds)
        check_distinct("splits", self.splits)
        check_distinct("efficiency_variants", self.efficiency_variants, allow_empty=True)
        check_distinct("efficiency_prompts", self.efficiency_prompts, allow_empty=True)
        if any(k <= 0 for k in self.efficiency_prompts):
            raise ValueError("key 'efficiency_prompts': prompt counts must be positive")
        check_distinct("efficiency_seeds", self.efficiency_seeds, allow_empty=True)
        check_at_least(self, 1, "n_boot")
        check_at_least(self, 0, "n_show")
        check_layers("eval_layers", self.eval_layers)

    def smoke_version(self) -> EvalParams:
        """The same params cut down for a quick check (``smoke=True``)."""
        return dataclasses.replace(self, smoke=True, seeds=self.seeds[:1],
                                   efficiency_seeds=self.efficiency_seeds[:1],
                                   efficiency_prompts=self.efficiency_prompts[:1])


PARAMS_BY_NOTEBOOK: dict[str, type] = {
    "01_data_construction": DataParams,
    "02_backbone": BackboneParams,
    "03_anchoring": AnchorParams,
    "04_counterfactual_rl": RLParams,
    "05_evaluation": EvalParams,
}
"""The dataclass of each notebook's parameters (``notebook_params``, ``cli.run_notebook``)."""


# --------------------------------------------------------------------------------------
# Loading and type checking
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` coerced to ``tp`` (only int -> float), or raise ParamsError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _check(value, arg, where)
            except ParamsError as exc:
                errors.append(str(exc))
        raise ParamsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ParamsError(f"{where}: expected None, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ParamsError(f"{where}: expected one of {list(get_args(tp))}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ParamsError(f"{where}: expected bool, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ParamsError(f"{where}: expected int, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ParamsError(f"{where}: expected a finite float, got {value!r}")
            return float(value)
        raise ParamsError(f"{where}: expected float, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ParamsError(f"{where}: expected str, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = get_args(tp) or (Any,)
        return [_check(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ParamsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {
            _check(k, key_tp, f"{where} key"): _check(v, val_tp, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    raise ParamsError(f"{where}: unsupported parameter type {_type_name(tp)}")


class _DuplicateKey(yaml.YAMLError):
    """A mapping of a parameter file that sets one key twice."""

    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(f"key {key!r} is set twice (lines {first} and {again})")
        self.key, self.first, self.again = key, first, again


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping may not set a key twice (the plain loader
    keeps the last value silently). A merge (``<<``) may still be overridden by the mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: the base class reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise _DuplicateKey(key, first, line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads ``1e-4`` as a string: it wants a dot in a float's mantissa. YAML 1.2
# and every reader of these files take it for the number it looks like.
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml_value(text: str) -> Any:
    """One YAML value as the parameter files read it (``1e-4`` a float, ``[a, b]`` a list)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def _read_yaml(path: Path) -> dict:
    """The mapping of a parameter file: UTF-8 YAML, no key set twice, not empty (``{}`` is
    the explicit "all defaults")."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read parameter file ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); parameter "
                          f"files are UTF-8 YAML") from exc
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        raise ParamsError(f"{path}: key {exc.key!r} is set twice (lines {exc.first} and "
                          f"{exc.again}); set it once") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: invalid YAML ({exc})") from exc
    if data is None:
        raise ParamsError(f"{path}: no parameters (the file is empty or only comments); name "
                          f"at least its profile (profile: ...), or write {{}} for all defaults")
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of parameter names to values, "
                          f"got {type(data).__name__}")
    return data


def sections(cls: type) -> dict[str, type]:
    """The sections of a params dataclass: its fields that hold a dataclass (``RLParams.reward``
    holds a ``RewardParams``), by field name."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(hints[f.name])}


def section_of(cls: type) -> dict[str, str | None]:
    """Every key a parameter file of ``cls`` may set -> the section holding it (None: ``cls``
    itself). Keys are flat: a section's fields are set by their own names, so no two places
    of one stage may share a name (checked here)."""
    out: dict[str, str | None] = {}
    parts = sections(cls)
    owners = [(None, cls), *parts.items()]
    for name, owner in owners:
        for f in dataclasses.fields(owner):
            if name is None and f.name in parts:
                continue
            if f.name in out:
                raise TypeError(f"{cls.__name__}: key {f.name!r} is defined twice")
            out[f.name] = name
    return out


def _build(cls: type[T], values: Mapping[str, Any], origin: str) -> T:
    """``cls`` from flat ``values`` after the key, type and value checks; errors start with
    ``origin``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    where = section_of(cls)
    unknown = sorted(set(values) - set(where))
    if unknown:
        raise ParamsError(
            f"{origin}: unknown key(s) {unknown} for {cls.__name__}; "
            f"allowed keys: {sorted(where)}"
        )
    parts = sections(cls)
    hints = {k: typing.get_type_hints(parts[sec] if sec else cls)[k] for k, sec in where.items()}
    checked = {k: _check(v, hints[k], f"{origin}: key {k!r}") for k, v in values.items()}
    top = {k: v for k, v in checked.items() if where[k] is None}
    for name, part in parts.items():
        top[name] = part(**{k: v for k, v in checked.items() if where[k] == name})
    params = cls(**top)
    checks = [getattr(obj, n, None) for obj in (params, *(top[name] for name in parts))
              for n in ("validate_common", "validate")]
    for validate in [*checks, lambda: check_ranges(params)]:
        if callable(validate):
            try:
                validate()
            except ValueError as exc:
                raise ParamsError(f"{origin}: {exc}") from exc
    _check_against_backbone(params, origin)
    return params


def replace_values(params: T, **values: Any) -> T:
    """``params`` with flat ``values`` changed (``dataclasses.replace`` through the sections);
    no checks: what a script does to params already loaded."""
    where = section_of(type(params))
    unknown = sorted(set(values) - set(where))
    if unknown:
        raise ParamsError(f"unknown key(s) {unknown} for {type(params).__name__}")
    top = {k: v for k, v in values.items() if where[k] is None}
    for name in sections(type(params)):
        mine = {k: v for k, v in values.items() if where[k] == name}
        if mine:
            top[name] = dataclasses.replace(getattr(params, name), **mine)
    return dataclasses.replace(params, **top)


def load_params(cls: type[T], source: str | Path | Mapping[str, Any] | None = None,
                **overrides: Any) -> T:
    """Build ``cls`` from a YAML file or a dict; every field it does not set keeps its default.

    Args:
        cls: a parameter dataclass, e.g. ``DataParams``.
        source: path of a YAML file, or a mapping. ``None`` means the defaults.
        **overrides: values applied last, checked like the rest.

    Returns:
        An instance of ``cls`` whose every field has the declared type.

    Raises:
        ParamsError: unknown key, wrong type, value out of range, unreadable, empty, non-UTF-8
            or invalid YAML, a key set twice, a layer or head index the backbone lacks; the
            message names the file (or ``<dict>``) and the key.
    """
    if source is None:
        origin, values = "<defaults>", {}
    elif isinstance(source, (str, Path)):
        origin, values = str(source), _read_yaml(Path(source))
        check_file_profile(Path(source), values)
    else:
        origin, values = "<dict>", dict(source)
    return _build(cls, {**values, **overrides}, origin)


def load_pointed(cls: type[T], path: str | Path, key: str, **overrides: Any) -> T:
    """``load_params(cls, path, **overrides)`` for the file a pointer ``key`` names: an error
    names the key too (a ``backbone_params_file`` that leads to another stage's file)."""
    try:
        return load_params(cls, path, **overrides)
    except ParamsError as exc:
        raise ParamsError(f"key {key!r} points at {path}, which is not a {cls.__name__} "
                          f"file: {exc}") from exc


def check_file_profile(path: Path, values: Mapping[str, Any]) -> None:
    """A file of a profile folder (``params/<profile>/*.yaml``) that names a ``profile`` names
    its folder's (ParamsError naming the file otherwise)."""
    folder = Path(path).resolve().parent
    named = values.get("profile")
    if folder.parent.name == "params" and isinstance(named, str) and named != folder.name:
        raise ParamsError(f"{path}: key 'profile' is {named!r}, but the file is in the "
                          f"{folder.name!r} profile folder")


PARAMS_ROOT = Path(__file__).resolve().parents[1]
"""The checkout holding ``fmr1lib/`` and ``params/``: where ``notebook_params`` looks by default."""


def notebook_params_file(profile: str, notebook: str, root: str | Path | None = None) -> Path:
    """``params/<profile>/<notebook>.yaml`` under ``root`` (default: ``PARAMS_ROOT``)."""
    return Path(root if root is not None else PARAMS_ROOT) / "params" / profile / f"{notebook}.yaml"


def check_profile_name(profile: str, where: str = "key 'profile'") -> None:
    """A profile is a plain folder name (ValueError naming ``where`` otherwise)."""
    if not PROFILE_NAME.fullmatch(profile):
        raise ValueError(f"{where}: {profile!r} is not a profile name (a plain folder name under "
                         f"params/: letters, digits, '_', '-', '.'; no '/' and no leading '.')")


def profiles(root: str | Path | None = None) -> list[str]:
    """The profiles under ``<root>/params/``: folders holding a notebook's parameter file."""
    folder = Path(root if root is not None else PARAMS_ROOT) / "params"
    if not folder.is_dir():
        return []
    return sorted(d.name for d in folder.iterdir()
                  if d.is_dir() and any((d / f"{nb}.yaml").is_file() for nb in PARAMS_BY_NOTEBOOK))


def check_profile(profile: Any, root: str | Path | None = None,
                  where: str = "key 'profile'") -> str:
    """``profile`` if it names a profile folder under ``<root>/params/``, else ParamsError naming
    ``where`` and listing the profiles that exist."""
    if not isinstance(profile, str):
        raise ParamsError(f"{where}: expected str, got {profile!r}")
    try:
        check_profile_name(profile, where)
    except ValueError as exc:
        raise ParamsError(str(exc)) from exc
    known = profiles(root)
    if profile not in known:
        folder = Path(root if root is not None else PARAMS_ROOT) / "params"
        raise ParamsError(f"{where}: no profile {profile!r} under {folder}; profiles: {known}")
    return profile


# --------------------------------------------------------------------------------------
# Layer and head indices against the backbone, before any weights load
# --------------------------------------------------------------------------------------

KNOWN_CHECKPOINTS: dict[str, tuple[int, int]] = {
    "Qwen/Qwen2.5-VL-3B-Instruct": (36, 16),
    "Qwen/Qwen2.5-VL-7B-Instruct": (28, 28),
}
"""(decoder layers, attention heads) of the hub checkpoints the GPU profiles name, from their
``config.json``: used when that file is neither a local folder's nor in the hub cache."""

LAYER_KEYS = ("anchor_layers", "reward_layers", "eval_layers")
"""Fields holding decoder-layer selections (``check_indices``)."""


def shape_from_config(cfg: Mapping[str, Any]) -> tuple[int, int] | None:
    """(decoder layers, attention heads) of a transformers ``config.json`` (its ``text_config``
    where it has one), or None if it does not say."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), Mapping) else {}
    layers = text.get("num_hidden_layers", cfg.get("num_hidden_layers"))
    heads = text.get("num_attention_heads", cfg.get("num_attention_heads"))
    if isinstance(layers, int) and isinstance(heads, int):
        return layers, heads
    return None


def backbone_shape(bp: ModelParams) -> tuple[int, int, str] | None:
    """(decoder layers, attention heads, where they come from) of the backbone ``bp`` names,
    known without loading weights, or None.

    ``tiny``: ``num_layers`` / ``num_heads``. A local checkpoint folder: its ``config.json``. A
    hub id: its ``config.json`` if the hub cache holds it (no download), else
    ``KNOWN_CHECKPOINTS``. None otherwise: the indices are then checked only once the model has
    loaded (``attention.resolve_layers``); ``check_indices(p, n_layers, n_heads, ...)`` is the
    same check for a loader to run on the config before the weights.
    """
    if bp.model_name == "tiny":
        return bp.num_layers, bp.num_heads, "its num_layers / num_heads"
    name = Path(bp.model_name)
    candidates = [name] if name.is_absolute() else [Path.cwd() / name, PARAMS_ROOT / name]
    cfg_file = next((c / "config.json" for c in candidates if (c / "config.json").is_file()), None)
    if cfg_file is None and not name.is_absolute():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(bp.model_name, "config.json")
            cfg_file = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - not a repo id, or no hub client: nothing known
            cfg_file = None
    if cfg_file is not None:
        try:
            shape = shape_from_config(json.loads(cfg_file.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            shape = None
        if shape is not None:
            return (*shape, str(cfg_file))
    if bp.model_name in KNOWN_CHECKPOINTS:
        return (*KNOWN_CHECKPOINTS[bp.model_name], f"the known config of {bp.model_name}")
    return None


def check_indices(p: Any, n_layers: int, n_heads: int, source: str, origin: str) -> None:
    """Every explicit layer index of ``p`` (``LAYER_KEYS``) is one of the ``n_layers`` decoder
    layers (negative: from the end, each layer once) and every ``head_select`` index one of the
    ``n_heads`` heads; ParamsError starting with ``origin`` and naming the key otherwise."""
    values = params_to_dict(p)
    for key in LAYER_KEYS:
        spec = values.get(key)
        if not isinstance(spec, list):
            continue
        bad = [i for i in spec if not -n_layers <= i < n_layers]
        if bad:
            raise ParamsError(f"{origin}: key {key!r}: layer index {bad} out of range: the backbone "
                              f"has {n_layers} decoder layers (0..{n_layers - 1} or "
                              f"-{n_layers}..-1; from {source})")
        resolved = [i % n_layers for i in spec]
        if len(set(resolved)) != len(resolved):
            raise ParamsError(f"{origin}: key {key!r}: {spec} names one of the {n_layers} layers "
                              f"twice (negative indices count from the end)")
    heads = getattr(p, "head_select", None)
    if isinstance(heads, list):
        bad = [h for h in heads if not 0 <= h < n_heads]
        if bad:
            raise ParamsError(f"{origin}: key 'head_select': head index {bad} out of range: the "
                              f"backbone has {n_heads} attention heads (0..{n_heads - 1}; from "
                              f"{source})")


def _upstream_backbone(p: Any) -> tuple[Any, str] | None:
    """The ``BackboneParams`` ``p``'s pointers lead to (``backbone_params_file``, or the
    ``anchor_params_file``'s), with their file; None where a pointed file does not exist (the
    stage reports that when it reads it)."""
    for key, cls in (("backbone_params_file", BackboneParams), ("anchor_params_file", AnchorParams)):
        name = getattr(p, key, None)
        if not name:
            continue
        path = Path(name) if Path(name).is_absolute() else PARAMS_ROOT / name
        if not path.is_file():
            return None
        up = load_pointed(cls, path, key)
        return (up, name) if cls is BackboneParams else _upstream_backbone(up)
    return None


def _check_against_backbone(p: Any, origin: str) -> None:
    """``check_indices`` of ``p`` against the backbone its pointers name, where its shape is
    known without loading it (``backbone_shape``)."""
    values = params_to_dict(p)
    explicit = [k for k in (*LAYER_KEYS, "head_select") if isinstance(values.get(k), list)]
    if not explicit:
        return
    found = _upstream_backbone(p)
    if found is None:
        return
    bp, name = found
    shape = backbone_shape(bp)
    if shape is None:
        return
    n_layers, n_heads, source = shape
    check_indices(p, n_layers, n_heads, f"{name}: {source}" if bp.model_name == "tiny" else source,
                  origin)


def notebook_params(notebook: str, namespace: Mapping[str, Any] | None = None, *,
                    root: str | Path | None = None, **overrides: Any) -> Any:
    """The parameters a notebook runs with: its profile's file, then the notebook's own values.

    A notebook calls ``config.notebook_params("03_anchoring", globals())``. Its ``parameters``
    cell sets ``profile`` and a few knobs to ``None``, meaning "from the profile's file"; papermill
    (``-p``, or ``cli.run_notebook``'s overrides) injects values after that cell.

    Args:
        notebook: a key of ``PARAMS_BY_NOTEBOOK``, e.g. ``"03_anchoring"``.
        namespace: the notebook's ``globals()``. ``profile`` selects
            ``params/<profile>/<notebook>.yaml`` (default ``tiny``); every other name that is a
            field of the notebook's dataclass and is not None overrides the file. Other names
            (imports, variables) are ignored.
        root: the folder holding ``params/`` (default: ``PARAMS_ROOT``).
        **overrides: further values; unlike the namespace, each must be a field.

    Returns:
        The notebook's dataclass (``PARAMS_BY_NOTEBOOK[notebook]``), checked like ``load_params``.

    Raises:
        ParamsError: unknown notebook, a profile that is not a folder under ``params/`` (the
            message lists those that are), missing file, a file that does not name its profile
            or whose ``profile`` is not its folder's, or a value that does not fit the dataclass;
            the message names the file and the key.
    """
    if notebook not in PARAMS_BY_NOTEBOOK:
        raise ParamsError(f"unknown notebook {notebook!r}; known: {list(PARAMS_BY_NOTEBOOK)}")
    cls = PARAMS_BY_NOTEBOOK[notebook]
    namespace = namespace or {}
    profile = overrides.pop("profile", None) or namespace.get("profile") or CommonParams.profile
    check_profile(profile, root, f"<notebook {notebook}>: key 'profile'")
    path = notebook_params_file(profile, notebook, root)
    if not path.exists():
        raise ParamsError(f"{path}: no parameter file for notebook {notebook!r} "
                          f"in profile {profile!r}")
    values = _read_yaml(path)
    if "profile" not in values:
        raise ParamsError(f"{path}: key 'profile' missing: a profile's file names its profile "
                          f"(profile: {profile})")
    params = _build(cls, values, str(path))  # errors in the file name the file
    if params.profile != profile:
        raise ParamsError(f"{path}: key 'profile' is {params.profile!r}, but the file is in the "
                          f"{profile!r} profile folder")
    fields = [k for k in section_of(cls) if k != "profile"]
    set_here = {k: namespace[k] for k in fields if namespace.get(k) is not None}
    set_here.update(overrides)
    if not set_here:
        return params
    return _build(cls, {**values, **set_here}, f"{path} (overrides)")


def params_to_dict(params: Any) -> dict[str, Any]:
    """The resolved parameters as a flat dict, as a parameter file names them (for printing,
    hashing and storing with artifacts; ``repro.params_dict``)."""
    return repro.params_dict(params)


def format_params(params: Any) -> str:
    """A readable YAML dump of the resolved parameters, headed by the class name."""
    body = yaml.safe_dump(params_to_dict(params), sort_keys=False, default_flow_style=None)
    return f"# {type(params).__name__}\n{body}"


def params_summary(params: Any, source: str | Path | None = None) -> str:
    """A few lines on a notebook's parameters: the file, what differs from the defaults, a count.

    Args:
        params: a parameter dataclass.
        source: the YAML file it was read from (default: ``params/<profile>/<notebook>.yaml``,
            the file ``notebook_params`` reads for its class).

    Returns:
        One line naming the class, the file and how many fields differ from the defaults in
        ``fmr1lib/config.py``, then one line per such field; a value that is not the file's
        (a notebook override) is marked with what the file gives.
    """
    cls = type(params)
    if source is None:
        notebook = next((nb for nb, c in PARAMS_BY_NOTEBOOK.items() if c is cls), None)
        source = notebook_params_file(params.profile, notebook) if notebook else None
    values, defaults = params_to_dict(params), params_to_dict(cls())
    from_file = params_to_dict(load_params(cls, source)) if source is not None else defaults
    shown = [k for k in values if values[k] != defaults[k] or values[k] != from_file[k]]
    where = "the defaults"
    if source is not None:
        where = Path(source).resolve()
        if where.is_relative_to(PARAMS_ROOT):
            where = where.relative_to(PARAMS_ROOT)
    n_diff = sum(values[k] != defaults[k] for k in values)
    lines = [f"{cls.__name__} from {where}: {len(values)} parameters, {n_diff} differ from the "
             f"defaults in fmr1lib/config.py"]
    for k in shown:
        line = f"  {k}: {_flow(values[k])}"
        if values[k] != from_file[k]:
            line += f"  # override; the file gives {_flow(from_file[k])}"
        lines.append(line)
    return "\n".join(lines)


def _flow(value: Any) -> str:
    """``value`` as one line of YAML flow style."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
    return text.removesuffix("...\n").strip()
