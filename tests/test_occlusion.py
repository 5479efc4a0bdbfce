"""The annotation-free region searches (fmr1lib.occlusion)."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from fmr1lib import batching, config, data, modeling, occlusion


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
    regions = occlusion.search(model, processor, rows, occlusion.Search(n_cells=3, how="exhaustive", chunk_size=5))
    for cells, s in zip(_cells_of(regions, rows, processor), scores, strict=False):
        assert cells == sorted(range(len(s)), key=lambda k: (s[k], k))[:3]


@pytest.mark.parametrize("how,kw", [("budgeted", {"budget": 16}), ("coarse_to_fine", {"beam": 4})])
def test_cheaper_searches_equal_exhaustive_when_given_every_cell(tiny, rows, how, kw):
    """A budget of every cell re-ranks all of them exactly; a beam of 4 on a 4x4 grid keeps
    every quadrant, so both reduce to the exhaustive search."""
    model, processor = tiny
    exhaustive = occlusion.search(model, processor, rows, occlusion.Search(how="exhaustive"))
    assert occlusion.search(model, processor, rows, occlusion.Search(how=how, **kw)) == exhaustive


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
        occlusion.search(*tiny, rows, occlusion.Search(how="nope"))


def test_every_search_returns_distinct_cells_of_the_image(tiny, rows):
    model, processor = tiny
    for how in occlusion.SEARCHES:
        regions = occlusion.search(model, processor, rows, occlusion.Search(how=how))
        for cells in _cells_of(regions, rows, processor):
            assert len(cells) == 2 and len(set(cells)) == 2 and all(0 <= c < 16 for c in cells)
