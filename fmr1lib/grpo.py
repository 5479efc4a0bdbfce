"""Stage 2, Reinforcing: GRPO with the counterfactual faithful reward (docs/design.md §6).

Per step, for ``P`` prompts: sample ``G`` completions each (temperature ``T``, vision tokens
suppressed), score them (``rewards.py``; the faithful reward from ``faithful.py``), normalise
the rewards within each group (GRPO; the std division is optional, Dr.GRPO) and take
``num_iterations`` steps on the clipped objective

    L = -agg_t min(r_t A, clip(r_t, 1 - clip_low, 1 + clip_high) A) + beta * KL_k3(pi || pi_ref)

with ``r_t = pi(y_t | .) / pi_old(y_t | .)``, asymmetric clipping (DAPO clip-higher) and
``agg`` the token mean over the batch or the per-sequence mean.

The file reads top to bottom: the pure math (``group_advantages``, ``clipped_policy_loss``),
rollouts (``rollout``, ``collect_groups`` with dynamic sampling; the sampler that
``rollout_backend`` names, ``make_sampler``: ``fmr1lib.rollouts``), then ``grpo_step``, which is
one rollout and update, and ``train_grpo``, which runs it in the training skeleton
(``train.fit``). The faithful reward's attention rows come from the same training forward that
gives the log-probabilities, captured by ``attention.AttentionCapture``: the only extra pass is
the one on the counterfactual image.

Variant ``grpo_backbone`` is ``grpo`` started from the stage-0 backbone; the trainer treats the
two alike.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmr1lib import (
    anchoring,
    attention,
    batching,
    config,
    faithful,
    grpo_stats,
    modeling,
    reading,
    rewards,
    rollouts,
    train,
)
from fmr1lib.batching import SequenceBatch, completion_logits, token_logprobs
from fmr1lib.choices import LossAgg, options
from fmr1lib.config import PolicyLossParams

logger = logging.getLogger(__name__)

VARIANTS = config.RLParams.VARIANTS
FAITHFUL_VARIANTS = config.RLParams.FAITHFUL_VARIANTS
LOSS_AGGS = options(LossAgg)
REFILL_SEED_STRIDE = 7919
"""Refill round ``r`` of dynamic sampling draws prompts with seed ``seed + r * stride``."""

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
                        mask: torch.Tensor, settings: PolicyLossParams | None = None,
                        logp_ref: torch.Tensor | None = None,
                        is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO / PPO clipped surrogate with asymmetric clipping and an optional k3 KL term.

    Per valid token: ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + beta * k3`` with
    ``r = exp(logp_new - logp_old)`` and ``k3 = exp(ref - new) - (ref - new) - 1``.

    Args:
        logp_new: ``[N, T]`` log-probs of the sampled tokens under the current policy.
        logp_old: ``[N, T]`` the same under the sampling policy (detached).
        advantages: ``[N]`` one advantage per sequence.
        mask: ``[N, T]`` valid completion tokens.
        settings: ``clip_low`` (``r`` is clipped below at ``1 - clip_low``), ``clip_high``
            (above at ``1 + clip_high``), ``loss_agg`` (``token_mean``: sum over the batch's
            valid tokens / their number; ``seq_mean``: mean over each sequence's valid tokens,
            then over sequences) and ``beta`` (the KL term's weight).
        logp_ref: ``[N, T]`` log-probs under the reference policy (needed when ``beta > 0``).
        is_weights: ``[N, T]`` or ``[N, 1]`` importance-sampling weights of a sampler that is
            not the policy (``rollouts.importance_weights``): the policy term of each token is
            multiplied by its weight before aggregation, the KL term is not (TRL's placement).
            None: no correction.

    Returns:
        ``(loss, stats)``; stats: ``clip_frac`` (valid tokens whose clipped term is the active
        one), ``clip_low_frac``, ``clip_high_frac``, ``ratio_mean``, ``kl`` (k3 to the
        reference, NaN without one), ``pg_loss``.

    >>> lp = torch.zeros(1, 2)
    >>> loss, st = clipped_policy_loss(lp, lp, torch.tensor([2.0]), torch.ones(1, 2))
    >>> float(loss), st["ratio_mean"], st["clip_frac"]
    (-2.0, 1.0, 0.0)
    """
    settings = settings or PolicyLossParams()
    clip_low, clip_high = settings.clip_low, settings.clip_high
    loss_agg, beta = settings.loss_agg, settings.beta
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss aggregation {loss_agg!r}; use one of {LOSS_AGGS}")
    m = mask.to(logp_new.dtype)
    adv = advantages.to(logp_new.dtype)[:, None]
    ratio = torch.exp((logp_new - logp_old) * m)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights.to(per_token.dtype)
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


# --------------------------------------------------------------------------------------
# Groups and rollouts
# --------------------------------------------------------------------------------------


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
    sampler_logprobs: list[list[float]] | None = None
    """Per completion the sampler's log-prob of each kept token (None: the policy sampled,
    ``rollouts.HFSampler``)."""

    @property
    def correct(self) -> list[bool]:
        """Answer-correct completions."""
        return [a > 0 for a in self.accuracy]

    def distinct_correct(self) -> list[list[int]]:
        """Indices of the correct completions, grouped by identical token sequence."""
        return faithful.distinct_correct(self.tokens, self.correct)


@dataclass
class GRPOContext:
    """Everything one GRPO step needs: the training state, the processor and the settings."""

    state: train.TrainState
    processor: Any
    params: Any
    variant: str
    layers: list[int]
    ref_model: Any = None
    extra_reward: ExtraReward | None = None
    token_ids: dict[str, int] = field(default_factory=dict)
    share_images: bool = True
    """Each prompt once: its prefill runs once for the G rollouts (``modeling.prefill_once``) and
    its image is stored once in the step's sequences (the vision tower runs once per prompt, not
    once per sample); False repeats both per sample (the benchmark's baseline)."""
    sampler: Any = None
    """Who samples the rollouts (``make_sampler``: ``rollouts.HFSampler`` or
    ``vllm_backend.VLLMSampler``)."""

    model = property(lambda self: self.state.model)
    optimizer = property(lambda self: self.state.optimizer)
    scheduler = property(lambda self: self.state.scheduler)
    accelerator = property(lambda self: self.state.accelerator)
    start_step = property(lambda self: self.state.start_step)

    @property
    def faithful(self) -> bool:
        """Whether the faithful reward is on."""
        return self.variant in FAITHFUL_VARIANTS and self.params.reward.w_faith != 0

    @property
    def region(self) -> str:
        """Where the causal region comes from (``faithful.REGIONS``)."""
        return "occlusion" if self.variant == "faithful_occlusion" else "boxes"


def _is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def setup_grpo(model: Any, processor: Any, params: Any, variant: str, accelerator: Any = None,
               extra_reward: ExtraReward | None = None,
               out_dir: str | Path | None = None) -> GRPOContext:
    """Reference policy, then optimiser, schedule, resume and accelerate (``train.setup_training``).

    Args:
        model: a Qwen2.5-VL (possibly peft-wrapped), the policy to train.
        processor: its processor.
        params: ``RLParams``.
        variant: one of ``VARIANTS``.
        accelerator: an ``accelerate.Accelerator`` (default: a new one with
            ``params.mixed_precision``).
        extra_reward: optional reward added to the total (see ``ExtraReward``).
        out_dir: run folder (checkpoints; ``params.resume`` resumes from its latest).

    Returns:
        A ``GRPOContext``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown RL variant {variant!r}; use one of {VARIANTS}")
    acc = accelerator or train.make_accelerator(params)
    ref_model = None
    if params.loss.beta > 0 and not _is_peft(model):
        # Copied before any checkpoint is loaded: the reference is the starting policy.
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    state = train.setup_training(
        model, params, out_dir, acc,
        micro_batch=(params.rollout.prompts_per_step * params.rollout.group_size
                     // max(1, params.grad_accum)))
    if ref_model is not None:
        ref_model = ref_model.to(acc.device)
    tok = processor.tokenizer
    ids = {"eos": tok.convert_tokens_to_ids("<|im_end|>"),
           "image": tok.convert_tokens_to_ids("<|image_pad|>")}
    layers = attention.resolve_layers(params.reward.reward_layers, attention.num_text_layers(model))
    ctx = GRPOContext(state=state, processor=processor, params=params, variant=variant,
                      layers=layers, ref_model=ref_model, extra_reward=extra_reward,
                      token_ids=ids)
    ctx.sampler = make_sampler(ctx)
    return ctx


def make_sampler(ctx: GRPOContext) -> Any:
    """The sampler ``params.rollout.rollout_backend`` names (``fmr1lib.rollouts``)."""
    rollout, acc = ctx.params.rollout, ctx.accelerator
    if rollout.rollout_backend == "hf":
        return rollouts.HFSampler(ctx.processor, acc.device)
    if acc.num_processes > 1:
        raise NotImplementedError("rollout_backend 'vllm' runs in one process; launch stage 2 "
                                  "without accelerate's multi-process launcher, or use 'hf'")
    from fmr1lib import vllm_backend

    return vllm_backend.VLLMSampler(ctx.processor, vllm_backend.EngineSettings.of(ctx.params))


def rollout(ctx: GRPOContext, rows: Sequence[dict[str, Any]]) -> list[Group]:
    """Sample ``G`` completions per prompt and score them with the model-free rewards.

    A completion that samples a vision token or is malformed scores 0; nothing raises.
    With ``rollout_prompts`` > 0 the prompts are generated that many at a time (memory).
    """
    k = ctx.params.rollout.rollout_prompts or len(rows)
    return [g for start in range(0, len(rows), k) for g in _rollout(ctx, rows[start:start + k])]


def _rollout(ctx: GRPOContext, rows: Sequence[dict[str, Any]]) -> list[Group]:
    p = ctx.params
    out = ctx.sampler.sample(ctx.accelerator.unwrap_model(ctx.model), rows, p.rollout,
                             p.max_new_tokens, share_prefill=ctx.share_images)
    texts = out.texts
    tokens, ok = batching.completion_tokens(out.completion_ids, ctx.token_ids["eos"],
                                            modeling.vision_token_ids(ctx.processor))
    sampler_logp = rollouts.cut_logprobs(out.logprobs, tokens)
    g = p.rollout.group_size
    groups = []
    for i, row in enumerate(rows):
        sl = slice(i * g, (i + 1) * g)
        t_i, ok_i, x_i = tokens[sl], ok[sl], texts[sl]
        a = rewards.accuracy_reward(x_i, [row["answer"]] * g, [row.get("answer_type") or "word"] * g,
                                    [row.get("choices")] * g)
        f = rewards.format_reward(x_i)
        a = [v if k else 0.0 for v, k in zip(a, ok_i, strict=True)]
        f = [v if k else 0.0 for v, k in zip(f, ok_i, strict=True)]
        extra = None
        if ctx.extra_reward is not None:
            extra = [float(v) if k else 0.0 for v, k in zip(
                ctx.extra_reward(completions=x_i, completion_ids=t_i, rows=[row] * g), ok_i,
                strict=True)]
        groups.append(Group(row=row, tokens=t_i, texts=x_i, ok=ok_i, accuracy=a, format=f,
                            extra=extra,
                            sampler_logprobs=sampler_logp[sl] if sampler_logp is not None else None))
    return groups


def _distinct_scored(ctx: GRPOContext, g: Group) -> list[list[int]]:
    """The group's distinct correct trajectories if the faithful reward scores it, else []."""
    if not ctx.faithful:
        return []
    distinct = g.distinct_correct()
    ok = faithful.faithful_eligible(g.row, distinct, ctx.region, ctx.params.reward.faithful_form)
    return distinct if ok else []


def _group_rewards(ctx: GRPOContext, g: Group, faith: Sequence[float] | None = None) -> list[float]:
    w = ctx.params.reward
    return rewards.combine_rewards(g.accuracy, g.format, faith, w.w_acc, w.w_fmt, w.w_faith,
                                   extra=g.extra)["overall"]


def _group_may_vary(ctx: GRPOContext, g: Group) -> bool:
    """Whether a group can give a non-zero advantage (dynamic sampling keeps it).

    Equal accuracy + format rewards mean all or none are correct; then only two distinct
    correct trajectories can make the faithful reward differ within the group.
    """
    base = _group_rewards(ctx, g)
    if max(base) != min(base):
        return True
    return len(_distinct_scored(ctx, g)) >= 2


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
    p, acc = ctx.params, ctx.accelerator
    n = min(len(dataset), p.n_prompts) if p.n_prompts > 0 else len(dataset)

    def draw(seed: int, k: int) -> list[Group]:
        idx = batching.batch_indices(n, p.rollout.prompts_per_step, step, seed,
                                     acc.process_index, acc.num_processes)
        return rollout(ctx, [dataset[i] for i in idx[:k]])

    with _process_sampling_rng(acc, p.seed, step):
        first = draw(p.seed, p.rollout.prompts_per_step)
        if not p.rollout.dynamic_sampling:
            return first, 0
        kept = [g for g in first if _group_may_vary(ctx, g)]
        rounds = 0
        while len(kept) < len(first) and rounds < p.rollout.max_refill:
            rounds += 1
            more = draw(p.seed + REFILL_SEED_STRIDE * rounds, len(first) - len(kept))
            kept += [g for g in more if _group_may_vary(ctx, g)]
    return (kept if kept else first), rounds


# --------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------


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
    logp_sampler: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None


def _chunks(ctx: GRPOContext, groups: list[Group]) -> list[_Chunk]:
    """Split the groups into ``grad_accum`` chunks, each weighted by its share of the loss
    (``train.loss_shares``: the loss is the mean over the global batch)."""
    p = ctx.params
    n_chunks = max(1, min(p.grad_accum, len(groups)))
    parts = [list(map(int, c)) for c in np.array_split(np.arange(len(groups)), n_chunks)]
    counts = []
    for part in parts:
        toks = [len(c) for i in part for c in groups[i].tokens]
        counts.append(sum(toks) if p.loss.loss_agg == "token_mean" else sum(t > 0 for t in toks))
    out = []
    for part, w in zip(parts, train.loss_shares(ctx.accelerator, counts), strict=True):
        gs = [groups[i] for i in part]
        batch = batching.build_sequences([g.row for g in gs], [g.tokens for g in gs], ctx.processor,
                                         share_images=ctx.share_images)
        chunk = _Chunk(groups=gs, batch=batch.to(ctx.accelerator.device), weight=w)
        if gs[0].sampler_logprobs is not None:
            chunk.logp_sampler = rollouts.pad_logprobs(
                [lp for g in gs for lp in g.sampler_logprobs or []],
                batch.completion_ids.shape[1]).to(ctx.accelerator.device)
        out.append(chunk)
    return out


def _reference_logprobs(ctx: GRPOContext, batch: SequenceBatch) -> torch.Tensor:
    t = batch.completion_ids.shape[1]
    if ctx.ref_model is not None:
        with batching.eval_mode(ctx.ref_model):
            logits = completion_logits(ctx.ref_model, batch.inputs, t,
                                       ctx.params.rollout.temperature)
    else:
        model = ctx.accelerator.unwrap_model(ctx.model)
        with batching.eval_mode(model), model.disable_adapter():
            logits = completion_logits(model, batch.inputs, t, ctx.params.rollout.temperature)
    return token_logprobs(logits, batch.completion_ids, batch.completion_mask)


def _counterfactual(ctx: GRPOContext, chunk: _Chunk) -> faithful.CounterfactualView | None:
    """The chunk's counterfactual view ``I'`` (faithful variants; no gradient)."""
    return faithful.counterfactual_view(
        ctx.accelerator.unwrap_model(ctx.model), ctx.processor, chunk.batch,
        [g.row for g in chunk.groups], [_distinct_scored(ctx, g) for g in chunk.groups],
        ctx.params.reward, ctx.region, ctx.params.rollout.temperature)


@dataclass
class _Scores:
    """What scoring a chunk gives: the rewards of its trajectories and what they are made of."""

    faithful: list[float]
    overall: list[float]
    entropy: float
    details: faithful.FaithfulScores | None


def _score(ctx: GRPOContext, chunk: _Chunk, view: faithful.CounterfactualView | None,
           logits: torch.Tensor, attn: torch.Tensor | None) -> _Scores:
    """The chunk's rewards (combined in ``rewards.combine_rewards``) and its policy's entropy,
    from the training forward's logits and attention rows."""
    batch = chunk.batch
    with torch.no_grad():
        ent = token_entropy(logits.detach(), batch.completion_mask)
        entropy = float(ent.sum() / batch.completion_mask.sum().clamp_min(1))
        details = (faithful.faithful_rewards(view, batch, logits, attn, ctx.params.reward)
                   if ctx.faithful else None)
    g_size = batch.group_size
    faith = details.rewards if details is not None else [0.0] * (len(chunk.groups) * g_size)
    overall = [r for gi, g in enumerate(chunk.groups)
               for r in _group_rewards(ctx, g, faith[gi * g_size:(gi + 1) * g_size])]
    return _Scores(faithful=faith, overall=overall, entropy=entropy, details=details)


def _advantages(ctx: GRPOContext, chunk: _Chunk, scores: _Scores) -> torch.Tensor:
    """Group advantages of the chunk's rewards (``faithful_advantage``: ``combine_advantages``)."""
    p, g_size = ctx.params, chunk.batch.group_size
    if ctx.faithful and p.reward.faithful_advantage == "separate":
        base = [r for g in chunk.groups for r in _group_rewards(ctx, g)]
        correct = [ok for g in chunk.groups for ok in g.correct]
        adv = combine_advantages(base, scores.faithful, correct, g_size, p.reward.w_faith,
                                 p.loss.std_normalize)
    else:
        adv = group_advantages(torch.tensor(scores.overall), g_size, p.loss.std_normalize)
    return adv.to(ctx.accelerator.device)


def combine_advantages(base: Sequence[float], faith: Sequence[float], correct: Sequence[bool],
                       group_size: int, w_faith: float = 1.0,
                       std_normalize: bool = True) -> torch.Tensor:
    """``separate`` advantages: the group advantage of the other rewards, plus the faithful
    reward centred among the group's correct trajectories and weighted, never divided by a
    group std (``choices.FaithfulAdvantage``).

    In a group whose answers are all correct the other rewards give 0, and a faithful spread of
    0.01 stays 0.01 instead of becoming a full-sized advantage.

    >>> combine_advantages([1.0, 1.0], [0.1, -0.1], [True, True], 2).tolist()
    [0.10000000149011612, -0.10000000149011612]
    >>> [round(v, 4) for v in combine_advantages([1.0, 0.0], [0.0, 0.0], [True, False], 2).tolist()]
    [0.7071, -0.7071]
    """
    adv = group_advantages(torch.tensor(list(base)), group_size, std_normalize)
    f = torch.tensor(list(faith), dtype=torch.float32).view(-1, group_size)
    ok = torch.tensor(list(correct), dtype=torch.bool).view(-1, group_size)
    n_ok = ok.sum(dim=1, keepdim=True).clamp_min(1)
    mean_ok = (f * ok).sum(dim=1, keepdim=True) / n_ok
    centred = torch.where(ok, f - mean_ok, torch.zeros_like(f))
    return adv + w_faith * centred.reshape(-1)


def _log_scores(log: grpo_stats.StepLog, scores: _Scores) -> None:
    log.lists["entropy"].append(scores.entropy)
    if scores.details is not None:
        d = scores.details
        log.lists["concentration"] += d.concentration
        log.lists["s_t"] += d.s_t
        log.lists["share"] += d.share
        log.lists["distinct"] += [1.0] * d.distinct


def _log_reading(ctx: GRPOContext, chunk: _Chunk, view: faithful.CounterfactualView,
                 logits: torch.Tensor, log: grpo_stats.StepLog) -> None:
    """The reward-validity diagnostic (``fmr1lib.reading``): ``reading`` of each scored distinct
    trajectory, and per group the rank correlation of its faithful reward with ``reading``."""
    batch, p = chunk.batch, ctx.params
    sel = view.selected
    on_i = view.on_original(logits)
    model = ctx.accelerator.unwrap_model(ctx.model)
    g_size = batch.group_size
    rows = [g.row for g in chunk.groups]
    answers = [rows[int(i) // g_size]["answer"] for i in sel.tolist()]
    values = reading.reading_scores(model, ctx.processor, batch, rows,
                                    reading.Trajectories(sel, on_i, answers),
                                    p.reward.intervention, p.rollout.temperature)
    scores = [chunk.faithful[c[0]] for c in view.copies]
    group_of = [int(i) // g_size for i in sel.tolist()]
    log.lists["reading"] += [v for v in values if math.isfinite(v)]
    log.lists["reading_cue"] += [float(v < 0) for v in values if math.isfinite(v)]
    log.lists["reading_spearman"] += reading.within_group_spearman(scores, values, group_of)


def _focus_anchor_loss(ctx: GRPOContext, batch: SequenceBatch,
                       attn: torch.Tensor) -> torch.Tensor | None:
    """Auxiliary anchoring term on the ``<Focus>`` row (the first query row) during RL."""
    first = torch.arange(0, attn.shape[0], batch.group_size, device=attn.device)
    ids = batch.inputs["input_ids"].index_select(0, first)
    dists = [r[:, 0, :] for r in attention.rows_over_image_tokens(
        attn.index_select(0, first)[:, :, :1], ids, ctx.token_ids["image"])]
    loss, _ = anchoring.batch_attention_loss(dists, batch.focus_targets, "kl")
    return loss


def _update(ctx: GRPOContext, chunk: _Chunk, first: bool, last: bool, n_groups: int,
            log: grpo_stats.StepLog) -> None:
    """One chunk of one policy update, in phases: (first iteration: reference log-probs and
    the counterfactual view), the fused forward (log-probs and the attention rows the reward
    and the auxiliary loss read), (first iteration: score, advantages), policy loss, auxiliary
    loss, backward."""
    p, acc, model, batch = ctx.params, ctx.accelerator, ctx.model, chunk.batch
    view = None
    if first:
        if p.loss.beta > 0:
            chunk.logp_ref = _reference_logprobs(ctx, batch)
        if ctx.faithful:
            t0 = time.perf_counter()
            view = _counterfactual(ctx, chunk)
            log.faithful_s += time.perf_counter() - t0
    capture = (first and view is not None) or p.loss.lambda_attn_rl > 0
    cap_ctx = (attention.AttentionCapture(model, batch.query_positions.to(acc.device),
                                          layers=ctx.layers)
               if capture else contextlib.nullcontext())
    # With gradient checkpointing the backward recomputes the captured layers, so it runs
    # inside the capture block.
    with train.micro_batch(acc, model, last), cap_ctx as cap:
        logits = completion_logits(model, batch.inputs, batch.completion_ids.shape[1],
                                   p.rollout.temperature)
        logp = token_logprobs(logits, batch.completion_ids, batch.completion_mask)
        attn = cap.attentions if capture else None
        if first:
            t0 = time.perf_counter()
            scores = _score(ctx, chunk, view, logits, attn)
            if ctx.faithful:
                log.faithful_s += time.perf_counter() - t0
            _log_scores(log, scores)
            chunk.faithful, chunk.overall = scores.faithful, scores.overall
            chunk.advantages = _advantages(ctx, chunk, scores)
            chunk.logp_old = logp.detach()
            if chunk.logp_sampler is not None:
                chunk.is_weights, is_stats = rollouts.importance_weights(
                    chunk.logp_old, chunk.logp_sampler, batch.completion_mask,
                    p.loss.is_correction, p.loss.is_cap)
                log.add(is_stats)
        loss, st = clipped_policy_loss(logp, chunk.logp_old, chunk.advantages,
                                       batch.completion_mask, p.loss, chunk.logp_ref,
                                       chunk.is_weights)
        log.add(st)
        # The policy term is weighted by the chunk's share of tokens (or sequences), the
        # anchoring term by its share of prompts, so chunking leaves both means unchanged.
        loss = loss * chunk.weight
        if p.loss.lambda_attn_rl > 0 and attn is not None:
            aux = _focus_anchor_loss(ctx, batch, attn)
            if aux is not None:
                loss = loss + p.loss.lambda_attn_rl * aux * len(chunk.groups) / n_groups
                log.lists["attn_rl"].append(float(aux.detach()))
        ctx.state.backward(loss, f"GRPO loss ({ctx.variant})")
        log.lists["loss"].append(float(loss.detach()))
    if view is not None and p.reward.reading_diagnostic:
        # Outside the capture block: the instrument's forwards are not the step's.
        _log_reading(ctx, chunk, view, logits, log)


def grpo_step(ctx: GRPOContext, dataset: Any, step: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One GRPO step: roll out, then ``num_iterations`` policy updates (``_update``: score and
    advantages on the first, policy and auxiliary loss on each), one optimiser step each, one
    schedule step.

    Args:
        ctx: from ``setup_grpo``.
        dataset: rows with image, question, answer, answer_type, evidence_boxes, meta.
        step: the step index (selects the prompts).

    Returns:
        ``(stats, samples)``: the step's metrics (see ``train_grpo``) and per completion of the
        first groups a small dict (question, answer, completion, rewards).

    Raises:
        train.NonFiniteLossError: the loss is NaN/inf.
    """
    p = ctx.params
    ctx.state.step = step
    t_start = time.perf_counter()
    groups, refills = collect_groups(ctx, dataset, step)
    t_rollout = time.perf_counter() - t_start
    chunks = _chunks(ctx, groups)
    log = grpo_stats.StepLog()
    grad_norm = None
    for it in range(p.loss.num_iterations):
        for ci, chunk in enumerate(chunks):
            _update(ctx, chunk, it == 0, ci == len(chunks) - 1, len(groups), log)
        grad_norm = ctx.state.clip_and_step(p.grad_clip)
        ctx.sampler.weights_updated()
    lr = ctx.scheduler.get_last_lr()[0]
    ctx.scheduler.step()
    stats = grpo_stats.step_stats(ctx, groups, chunks, log)
    stats.update(grad_norm=grad_norm, lr=lr, n_groups=len(groups), refill_rounds=refills,
                 rollout_s=t_rollout, faithful_s=log.faithful_s,
                 step_s=time.perf_counter() - t_start)
    if groups[0].extra is not None:
        extra = [r for g in groups for r in g.extra or []]
        stats["extra_mean"], stats["extra_std"] = grpo_stats.mean(extra), grpo_stats.std(extra)
    return stats, grpo_stats.samples(groups, chunks, p.n_show)


# --------------------------------------------------------------------------------------
# The stage's training run
# --------------------------------------------------------------------------------------


def _train_step(state: train.TrainState, step: int, *, ctx: GRPOContext,
                dataset: Any) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    stats, samples = grpo_step(ctx, dataset, step)
    done, every = step + 1, ctx.params.log_every
    show = bool(every) and (done % every == 0 or done == 1)
    return stats, {"samples": samples if show else []}


def train_grpo(model: Any, processor: Any, dataset: Any, params: Any, out_dir: str | Path,
               variant: str = "grpo", accelerator: Any = None,
               hooks: train.Hooks | None = None) -> train.TrainResult:
    """Stage 2: GRPO (``grpo``, ``grpo_backbone``) or GRPO + faithful reward, with resume.

    Every step appends to ``out_dir/metrics.jsonl`` the reward components (mean and std), the
    within-group std of the faithful reward (overall and among correct trajectories, to show
    it carries signal beyond the correctness gate), accuracy, format rate, completion length,
    clip fractions, KL, entropy, the mean concentration and mean ``s_t`` of the scored
    (correct) trajectories, lr and timings (with a sampler that returns log-probs, ``vllm``, also
    the log-prob gap and importance ratios: ``grpo_stats.IS_KEYS``); every ``log_every`` steps ``n_show`` sample
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
        hooks: an extra reward added to the total (tests, custom tasks), test hooks.

    Returns:
        ``train.TrainResult`` (out_dir, logged metrics, wall time, steps done).

    Raises:
        train.NonFiniteLossError: the loss became NaN/inf; the last good checkpoint stays.
    """
    hooks = hooks or train.Hooks()
    ctx = setup_grpo(model, processor, params, variant, accelerator, hooks.extra_reward, out_dir)
    step_fn = functools.partial(_train_step, ctx=ctx, dataset=dataset)
    loop = train.Loop(f"{variant} GRPO", logs=("metrics", "samples"),
                      checkpoint_extra={"variant": variant},
                      postfix=lambda s: {"reward": f"{s['reward_mean']:.3f}",
                                         "acc": f"{s['accuracy']:.2f}"})
    try:
        return train.fit(ctx.state, params, out_dir, step_fn, loop, hooks)
    finally:
        ctx.sampler.close()
