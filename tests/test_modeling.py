"""Tests of fmr1lib.modeling: tokenizer, processor, geometry, checkpoints, LoRA, generation.

One tiny backbone is built per module (tokenizer training dominates the cost); tests that
change a model work on a deep copy so the shared one stays clean.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from fmr1lib import config, data, modeling, prompting

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
QUESTION = "What color is the circle?"
H, W = 168, 224  # non-square, both sides multiples of 28: the processor keeps it as is


@pytest.fixture(scope="module")
def params() -> config.BackboneParams:
    return config.load_params(config.BackboneParams)


@pytest.fixture(scope="module")
def backbone(params):
    model, processor = modeling.build_tiny_backbone(params)
    model.eval()
    return model, processor


@pytest.fixture(scope="module")
def model(backbone):
    return backbone[0]


@pytest.fixture(scope="module")
def processor(backbone):
    return backbone[1]


@pytest.fixture(scope="module")
def tokenizer(processor):
    return processor.tokenizer


@pytest.fixture(scope="module")
def big_processor(tokenizer):
    """A processor whose pixel limits leave a 168x224 image at its size."""
    return modeling.build_processor(tokenizer, min_pixels=3136, max_pixels=H * W)


@pytest.fixture(scope="module")
def focus_image() -> Image.Image:
    p = config.load_params(config.DataParams)
    return data.make_example(p, "train", 0)["image"]


def noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def encode(processor, image: Image.Image | np.ndarray, question: str = QUESTION):
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return processor(
        text=[prompting.prompt_text(processor, question)], images=[image], return_tensors="pt"
    )


def image_pad_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|image_pad|>")


# --------------------------------------------------------------------------------------
# Tokenizer and config
# --------------------------------------------------------------------------------------


def test_special_and_tag_tokens_are_single_ids(tokenizer):
    ids = {}
    for t in modeling.QWEN_SPECIAL_TOKENS + prompting.TAG_TOKENS:
        enc = tokenizer.encode(t, add_special_tokens=False)
        assert len(enc) == 1, (t, enc)
        assert enc[0] == tokenizer.convert_tokens_to_ids(t)
        ids[t] = enc[0]
    assert len(set(ids.values())) == len(ids)
    # Tags stay whole inside running text too.
    text = "<Focus><think>look at the circle</think><answer>red</answer><|im_end|>"
    toks = tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))
    for t in prompting.TAG_TOKENS + ("<|im_end|>",):
        assert toks.count(t) == 1


@pytest.mark.parametrize("word", COLORS + SHAPES)
def test_answer_words_are_single_tokens(tokenizer, word):
    assert len(tokenizer.encode(word, add_special_tokens=False)) == 1
    assert len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1


def test_tokenizer_pads_left_and_round_trips(processor, tokenizer):
    assert tokenizer.padding_side == "left"
    prompt = prompting.prompt_text(processor, QUESTION)
    full = prompt + prompting.response_text("red", "look at the circle") + "<|im_end|>"
    for text in (prompt, full):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    batch = tokenizer(["a", "What color is the circle?"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id


def test_config_ids_match_tokenizer(model, tokenizer):
    cfg = model.config
    for attr, tok in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ]:
        assert getattr(cfg, attr) == tokenizer.convert_tokens_to_ids(tok), attr
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == im_end
    assert cfg.get_text_config().eos_token_id == im_end
    assert model.generation_config.eos_token_id == im_end
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.pad_token == "<|endoftext|>"
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert cfg.get_text_config().vocab_size == len(tokenizer)


# --------------------------------------------------------------------------------------
# Processor and geometry
# --------------------------------------------------------------------------------------


def test_processor_on_focusshapes_image(processor, tokenizer, focus_image):
    # The PIL image processor needs no torchvision (absent from this environment).
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)
    assert focus_image.size == (112, 112)
    enc = encode(processor, focus_image)
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert int((enc["input_ids"] == image_pad_id(tokenizer)).sum()) == 4 * 4
    # 14-px patches of 3 channels x 2 temporal frames.
    assert tuple(enc["pixel_values"].shape) == (8 * 8, 3 * 2 * 14 * 14)


def test_processor_on_non_square_image(big_processor, tokenizer):
    enc = encode(big_processor, noise_image(H, W))
    assert enc["image_grid_thw"].tolist() == [[1, H // 14, W // 14]]
    assert int((enc["input_ids"] == image_pad_id(tokenizer)).sum()) == (H // 28) * (W // 28)
    positions, cells = modeling.image_token_cells(
        enc["input_ids"], enc["image_grid_thw"], 0, image_pad_id(tokenizer)
    )
    assert positions.tolist() == list(range(int(positions[0]), int(positions[0]) + 48))
    assert cells[0].tolist() == [0, 0] and cells[-1].tolist() == [H // 28 - 1, W // 28 - 1]
    assert cells[W // 28].tolist() == [1, 0]  # row-major


def test_processor_resizes_to_multiples_of_28(processor, tokenizer):
    enc = encode(processor, noise_image(100, 100))
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8]]  # 100 px -> 112 px


class PassThroughBlock(torch.nn.Module):
    """Stands in for a vision block: returns its input, so tokens do not mix."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def image_features(model, enc) -> torch.Tensor:
    with torch.no_grad():
        out = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
    pooled = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(pooled, (list, tuple)):
        pooled = torch.cat(list(pooled))
    return pooled


def with_cell_changed(image: np.ndarray, r: int, c: int, seed: int = 1) -> np.ndarray:
    out = image.copy()
    out[28 * r : 28 * r + 28, 28 * c : 28 * c + 28] = noise_image(28, 28, seed)
    return out


@pytest.fixture(scope="module")
def mixing_free_model(model):
    m = copy.deepcopy(model)
    for i in range(len(m.model.visual.blocks)):
        m.model.visual.blocks[i] = PassThroughBlock()
    return m


@pytest.mark.parametrize("cell", [(1, 2), (4, 7)])
def test_changed_cell_moves_exactly_its_image_token(
    mixing_free_model, big_processor, tokenizer, cell
):
    r, c = cell
    base_img = noise_image(H, W)
    enc0 = encode(big_processor, base_img)
    enc1 = encode(big_processor, with_cell_changed(base_img, r, c))
    assert torch.equal(enc0["input_ids"], enc1["input_ids"])
    f0, f1 = image_features(mixing_free_model, enc0), image_features(mixing_free_model, enc1)
    assert f0.shape == (48, mixing_free_model.config.get_text_config().hidden_size)
    changed = ((f1 - f0).abs().amax(-1) > 0).nonzero().flatten().tolist()
    assert len(changed) == 1
    k = changed[0]
    assert k == r * (W // 28) + c
    positions, cells = modeling.image_token_cells(
        enc0["input_ids"], enc0["image_grid_thw"], 0, image_pad_id(tokenizer)
    )
    assert tuple(cells[k].tolist()) == (r, c)

    # Through the full forward: the language model's input changes at exactly the position
    # that image_token_cells assigns to cell (r, c).
    seen = []

    def grab(module, args, kwargs):
        seen.append(kwargs["inputs_embeds"].detach().clone())

    handle = mixing_free_model.model.language_model.register_forward_pre_hook(
        grab, with_kwargs=True
    )
    try:
        with torch.no_grad():
            mixing_free_model(**enc0)
            mixing_free_model(**enc1)
    finally:
        handle.remove()
    diff = (seen[1][0] - seen[0][0]).abs().amax(-1)
    assert (diff > 0).nonzero().flatten().tolist() == [int(positions[k])]


@pytest.mark.parametrize("cell", [(1, 2), (4, 7), (0, 0), (5, 3)])
def test_changed_cell_moves_its_own_token_most_with_real_tower(model, big_processor, cell):
    # The real tower mixes tokens (window and full attention), so every output may move;
    # the changed cell's own token must still move the most, by a wide margin.
    r, c = cell
    base_img = noise_image(H, W)
    f0 = image_features(model, encode(big_processor, base_img))
    f1 = image_features(model, encode(big_processor, with_cell_changed(base_img, r, c)))
    change = (f1 - f0).norm(dim=-1)
    top = change.topk(2)
    assert int(top.indices[0]) == r * (W // 28) + c
    assert top.values[0] > 10 * top.values[1]


def test_image_token_cells_rejects_count_mismatch(processor, tokenizer, focus_image):
    enc = encode(processor, focus_image)
    pad = image_pad_id(tokenizer)
    ids = enc["input_ids"].clone()
    first = int((ids[0] == pad).nonzero()[0])
    ids[0, first] = tokenizer.pad_token_id
    with pytest.raises(ValueError, match="image tokens"):
        modeling.image_token_cells(ids, enc["image_grid_thw"], 0, pad)
    with pytest.raises(ValueError):
        modeling.image_token_cells(enc["input_ids"], torch.tensor([[1, 8, 10]]), 0, pad)


# --------------------------------------------------------------------------------------
# boxes_to_grid
# --------------------------------------------------------------------------------------


def test_boxes_to_grid_one_cell_is_one_hot():
    grid = modeling.boxes_to_grid([[56, 28, 84, 56]], (112, 112), (1, 8, 8))
    expected = torch.zeros(4, 4)
    expected[1, 2] = 1.0
    assert torch.equal(grid, expected)
    # A box strictly inside a cell gives the same one-hot target.
    assert torch.equal(modeling.boxes_to_grid([[60, 30, 80, 50]], (112, 112), (1, 8, 8)), expected)


def test_boxes_to_grid_non_square():
    grid = modeling.boxes_to_grid([[28 * 7, 28 * 5, W, H]], (W, H), (1, H // 14, W // 14))
    assert grid.shape == (H // 28, W // 28)
    assert grid[5, 7] == 1.0 and grid.sum() == 1.0


def test_boxes_to_grid_half_half():
    grid = modeling.boxes_to_grid([[14, 0, 42, 28]], (112, 112), (1, 8, 8))
    assert grid[0, 0] == pytest.approx(0.5) and grid[0, 1] == pytest.approx(0.5)
    assert grid.sum() == pytest.approx(1.0) and int((grid > 0).sum()) == 2
    vertical = modeling.boxes_to_grid([[28, 42, 56, 70]], (112, 112), (1, 8, 8))
    assert vertical[1, 1] == pytest.approx(0.5) and vertical[2, 1] == pytest.approx(0.5)


def test_boxes_to_grid_scales_original_pixels(processor):
    # A 100x100 image is resized to 112x112; a 25-px box in original pixels is one 28-px cell.
    thw = encode(processor, noise_image(100, 100))["image_grid_thw"][0]
    grid = modeling.boxes_to_grid([[25, 50, 50, 75]], (100, 100), thw)
    assert grid.shape == (4, 4)
    assert grid[2, 1] == pytest.approx(1.0) and grid.sum() == pytest.approx(1.0)
    half = modeling.boxes_to_grid([[12.5, 0, 37.5, 25]], (100, 100), thw)
    assert half[0, 0] == pytest.approx(0.5) and half[0, 1] == pytest.approx(0.5)
    # Non-square original: width and height scale separately (100x50 -> 112x56 cells 4x2).
    wide = modeling.boxes_to_grid([[75, 25, 100, 50]], (100, 50), (1, 4, 8))
    assert wide.shape == (2, 4) and wide[1, 3] == pytest.approx(1.0)


def test_boxes_to_grid_smoothing_keeps_sum_and_argmax():
    boxes = [[28, 28, 56, 56], [56, 28, 70, 56]]  # weights 2:1 on cells (1,1) and (1,2)
    sharp = modeling.boxes_to_grid(boxes, (112, 112), (1, 8, 8))
    smooth = modeling.boxes_to_grid(boxes, (112, 112), (1, 8, 8), smooth_sigma=1.0)
    assert sharp.sum() == pytest.approx(1.0) and smooth.sum() == pytest.approx(1.0, abs=1e-6)
    assert int(smooth.argmax()) == int(sharp.argmax()) == 1 * 4 + 1
    assert bool((smooth > 0).all()) and smooth.max() < sharp.max()


def test_boxes_to_grid_no_boxes_is_zero():
    assert torch.equal(modeling.boxes_to_grid([], (112, 112), (1, 8, 8)), torch.zeros(4, 4))
    outside = modeling.boxes_to_grid([[200, 200, 220, 220]], (112, 112), (1, 8, 8))
    assert torch.equal(outside, torch.zeros(4, 4))


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def logits_of(model, enc) -> torch.Tensor:
    with torch.no_grad():
        return model(**enc).logits


def test_save_and_load_round_trip(model, processor, params, focus_image, tmp_path):
    folder = modeling.save_backbone(model, processor, tmp_path / "m")
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert not [p for p in tmp_path.iterdir() if p.name != "m"]  # no temp folder left behind
    loaded, proc = modeling.load_saved_backbone(folder, params)
    loaded.eval()
    assert proc.tokenizer.padding_side == "left"
    assert proc.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    enc = encode(processor, focus_image)
    enc2 = encode(proc, focus_image)
    for key in ("input_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(enc[key], enc2[key]), key
    assert torch.equal(logits_of(model, enc), logits_of(loaded, enc2))
    # Saving again over an existing folder replaces it.
    modeling.save_backbone(loaded, proc, folder)
    assert (folder / "model.safetensors").exists()


def test_load_saved_backbone_missing_folder(params, tmp_path):
    with pytest.raises(FileNotFoundError):
        modeling.load_saved_backbone(tmp_path / "nothing", params)


def test_load_backbone_from_local_checkpoint(model, processor, params, focus_image, tmp_path):
    assert params.trust_remote_code is False
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    local = config.load_params(config.BackboneParams, model_name=str(folder))
    loaded, proc = modeling.load_backbone(local.model_name, local)
    loaded.eval()
    tok = proc.tokenizer
    assert tok.padding_side == "left"
    assert len(tok.encode(prompting.FOCUS, add_special_tokens=False)) == 1
    assert modeling.add_focus_token(loaded, proc) == []  # already present
    assert len(tok) == len(processor.tokenizer)
    enc = encode(proc, focus_image)
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert torch.equal(logits_of(loaded, enc), logits_of(model, encode(processor, focus_image)))


def tokenizer_without_tags() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(modeling.QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        [QUESTION, "red green blue yellow", "look at the circle"] * 4, trainer=trainer
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        additional_special_tokens=list(modeling.VISION_TOKENS),
    )


def test_add_focus_token_adds_missing_tags_with_mean_rows(params, focus_image):
    tok = tokenizer_without_tags()
    for t in prompting.TAG_TOKENS:
        assert t not in tok.get_vocab()
    proc = modeling.build_processor(tok, params.image_min_pixels, params.image_max_pixels)
    torch.manual_seed(0)
    m = Qwen2_5_VLForConditionalGeneration(modeling.tiny_config(params, tok)).eval()
    n_old = len(tok)
    old_in = m.get_input_embeddings().weight.detach().clone()
    assert old_in.shape[0] == n_old

    added = modeling.add_focus_token(m, proc)

    assert added == list(prompting.TAG_TOKENS)
    assert len(tok) == n_old + len(prompting.TAG_TOKENS)
    emb_in, emb_out = m.get_input_embeddings().weight, m.get_output_embeddings().weight
    assert emb_in.shape[0] == emb_out.shape[0] == len(tok)
    assert m.config.get_text_config().vocab_size == len(tok)
    assert torch.equal(emb_in[:n_old], old_in)
    mean = old_in.mean(0, keepdim=True).expand(len(added), -1)
    assert torch.allclose(emb_in[n_old:], mean, atol=1e-6)
    assert torch.allclose(emb_out[n_old:], mean, atol=1e-6)
    for t in prompting.TAG_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] >= n_old
    # The grown model runs a prompt that ends with the new <Focus> token.
    enc = encode(proc, focus_image)
    assert int(enc["input_ids"][0, -1]) == tok.convert_tokens_to_ids(prompting.FOCUS)
    assert logits_of(m, enc).shape[-1] == len(tok)
    # A second call adds nothing.
    assert modeling.add_focus_token(m, proc) == []
    assert m.get_input_embeddings().weight.shape[0] == len(tok)


def test_add_focus_token_with_padded_embedding(params):
    # Real checkpoints carry more embedding rows than tokens (Qwen2.5-VL-3B: 151936 rows for
    # 151665 tokens): the tags land on padding rows, which must still get the mean row.
    tok = tokenizer_without_tags()
    proc = modeling.build_processor(tok, params.image_min_pixels, params.image_max_pixels)
    torch.manual_seed(0)
    m = Qwen2_5_VLForConditionalGeneration(modeling.tiny_config(params, tok)).eval()
    n_tok = len(tok)
    m.resize_token_embeddings(n_tok + 16, mean_resizing=False)
    with torch.no_grad():
        m.get_input_embeddings().weight[n_tok:] = 7.0  # stand-in for untrained padding rows
    old = m.get_input_embeddings().weight.detach().clone()

    added = modeling.add_focus_token(m, proc)

    assert added == list(prompting.TAG_TOKENS)
    emb = m.get_input_embeddings().weight
    assert emb.shape[0] == n_tok + 16  # no resize needed
    ids = tok.convert_tokens_to_ids(list(prompting.TAG_TOKENS))
    mean = old[:n_tok].mean(0, keepdim=True).expand(len(ids), -1)
    assert torch.allclose(emb[ids], mean, atol=1e-6)
    untouched = [i for i in range(n_tok + 16) if i not in ids]
    assert torch.equal(emb[untouched], old[untouched])


# --------------------------------------------------------------------------------------
# LoRA and parameter counts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("freeze", [False, True])
def test_wrap_lora_targets_language_model_only(model, processor, params, focus_image, freeze):
    p = config.load_params(config.BackboneParams, lora=True, freeze_vision=freeze)
    full = modeling.count_parameters(model)
    wrapped = modeling.wrap_lora(copy.deepcopy(model), p, processor)
    named = list(wrapped.named_parameters())
    lora = [n for n, _ in named if "lora_" in n]
    assert lora, "no adapters"
    assert not [n for n in lora if "visual" in n]
    assert all("language_model" in n for n in lora)
    for target in p.lora_targets:
        assert any(f".{target}." in n for n in lora), target
    counts = modeling.count_parameters(wrapped)
    assert counts["trainable"] < full["total"]
    # Trainable parameters: the adapters, plus one copy of the tower unless it is frozen
    # (however the wrapper keeps it, e.g. as a module saved with the adapter).
    trainable_vision = sum(x.numel() for n, x in named if "visual" in n and x.requires_grad)
    assert trainable_vision == (0 if freeze else full["vision"])
    # Besides adapters and tower: only the new tokens' rows (one row each; the head is tied).
    rows = [(n, x) for n, x in named if "trainable_tokens_delta" in n]
    assert [tuple(x.shape) for _, x in rows] == [(len(prompting.TAG_TOKENS), model.config.get_text_config().hidden_size)]
    assert not [n for n, x in named if x.requires_grad and "visual" not in n and "lora_" not in n
                and "trainable_tokens_delta" not in n]
    lora_params = sum(x.numel() for n, x in named if "lora_" in n)
    assert all(x.requires_grad for n, x in named if "lora_" in n)
    assert counts["trainable"] == lora_params + trainable_vision + sum(x.numel() for _, x in rows)
    # Fresh adapters (B = 0) leave the model's output unchanged.
    enc = encode(processor, focus_image)
    wrapped.eval()
    assert torch.allclose(logits_of(wrapped, enc), logits_of(model, enc), atol=1e-6)


def _untied(model):
    """A copy of ``model`` whose output head is its own matrix (as in 7B)."""
    out = copy.deepcopy(model)
    out.config.tie_word_embeddings = False
    out.config.get_text_config().tie_word_embeddings = False
    out.lm_head.weight = torch.nn.Parameter(out.lm_head.weight.detach().clone())
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_lora_step_trains_the_new_token_rows_only(model, processor, params, tied):
    """Under LoRA the mean-initialised <Focus> / tag rows were frozen, so the model could not
    tell <think> from <answer> when emitting one. Now they train (input rows, and the head's
    rows when untied); every other row stays as it was."""
    base = copy.deepcopy(model) if tied else _untied(model)
    assert (base.lm_head.weight.data_ptr() == base.get_input_embeddings().weight.data_ptr()) == tied
    emb0 = base.get_input_embeddings().weight.detach().clone()
    head0 = base.lm_head.weight.detach().clone()
    p = config.load_params(config.BackboneParams, lora=True, freeze_vision=True)
    wrapped = modeling.wrap_lora(base, p, processor)
    rows = [data.make_example(config.load_params(config.DataParams), "train", i) for i in range(2)]
    from fmr1lib import batching

    batch = batching.encode_batch(rows, processor, "focus_anchor")
    opt = torch.optim.AdamW([x for x in wrapped.parameters() if x.requires_grad], lr=1e-2)
    wrapped.train()
    loss = wrapped(**batch.inputs, labels=batch.labels).loss
    loss.backward()
    opt.step()
    merged = wrapped.merge_and_unload()
    new = modeling.new_token_ids(processor)
    old = torch.ones(emb0.shape[0], dtype=torch.bool)
    old[new] = False
    emb = merged.get_input_embeddings().weight.detach()
    assert torch.equal(emb[old], emb0[old])
    assert all(not torch.equal(emb[i], emb0[i]) for i in new)
    head = merged.lm_head.weight.detach()
    assert torch.equal(head[old], head0[old])
    # The tag rows in the head move (tied: with the embedding; untied: on their own).
    moved = [i for i in new if not torch.equal(head[i], head0[i])]
    assert len(moved) >= 4, moved


def test_count_parameters_adds_up(model):
    counts = modeling.count_parameters(model)
    assert counts["total"] == counts["vision"] + counts["language"]
    assert counts["vision"] == sum(p.numel() for p in model.model.visual.parameters())
    lm = sum(p.numel() for p in model.model.language_model.parameters())
    assert counts["language"] == lm  # lm_head is tied to the input embeddings
    assert counts["trainable"] == counts["total"]
    m = copy.deepcopy(model)
    modeling.freeze_vision(m, True)
    frozen = modeling.count_parameters(m)
    assert frozen["trainable"] == frozen["total"] - frozen["vision"] <= frozen["total"]
    modeling.freeze_vision(m, False)
    assert modeling.count_parameters(m)["trainable"] == counts["total"]


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------


def boost_logits(model, token_ids: dict[int, float]):
    """Forward hook on the lm_head that adds a bonus to chosen token logits."""
    idx = torch.tensor(list(token_ids))
    bonus = torch.tensor(list(token_ids.values()))

    def hook(module, args, output):
        output = output.clone()
        output[..., idx] += bonus
        return output

    return model.get_output_embeddings().register_forward_hook(hook)


def test_generate_suppresses_vision_tokens(model, processor, focus_image):
    vision = modeling.vision_token_ids(processor)
    assert len(set(vision)) == 4
    enc = encode(processor, focus_image)
    handle = boost_logits(model, dict.fromkeys(vision, 100.0))
    try:
        # Without suppression the model now prefers a vision token.
        assert int(logits_of(model, enc)[0, -1].argmax()) in vision
        ids, texts = modeling.generate(model, processor, enc, max_new_tokens=6)
        assert ids.shape == (1, 6)
        assert not set(ids.flatten().tolist()) & set(vision)
        ids, texts = modeling.generate(
            model, processor, enc, max_new_tokens=5,
            decoding=modeling.Decoding(do_sample=True, num_return_sequences=3),
        )
        assert ids.shape[0] == 3 and len(texts) == 3
        assert not set(ids.flatten().tolist()) & set(vision)
    finally:
        handle.remove()


def test_generate_stops_and_cuts_at_im_end(model, processor, tokenizer, focus_image):
    vision = modeling.vision_token_ids(processor)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    enc = encode(processor, focus_image)
    bonus = dict.fromkeys(vision, 100.0)
    bonus[im_end] = 50.0
    handle = boost_logits(model, bonus)
    try:
        ids, texts = modeling.generate(model, processor, enc, max_new_tokens=6)
    finally:
        handle.remove()
    assert int(ids[0, 0]) == im_end
    assert texts == [""]


def test_decode_completions_keeps_tags_and_cuts(processor, tokenizer):
    body = "<think>look at the circle</think><answer>red</answer>"
    pad = tokenizer.pad_token_id
    ids = tokenizer.encode(body + "<|im_end|><think>junk", add_special_tokens=False)
    no_end = tokenizer.encode(body, add_special_tokens=False)
    width = max(len(ids), len(no_end)) + 2
    rows = [ids + [pad] * (width - len(ids)), no_end + [pad] * (width - len(no_end))]
    texts = modeling.decode_completions(processor, torch.tensor(rows))
    assert texts == [body, body]
    assert prompting.parse_answer(texts[0]) == "red" and prompting.is_well_formed(texts[0])


# --------------------------------------------------------------------------------------
# Decoding settings are explicit (nothing inherited from the checkpoint)
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def checkpoint_decoding(model, **settings):
    """The model's generation config as an Instruct checkpoint ships it (restored after)."""
    saved = {k: getattr(model.generation_config, k, None) for k in settings}
    for k, v in settings.items():
        setattr(model.generation_config, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(model.generation_config, k, v)


def test_sampling_ignores_checkpoint_top_k_and_penalty(model, processor, focus_image):
    """Qwen2.5-VL-Instruct's generation_config.json (top_k=1, repetition_penalty=1.05) made all
    G samples of a prompt identical: every group advantage 0."""
    enc = encode(processor, focus_image)
    with checkpoint_decoding(model, top_k=1, repetition_penalty=1.05, temperature=0.1, top_p=0.001):
        torch.manual_seed(0)
        ids, _ = modeling.generate(model, processor, enc, max_new_tokens=8,
                                   decoding=modeling.Decoding(do_sample=True,
                                                              num_return_sequences=8))
    assert len({tuple(r) for r in ids.tolist()}) >= 4


def test_sampling_scores_are_softmax_of_logits_over_temperature(model, processor, focus_image):
    """The sampler's processed scores equal logits / T except at the suppressed vision tokens:
    no inherited top-k (transformers' hidden default is 50), no repetition penalty."""
    enc = encode(processor, focus_image)
    vision = modeling.vision_token_ids(processor)
    kw = modeling.decoding_kwargs(do_sample=True, temperature=0.7)
    with checkpoint_decoding(model, top_k=1, repetition_penalty=5.0):
        torch.manual_seed(0)
        out = model.generate(**enc, **kw, max_new_tokens=6, suppress_tokens=vision,
                             output_scores=True, output_logits=True, return_dict_in_generate=True)
    scores, logits = torch.stack(out.scores, 1), torch.stack(out.logits, 1)
    keep = torch.ones(scores.shape[-1], dtype=torch.bool)
    keep[vision] = False
    assert torch.isinf(scores[..., ~keep]).all()
    assert torch.allclose(scores[..., keep], logits[..., keep] / 0.7, atol=1e-5)


def test_greedy_is_argmax_despite_checkpoint_penalty(model, processor, focus_image):
    """Greedy evaluation must not inherit the checkpoint's repetition penalty either."""
    enc = encode(processor, focus_image)
    with checkpoint_decoding(model, repetition_penalty=5.0, no_repeat_ngram_size=1):
        ids, _ = modeling.generate(model, processor, enc, max_new_tokens=8)
    plain, _ = modeling.generate(model, processor, enc, max_new_tokens=8)
    assert torch.equal(ids, plain)
    # And the plain run is the argmax at every step (teacher-forced check).
    vision = modeling.vision_token_ids(processor)
    seq = torch.cat([enc["input_ids"], ids], 1)
    full = dict(enc, input_ids=seq, attention_mask=torch.ones_like(seq))
    if "mm_token_type_ids" in enc:
        full["mm_token_type_ids"] = torch.cat(
            [enc["mm_token_type_ids"], torch.zeros_like(ids, dtype=enc["mm_token_type_ids"].dtype)], 1)
    n = enc["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**full).logits[0, n - 1:-1].float()
    logits[:, vision] = -float("inf")
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    steps = ids[0].tolist()
    upto = steps.index(im_end) + 1 if im_end in steps else len(steps)
    assert logits.argmax(-1)[:upto].tolist() == steps[:upto]


def test_set_generation_defaults_drops_checkpoint_decoding(params):
    model, processor = modeling.build_tiny_backbone(params)
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 1.05
    model.generation_config.min_p = 0.1
    modeling.set_generation_defaults(model, processor)
    gc = model.generation_config
    assert gc.top_k is None and gc.repetition_penalty is None and gc.min_p is None
    assert gc.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_decoding_kwargs_rejects_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        modeling.decoding_kwargs(True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        modeling.decoding_kwargs(True, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        modeling.decoding_kwargs(True, top_k=-1)
