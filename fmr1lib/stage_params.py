"""The parameters of each stage, one dataclass per notebook (docs/design.md §10).

Every parameter has exactly one default, documented here: the method's setting, which is also
the ``tiny`` profile. Stage 2's method settings are sections (``RolloutParams``,
``PolicyLossParams``, ``RewardParams``), each handed whole to the code that uses it; a
parameter file still names their keys flat (``config.section_of``).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Literal

from fmr1lib.choices import (
    AblationRow,
    AttnLoss,
    Concentration,
    CueCorner,
    DataSource,
    FaithfulAdvantage,
    FaithfulForm,
    Intervention,
    ISCorrection,
    LayerSelection,
    LossAgg,
    LrSchedule,
    OcclusionSearch,
    OnBadRecord,
    OodCue,
    RLVariant,
    RolloutBackend,
    Split,
    StageVariant,
    TestSplit,
    WarmupCue,
    WarmupVariant,
    options,
)
from fmr1lib.params_common import (
    PARAMS_ROOT,
    AdapterParams,
    BuildParams,
    CommonParams,
    EvalSettings,
    ModelLoadParams,
    ModelParams,
    OptimParams,
    SeedParams,
    TrainParams,
    check_at_least,
    check_distinct,
    check_layers,
)


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
        default_factory=lambda: list(options(StageVariant)))
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
    rollout_backend: RolloutBackend = "hf"
    """Who samples the rollouts (``fmr1lib.rollouts``): ``hf`` (``generate`` on the policy) or
    ``vllm`` (a vLLM engine built from the start model, its weights synced from the policy once
    per optimiser step; needs the optional vLLM install, README). The sampler's own log-probs
    then enter the importance-sampling correction (``is_correction``)."""
    vllm_gpu_memory_utilization: float = 0.3
    """``vllm``: the share of the GPU's memory the engine may take (weights and KV cache), the rest
    staying with training (colocation); unused on CPU, where ``VLLM_CPU_KVCACHE_SPACE`` sizes
    the cache."""

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
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"key 'vllm_gpu_memory_utilization': "
                             f"{self.vllm_gpu_memory_utilization} is not in (0, 1]")


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
    is_correction: ISCorrection = "none"
    """Importance-sampling correction of the policy term for a sampler that is not the trained
    policy (``rollout_backend: vllm``; ``rollouts.importance_weights``): each token's term is
    multiplied by ``pi_old / pi_sampler`` of its token (``token_*``) or of its whole sequence
    (``sequence_*``), capped at ``is_cap`` (``*_truncate``) or set to 0 above it (``*_mask``).
    The sampler's log-prob gap and ratios are logged whichever is chosen."""
    is_cap: float = 3.0
    """The cap of the importance-sampling ratio (``is_correction``)."""

    def validate(self) -> None:
        """Value checks."""
        check_at_least(self, 1, "num_iterations")
        check_at_least(self, 0, "beta", "lambda_attn_rl", "clip_high")
        check_at_least(self, 1, "is_cap")
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
        if self.loss.is_correction != "none" and self.rollout.rollout_backend == "hf":
            raise ValueError(f"key 'is_correction': {self.loss.is_correction!r} corrects for a "
                             f"sampler that is not the policy, but rollout_backend is 'hf' (the "
                             f"policy samples itself); set rollout_backend: vllm or "
                             f"is_correction: none")


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


