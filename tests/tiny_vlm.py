"""A tiny Qwen2.5-VL built from a config, and hand-made batches for it, for fast CPU tests.

No tokenizer or processor is involved: token ids are chosen directly and images are given as
already-patchified `pixel_values`, laid out the way `Qwen2VLImageProcessor` lays them out
(one row per 14x14 patch, `3 * temporal_patch_size * 14 * 14` values, patches of a 2x2 merge
group consecutive). Geometry follows docs/design.md §4: an image of `H x W` pixels (multiples of 28) has
`image_grid_thw = (1, H/14, W/14)` and contributes `(H/28) * (W/28)` image tokens.
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

PAD_ID = 0
EOS_ID = 2
IMAGE_TOKEN_ID = 251
VIDEO_TOKEN_ID = 252
VISION_START_ID = 253
VISION_END_ID = 254
VOCAB_SIZE = 300
# Ordinary text tokens are drawn from this range, which holds none of the special ids above.
TEXT_ID_RANGE = (10, 250)

PATCH = 14
MERGE = 2
TEMPORAL_PATCH = 2


def tiny_config(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden: int = 32,
) -> Qwen2_5_VLConfig:
    """Config of a tiny Qwen2.5-VL: GQA text model and a 2-block vision tower.

    Args:
        hidden_size: text hidden size; also the vision tower's `out_hidden_size`.
        num_layers: number of language-model decoder layers.
        num_heads: query heads per decoder layer.
        num_kv_heads: key/value heads per decoder layer (fewer than `num_heads` means GQA).
        vision_hidden: hidden size of the vision tower.

    Returns:
        The config; special token ids live at the top level, where transformers 5.x reads them.
    """
    head_dim = hidden_size // num_heads
    # mrope_section splits the rotary half-dimension into (temporal, height, width) parts, so it
    # must sum to head_dim / 2 (docs/design.md §10.3).
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text_config = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 1024,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": section,
        },
        "bos_token_id": EOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    vision_config = {
        "depth": 2,
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_heads": 2,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": TEMPORAL_PATCH,
        "window_size": 56,
        "out_hidden_size": hidden_size,
        "fullatt_block_indexes": [1],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )


def tiny_model(
    seed: int = 0, attn_implementation: str = "sdpa", **config_kwargs: int
) -> Qwen2_5_VLForConditionalGeneration:
    """Randomly initialised tiny Qwen2.5-VL on CPU in fp32, in eval mode.

    Args:
        seed: torch seed for the weight initialisation.
        attn_implementation: attention implementation to start with.
        **config_kwargs: forwarded to `tiny_config`.

    Returns:
        The model.
    """
    torch.manual_seed(seed)
    config = tiny_config(**config_kwargs)
    config._attn_implementation = attn_implementation
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def image_token_count(size: tuple[int, int]) -> int:
    """Number of `<|image_pad|>` tokens an image of `size = (H, W)` pixels contributes."""
    height, width = size
    return (height // (PATCH * MERGE)) * (width // (PATCH * MERGE))


def make_batch(
    image_sizes: list[tuple[int, int]],
    prefix_lens: list[int] | None = None,
    suffix_lens: list[int] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A left-padded batch of one image per sample, built by hand.

    Each sample is `text(prefix) <vision_start> <image_pad> * n <vision_end> text(suffix)`,
    left-padded with `PAD_ID` to the longest sample.

    Args:
        image_sizes: `(H, W)` in pixels per sample, both multiples of 28.
        prefix_lens: text tokens before the image per sample (default 3 each).
        suffix_lens: text tokens after the image per sample (default 5, 3, 7, ... alternating).
        seed: seed for the token ids and pixel values.

    Returns:
        `input_ids` `[B, S]`, `attention_mask` `[B, S]` (0 on padding), `pixel_values`
        `[sum_i h_i * w_i, 3 * 2 * 14 * 14]` and `image_grid_thw` `[B, 3]` rows `(1, H/14, W/14)`.
    """
    generator = torch.Generator().manual_seed(seed)
    n = len(image_sizes)
    prefix_lens = prefix_lens or [3] * n
    suffix_lens = suffix_lens or [5 if i % 2 == 0 else 3 + 4 * (i // 2) for i in range(n)]
    sequences, pixel_rows, grids = [], [], []
    for (height, width), n_pre, n_suf in zip(image_sizes, prefix_lens, suffix_lens, strict=True):
        if height % (PATCH * MERGE) or width % (PATCH * MERGE):
            raise ValueError(f"image size {(height, width)} is not a multiple of {PATCH * MERGE}")
        h, w = height // PATCH, width // PATCH
        grids.append([1, h, w])
        pixel_rows.append(
            torch.randn(h * w, 3 * TEMPORAL_PATCH * PATCH * PATCH, generator=generator)
        )
        low, high = TEXT_ID_RANGE
        prefix = torch.randint(low, high, (n_pre,), generator=generator)
        suffix = torch.randint(low, high, (n_suf,), generator=generator)
        image = torch.full((image_token_count((height, width)),), IMAGE_TOKEN_ID)
        sequences.append(
            torch.cat(
                [
                    prefix,
                    torch.tensor([VISION_START_ID]),
                    image,
                    torch.tensor([VISION_END_ID]),
                    suffix,
                ]
            )
        )
    length = max(len(s) for s in sequences)
    input_ids = torch.full((n, length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, length - len(seq) :] = seq
        attention_mask[i, length - len(seq) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat(pixel_rows),
        "image_grid_thw": torch.tensor(grids, dtype=torch.long),
    }
