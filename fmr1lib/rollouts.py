"""Who samples stage 2's rollouts, and what a sampler that is not the policy costs the loss.

A sampler (``rollout_backend``) turns the step's prompt records into ``Samples``: the prompt
ids, ``G`` completions per prompt and, where the sampler is not the trained model itself, the
log-probability it gave each token it sampled. The policy's own log-probabilities and the
attention rows the faithful reward reads come from the training forward on the sampled ids
(``grpo._update``), so a sampler only has to return ids; its log-probs serve the
importance-sampling correction alone.

* ``HFSampler`` (``hf``, the default): ``modeling.generate`` on the policy. Its sampler *is* the
  policy, so it returns no log-probs and its importance ratio is 1 by definition: computing
  them would cost a ``[N, T, V]`` score tensor per step for a ratio that differs from 1 only by
  the forward's rounding (the cached decoding forward against the full training forward) and by
  the suppressed vision tokens' mass, both present before this interface existed.
* ``vllm_backend.VLLMSampler`` (``vllm``, optional install): a vLLM engine, its weights synced
  from the policy once per optimiser step (``engine_weights`` gives them, named as the engine
  reads a checkpoint).

``importance_weights`` is the correction's maths: the ratio ``pi_old / pi_sampler`` of each
token (or of each sequence), truncated or masked above a cap, as TRL's
``vllm_importance_sampling_correction`` does, with the gap statistics a step logs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fmr1lib import batching, modeling
from fmr1lib.choices import ISCorrection, options

IS_CORRECTIONS = options(ISCorrection)


@dataclass
class Samples:
    """What a sampler returns for ``P`` prompts: ``P * G`` completions, the ``G`` of a prompt
    consecutive."""

    prompt_ids: list[list[int]]
    """Per prompt its token ids as the sampler read them (image tokens expanded, no padding)."""
    completion_ids: torch.Tensor
    """``[P * G, T]`` sampled ids on the CPU, right-padded with the pad id (``T`` the longest)."""
    texts: list[str]
    """Decoded completions (tag tokens kept, cut at ``<|im_end|>``)."""
    logprobs: torch.Tensor | None = None
    """``[P * G, T]`` the sampler's log-probability of each sampled token (0 at padding), or
    None when the sampler is the policy itself (``HFSampler``: the ratio is 1)."""


class HFSampler:
    """``rollout_backend: hf``: ``modeling.generate`` on the policy (vision tokens suppressed,
    every decoding setting explicit)."""

    def __init__(self, processor: Any, device: Any):
        self.processor, self.device = processor, device

    def sample(self, model: Any, rows: Sequence[dict[str, Any]], rollout: Any,
               max_new_tokens: int, share_prefill: bool = True) -> Samples:
        """``rollout.group_size`` completions of each of ``rows`` under ``rollout``'s sampling
        settings (``RolloutParams``), at most ``max_new_tokens`` each; with ``share_prefill``
        each prompt is prefilled once for its ``G`` completions (``modeling.prefill_once``).

        Every sampler has this signature; ``model`` is the policy (unwrapped), which an engine
        reads only to sync its weights."""
        batch = batching.encode_batch(rows, self.processor, "plain", with_response=False)
        inputs = {k: v.to(self.device) for k, v in batch.inputs.items()}
        with batching.eval_mode(model):
            decoding = modeling.Decoding(do_sample=True, temperature=rollout.temperature,
                                         top_p=rollout.top_p, top_k=rollout.top_k,
                                         num_return_sequences=rollout.group_size)
            completion_ids, texts = modeling.generate(
                model, self.processor, inputs, max_new_tokens=max_new_tokens, decoding=decoding,
                share_prefill=share_prefill)
        ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"].bool()
        prompt_ids = [row[keep].tolist() for row, keep in zip(ids, mask, strict=True)]
        return Samples(prompt_ids=prompt_ids, completion_ids=completion_ids.cpu(), texts=texts)

    def weights_updated(self) -> None:
        """The policy took an optimiser step (nothing to do: the sampler is the policy)."""

    def close(self) -> None:
        """Release the sampler (nothing held)."""


def cut_logprobs(logprobs: torch.Tensor | None,
                 tokens: Sequence[Sequence[int]]) -> list[list[float]] | None:
    """Each completion's sampler log-probs, cut to its kept tokens (``batching.completion_tokens``
    keeps a prefix of each sampled row).

    >>> cut_logprobs(torch.tensor([[-0.5, -1.0, 0.0], [-2.0, 0.0, 0.0]]), [[5, 6], [7]])
    [[-0.5, -1.0], [-2.0]]
    >>> cut_logprobs(None, [[5]]) is None
    True
    """
    if logprobs is None:
        return None
    return [logprobs[i, :len(t)].tolist() for i, t in enumerate(tokens)]


def pad_logprobs(per_sequence: Sequence[Sequence[float]], width: int) -> torch.Tensor:
    """``[N, width]`` right-padded with 0, the layout of ``SequenceBatch.completion_ids``.

    >>> pad_logprobs([[-0.5], [-1.0, -2.0]], 3).tolist()
    [[-0.5, 0.0, 0.0], [-1.0, -2.0, 0.0]]
    """
    out = torch.zeros(len(per_sequence), width, dtype=torch.float32)
    for i, values in enumerate(per_sequence):
        if values:
            out[i, :len(values)] = torch.tensor(list(values), dtype=torch.float32)
    return out


def importance_weights(logp_old: torch.Tensor, logp_sampler: torch.Tensor, mask: torch.Tensor,
                       mode: str = "none",
                       cap: float = 3.0) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Importance-sampling weights for completions sampled by another policy than the trained
    one, and the gap statistics.

    The policy loss's ratio ``pi_theta / pi_old`` assumes the completions were sampled from
    ``pi_old``; an engine samples from its own ``pi_sampler`` (other kernels, other precision,
    weights one sync behind). Each token's policy term is then weighted by

    * ``token_*``: ``w_t = pi_old(y_t) / pi_sampler(y_t)``, shape ``[N, T]``;
    * ``sequence_*``: ``w = prod_t pi_old(y_t) / pi_sampler(y_t)`` over the sequence's valid
      tokens, shape ``[N, 1]``;

    and ``*_truncate`` caps ``w`` at ``cap`` while ``*_mask`` sets it to 0 where it exceeds
    ``cap``; ``none`` gives no weights (the statistics only, at token level). The weights carry
    no gradient.

    Args:
        logp_old: ``[N, T]`` log-probs of the sampled tokens under the trained policy as it
            sampled (the first update's forward, detached).
        logp_sampler: ``[N, T]`` the sampler's log-probs of the same tokens.
        mask: ``[N, T]`` valid completion tokens.
        mode: one of ``IS_CORRECTIONS``.
        cap: the cap (>= 1).

    Returns:
        ``(weights or None, stats)``; stats: ``sampler_logp_gap`` (mean ``|logp_old -
        logp_sampler|`` over valid tokens), ``sampler_logp_gap_max``, ``is_ratio_mean``,
        ``is_ratio_min``, ``is_ratio_max`` (of the uncapped ratio, over valid tokens or over
        sequences with a valid token) and ``is_capped_frac`` (the share of them above ``cap``:
        truncated, or masked).

    >>> old, samp = torch.log(torch.tensor([[0.5, 0.4]])), torch.log(torch.tensor([[0.1, 0.4]]))
    >>> w, st = importance_weights(old, samp, torch.ones(1, 2), "token_truncate", 3.0)
    >>> [round(v, 4) for v in w[0].tolist()], st["is_capped_frac"]
    ([3.0, 1.0], 0.5)
    >>> w, _ = importance_weights(old, samp, torch.ones(1, 2), "token_mask", 3.0)
    >>> [round(v, 4) for v in w[0].tolist()]
    [0.0, 1.0]
    >>> w, st = importance_weights(old, samp, torch.tensor([[1, 0]]), "sequence_truncate", 10.0)
    >>> round(float(w[0, 0]), 4), round(st["sampler_logp_gap"], 4)
    (5.0, 1.6094)
    >>> importance_weights(old, old, torch.ones(1, 2))[0] is None
    True
    """
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"unknown importance-sampling correction {mode!r}; use one of "
                         f"{IS_CORRECTIONS}")
    m = mask.to(torch.float32)
    diff = (logp_old.float() - logp_sampler.float()) * m
    sequence = mode.startswith("sequence")
    if sequence:
        log_ratio = diff.sum(dim=1, keepdim=True)
        valid = m.sum(dim=1, keepdim=True) > 0
    else:
        log_ratio, valid = diff, m > 0
    ratio = torch.exp(log_ratio)
    over = ratio > cap
    weights = None
    if mode.endswith("truncate"):
        weights = ratio.clamp(max=cap)
    elif mode.endswith("mask"):
        weights = ratio.masked_fill(over, 0.0)
    gap = diff.abs()
    r = ratio[valid]
    nan = float("nan")
    stats = {"sampler_logp_gap": float(gap.sum() / m.sum().clamp_min(1.0)),
             "sampler_logp_gap_max": float(gap.max()) if gap.numel() else nan,
             "is_ratio_mean": float(r.mean()) if r.numel() else nan,
             "is_ratio_min": float(r.min()) if r.numel() else nan,
             "is_ratio_max": float(r.max()) if r.numel() else nan,
             "is_capped_frac": float(over[valid].float().mean()) if r.numel() else nan}
    return (weights.detach() if weights is not None else None), stats


# --------------------------------------------------------------------------------------
# The policy's weights as an engine reads them
# --------------------------------------------------------------------------------------

PEFT_ONLY = ("lora_", ".original_module.", "trainable_tokens_")
"""Parts of a peft parameter name that mark a tensor the merged model does not have: the LoRA
factors, the frozen copy ``modules_to_save`` keeps, the trainable-token deltas."""


def engine_weight_name(name: str) -> str | None:
    """The name a checkpoint of the merged model gives the peft parameter ``name``, or None for
    a tensor that merging folds away (``PEFT_ONLY``).

    Strips ``base_model.model.``, ``.base_layer``, ``.token_adapter`` and
    ``modules_to_save.default.``; a plain (not peft-wrapped) model's names pass unchanged.

    >>> engine_weight_name("base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.language_model.layers.0.self_attn.q_proj.weight'
    >>> engine_weight_name("base_model.model.model.visual.modules_to_save.default.blocks.0.attn.qkv.bias")
    'model.visual.blocks.0.attn.qkv.bias'
    >>> engine_weight_name("base_model.model.model.language_model.embed_tokens.token_adapter.base_layer.weight")
    'model.language_model.embed_tokens.weight'
    >>> [engine_weight_name(n) for n in ("base_model.model.x.q_proj.lora_A.default.weight",
    ...  "base_model.model.model.visual.original_module.blocks.0.norm1.weight")]
    [None, None]
    >>> engine_weight_name("model.language_model.norm.weight")
    'model.language_model.norm.weight'
    """
    if any(part in name for part in PEFT_ONLY):
        return None
    name = name.removeprefix("base_model.model.")
    for part in (".base_layer", ".token_adapter"):
        name = name.replace(part, "")
    return name.replace("modules_to_save.default.", "")


@torch.no_grad()
def _merged_base_weights(model: Any) -> dict[str, torch.Tensor]:
    """The base weight of every peft-wrapped module with its adapter folded in, computed beside
    the model (``merge_adapter`` / ``unmerge_adapter`` would round the weights each step)."""
    out: dict[str, torch.Tensor] = {}
    for mname, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is None or getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
            continue
        key = f"{mname}.base_layer.weight"
        if hasattr(module, "lora_A") and hasattr(module, "get_delta_weight"):
            w = base.weight.detach()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    w = w + module.get_delta_weight(adapter).to(w.dtype)
            out[key] = w
        elif hasattr(module, "get_merged_weights"):  # peft's trainable tokens
            out[key] = module.get_merged_weights(module.active_adapters).detach()
    return out


def engine_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every weight of the merged policy, named as its checkpoint names
    them (``engine_weight_name``); tied weights once. The model is left untouched.

    Args:
        model: the policy (plain, or peft-wrapped: LoRA and trainable tokens are merged).
    """
    merged = _merged_base_weights(model)
    for name, param in model.named_parameters():
        out = engine_weight_name(name)
        if out is not None:
            yield out, merged.get(name, param.detach())
