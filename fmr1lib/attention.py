"""Capture the softmax attention of chosen query tokens over the sequence, from one normal forward.

This gives the prediction ``p^l`` of docs/design.md §5.3 (the Focus query's attention at layer ``l``,
averaged over heads, restricted to image keys and renormalised) and the attention shares used by
the faithful reward, without switching the model to eager attention.

Mechanism (docs/design.md §10.1, §10.3). A custom attention function is registered with transformers'
``AttentionInterface`` under :data:`CAPTURE_IMPLEMENTATION`, together with the SDPA mask function
under the same name in ``AttentionMaskInterface`` (without it the decoder layers silently get
``attention_mask=None`` and left-padded samples attend to padding). While an
:class:`AttentionCapture` is active, the language model's attention implementation is switched to
that name; every call first runs the stock SDPA function, so the layer output is exactly SDPA's,
and for the decoder layers being captured it also computes ``softmax(q_rows K^T * scale + mask_rows)``
for the requested query rows only: post-RoPE queries and keys, GQA-aware, mask rows applied, fp32
softmax, differentiable. Memory is O(heads x rows x seq) per captured layer instead of eager's
O(heads x seq^2) for every layer.

Example::

    with AttentionCapture(model, query_positions=focus_pos[:, None], layers=[-2, -1]) as cap:
        outputs = model(**batch)
    p = rows_over_image_tokens(cap.attentions, batch["input_ids"], image_token_id)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from fmr1lib.choices import HeadSelection, options

logger = logging.getLogger(__name__)

CAPTURE_IMPLEMENTATION = "fmr1_capture"
"""Name under which the capturing attention function and its mask function are registered.
It must not contain "sdpa": transformers would then run its SDPA dispatch checks on it."""

# Attribute set, only while a capture is active, on the attention modules of the captured decoder
# layers. Its presence is the only thing that makes the attention function capture, so vision-tower
# calls and decoder layers that were not requested go straight to SDPA.
_FLAG = "_fmr1_attention_capture"

Heads = HeadSelection | Sequence[int]


def _capture_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered under :data:`CAPTURE_IMPLEMENTATION`.

    Same signature and output as ``sdpa_attention_forward``; for flagged modules it also hands
    the requested softmax rows to the owning :class:`AttentionCapture`.
    """
    output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    flag = module.__dict__.get(_FLAG)
    if flag is not None:
        capture, slot = flag
        capture._record(module, slot, query, key, attention_mask, kwargs)
    return output


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention_forward)
# The layer output comes from SDPA, so the layers must get SDPA's mask (boolean, or None when a
# plain causal mask suffices).
AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside peft / DDP-style wrappers.

    Args:
        model: a ``PreTrainedModel``, a peft ``PeftModel``, or a wrapper exposing ``.module``.

    Returns:
        The innermost ``PreTrainedModel``.
    """
    current = model
    for _ in range(8):
        if hasattr(current, "get_base_model"):
            # PeftModel.get_base_model returns the transformers model carrying the LoRA layers.
            current = current.get_base_model()
        elif isinstance(current, PreTrainedModel):
            return current
        elif isinstance(getattr(current, "module", None), nn.Module):
            current = current.module
        else:
            break
    if isinstance(current, PreTrainedModel):
        return current
    raise TypeError(f"no transformers PreTrainedModel found inside {type(model).__name__}")


def _text_config_key(base: PreTrainedModel) -> str | None:
    """Key of the language-model sub-config in ``base.config``, or None if it is the top config."""
    text_config = base.config.get_text_config()
    if text_config is base.config:
        return None
    for key in base.config.sub_configs:
        if getattr(base.config, key, None) is text_config:
            return key
    raise ValueError(f"cannot locate the text sub-config of {type(base.config).__name__}")


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


def num_text_layers(model: nn.Module) -> int:
    """Number of language-model decoder layers."""
    return len(language_attention_modules(model))


def language_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of the language-model decoder layers, in layer order.

    Args:
        model: a transformers model, possibly wrapped (see :func:`unwrap_model`).

    Returns:
        ``num_hidden_layers`` modules; module ``i`` has ``layer_idx == i``.
    """
    base = unwrap_model(model)
    text_config = base.config.get_text_config()
    # The vision tower's attention modules hold the vision config and no layer_idx, so matching on
    # the text config object and layer_idx selects exactly the decoder self-attentions.
    found: dict[int, nn.Module] = {}
    for module in base.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if (
            isinstance(layer_idx, int)
            and getattr(module, "config", None) is text_config
            and hasattr(module, "num_key_value_groups")
        ):
            if layer_idx in found:
                raise ValueError(f"two attention modules claim decoder layer {layer_idx}")
            found[layer_idx] = module
    n_layers = text_config.num_hidden_layers
    if sorted(found) != list(range(n_layers)):
        raise ValueError(
            f"expected attention modules for layers 0..{n_layers - 1}, found {sorted(found)}"
        )
    return [found[i] for i in range(n_layers)]


class AttentionCapture:
    """Context manager capturing the attention rows of chosen query positions during a forward.

    Inside the ``with`` block the language model runs :data:`CAPTURE_IMPLEMENTATION` (SDPA output
    plus row capture); on exit the previous implementation is restored and the flags removed, also
    when the block raises. The vision tower is left on its own implementation. The decoder layers'
    output inside the block is SDPA's, even if the model was set to eager or flash attention.

    Each forward inside the block overwrites the captured rows, so read :attr:`attentions` after
    the forward you want. With gradient checkpointing, call ``backward`` inside the block: the
    recomputation of a checkpointed layer must capture again to rebuild the rows' graph.

    Args:
        model: ``Qwen2_5_VLForConditionalGeneration`` (or another decoder with the same attention
            interface), possibly wrapped by peft or DDP.
        query_positions: LongTensor ``[B, n_queries]`` or list of lists: absolute positions in the
            (padded) sequence, one row per sample. With a KV cache, positions count the cached
            tokens too and must fall inside the tokens of the current forward.
        layers: decoder layer indices to capture (negative allowed); default all layers.
        heads: ``"mean"`` averages over query heads; ``"all"`` keeps them; a list of head indices
            keeps those heads and averages over them.

    Example::

        with AttentionCapture(model, [[12, 30], [14, 30]], layers=[-1]) as cap:
            out = model(**batch)
        cap.attentions.shape  # [2, 1, 2, seq]
    """

    def __init__(
        self,
        model: nn.Module,
        query_positions: torch.Tensor | Sequence[Sequence[int]],
        layers: Sequence[int] | None = None,
        heads: Heads = "mean",
    ) -> None:
        self.model = model
        self._base = unwrap_model(model)
        self._modules = language_attention_modules(self._base)
        n_layers = len(self._modules)
        if layers is None:
            layers = list(range(n_layers))
        normalised = []
        for layer in layers:
            if not -n_layers <= int(layer) < n_layers:
                raise IndexError(f"layer {layer} out of range for {n_layers} decoder layers")
            normalised.append(int(layer) % n_layers)
        if len(set(normalised)) != len(normalised):
            raise ValueError(f"duplicate layers in {list(layers)}")
        if not normalised:
            raise ValueError("layers is empty")
        self.layers: list[int] = normalised

        positions = torch.as_tensor(query_positions, dtype=torch.long)
        if positions.ndim != 2:
            raise ValueError(
                f"query_positions must be [B, n_queries], got shape {tuple(positions.shape)}"
            )
        self.query_positions: torch.Tensor = positions

        n_heads = self._base.config.get_text_config().num_attention_heads
        self._head_index: torch.Tensor | None = None
        if isinstance(heads, str):
            if heads not in options(HeadSelection):
                raise ValueError(f'heads must be "mean", "all" or a list of ints, got {heads!r}')
        else:
            index = [int(h) for h in heads]
            if not index or any(not 0 <= h < n_heads for h in index):
                raise ValueError(f"head indices {index} invalid for {n_heads} heads")
            self._head_index = torch.tensor(index, dtype=torch.long)
        self.heads = heads

        self._rows: list[torch.Tensor | None] = [None] * len(self.layers)
        self._previous: str | None = None

    # -- context management ------------------------------------------------------------------

    def __enter__(self) -> AttentionCapture:
        for module in self._modules:
            if _FLAG in module.__dict__:
                raise RuntimeError("an AttentionCapture is already active on this model")
        key = _text_config_key(self._base)
        text_config = self._base.config.get_text_config()
        self._previous = text_config._attn_implementation
        try:
            # Only the language model is switched: the vision tower keeps its implementation.
            self._base.set_attn_implementation(
                CAPTURE_IMPLEMENTATION if key is None else {key: CAPTURE_IMPLEMENTATION}
            )
            if text_config._attn_implementation != CAPTURE_IMPLEMENTATION:
                raise RuntimeError(
                    f"{type(self._base).__name__} refused attention implementation "
                    f"{CAPTURE_IMPLEMENTATION!r} (now {text_config._attn_implementation!r})"
                )
            for slot, layer in enumerate(self.layers):
                setattr(self._modules[layer], _FLAG, (self, slot))
        except BaseException:
            self._restore()
            raise
        self._rows = [None] * len(self.layers)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self._restore()
        if (
            exc_type is None
            and self._base.training
            and any(rows is not None and rows.requires_grad for rows in self._rows)
        ):
            # A checkpointed layer recomputes its forward during backward; outside the block that
            # recomputation skips the capture and torch raises a cryptic CheckpointError.
            if any(getattr(m, "gradient_checkpointing", False) for m in self._base.modules()):
                logger.warning(
                    "gradient checkpointing is on: call backward on the captured attention "
                    "inside the AttentionCapture block"
                )

    def _restore(self) -> None:
        for module in self._modules:
            module.__dict__.pop(_FLAG, None)
        if self._previous is not None:
            key = _text_config_key(self._base)
            self._base.set_attn_implementation(
                self._previous if key is None else {key: self._previous}
            )
            self._previous = None

    # -- capture -------------------------------------------------------------------------------

    def _record(
        self,
        module: nn.Module,
        slot: int,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> None:
        """Compute and store the softmax rows of one decoder layer.

        Args:
            module: the layer's attention module.
            slot: index of this layer in ``self.layers``.
            query: post-RoPE queries ``[B, H, q_len, D]``.
            key: post-RoPE keys ``[B, H_kv, kv_len, D]`` (cache included).
            attention_mask: SDPA mask ``[B or 1, 1 or H, q_len, kv_len]`` (bool: True attends;
                float: additive) or None for a plain causal mask.
            kwargs: the remaining attention kwargs (``scaling``, ``is_causal``).
        """
        batch, n_heads, q_len, head_dim = query.shape
        n_kv_heads, kv_len = key.shape[1], key.shape[2]
        positions = self.query_positions.to(query.device)
        if positions.shape[0] != batch:
            raise ValueError(
                f"query_positions has {positions.shape[0]} rows but the batch has {batch} samples"
            )
        # Query row r sits at absolute position r + offset when earlier tokens come from a cache.
        offset = kv_len - q_len
        rows = positions - offset
        if bool(((rows < 0) | (rows >= q_len)).any()):
            raise ValueError(
                f"query positions {positions.tolist()} outside the tokens of this forward "
                f"(absolute {offset}..{kv_len - 1})"
            )
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = 1.0 / math.sqrt(head_dim)
        n_rep = n_heads // n_kv_heads
        n_q = rows.shape[1]

        # [B, H, n_q, D] by gathering the requested rows of each sample.
        q_rows = query.gather(2, rows[:, None, :, None].expand(batch, n_heads, n_q, head_dim))
        # Query head h uses kv head h // n_rep (as repeat_kv does): fold the repeats into the row
        # axis so one matmul per kv head serves all its query heads without copying the keys.
        q_rows = q_rows.float().reshape(batch, n_kv_heads, n_rep * n_q, head_dim)
        scores = torch.matmul(q_rows, key.float().transpose(-1, -2)) * scaling
        scores = scores.reshape(batch, n_heads, n_q, kv_len)
        scores = scores + self._mask_rows(
            attention_mask, positions, rows, batch, kv_len, module, kwargs, scores.device
        )
        probs = torch.softmax(scores, dim=-1)

        if self._head_index is not None:
            probs = probs.index_select(1, self._head_index.to(probs.device)).mean(dim=1)
        elif self.heads == "mean":
            probs = probs.mean(dim=1)
        self._rows[slot] = probs

    @staticmethod
    def _mask_rows(
        attention_mask: torch.Tensor | None,
        positions: torch.Tensor,
        rows: torch.Tensor,
        batch: int,
        kv_len: int,
        module: nn.Module,
        kwargs: dict[str, Any],
        device: torch.device,
    ) -> torch.Tensor:
        """Additive fp32 mask for the requested rows, ``[B, 1 or H, n_q, kv_len]``.

        Masked keys get the most negative fp32 value rather than -inf, as eager attention does,
        so a fully masked row (a padding query) stays finite.
        """
        lowest = torch.finfo(torch.float32).min
        if attention_mask is None:
            is_causal = kwargs.get("is_causal")
            if is_causal is None:
                is_causal = getattr(module, "is_causal", True)
            if not is_causal:
                return torch.zeros((), device=device)
            allowed = torch.arange(kv_len, device=device)[None, None, :] <= positions[:, :, None]
            return torch.where(allowed, 0.0, lowest)[:, None]
        mask = attention_mask.expand(batch, -1, -1, -1)
        index = rows.to(mask.device)[:, None, :, None].expand(
            batch, mask.shape[1], rows.shape[1], kv_len
        )
        mask = mask.gather(2, index).to(device)
        if mask.dtype == torch.bool:
            return torch.where(mask, 0.0, lowest)
        return mask.float().clamp_min(lowest)

    @property
    def attentions(self) -> torch.Tensor:
        """Captured rows in the order of ``self.layers``, fp32.

        Returns:
            ``[B, n_layers, n_queries, seq]`` for ``heads="mean"`` or a list of heads,
            ``[B, n_layers, n_heads, n_queries, seq]`` for ``heads="all"``; ``seq`` is the key
            length (the padded sequence length, cache included). Each row sums to 1.
        """
        missing = [
            layer for layer, rows in zip(self.layers, self._rows, strict=True) if rows is None
        ]
        if missing:
            raise RuntimeError(
                f"no attention captured for layers {missing}: run the forward inside the `with` block"
            )
        return torch.stack(self._rows, dim=1)  # type: ignore[arg-type]


def capture_attention(
    model: nn.Module,
    inputs: dict[str, Any],
    query_positions: torch.Tensor | Sequence[Sequence[int]],
    layers: Sequence[int] | None = None,
    heads: Heads = "mean",
) -> tuple[Any, torch.Tensor]:
    """Run ``model(**inputs)`` once and return its output with the captured attention rows.

    Args:
        model: see :class:`AttentionCapture`.
        inputs: keyword arguments of the forward (``input_ids``, ``attention_mask``,
            ``pixel_values``, ``image_grid_thw``, ...).
        query_positions: ``[B, n_queries]`` absolute positions of the query tokens.
        layers: decoder layers (negative allowed), default all.
        heads: ``"mean"``, ``"all"`` or a list of head indices to average.

    Returns:
        ``(outputs, attentions)``: the model output of that forward (logits included) and the
        rows, ``[B, n_layers, n_queries, seq]`` (``[B, n_layers, n_heads, n_queries, seq]`` for
        ``heads="all"``).
    """
    with AttentionCapture(model, query_positions, layers=layers, heads=heads) as capture:
        outputs = model(**inputs)
    return outputs, capture.attentions


def image_token_mask(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Where the image tokens are.

    Args:
        input_ids: ``[B, seq]`` token ids.
        image_token_id: id of ``<|image_pad|>``.

    Returns:
        BoolTensor ``[B, seq]``.

    >>> image_token_mask(torch.tensor([[1, 7, 7, 2]]), 7).tolist()
    [[False, True, True, False]]
    """
    return input_ids == image_token_id


def rows_over_image_tokens(
    attn: torch.Tensor, input_ids: torch.Tensor, image_token_id: int
) -> list[torch.Tensor]:
    """Attention restricted to each sample's image-token keys, renormalised to sum 1.

    Args:
        attn: ``[B, ..., seq]`` attention rows (e.g. :attr:`AttentionCapture.attentions`).
        input_ids: ``[B, seq]`` token ids of the same forward.
        image_token_id: id of ``<|image_pad|>``.

    Returns:
        One tensor per sample, ``[..., n_image_tokens_of_sample]``; the counts differ when image
        sizes differ. A row with no mass on the image stays all zero rather than dividing by zero.

    >>> ids = torch.tensor([[5, 7, 7, 6]])
    >>> rows_over_image_tokens(torch.tensor([[[0.4, 0.3, 0.1, 0.2]]]), ids, 7)[0].tolist()
    [[0.75, 0.25]]
    """
    if attn.shape[0] != input_ids.shape[0] or attn.shape[-1] != input_ids.shape[-1]:
        raise ValueError(
            f"attn {tuple(attn.shape)} does not match input_ids {tuple(input_ids.shape)} in batch/seq"
        )
    mask = image_token_mask(input_ids, image_token_id).to(attn.device)
    result = []
    for sample, keep in zip(attn, mask, strict=True):
        restricted = sample[..., keep]
        total = restricted.sum(dim=-1, keepdim=True)
        result.append(restricted / total.clamp_min(torch.finfo(restricted.dtype).tiny))
    return result


def to_grid(
    weights_1d: torch.Tensor,
    grid_thw: torch.Tensor | Sequence[int],
    spatial_merge_size: int = 2,
) -> torch.Tensor:
    """Lay one image's token weights out on its merged patch grid (docs/design.md §4).

    The k-th image token is merged cell ``(k // cols, k % cols)``.

    Args:
        weights_1d: ``[..., n]`` weights of one image's tokens, ``n = rows * cols``.
        grid_thw: ``(t, H, W)`` of the image in 14-px patches (a row of ``image_grid_thw``);
            ``t`` must be 1 (still images).
        spatial_merge_size: patches merged per side into one token.

    Returns:
        ``[..., rows, cols]`` with ``rows = H // merge`` and ``cols = W // merge``.

    >>> to_grid(torch.arange(6), (1, 4, 6)).tolist()
    [[0, 1, 2], [3, 4, 5]]
    """
    t, h, w = (int(v) for v in grid_thw)
    if t != 1:
        raise ValueError(f"to_grid handles still images (t == 1), got grid_thw {(t, h, w)}")
    rows, cols = h // spatial_merge_size, w // spatial_merge_size
    n = weights_1d.shape[-1]
    if n != rows * cols:
        raise ValueError(f"{n} weights do not fill a {rows}x{cols} grid (grid_thw {(t, h, w)})")
    return weights_1d.reshape(*weights_1d.shape[:-1], rows, cols)
