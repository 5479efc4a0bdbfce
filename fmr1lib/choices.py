"""The vocabulary of the package: every set of named choices, defined once.

Each choice set is a ``Literal`` type. ``config`` annotates the parameter fields with it, so a
parameter file that names anything else is refused at load, naming the file and the key, by
the one type check every field goes through (``config._check``); the modules that act on a
choice import the same type and take its values with ``options`` (``options(LossAgg)`` is
``("token_mean", "seq_mean")``). Adding a value is one edit here, plus the code that handles it.

This module imports nothing from the package: it is the lowest layer.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

# --- data (stage 0 inputs; ``fmr1lib.data``, ``fmr1lib.records``) ---------------------------

Split = Literal["train", "warmup", "test_id", "test_ood"]
"""The splits of every dataset (``train_split`` names one)."""
TestSplit = Literal["test_id", "test_ood"]
"""The evaluated splits: in-distribution (cue as in training) and out-of-distribution."""
DataSource = Literal["focusshapes", "jsonl"]
"""Where the records come from: the generated FocusShapes scenes or region-annotated JSONL."""
OnBadRecord = Literal["error", "skip"]
"""What a JSONL loader does with a record that fails validation."""
AnswerType = Literal["word", "number", "yesno", "choice"]
"""How an answer is compared with the reference (``fmr1lib.scoring``)."""
CueCorner = Literal["top_left", "top_right", "bottom_left", "bottom_right"]
"""The corner cell of the FocusShapes shortcut cue."""
OodCue = Literal["contradict", "random"]
"""The cue of ``test_ood``: never the answer, or uniform."""
WarmupCue = Literal["none", "random"]
"""The cue of the warm-up split: absent, or uninformative."""
Intervention = Literal["mask", "background", "blur", "noise"]
"""How a region is removed from an image (``fmr1lib.counterfactual``)."""

# --- models -------------------------------------------------------------------------------

Dtype = Literal["float32", "bfloat16", "float16"]
"""The dtype a model loads in."""
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
"""Attention kernels a model may load with; attention capture runs on top of whichever is set
(``attention.CAPTURE_IMPLEMENTATION``)."""
LayerSelection = Literal["last_half", "all"]
"""A named set of decoder layers (or a list of indices, where a field allows it)."""
HeadSelection = Literal["mean", "all"]
"""How attention heads are combined: their mean, or each kept (or a list of indices)."""

# --- training -----------------------------------------------------------------------------

LrSchedule = Literal["constant", "linear", "cosine"]
"""The learning-rate decay after the warm-up."""
MixedPrecision = Literal["no", "bf16", "fp16"]
"""accelerate's mixed-precision mode."""
Reasoning = Literal["look", "two_route"]
"""The reasoning text of supervised targets (``fmr1lib.prompting``): one route that names the
evidence, or the evidence route and the cue route by record (``cue_route_share``)."""
Route = Literal["evidence", "cue"]
"""The two reasoning routes of ``two_route`` targets."""
Stage = Literal["backbone", "anchor", "rl"]
"""The training stages: 0 (backbone), 1 (anchoring), 2 (reinforcing)."""
StageVariant = Literal["plain", "text_perception", "focus_anchor"]
"""Stage-1 variants: plain SFT, SFT + the Focus anchoring loss, SFT with perception text."""
WarmupVariant = Literal["plain", "focus_anchor"]
"""How the backbone's warm-up trains (a stage-1 variant without the text-perception one)."""
AttnLoss = Literal["kl", "mass"]
"""The anchoring loss: KL to the box distribution, or -log of the mass inside the boxes."""

# --- stage 2 ------------------------------------------------------------------------------

RLVariant = Literal["grpo_backbone", "grpo", "faithful", "faithful_occlusion", "grpo_plain",
                    "faithful_plain"]
"""Stage-2 variants (``config.RLParams.variants``; what each starts from:
``RLParams.START_VARIANTS``)."""
Region = Literal["boxes", "occlusion"]
"""Where the faithful reward's causal region comes from: the evidence boxes, or an occlusion
search on the policy itself."""
LossAgg = Literal["token_mean", "seq_mean"]
"""How the policy loss averages: over every completion token of the batch, or per sequence."""
FaithfulForm = Literal["raw", "group_tanh"]
"""The faithful reward from the concentration: c itself, or 0.5 tanh of its group z-score."""
Concentration = Literal["top_kappa", "weighted", "relative", "dependency"]
"""Which response tokens enter the faithful reward's concentration, and with what weight
(``faithful.concentration``; docs/design.md §6.3, §6.6)."""
FaithfulAdvantage = Literal["summed", "separate"]
"""How the faithful reward enters the GRPO advantage (``grpo.combine_advantages``): ``summed``
adds it to the total reward before the group standardisation; ``separate`` adds it, centred
among the group's correct trajectories and weighted, to the standardised advantage of the other
rewards, so the group std cannot magnify it."""
Reading = Literal["logprob", "kl"]
"""How the dependence of the answer tokens on a region is measured (``fmr1lib.reading``): the
answer tokens' log-probability lost when it is removed, or the policy's KL at those tokens."""
OcclusionSearch = Literal["exhaustive", "coarse_to_fine", "gradient", "budgeted"]
"""How the occlusion region is found (``fmr1lib.occlusion``)."""
RolloutBackend = Literal["hf", "vllm"]
"""Who samples stage 2's rollouts (``fmr1lib.rollouts``): Hugging Face ``generate`` on the policy
itself, or a vLLM engine whose weights are synced from the policy once per optimiser step."""
ISCorrection = Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
"""The importance-sampling correction for a sampler that is not the trained policy
(``rollouts.importance_weights``): off, or the ratio ``pi_train / pi_sampler`` per token or per
sequence, capped (``truncate``) or dropped above the cap (``mask``)."""

# --- evaluation ---------------------------------------------------------------------------

AblationRow = Literal["backbone", "plain_sft", "text_perception", "anchoring", "grpo_backbone",
                      "anchoring_grpo", "faithful_mr1", "faithful_mr1_occlusion", "plain_grpo",
                      "plain_faithful"]
"""Rows of the ablation table, in order (``fmr1lib.stages.ROWS`` says what trains each)."""


def options(choice: Any) -> tuple[str, ...]:
    """The values of a choice set, in their order.

    >>> options(LossAgg)
    ('token_mean', 'seq_mean')
    """
    values = get_args(choice)
    if not values or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{choice!r} is not a Literal of strings")
    return values
