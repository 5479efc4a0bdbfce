"""The annotation-free region searches (fmr1lib.occlusion) and encoding each image once."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from fmr1lib import attention, batching, config, data, faithful, modeling, occlusion


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test of this module runs with one torch thread."""


@pytest.fixture(scope="module")
def tiny():
    """The tiny backbone with its image embeddings scaled up, so that occluding a cell changes
    the answer's log-probability far above float noise (a fresh model barely looks)."""
    model, processor = modeling.build_tiny_backbone(config.load_params(config.BackboneParams))
    with torch.no_grad():
        model.model.visual.merger.mlp[2].weight.mul_(30.0)
    return model.eval(), processor


@pytest.fixture(scope="module")
def rows():
    p = config.load_params(config.DataParams)
    return [data.make_example(p, "train", i) for i in range(3)]


def _cells_of(regions, rows, processor):
    grids = processor.image_processor(images=[r["image"] for r in rows],
                                      return_tensors="pt")["image_grid_thw"]
    return [occlusion.chosen_cells(b, r["image"].size, g) for b, r, g in zip(regions, rows, grids, strict=False)]


def test_split_block_covers_the_block_without_overlap():
    for block in [(0, 4, 0, 4), (0, 3, 0, 5), (2, 3, 1, 2), (0, 1, 0, 7)]:
        cells = [(r, c) for a, b, c0, c1 in occlusion.split_block(block)
                 for r in range(a, b) for c in range(c0, c1)]
        expect = [(r, c) for r in range(block[0], block[1]) for c in range(block[2], block[3])]
        assert sorted(cells) == sorted(expect) and len(cells) == len(set(cells))


def test_forwards_per_image_grow_slowly_except_exhaustive():
    f = {h: [occlusion.forwards_per_image(h, s, s) for s in (4, 8, 12, 16)] for h in occlusion.SEARCHES}
    assert f["exhaustive"] == [16, 64, 144, 256]
    assert f["coarse_to_fine"][0] == 12 and f["coarse_to_fine"][-1] == 28
    assert f["budgeted"] == [2, 2, 2, 2] and f["gradient"] == [0, 0, 0, 0]


def test_chosen_cells_inverts_cell_boxes():
    boxes = occlusion.cell_boxes((100, 60), (1, 6, 10))
    assert occlusion.chosen_cells(boxes, (100, 60), (1, 6, 10)) == list(range(15))


def test_exhaustive_search_is_the_lowest_scores(tiny, rows):
    model, processor = tiny
    scores = occlusion.exhaustive_scores(model, processor, rows)
    assert min(max(s) - min(s) for s in scores) > 1e-3  # the cells matter, far above float noise
    regions = occlusion.search(model, processor, rows, 3, how="exhaustive", chunk_size=5)
    for cells, s in zip(_cells_of(regions, rows, processor), scores, strict=False):
        assert cells == sorted(range(len(s)), key=lambda k: (s[k], k))[:3]


@pytest.mark.parametrize("how,kw", [("budgeted", {"budget": 16}), ("coarse_to_fine", {"beam": 4})])
def test_cheaper_searches_equal_exhaustive_when_given_every_cell(tiny, rows, how, kw):
    """A budget of every cell re-ranks all of them exactly; a beam of 4 on a 4x4 grid keeps
    every quadrant, so both reduce to the exhaustive search."""
    model, processor = tiny
    exhaustive = occlusion.search(model, processor, rows, 2, how="exhaustive")
    assert occlusion.search(model, processor, rows, 2, how=how, **kw) == exhaustive


def test_gradient_scores_are_the_first_order_change(tiny, rows):
    """A cell's score is the derivative of the answer log-probability along (its removed
    embedding - its embedding): equal to an independent autograd of the log-probability, and
    close to a finite difference on the cells that matter (the model's RMSNorm runs in fp32,
    so a finite difference cannot resolve the small ones)."""
    model, processor = tiny
    row = rows[0]
    scores = occlusion.gradient_scores(model, processor, [row])[0]
    inner = model.model
    batch = batching.encode_batch([row], processor, "plain", with_response=True)
    labels = batch.labels
    n_resp = int((labels != -100).sum(1).max())
    inputs = dict(batch.inputs)
    grid = inputs["image_grid_thw"]
    removed = occlusion._occluded(row, row["image"], occlusion.cell_boxes(row["image"].size, grid[0]),
                                  "background")["image"]
    pv_removed = processor.image_processor(images=[removed], return_tensors="pt")["pixel_values"]
    open_id, close_id = occlusion._answer_ids(processor)
    keep = batching.answer_token_mask(labels, open_id, close_id)[:, -n_resp:]
    targets = labels[:, -n_resp:].clamp_min(0)
    with torch.no_grad():
        e = torch.cat(inner.get_image_features(inputs.pop("pixel_values"), grid).pooler_output)
        e_removed = torch.cat(inner.get_image_features(pv_removed, grid).pooler_output)

    def logp(emb):
        feats = BaseModelOutputWithPooling(pooler_output=(emb,))
        out = model(**inputs, mm_encoder_outputs={"image": feats}, logits_to_keep=n_resp + 1)
        lp = torch.log_softmax(out.logits[:, :-1].double(), -1)
        return (lp.gather(-1, targets[..., None])[..., 0] * keep).sum()

    x = e.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(logp(x), x)
    expect = (g * (e_removed - e)).sum(-1)
    assert torch.allclose(torch.tensor(scores, dtype=torch.float64), expect.double(), rtol=1e-4, atol=1e-8)
    big = [k for k in range(len(scores)) if abs(scores[k]) > 1e-3]
    assert big and len(big) < len(scores)  # some cells matter, others barely
    eps = 1e-2
    with torch.no_grad():
        for k in big:
            up, down = e.clone(), e.clone()
            up[k] += eps * (e_removed[k] - e[k])
            down[k] -= eps * (e_removed[k] - e[k])
            fd = float(logp(up) - logp(down)) / (2 * eps)
            assert fd == pytest.approx(scores[k], rel=0.1)
    assert all(p.grad is None for p in model.parameters())


def test_search_rejects_an_unknown_name(tiny, rows):
    with pytest.raises(ValueError, match="occlusion search 'nope'"):
        occlusion.search(*tiny, rows, how="nope")


def test_every_search_returns_distinct_cells_of_the_image(tiny, rows):
    model, processor = tiny
    for how in occlusion.SEARCHES:
        regions = occlusion.search(model, processor, rows, 2, how=how)
        for cells in _cells_of(regions, rows, processor):
            assert len(cells) == 2 and len(set(cells)) == 2 and all(0 <= c < 16 for c in cells)


# --------------------------------------------------------------------------------------
# Each image through the vision tower once per forward
# --------------------------------------------------------------------------------------


def _sequences(rows, processor, share):
    tok = processor.tokenizer
    texts = ["<think> the circle is red </think> <answer> red </answer>",
             "<think> the patch </think> <answer> blue </answer>", "<answer> green"]
    comps = [[tok(t, add_special_tokens=False)["input_ids"] for t in texts] for _ in rows]
    return batching.build_sequences(rows, comps, processor, share_images=share)


def test_vision_tower_runs_once_per_prompt_not_per_sample(tiny, rows):
    model, processor = tiny
    seen = []
    hook = model.model.visual.register_forward_hook(lambda m, a, kw, out: seen.append(a[0].shape[0]),
                                                    with_kwargs=True)
    try:
        batch = _sequences(rows, processor, share=True)
        with torch.no_grad():
            batching.completion_logits(model, batch.inputs, batch.completion_ids.shape[1])
    finally:
        hook.remove()
    patches = int(batch.grid_thw.prod(-1).sum())  # every prompt's patches, once
    assert seen == [patches]
    assert batch.completion_ids.shape[0] == 3 * len(rows)


def test_shared_images_give_the_same_logprobs_rows_and_gradients(tiny, rows):
    model, processor = tiny
    model.train()
    out = {}
    try:
        for share in (True, False):
            batch = _sequences(rows, processor, share)
            model.zero_grad()
            with attention.AttentionCapture(model, batch.query_positions, layers=[-1]) as cap:
                logits = batching.completion_logits(model, batch.inputs, batch.completion_ids.shape[1])
                lp = batching.token_logprobs(logits, batch.completion_ids, batch.completion_mask)
                lp.sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            out[share] = (lp.detach(), cap.attentions.detach(), grads)
    finally:
        model.zero_grad()
        model.eval()
    (lp_a, at_a, g_a), (lp_b, at_b, g_b) = out[True], out[False]
    assert torch.allclose(lp_a, lp_b, atol=1e-6)
    assert torch.allclose(at_a, at_b, atol=1e-6)
    assert any("visual" in n for n in g_a) and g_a.keys() == g_b.keys()
    for n in g_a:
        assert torch.allclose(g_a[n], g_b[n], rtol=1e-4, atol=1e-7), n


def test_faithful_rewards_unchanged_by_shared_images(tiny, rows):
    model, processor = tiny
    res = {}
    for share in (True, False):
        batch = _sequences(rows, processor, share)
        distinct = [[[0], [1]]] * len(rows)
        with batching.eval_mode(model), attention.AttentionCapture(
                model, batch.query_positions, layers=[-1]) as cap:
            logits = batching.completion_logits(model, batch.inputs, batch.completion_ids.shape[1])
        view = faithful.counterfactual_view(model, processor, batch, rows, distinct, "boxes", layers=[-1])
        res[share] = faithful.faithful_rewards(view, batch, logits, cap.attentions, form="raw")
    assert sum(r > 0 for r in res[True]) == 2 * len(rows)
    assert res[True] == pytest.approx(res[False], abs=1e-6)


def test_sequence_grids_and_selection(tiny, rows):
    _, processor = tiny
    batch = _sequences(rows, processor, share=True)
    grids = batching.sequence_grids(batch.inputs)
    assert grids.shape[0] == 3 * len(rows)
    sel = batching.select_sequences(batch.inputs, torch.tensor([4, 0]))
    assert sel[batching.IMAGE_INDEX].tolist() == [1, 0]
    assert torch.equal(sel["input_ids"], batch.inputs["input_ids"][[4, 0]])
    repeated = _sequences(rows, processor, share=False)
    assert torch.equal(batching.sequence_grids(repeated.inputs), grids)
    with pytest.raises(ValueError, match="stored once"):
        batching.select_sequences(repeated.inputs, torch.tensor([0]))
