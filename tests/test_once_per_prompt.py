"""Each prompt once: its image through the vision tower once per forward (batching.images_once)
and its prefill once for the G rollouts (modeling.prefill_once), with unchanged numbers."""

from __future__ import annotations

import pytest
import torch

from fmr1lib import attention, batching, config, data, faithful, modeling


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test of this module runs with one torch thread."""


@pytest.fixture(scope="module")
def tiny():
    model, processor = modeling.build_tiny_backbone(config.load_params(config.BackboneParams))
    return model.eval(), processor


@pytest.fixture(scope="module")
def rows():
    p = config.load_params(config.DataParams)
    return [data.make_example(p, "train", i) for i in range(3)]


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
    reward = config.RewardParams(concentration="top_kappa", faithful_form="raw", reward_layers=[-1])
    res = {}
    for share in (True, False):
        batch = _sequences(rows, processor, share)
        distinct = [[[0], [1]]] * len(rows)
        with batching.eval_mode(model), attention.AttentionCapture(
                model, batch.query_positions, layers=[-1]) as cap:
            logits = batching.completion_logits(model, batch.inputs, batch.completion_ids.shape[1])
        view = faithful.counterfactual_view(model, processor, batch, rows, distinct, reward)
        res[share] = faithful.faithful_rewards(view, batch, logits, cap.attentions, reward).rewards
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


def _prompts(rows, processor):
    return batching.encode_batch(rows, processor, "plain", with_response=False).inputs


@pytest.mark.parametrize("do_sample", [True, False])
def test_prefill_once_gives_the_same_completions(tiny, rows, do_sample):
    """Same random state, same samples: the shared prefill changes no logit that decides a token."""
    model, processor = tiny
    inputs = _prompts(rows, processor)
    g = 4 if do_sample else 1
    out = {}
    for share in (True, False):
        torch.manual_seed(0)
        decoding = modeling.Decoding(do_sample=do_sample, num_return_sequences=g)
        out[share] = modeling.generate(model, processor, inputs, max_new_tokens=8, decoding=decoding,
                                       share_prefill=share)[0]
    assert out[True].shape == (len(rows) * g, 8)
    assert torch.equal(out[True], out[False])
    if do_sample:
        assert len({tuple(r) for r in out[True].tolist()}) > len(rows)  # the G samples differ


def test_prefill_runs_once_per_prompt(tiny, rows):
    model, processor = tiny
    inputs = _prompts(rows, processor)
    seen = []
    hook = model.model.language_model.register_forward_hook(
        lambda m, a, kw, out: seen.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True)
    try:
        modeling.generate(model, processor, inputs, max_new_tokens=3,
                          decoding=modeling.Decoding(do_sample=True, num_return_sequences=4))
    finally:
        hook.remove()
    n, s = inputs["input_ids"].shape
    assert seen[0] == (n, s - 1)  # each prompt once, the last token left for generate
    assert seen[1:] == [(4 * n, 1)] * 3
