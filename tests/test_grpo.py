"""Stage 2 (fmr1lib.grpo): the GRPO pieces on hand-built tensors, then tiny runs on the tiny backbone."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fmr1lib import (
    anchoring,
    attention,
    batching,
    checkpoints,
    config,
    counterfactual,
    data,
    faithful,
    grpo,
    modeling,
    prompting,
    repro,
    train,
)

# --------------------------------------------------------------------------------------
# Advantages and the clipped loss (hand-built tensors)
# --------------------------------------------------------------------------------------


def test_equal_rewards_give_exactly_zero_advantage():
    r = torch.tensor([0.1] * 8 + [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    adv = grpo.group_advantages(r, 8)
    assert torch.equal(adv[:8], torch.zeros(8))
    assert adv[8:].abs().min() > 0.5
    assert torch.equal(grpo.group_advantages(torch.full((6,), 0.7), 3, std_normalize=False),
                       torch.zeros(6))


def test_std_normalize_on_and_off():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 1.0, 3.0])
    on = grpo.group_advantages(r, 4, std_normalize=True, eps=0.0)
    off = grpo.group_advantages(r, 4, std_normalize=False)
    # group 1: mean 0.25, unbiased std 0.5; group 2: mean 2, unbiased std 2/sqrt(3)
    assert off.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 1.0, -1.0, -1.0, 1.0])
    s = 2 / math.sqrt(3)
    assert on.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5, 1 / s, -1 / s, -1 / s, 1 / s])
    with pytest.raises(ValueError):
        grpo.group_advantages(torch.ones(5), 4)


def _loss_inputs(ratios, adv, mask=None):
    logp_new = torch.log(torch.tensor(ratios, dtype=torch.float32)).requires_grad_(True)
    logp_old = torch.zeros_like(logp_new)
    mask = torch.ones_like(logp_new) if mask is None else torch.tensor(mask, dtype=torch.float32)
    return logp_new, logp_old, torch.tensor(adv, dtype=torch.float32), mask


def test_clip_positive_advantage_above_high_has_no_gradient():
    lp, lo, adv, m = _loss_inputs([[1.5, 1.1, 0.5]], [1.0])
    loss, stats = grpo.clipped_policy_loss(lp, lo, adv, m, config.PolicyLossParams(clip_low=0.2, clip_high=0.28))
    loss.backward()
    g = lp.grad[0]
    assert g[0] == 0.0  # r = 1.5 > 1 + 0.28 with A > 0: clipped
    assert g[1] != 0.0  # inside the trust region
    assert g[2] != 0.0  # A > 0 below 1 - clip_low: the unclipped term is the min, still pushes up
    assert stats["clip_frac"] == pytest.approx(1 / 3)
    assert stats["clip_high_frac"] == pytest.approx(1 / 3) and stats["clip_low_frac"] == 0.0


def test_clip_negative_advantage_below_low_has_no_gradient():
    lp, lo, adv, m = _loss_inputs([[0.5, 0.9, 1.5]], [-1.0])
    loss, stats = grpo.clipped_policy_loss(lp, lo, adv, m, config.PolicyLossParams(clip_low=0.2, clip_high=0.28))
    loss.backward()
    g = lp.grad[0]
    assert g[0] == 0.0  # r = 0.5 < 1 - 0.2 with A < 0: clipped
    assert g[1] != 0.0
    assert g[2] != 0.0  # A < 0 above 1 + clip_high: unclipped term active, still pushes down
    assert stats["clip_low_frac"] == pytest.approx(1 / 3) and stats["clip_high_frac"] == 0.0


def test_clipped_loss_hand_value_and_gradient():
    lp, lo, adv, m = _loss_inputs([[1.5, 0.9], [0.5, 1.1]], [1.0, -1.0])
    loss, stats = grpo.clipped_policy_loss(lp, lo, adv, m, config.PolicyLossParams(loss_agg="token_mean"))
    # per token: -min(rA, clip(r)A) = [-1.28, -0.9] and [0.8, 1.1]; token mean over 4
    assert float(loss.detach()) == pytest.approx((-1.28 - 0.9 + 0.8 + 1.1) / 4)
    loss.backward()
    # d/dlogp of -rA/4 is -rA/4 where unclipped
    assert torch.allclose(lp.grad, torch.tensor([[0.0, -0.9 / 4], [0.0, 1.1 / 4]]))
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.9 + 0.5 + 1.1) / 4)
    assert math.isnan(stats["kl"])


def test_ratio_one_gives_minus_advantage():
    lp = torch.zeros(2, 3)
    loss, stats = grpo.clipped_policy_loss(lp, lp, torch.tensor([1.0, -3.0]), torch.ones(2, 3))
    assert float(loss.detach()) == pytest.approx(1.0)  # -(1 * 3 - 3 * 3) / 6
    assert stats["clip_frac"] == 0.0 and stats["ratio_mean"] == 1.0


def test_token_mean_and_seq_mean_differ_on_unequal_lengths():
    # A = -1 with ratios inside the clip range: the per-token loss is the ratio itself.
    ratios = [[1.0, 1.1, 1.2], [0.9, 1.0, 1.0]]
    mask = [[1, 1, 1], [1, 0, 0]]
    lp, lo, adv, m = _loss_inputs(ratios, [-1.0, -1.0], mask)
    tok, _ = grpo.clipped_policy_loss(lp, lo, adv, m, config.PolicyLossParams(loss_agg="token_mean"))
    seq, _ = grpo.clipped_policy_loss(lp, lo, adv, m, config.PolicyLossParams(loss_agg="seq_mean"))
    assert float(tok.detach()) == pytest.approx((1.0 + 1.1 + 1.2 + 0.9) / 4)  # 1.05
    assert float(seq.detach()) == pytest.approx(((1.0 + 1.1 + 1.2) / 3 + 0.9) / 2)  # 1.0
    with pytest.raises(ValueError):
        grpo.clipped_policy_loss(lp, lo, adv, m, config.PolicyLossParams(loss_agg="sum"))


def test_seq_mean_ignores_empty_sequences():
    lp, lo, adv, m = _loss_inputs([[1.1, 1.0], [1.0, 1.0]], [-1.0, -1.0], [[1, 0], [0, 0]])
    loss, _ = grpo.clipped_policy_loss(lp, lo, adv, m, config.PolicyLossParams(loss_agg="seq_mean"))
    assert float(loss.detach()) == pytest.approx(1.1)


def test_k3_kl_to_reference():
    lp = torch.zeros(1, 2, requires_grad=True)
    mask = torch.ones(1, 2)
    half = config.PolicyLossParams(beta=0.5)
    same, st = grpo.clipped_policy_loss(lp, lp.detach(), torch.zeros(1), mask, half,
                                        logp_ref=lp.detach())
    assert st["kl"] == pytest.approx(0.0) and float(same.detach()) == pytest.approx(0.0)
    ref = torch.full((1, 2), math.log(2.0))
    loss, st = grpo.clipped_policy_loss(lp, lp.detach(), torch.zeros(1), mask, half, logp_ref=ref)
    k3 = 2.0 - math.log(2.0) - 1.0
    assert st["kl"] == pytest.approx(k3) and float(loss.detach()) == pytest.approx(0.5 * k3)
    with pytest.raises(ValueError):
        grpo.clipped_policy_loss(lp, lp.detach(), torch.zeros(1), mask, config.PolicyLossParams(beta=0.1))


def test_token_logprobs_and_entropy():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    lp = batching.token_logprobs(logits, torch.tensor([[1, 2]]), torch.tensor([[1, 0]]))
    assert torch.allclose(lp, torch.tensor([[math.log(0.25), 0.0]]))
    ent = grpo.token_entropy(logits)
    assert float(ent[0, 0]) == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))


def test_visual_dependency_pure():
    a = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    b = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))
    s = faithful.visual_dependency(a, b, torch.tensor([[1, 1]]))
    kl = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert torch.allclose(s, torch.tensor([[0.0, kl]]), atol=1e-6)


def test_region_share_renormalises_over_image_tokens_and_averages_layers():
    # seq = [text, img, img, img, text]; layer 0 and layer 1 rows for one token
    rows = torch.tensor([[[[0.4, 0.3, 0.2, 0.1, 0.0]], [[0.1, 0.1, 0.1, 0.2, 0.5]]]])
    image = torch.tensor([[False, True, True, True, False]])
    region = torch.tensor([[False, True, False, False, True]])  # a text token in C is ignored
    share = faithful.region_share(rows, region, image)
    assert share.shape == (1, 1)
    assert float(share) == pytest.approx((0.3 / 0.6 + 0.1 / 0.4) / 2)
    flat = faithful.region_share(rows[:, 0], region, image)
    assert float(flat) == pytest.approx(0.5)
    none = faithful.region_share(torch.tensor([[[1.0, 0, 0, 0, 0]]]), region, image)
    assert float(none) == 0.0


def test_completion_tokens_cut_at_eos_and_vision_tokens():
    ids = torch.tensor([[5, 6, 2, 0, 0], [7, 8, 9, 10, 11], [5, 251, 6, 2, 0]])
    toks, ok = batching.completion_tokens(ids, eos_id=2, forbidden_ids=[251])
    assert toks == [[5, 6, 2], [7, 8, 9, 10, 11], [5]]
    assert ok == [True, True, False]


def test_repeat_image_inputs_repeats_blocks_not_rows():
    thw = torch.tensor([[1, 2, 2], [1, 2, 4]])  # 4 and 8 patch rows
    pv = torch.cat([torch.zeros(4, 3), torch.ones(8, 3)])
    out, thw_out = batching.repeat_image_inputs(pv, thw, 3)
    assert out.shape == (36, 3)
    assert out[:12].sum() == 0 and out[12:].min() == 1
    assert thw_out.tolist() == [[1, 2, 2]] * 3 + [[1, 2, 4]] * 3


def test_cell_boxes_scale_back_to_the_original_image():
    boxes = faithful.cell_boxes((100, 50), (1, 8, 4))  # 4 rows x 2 cols of merged cells
    assert len(boxes) == 8
    assert boxes[0] == [0.0, 0.0, 50.0, 12.5]
    assert boxes[-1] == [50.0, 37.5, 100.0, 50.0]
    grid = modeling.boxes_to_grid([boxes[3]], (100, 50), (1, 8, 4))
    assert torch.nonzero(grid > 1e-6).tolist() == [[1, 1]]  # float slivers aside


# --------------------------------------------------------------------------------------
# The tiny backbone
# --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test of this module runs with one torch thread (``one_torch_thread``)."""


@pytest.fixture(scope="module")
def backbone_params():
    return config.load_params(config.BackboneParams)


@pytest.fixture(scope="module")
def data_params():
    return config.load_params(config.DataParams)


@pytest.fixture(scope="module")
def rows(data_params):
    return [data.make_example(data_params, "train", i) for i in range(4)]


@pytest.fixture(scope="module")
def tiny(backbone_params):
    model, processor = modeling.build_tiny_backbone(backbone_params)
    model.eval()
    return model, processor


@pytest.fixture(scope="module")
def sft_state(backbone_params, data_params, tmp_path_factory):
    """Weights of a tiny backbone after a short SFT: well-formed answers, some correct."""
    model, processor = modeling.build_tiny_backbone(backbone_params)
    warm = [data.make_example(data_params, "warmup", i) for i in range(32)]
    p = config.load_params(config.BackboneParams, steps=60, batch_size=8, lr=5e-3,
                           lr_warmup_steps=0, lr_schedule="constant", log_every=0,
                           checkpoint_every=0)
    repro.seed_everything(0)
    anchoring.train_supervised(model, processor, warm, p, tmp_path_factory.mktemp("sft"), "plain")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fresh(backbone_params, state=None):
    model, processor = modeling.build_tiny_backbone(backbone_params)
    if state is not None:
        model.load_state_dict(state)
    return model, processor


NO_LR = 1e-12
"""A learning rate for tests that read one step's rollouts and rewards only (computed before the
update); ``lr`` must be > 0."""


def _rl(**kw):
    base = {"steps": 4, "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 12,
            "lr": 1e-3, "lr_warmup_steps": 0, "lr_schedule": "constant", "log_every": 1,
            "checkpoint_every": 0}
    base.update(kw)
    return config.load_params(config.RLParams, **base)


def _low_ids(vocab_size):
    def reward(completions, completion_ids, rows):
        return [sum(t < vocab_size // 2 for t in ids) / max(1, len(ids)) for ids in completion_ids]

    return reward


def _response_sequences(rows, processor):
    """Per row: the reference response and its first four tokens, as two completions."""
    completions = []
    for r in rows:
        text = prompting.response_text(r["answer"], prompting.think_text(r["question"])) + "<|im_end|>"
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        completions.append([ids, ids[:4]])
    return batching.build_sequences(rows, completions, processor)


def test_visual_dependency_zero_on_same_image_positive_without_evidence(tiny, rows):
    model, processor = tiny
    batch = _response_sequences(rows, processor)
    t = batch.completion_ids.shape[1]
    mask = batch.completion_mask
    with torch.no_grad():
        logits = batching.completion_logits(model, batch.inputs, t)
        again = batching.completion_logits(model, batch.inputs, t)
        groups_rows = [r for r in rows for _ in range(2)]
        pv, thw = faithful.counterfactual_pixels(groups_rows, [r["evidence_boxes"] for r in groups_rows],
                                             processor, "background")
        n = batch.completion_ids.shape[0]
        cf = batching.select_sequences(batch.inputs, torch.arange(n), pv, thw, torch.arange(n))
        logits_cf = batching.completion_logits(model, cf, t)
    same = faithful.visual_dependency(logits, again, mask)
    removed = faithful.visual_dependency(logits, logits_cf, mask)
    assert float(same.max()) < 1e-6
    assert float(removed.max()) > 1e-7 and float(removed.max()) > 100 * float(same.max())
    assert float(removed[mask == 0].abs().max()) == 0.0


def test_teacher_forced_logprobs_match_the_sampler(tiny, rows):
    model, processor = tiny
    enc = batching.encode_batch(rows[:2], processor, "plain", with_response=False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc.inputs, do_sample=True, max_new_tokens=10, num_return_sequences=3,
                             suppress_tokens=modeling.vision_token_ids(processor),
                             output_logits=True, return_dict_in_generate=True)
    comp = out.sequences[:, enc.inputs["input_ids"].shape[1]:]
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens, ok = batching.completion_tokens(comp, eos, modeling.vision_token_ids(processor))
    groups = [grpo.Group(row=r, tokens=tokens[3 * i:3 * i + 3], texts=[""] * 3, ok=ok[3 * i:3 * i + 3],
                         accuracy=[0.0] * 3, format=[0.0] * 3) for i, r in enumerate(rows[:2])]
    batch = batching.build_sequences([g.row for g in groups], [g.tokens for g in groups], processor)
    with torch.no_grad():
        logits = batching.completion_logits(model, batch.inputs, batch.completion_ids.shape[1])
    lp = batching.token_logprobs(logits, batch.completion_ids, batch.completion_mask)
    t = batch.completion_ids.shape[1]
    sampler = torch.log_softmax(torch.stack(out.logits, 1)[:, :t].float(), -1)
    ref = sampler.gather(-1, comp[:, :t, None])[..., 0] * batch.completion_mask
    assert torch.allclose(lp, ref, atol=1e-4)


def test_captured_rows_are_those_that_predict_each_completion_token(tiny, rows):
    model, processor = tiny
    batch = _response_sequences(rows[:2], processor)
    s, t = batch.prompt_len, batch.completion_ids.shape[1]
    with torch.no_grad(), attention.AttentionCapture(model, batch.query_positions, layers=[-1]) as cap:
        batching.completion_logits(model, batch.inputs, t)
    att = cap.attentions[:, 0]  # [N, T, seq]
    for k in range(t):
        q = s - 1 + k  # the row that predicts completion token k
        assert torch.all(att[:, k, q + 1:] == 0)
        assert torch.all(att[batch.completion_mask[:, k].bool(), k, q] > 0)
    assert torch.allclose(att.sum(-1), torch.ones(att.shape[:2]), atol=1e-5)


def test_occlusion_region_matches_a_direct_search(tiny, rows):
    model, processor = tiny
    row = dict(rows[0], image=rows[0]["image"].resize((100, 100)),
               evidence_boxes=[[b * 100 / 112 for b in rows[0]["evidence_boxes"][0]]])
    regions = faithful.occlusion_region(
        model, processor, [row, rows[1]],
        config.RewardParams(occlusion_cells=3, occlusion_search="exhaustive"), chunk_size=7)
    assert [len(r) for r in regions] == [3, 3]
    cells = faithful.cell_boxes((100, 100), (1, 8, 8))
    assert all(box in cells for box in regions[0])
    assert len({tuple(b) for b in regions[0]}) == 3
    # direct search: teacher-force the reference response on each occluded copy, one by one
    tok = processor.tokenizer
    resp = prompting.response_text(row["answer"], prompting.think_text(row["question"]))
    ans_ids = tok(row["answer"], add_special_tokens=False)["input_ids"]
    tail = tok(prompting.ANSWER_CLOSE + "<|im_end|>", add_special_tokens=False)["input_ids"]
    scores = []
    for box in cells:
        img = counterfactual.intervene(row["image"], [box], "background", seed=0,
                                       fill=tuple(row["meta"]["background"]))
        text = prompting.prompt_text(processor, row["question"]) + resp + "<|im_end|>"
        enc = processor(text=[text], images=[img], return_tensors="pt")
        with torch.no_grad():
            logp = torch.log_softmax(model(**enc).logits[0].float(), -1)
        end = enc["input_ids"].shape[1] - len(tail)
        pos = range(end - len(ans_ids), end)
        scores.append(sum(float(logp[p - 1, enc["input_ids"][0, p]]) for p in pos))
    order = sorted(range(len(cells)), key=lambda k: (scores[k], k))[:3]
    assert regions[0] == [cells[k] for k in order]


def test_region_token_mask_marks_the_cells_of_the_boxes(tiny, rows):
    _, processor = tiny
    batch = _response_sequences(rows[:1], processor)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = batch.inputs["input_ids"][:1]
    mask = faithful.region_token_mask(ids, batch.grid_thw, [[[28.0, 56.0, 56.0, 84.0]]], [(112, 112)],
                                  image_id)
    pos, cells = modeling.image_token_cells(ids, batch.grid_thw, 0, image_id)
    assert mask.sum() == 1 and mask[0, pos[cells.tolist().index([2, 1])]]
    assert faithful.region_token_mask(ids, batch.grid_thw, [[]], [(112, 112)], image_id).sum() == 0


def test_grpo_run_changes_parameters_and_raises_reward(backbone_params, rows, tmp_path):
    model, processor = _fresh(backbone_params)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    p = _rl(steps=12, group_size=8, max_new_tokens=8, lr=1e-2, w_acc=0.0, w_fmt=0.0, log_every=4)
    repro.seed_everything(0)
    res = grpo.train_grpo(model, processor, rows, p, tmp_path, "grpo",
                          hooks=train.Hooks(extra_reward=_low_ids(len(processor.tokenizer))))
    assert res.steps == 12 and len(res.metrics) == 12
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert "lm_head.weight" in changed or "model.language_model.embed_tokens.weight" in changed
    extra = [m["extra_mean"] for m in res.metrics]
    assert sum(extra[-3:]) / 3 > sum(extra[:3]) / 3 + 0.15
    first = res.metrics[0]
    for key in ("reward_mean", "reward_std", "accuracy", "format", "faithful_group_std",
                "completion_len", "clip_frac", "entropy", "lr", "time_s", "rollout_s"):
        assert key in first, key
    assert first["ratio_mean"] == pytest.approx(1.0)
    samples = repro.read_jsonl(tmp_path / "samples.jsonl")
    assert {s["step"] for s in samples} == {1, 4, 8, 12}
    assert (tmp_path / "checkpoints" / "latest").exists()


def test_faithful_reward_only_for_correct_and_evidence(backbone_params, sft_state, rows, tmp_path):
    model, processor = _fresh(backbone_params, sft_state)
    no_evidence = dict(rows[1], evidence_boxes=[])
    p = _rl(steps=2, group_size=8, lr=1e-4, n_show=16, faithful_form="raw")
    repro.seed_everything(0)
    res = grpo.train_grpo(model, processor, [rows[0], no_evidence], p, tmp_path, "faithful")
    samples = repro.read_jsonl(tmp_path / "samples.jsonl")
    assert len(samples) == 32
    for s in samples:
        if s["accuracy"] == 0 or s["id"] == no_evidence["id"]:
            assert s["faithful"] == 0.0
        else:
            assert 0.0 <= s["faithful"] <= 1.0
    assert sum(m["n_faithful_scored"] for m in res.metrics) > 0
    scored = [m for m in res.metrics if m["n_faithful_scored"]]
    assert all(0.0 <= m["concentration"] <= 1.0 and m["s_t_mean"] >= 0.0 for m in scored)
    assert all(m["faithful_s"] > 0 for m in scored)


def test_faithful_occlusion_runs(backbone_params, sft_state, rows, tmp_path):
    model, processor = _fresh(backbone_params, sft_state)
    p = _rl(steps=2, group_size=8, lr=1e-4, n_show=16, occlusion_cells=2, faithful_form="raw")
    repro.seed_everything(1)
    res = grpo.train_grpo(model, processor, rows[:2], p, tmp_path, "faithful_occlusion")
    samples = repro.read_jsonl(tmp_path / "samples.jsonl")
    assert all(s["faithful"] == 0.0 for s in samples if s["accuracy"] == 0)
    assert any(s["faithful"] > 0.0 for s in samples if s["accuracy"] == 1)
    assert sum(m["n_faithful_scored"] for m in res.metrics) > 0
    for m in res.metrics:
        assert m["faithful_group_std"] >= 0.0
        assert m["n_faithful_scored"] == 0 or 0.0 <= m["concentration"] <= 1.0


def _hand_groups(rows, processor, texts_per_row):
    tok = processor.tokenizer
    groups = []
    for row, texts in zip(rows, texts_per_row, strict=True):
        ids = [tok(t + "<|im_end|>", add_special_tokens=False)["input_ids"] for t in texts]
        acc = [1.0 if row["answer"] in t else 0.0 for t in texts]
        groups.append(grpo.Group(row=row, tokens=ids, texts=list(texts), ok=[True] * len(texts),
                                 accuracy=acc, format=[1.0] * len(texts)))
    return groups


@pytest.mark.parametrize("variant", ["faithful", "faithful_occlusion"])
def test_group_tanh_scores_distinct_correct_trajectories(backbone_params, rows, monkeypatch, variant):
    model, processor = _fresh(backbone_params)
    a0, a1 = rows[0]["answer"], rows[1]["answer"]
    wrong = next(c for c in ("red", "green", "blue", "yellow") if c not in (a0, a1))
    texts = [
        [f"<think>look at the circle</think><answer>{a0}</answer>",
         f"<think>look at the {a0} circle</think><answer>{a0}</answer>",
         f"<think>look at the circle</think><answer>{a0}</answer>",
         f"<think>look at the circle</think><answer>{wrong}</answer>"],
        # one group whose correct trajectories are all the same sequence: no signal
        [f"<think>look</think><answer>{a1}</answer>"] * 3
        + [f"<think>look</think><answer>{wrong}</answer>"],
    ]
    groups = _hand_groups(rows[:2], processor, texts)
    monkeypatch.setattr(grpo, "rollout", lambda ctx, rows_: groups)
    # No floor: the untrained model's concentrations differ by less than the default 0.01, and
    # this test is about which trajectories are compared (the floor has its own tests).
    ctx = grpo.setup_grpo(model, processor, _rl(lr=NO_LR, n_show=8, faithful_std_floor=0.0), variant)
    stats, samples = grpo.grpo_step(ctx, rows, 0)
    faith = [s["faithful"] for s in samples]
    assert faith[3] == 0.0 and faith[7] == 0.0  # wrong answers
    assert faith[0] == faith[2]  # identical trajectories, equal rewards
    assert faith[4:7] == [0.0, 0.0, 0.0]  # identical correct trajectories only: neutral
    assert stats["n_faithful_scored"] == 3 and stats["n_faithful_distinct"] == 2
    if variant == "faithful":
        # With the annotated region the two distinct trajectories get different concentrations.
        # (The occlusion search on an untrained model may pick cells neither attends to, which
        # gives equal concentrations and z = 0, so only the structure is checked there.)
        assert faith[0] != 0.0 and faith[0] * faith[1] < 0  # standardised against each other
        assert stats["faithful_group_std_correct"] > 0
    # dynamic sampling keeps the first group only because of the faithful reward
    g_all_correct = _hand_groups(rows[:1], processor, [texts[0][:3]])[0]
    g_identical = _hand_groups(rows[1:2], processor, [texts[1][:3]])[0]
    assert grpo._group_may_vary(ctx, g_all_correct)
    assert not grpo._group_may_vary(ctx, g_identical)


def _comparable(rows_):
    out = []
    for r in rows_:
        out.append({k: v for k, v in r.items() if not k.endswith("_s")})
    return out


def test_resume_matches_an_uninterrupted_run(backbone_params, sft_state, rows, tmp_path):
    p = _rl(steps=4, checkpoint_every=2, faithful_form="raw")
    model_a, processor = _fresh(backbone_params, sft_state)
    repro.seed_everything(0)
    full = grpo.train_grpo(model_a, processor, rows, p, tmp_path / "full", "faithful")

    model_b, processor = _fresh(backbone_params, sft_state)
    repro.seed_everything(0)
    part = grpo.train_grpo(model_b, processor, rows, p, tmp_path / "split", "faithful", hooks=train.Hooks(stop_after=2))
    assert part.steps == 2
    model_c, processor = _fresh(backbone_params, sft_state)
    p_resume = _rl(steps=4, checkpoint_every=2, faithful_form="raw", resume=True)
    resumed = grpo.train_grpo(model_c, processor, rows, p_resume, tmp_path / "split", "faithful")
    assert resumed.steps == 4
    for (name, a), (_, c) in zip(model_a.named_parameters(), model_c.named_parameters(), strict=True):
        assert torch.allclose(a, c, atol=1e-6), name
    assert json.dumps(_comparable(full.metrics)) == json.dumps(_comparable(resumed.metrics))
    assert len(resumed.metrics) == 4
    assert (repro.read_jsonl(tmp_path / "full" / "samples.jsonl")
            == repro.read_jsonl(tmp_path / "split" / "samples.jsonl"))


def test_non_finite_loss_raises_and_keeps_the_last_checkpoint(backbone_params, rows, tmp_path):
    model, processor = _fresh(backbone_params)
    p = _rl(steps=4, checkpoint_every=1, max_new_tokens=6)
    # fail_at_step is the 0-based index: the third step (step 3 in the logs) fails.
    with pytest.raises(train.NonFiniteLossError, match="step 3;.*step_0000002"):
        grpo.train_grpo(model, processor, rows, p, tmp_path, "grpo", hooks=train.Hooks(fail_at_step=2))
    last = checkpoints.latest_checkpoint(tmp_path / "checkpoints")
    assert last is not None and last.name.endswith("0000002")
    assert len(repro.read_jsonl(tmp_path / "metrics.jsonl")) == 2


def test_dynamic_sampling_drops_degenerate_groups(backbone_params, rows, tmp_path):
    model, processor = _fresh(backbone_params)
    # untrained: every completion is malformed, so every group has equal (zero) rewards
    p = _rl(steps=1, max_new_tokens=6, dynamic_sampling=True, max_refill=2)
    repro.seed_everything(0)
    res = grpo.train_grpo(model, processor, rows, p, tmp_path / "flat", "grpo")
    assert res.metrics[0]["refill_rounds"] == 2 and res.metrics[0]["n_groups"] == 2
    repro.seed_everything(0)
    res = grpo.train_grpo(model, processor, rows, p, tmp_path / "varied", "grpo",
                          hooks=train.Hooks(extra_reward=_low_ids(len(processor.tokenizer))))
    assert res.metrics[0]["refill_rounds"] == 0 and res.metrics[0]["n_groups"] == 2


def test_kl_to_frozen_reference_and_lora_reference(backbone_params, rows, tmp_path):
    model, processor = _fresh(backbone_params)
    p = _rl(steps=3, max_new_tokens=8, beta=0.1, lr=1e-2, w_acc=0.0, w_fmt=0.0)
    repro.seed_everything(0)
    res = grpo.train_grpo(model, processor, rows, p, tmp_path / "full", "grpo",
                          hooks=train.Hooks(extra_reward=_low_ids(len(processor.tokenizer))))
    kls = [m["kl"] for m in res.metrics]
    assert kls[0] == pytest.approx(0.0, abs=1e-7) and kls[-1] > 1e-6

    lora_p = _rl(steps=2, max_new_tokens=8, beta=0.1, lr=1e-2, lora=True, w_acc=0.0, w_fmt=0.0)
    peft_model = modeling.wrap_lora(_fresh(backbone_params)[0], lora_p, processor)
    repro.seed_everything(0)
    res = grpo.train_grpo(peft_model, processor, rows, lora_p, tmp_path / "lora", "grpo",
                          hooks=train.Hooks(extra_reward=_low_ids(len(processor.tokenizer))))
    assert res.metrics[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert all(math.isfinite(m["kl"]) for m in res.metrics)


def test_grad_accum_chunks_give_the_same_loss(backbone_params, rows):
    stats = {}
    for accum, lam in ((1, 0.0), (2, 0.0), (2, 1.0)):
        model, processor = _fresh(backbone_params)
        p = _rl(grad_accum=accum, lambda_attn_rl=lam, lr=NO_LR)
        ctx = grpo.setup_grpo(model, processor, p, "grpo",
                              extra_reward=_low_ids(len(processor.tokenizer)))
        repro.seed_everything(0)
        stats[accum, lam], _ = grpo.grpo_step(ctx, rows, 0)
    assert stats[1, 0.0]["extra_mean"] == stats[2, 0.0]["extra_mean"]
    assert stats[1, 0.0]["loss"] == pytest.approx(stats[2, 0.0]["loss"], abs=1e-6)
    assert stats[1, 0.0]["attn_rl_loss"] is None
    attn = stats[2, 1.0]["attn_rl_loss"]
    assert attn is not None and attn > 0
    # the anchoring term is added to the policy loss, averaged over the prompts
    assert stats[2, 1.0]["loss"] == pytest.approx(stats[2, 0.0]["loss"] + attn, abs=1e-5)


def test_unknown_variant_is_rejected(tiny, rows, tmp_path):
    model, processor = tiny
    with pytest.raises(ValueError, match="variant"):
        grpo.train_grpo(model, processor, rows, _rl(), tmp_path, "ppo")


def test_rollouts_in_micro_batches_keep_groups_and_prompts(tiny, rows):
    model, processor = tiny
    calls = []
    real = grpo._rollout

    def counting(ctx, rows_):
        calls.append(len(rows_))
        return real(ctx, rows_)

    ctx = grpo.setup_grpo(model, processor, _rl(lr=NO_LR, rollout_prompts=1), "grpo")
    import unittest.mock

    with unittest.mock.patch.object(grpo, "_rollout", counting):
        groups = grpo.rollout(ctx, rows[:3])
    assert calls == [1, 1, 1]  # one generate call per prompt
    assert [g.row["id"] for g in groups] == [r["id"] for r in rows[:3]]
    assert all(len(g.tokens) == ctx.params.rollout.group_size for g in groups)
    ctx_all = grpo.setup_grpo(model, processor, _rl(lr=NO_LR), "grpo")
    with unittest.mock.patch.object(grpo, "_rollout", counting):
        grpo.rollout(ctx_all, rows[:3])
    assert calls[3:] == [3]  # default: all prompts in one call


# --------------------------------------------------------------------------------------
# The faithful reward is computed in one mode, on the rows that can tell trajectories apart
# --------------------------------------------------------------------------------------


def test_faithful_reward_free_of_dropout_noise(backbone_params, rows, monkeypatch):
    """s_t compared train-mode logits on I (LoRA dropout active) with eval-mode logits on I':
    the reward carried dropout noise. Now both sides are eval mode: with dropout 0.5 the rewards
    do not depend on the dropout draws and equal those of the same weights without dropout."""
    a0 = rows[0]["answer"]
    wrong = next(c for c in ("red", "green", "blue", "yellow") if c != a0)
    texts = [[f"<think>look at the circle</think><answer>{a0}</answer>",
              f"<think>look at the {a0} circle</think><answer>{a0}</answer>",
              f"<think>the corner is {a0}</think><answer>{a0}</answer>",
              f"<think>look at the circle</think><answer>{wrong}</answer>"]]
    _, processor = _fresh(backbone_params)
    groups = _hand_groups(rows[:1], processor, texts)
    monkeypatch.setattr(grpo, "rollout", lambda ctx, rows_: groups)
    p = _rl(lr=NO_LR, n_show=4, prompts_per_step=1, faithful_form="raw")

    def rewards_of(m, seed):
        ctx = grpo.setup_grpo(m, processor, p, "faithful")
        torch.manual_seed(seed)
        _, samples = grpo.grpo_step(ctx, rows[:1], 0)
        return [s["faithful"] for s in samples]

    lp = config.load_params(config.BackboneParams, lora=True, lora_dropout=0.5)
    model = modeling.wrap_lora(_fresh(backbone_params)[0], lp, processor)
    torch.manual_seed(0)
    with torch.no_grad():  # adapters that do something, so that their dropout matters
        for name, w in model.named_parameters():
            if "lora_B" in name:
                w.normal_(0.0, 0.5)
    assert faithful.has_active_dropout(model)
    first, second = rewards_of(model, 1), rewards_of(model, 2)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    assert not faithful.has_active_dropout(model)
    clean = rewards_of(model, 3)
    assert sum(v != 0 for v in clean) == 3
    assert first == pytest.approx(clean, abs=1e-6) and second == pytest.approx(clean, abs=1e-6)


def test_focus_row_is_a_choice(tiny, rows):
    """The first candidate row is the <Focus> position (the same for every trajectory of a
    group). Off by default; with ``focus_row`` it is one more candidate row."""
    model, processor = tiny
    row = rows[0]
    comps = [f"<think>look at the circle</think><answer>{row['answer']}</answer>"]
    top = {"concentration": "top_kappa", "kappa": 100, "reward_layers": [-1]}
    kw = {"reward": config.RewardParams(**top)}
    off = faithful.explain_trajectories(model, processor, row, comps, **kw)[0]
    on = faithful.explain_trajectories(
        model, processor, row, comps, config.RewardParams(**top, faithful_focus_row=True))[0]
    share = on["share"]
    n = len(share)
    assert off["concentration"] == pytest.approx(sum(share[1:]) / (n - 1), abs=1e-6)
    assert on["concentration"] == pytest.approx(sum(share) / n, abs=1e-6)
    # Across a group the Focus row's s_t and share do not depend on the completion.
    other = faithful.explain_trajectories(model, processor, row, [comps[0].replace("circle", "corner")],
                                          **kw)[0]
    assert other["s_t"][0] == pytest.approx(off["s_t"][0], abs=1e-6)
    assert other["share"][0] == pytest.approx(off["share"][0], abs=1e-6)


def test_worked_example_scores_as_the_training_reward(backbone_params, sft_state, rows, monkeypatch):
    """``explain_trajectories`` (notebook 04's worked example) gives the concentration that the
    training reward computes for the same completions in a GRPO step: same ``I'``, pad, seed,
    temperature, layers and concentration (``raw``: the reward is ``c``). ``weighted`` is
    continuous in ``s_t``; on an untrained model a ``top_kappa`` selection among near-zero
    ``s_t`` is decided by rounding noise between two forwards, which is §6.6's point. A briefly
    trained model: on an untrained one every ``s_t`` is ~1e-6 and the concentration a ratio of
    rounding errors."""
    model, processor = _fresh(backbone_params, sft_state)
    row = rows[0]
    a = row["answer"]
    texts = [f"<think>the circle is {a}</think><answer>{a}</answer>",
             f"<think>the corner patch is {a}</think><answer>{a}</answer>",
             f"<think>look at the circle</think><answer>{a}</answer>",
             f"<think>the {a} circle</think><answer>{a}</answer>"]
    monkeypatch.setattr(grpo, "rollout", lambda ctx, rows_: _hand_groups([row], processor, [texts]))
    p = _rl(lr=NO_LR, n_show=4, prompts_per_step=1, faithful_form="raw", temperature=0.7,
            concentration="weighted", reward_layers=[-1])
    ctx = grpo.setup_grpo(model, processor, p, "faithful")
    _, samples = grpo.grpo_step(ctx, [row], 0)
    explained = faithful.explain_trajectories(model, processor, row, texts, p.reward,
                                              temperature=0.7)
    trained = [s["faithful"] for s in samples]
    assert len(set(round(t, 6) for t in trained)) > 1  # the completions do differ
    assert [e["concentration"] for e in explained] == pytest.approx(trained, abs=1e-6)


def test_separate_advantage_keeps_a_small_faithful_spread_small():
    """In an all-correct group, ``summed`` lets the group std blow a 0.01 faithful spread up to
    a full-sized advantage; ``separate`` keeps it at its size."""
    faith = [0.005, -0.005, 0.005, -0.005]
    summed = grpo.group_advantages(torch.tensor([1.5 + f for f in faith]), 4)
    separate = grpo.combine_advantages([1.5] * 4, faith, [True] * 4, 4)
    assert float(summed.abs().max()) > 0.8
    assert float(separate.abs().max()) == pytest.approx(0.005, abs=1e-6)
    # Incorrect trajectories get no faithful part; the accuracy advantage is GRPO's own.
    mixed = grpo.combine_advantages([1.5, 0.0, 1.5, 0.0], [0.2, 0.0, -0.2, 0.0],
                                    [True, False, True, False], 4)
    base = grpo.group_advantages(torch.tensor([1.5, 0.0, 1.5, 0.0]), 4)
    assert (mixed - base).tolist() == pytest.approx([0.2, 0.0, -0.2, 0.0], abs=1e-6)


def test_faithful_step_logs_the_reading_diagnostic(backbone_params, rows, monkeypatch):
    model, processor = _fresh(backbone_params)
    a = rows[0]["answer"]
    texts = [[f"<think>the circle is {a}</think><answer>{a}</answer>",
              f"<think>the corner patch is {a}</think><answer>{a}</answer>",
              f"<think>look at the circle</think><answer>{a}</answer>",
              f"<think>the {a} circle</think><answer>{a}</answer>"]]
    monkeypatch.setattr(grpo, "rollout", lambda ctx, rows_: _hand_groups(rows[:1], processor, texts))
    ctx = grpo.setup_grpo(model, processor, _rl(lr=NO_LR, prompts_per_step=1,
                                                faithful_std_floor=0.0), "faithful")
    stats, _ = grpo.grpo_step(ctx, rows[:1], 0)
    assert stats["reading"] is not None and math.isfinite(stats["reading"])
    assert 0.0 <= stats["reading_cue_share"] <= 1.0
    assert stats["reward_reading_groups"] in (0, 1)
