"""Tests of fmr1lib.attention: captured rows against eager attention on a tiny Qwen2.5-VL."""

from __future__ import annotations

import logging
import statistics
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_vlm import IMAGE_TOKEN_ID, VISION_END_ID, image_token_count, make_batch, tiny_model

from fmr1lib.attention import (
    _FLAG,
    CAPTURE_IMPLEMENTATION,
    AttentionCapture,
    capture_attention,
    image_token_mask,
    language_attention_modules,
    rows_over_image_tokens,
    to_grid,
)

SIZES = [(56, 84), (84, 56)]
TOL = 1e-5


@pytest.fixture
def model():
    return tiny_model(seed=0)


@pytest.fixture
def batch():
    # Different prefix lengths and image sizes give left padding of different lengths.
    return make_batch(SIZES, prefix_lens=[2, 6], suffix_lens=[5, 3], seed=1)


def query_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per sample: last token, second text token after the image, vision_end, an image token."""
    ids = batch["input_ids"]
    rows = []
    for sample in ids:
        vision_end = int((sample == VISION_END_ID).nonzero()[0])
        first_image = int((sample == IMAGE_TOKEN_ID).nonzero()[0])
        rows.append([ids.shape[1] - 1, vision_end + 2, vision_end, first_image + 1])
    return torch.tensor(rows)


def implementations(model) -> tuple[str, str, str]:
    config = model.config
    return (
        config._attn_implementation,
        config.text_config._attn_implementation,
        config.vision_config._attn_implementation,
    )


def eager_rows(model, batch, positions, heads="mean"):
    """Reference: eager attention with output_attentions, rows gathered afterwards."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    full = torch.stack(out.attentions, dim=1)  # [B, L, H, S, S]
    rows = torch.stack([full[b, :, :, positions[b]] for b in range(full.shape[0])])
    return rows.mean(dim=2) if heads == "mean" else rows


def test_rows_match_eager_with_left_padding(model, batch):
    positions = query_positions(batch)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain left padding"
    with torch.no_grad():
        _, rows = capture_attention(model, batch, positions)
    reference = eager_rows(model, batch, positions)
    seq = batch["input_ids"].shape[1]
    assert rows.shape == (2, 2, positions.shape[1], seq)
    assert (rows - reference).abs().max() < TOL
    torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:-1]))
    # Keys on padding get no attention, and no key after the query does.
    pad = batch["attention_mask"] == 0
    assert rows[pad[:, None, None, :].expand_as(rows)].abs().max() == 0
    for b in range(2):
        for j, pos in enumerate(positions[b].tolist()):
            assert rows[b, :, j, pos + 1 :].abs().sum() == 0


def test_selected_layers_in_requested_order(model, batch):
    positions = query_positions(batch)
    with torch.no_grad():
        _, rows = capture_attention(model, batch, positions.tolist(), layers=[-1, 0])
    reference = eager_rows(model, batch, positions)
    assert rows.shape[1] == 2
    assert (rows[:, 0] - reference[:, 1]).abs().max() < TOL
    assert (rows[:, 1] - reference[:, 0]).abs().max() < TOL
    with pytest.raises(IndexError):
        AttentionCapture(model, positions, layers=[2])


def test_logits_unchanged_by_capture(model, batch):
    with torch.no_grad():
        plain = model(**batch).logits
        outputs, _ = capture_attention(model, batch, query_positions(batch))
    assert (outputs.logits - plain).abs().max() <= 1e-6


def test_heads_all_mean_and_subset(model, batch):
    positions = query_positions(batch)
    with torch.no_grad():
        _, mean_rows = capture_attention(model, batch, positions, heads="mean")
        _, all_rows = capture_attention(model, batch, positions, heads="all")
        _, some_rows = capture_attention(model, batch, positions, heads=[0, 3])
    assert all_rows.shape == (2, 2, 4, positions.shape[1], batch["input_ids"].shape[1])
    torch.testing.assert_close(all_rows.mean(dim=2), mean_rows, rtol=0, atol=1e-7)
    torch.testing.assert_close(all_rows[:, :, [0, 3]].mean(dim=2), some_rows, rtol=0, atol=1e-7)
    # Per-head rows also match eager, which checks the GQA head-to-kv-head mapping.
    reference = eager_rows(model, batch, positions, heads="all")
    assert (all_rows - reference).abs().max() < TOL


def test_gradients_reach_query_and_key_projections(model, batch):
    positions = query_positions(batch)[:, :1]
    with AttentionCapture(model, positions, layers=[-1]) as capture:
        model(**batch)
        rows = capture.attentions
    assert rows.requires_grad
    image_rows = rows_over_image_tokens(rows, batch["input_ids"], IMAGE_TOKEN_ID)
    loss = -sum(torch.log(r[..., 0] + 1e-9).sum() for r in image_rows)
    loss.backward()
    layers = model.model.language_model.layers
    for name in ("q_proj", "k_proj"):
        grad = getattr(layers[-1].self_attn, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
        # Earlier layers shape the hidden states the captured layer attends with.
        assert getattr(layers[0].self_attn, name).weight.grad.abs().sum() > 0
    # The rows of the last layer do not depend on its values, its output or the LM head.
    assert layers[-1].self_attn.v_proj.weight.grad is None
    assert layers[-1].self_attn.o_proj.weight.grad is None
    assert model.lm_head.weight.grad is None


def test_no_grad_builds_no_graph(model, batch):
    with torch.no_grad():
        _, rows = capture_attention(model, batch, query_positions(batch))
    assert not rows.requires_grad and rows.grad_fn is None


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_lora_model(model, batch):
    positions = query_positions(batch)
    reference = eager_rows(model, batch, positions)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", lora_dropout=0.0
    )
    peft_model = get_peft_model(model, lora)
    assert len(language_attention_modules(peft_model)) == 2
    with torch.no_grad():
        _, rows = capture_attention(peft_model, batch, positions)
    # LoRA B starts at zero, so the wrapped model still attends like the original.
    assert (rows - reference).abs().max() < TOL
    assert implementations(peft_model.get_base_model())[1] == "sdpa"

    _, rows = capture_attention(peft_model, batch, positions[:, :1], layers=[-1])
    rows.sum(dim=(1, 2))[:, :10].sum().backward()
    q_proj = peft_model.get_base_model().model.language_model.layers[-1].self_attn.q_proj
    assert q_proj.lora_B["default"].weight.grad.abs().sum() > 0


def test_implementation_restored(model, batch):
    before = implementations(model)
    positions = query_positions(batch)
    with AttentionCapture(model, positions):
        assert implementations(model) == (before[0], CAPTURE_IMPLEMENTATION, before[2])
    assert implementations(model) == before

    with pytest.raises(RuntimeError, match="boom"), AttentionCapture(model, positions):
        raise RuntimeError("boom")
    assert implementations(model) == before

    # Positions past the sequence make the forward itself raise.
    with pytest.raises(ValueError, match="outside"):
        capture_attention(model, batch, positions + 100)
    assert implementations(model) == before
    assert all(_FLAG not in m.__dict__ for m in language_attention_modules(model))

    model.set_attn_implementation("eager")
    with torch.no_grad():
        capture_attention(model, batch, positions, layers=[0])
    assert implementations(model) == ("eager", "eager", "eager")


def test_capture_outside_forward_and_nesting(model, batch):
    positions = query_positions(batch)
    capture = AttentionCapture(model, positions)
    with pytest.raises(RuntimeError, match="no attention captured"):
        _ = capture.attentions
    with capture, pytest.raises(RuntimeError, match="already active"):
        with AttentionCapture(model, positions):
            pass
    with pytest.raises(ValueError, match="rows"):
        capture_attention(model, batch, positions[:1])


def test_vision_calls_pass_through(model, batch):
    with torch.no_grad():
        plain = model(**batch).logits
        # The whole model, vision tower included, on the capture implementation with nothing
        # flagged: every call must behave as SDPA.
        model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
        assert model.config.vision_config._attn_implementation == CAPTURE_IMPLEMENTATION
        switched = model(**batch).logits
    model.set_attn_implementation("sdpa")
    assert (switched - plain).abs().max() <= 1e-6


def test_rows_over_image_tokens_and_grid(model, batch):
    positions = query_positions(batch)
    with torch.no_grad():
        _, rows = capture_attention(model, batch, positions)
    per_sample = rows_over_image_tokens(rows, batch["input_ids"], IMAGE_TOKEN_ID)
    mask = image_token_mask(batch["input_ids"], IMAGE_TOKEN_ID)
    for b, (size, weights) in enumerate(zip(SIZES, per_sample, strict=True)):
        assert weights.shape == (2, positions.shape[1], image_token_count(size))
        assert int(mask[b].sum()) == image_token_count(size)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))

    # 56x84 px -> grid_thw (1, 4, 6) -> 2 rows x 3 cols of merged cells.
    grid_thw = batch["image_grid_thw"][0]
    assert grid_thw.tolist() == [1, 4, 6]
    grid = to_grid(torch.arange(6.0).expand(3, 6), grid_thw)
    assert grid.shape == (3, 2, 3)
    for k in range(6):
        assert grid[1, k // 3, k % 3] == k
    tall = to_grid(per_sample[1], batch["image_grid_thw"][1])
    assert tall.shape == (2, positions.shape[1], 3, 2)
    with pytest.raises(ValueError):
        to_grid(torch.ones(5), grid_thw)


def test_timing_capture_vs_sdpa_vs_eager(model, batch):
    """Not an assertion on speed: prints the median forward time of each path (run with -s)."""
    positions = query_positions(batch)[:, :1]

    def eager():
        model.set_attn_implementation("eager")
        model(**batch, output_attentions=True)
        model.set_attn_implementation("sdpa")

    paths = {
        "sdpa": lambda: model(**batch),
        "capture": lambda: capture_attention(model, batch, positions),
        "eager": eager,
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        for run in paths.values():
            run()
        # Interleaved so that load from other processes hits every path alike.
        for _ in range(10):
            for name, run in paths.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        "\nforward median of 10: "
        + ", ".join(
            f"{name} {t * 1e3:.2f} ms ({t / median['sdpa']:.2f}x)" for name, t in median.items()
        )
    )
    assert implementations(model) == ("sdpa", "sdpa", "sdpa")


def test_gradient_checkpointing_backward_inside_block(model, batch, caplog):
    positions = query_positions(batch)[:, :2]

    def grads():
        model.zero_grad(set_to_none=True)
        with AttentionCapture(model, positions, layers=[-1]) as capture:
            model(**batch, use_cache=False)
            (capture.attentions[..., :8] ** 2).sum().backward()
        return model.model.language_model.layers[0].self_attn.k_proj.weight.grad.clone()

    model.train()
    plain = grads()
    model.activation_checkpointing_enable()
    checkpointed = grads()
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-7)

    # Leaving the block before backward cannot work under checkpointing: say so.
    with caplog.at_level(logging.WARNING, logger="fmr1lib.attention"):
        with AttentionCapture(model, positions, layers=[-1]):
            model(**batch, use_cache=False)
    assert "inside the AttentionCapture block" in caplog.text
