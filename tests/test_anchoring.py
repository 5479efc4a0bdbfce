"""Stage 1: the attention loss, batches, a tiny anchoring run that learns, resume, NaN stop, LoRA."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fmr1lib import (
    anchoring,
    attention,
    batching,
    checkpoints,
    config,
    data,
    evaluation,
    modeling,
    prompting,
    records,
    repro,
)
from fmr1lib import train as fmr1_train
from fmr1lib.config import DataParams


@pytest.fixture(scope="module")
def tiny():
    p = config.load_params(config.AnchorParams, {"steps": 6, "batch_size": 4, "log_every": 1,
                                                 "checkpoint_every": 3, "lr_warmup_steps": 0})
    model, processor = modeling.build_tiny_backbone(p, seed=0)
    return p, model, processor


@pytest.fixture(scope="module")
def rows():
    dp = DataParams()
    train = data.make_split(dp, "train", 64)
    test = data.make_split(dp, "test_id", 24)
    return train, test


# ---------------------------------------------------------------- the loss (pure)


def test_kl_loss_zero_iff_equal():
    q = torch.tensor([0.0, 0.25, 0.75, 0.0])
    assert float(anchoring.anchoring_loss(q.clone(), q, "kl")) == pytest.approx(0.0, abs=1e-7)
    p = torch.tensor([0.25, 0.25, 0.25, 0.25])
    assert float(anchoring.anchoring_loss(p, q, "kl")) > 0.1


def test_mass_loss_zero_iff_all_mass_inside():
    q = torch.tensor([0.0, 0.5, 0.5, 0.0])
    inside = torch.tensor([0.0, 0.9, 0.1, 0.0])
    assert float(anchoring.anchoring_loss(inside, q, "mass")) == pytest.approx(0.0, abs=1e-6)
    assert float(anchoring.anchoring_loss(torch.tensor([0.5, 0.25, 0.25, 0.0]), q, "mass")) > 0.5


@pytest.mark.parametrize("kind", ["kl", "mass"])
def test_gradient_moves_attention_toward_the_box(kind):
    q = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    logits = torch.zeros(6, requires_grad=True)
    mass_before = float(torch.softmax(logits, -1)[2])
    opt = torch.optim.SGD([logits], lr=1.0)
    for _ in range(5):
        opt.zero_grad()
        anchoring.anchoring_loss(torch.softmax(logits, -1), q, kind).backward()
        opt.step()
    assert float(torch.softmax(logits, -1)[2]) > mass_before + 0.3


def test_unknown_loss_kind():
    with pytest.raises(ValueError, match="unknown attention loss"):
        anchoring.anchoring_loss(torch.ones(2) / 2, torch.ones(2) / 2, "l2")


# ---------------------------------------------------------------- batches


def test_encode_batch_labels_and_focus(tiny, rows):
    _, _, processor = tiny
    train, _ = rows
    batch = batching.encode_batch([train[i] for i in range(4)], processor, "plain")
    tok = processor.tokenizer
    ids, labels = batch.inputs["input_ids"], batch.labels
    focus_id = tok.convert_tokens_to_ids(prompting.FOCUS)
    for b in range(4):
        assert int(ids[b, batch.focus_pos[b]]) == focus_id
        labelled = labels[b][labels[b] != -100].tolist()
        text = tok.decode(labelled, skip_special_tokens=False)
        assert text.startswith("<think>") and text.endswith("</answer><|im_end|>")
        assert prompting.parse_answer(text) == train[b]["answer"]
        # Everything up to and including <Focus> is prompt, never labelled.
        assert (labels[b, : batch.focus_pos[b] + 1] == -100).all()
        q = batch.targets[b]
        assert q is not None and q.sum() == pytest.approx(1.0)


def test_text_perception_describes_the_evidence(tiny, rows):
    _, _, processor = tiny
    train, _ = rows
    row = train[0]
    meta = records.decode_meta(row["meta"])
    batch = batching.encode_batch([row], processor, "text_perception")
    labelled = batch.labels[0][batch.labels[0] != -100].tolist()
    text = processor.tokenizer.decode(labelled, skip_special_tokens=False)
    target = meta["objects"][meta["evidence_objects"][0]]
    assert text.startswith(f" the {target['color']} {target['shape']},")
    assert prompting.parse_answer(text) == row["answer"]


def test_resolve_layers():
    assert attention.resolve_layers("all", 3) == [0, 1, 2]
    assert attention.resolve_layers("last_half", 36) == list(range(18, 36))
    with pytest.raises(ValueError):
        attention.resolve_layers([5], 2)


# ---------------------------------------------------------------- training


def _held_out_mass(model, processor, test):
    maps = evaluation.focus_attention(model, processor, [test[i] for i in range(len(test))])
    return evaluation.perception_metrics(maps)["focus_mass"]


def test_tiny_anchoring_run_raises_focus_mass(tiny, rows, tmp_path):
    p0, model0, processor = tiny
    train, test = rows
    model = copy.deepcopy(model0)
    before = _held_out_mass(model, processor, test)
    p = config.load_params(config.AnchorParams, {
        "steps": 40, "batch_size": 8, "lr": 3e-3, "lambda_attn": 3.0, "log_every": 10,
        "checkpoint_every": 0, "lr_warmup_steps": 0, "lr_schedule": "constant"})
    res = anchoring.train_supervised(model, processor, train, p, tmp_path, "focus_anchor")
    after = _held_out_mass(model, processor, test)
    assert after > before + 0.1, (before, after)
    assert all(r["attn_loss"] is not None for r in res.metrics)


def _params_vector(model):
    return torch.cat([q.detach().flatten() for q in model.parameters()])


def test_resume_matches_uninterrupted_run(tiny, rows, tmp_path):
    p, model0, processor = tiny
    train, _ = rows
    full = copy.deepcopy(model0)
    repro.seed_everything(0)
    res_full = anchoring.train_supervised(full, processor, train, p, tmp_path / "full",
                                          "focus_anchor")
    part = copy.deepcopy(model0)
    repro.seed_everything(0)
    anchoring.train_supervised(part, processor, train, p, tmp_path / "part", "focus_anchor",
                               hooks=fmr1_train.Hooks(stop_after=3))
    resumed = copy.deepcopy(model0)  # a fresh process would rebuild the start model
    p_resume = config.load_params(config.AnchorParams, {**p.__dict__, "resume": True})
    res_resumed = anchoring.train_supervised(resumed, processor, train, p_resume, tmp_path / "part",
                                             "focus_anchor")
    assert torch.allclose(_params_vector(full), _params_vector(resumed), atol=1e-6)
    drop = {"time_s"}
    strip = [{k: v for k, v in r.items() if k not in drop} for r in res_full.metrics]
    strip2 = [{k: v for k, v in r.items() if k not in drop} for r in res_resumed.metrics]
    assert len(strip) == len(strip2) == p.steps
    for a, b in zip(strip, strip2, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a, b)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny, rows, tmp_path):
    p, model0, processor = tiny
    train, _ = rows
    model = copy.deepcopy(model0)
    p2 = config.load_params(config.AnchorParams, {**p.__dict__, "checkpoint_every": 2})
    # fail_at_step is the 0-based index: the fifth step, logged as step 5, after checkpoint 4.
    with pytest.raises(fmr1_train.NonFiniteLossError, match="step 5;.*step_0000004"):
        anchoring.train_supervised(model, processor, train, p2, tmp_path, "plain",
                                   hooks=fmr1_train.Hooks(fail_at_step=4))
    last = checkpoints.latest_checkpoint(tmp_path / "checkpoints")
    assert last is not None and last.name == "step_0000004"
    state = repro.read_records(last / "state.json")
    assert state["step"] == 4


@pytest.mark.parametrize("lora", [False, True])
def test_full_and_lora_training_change_weights(tiny, rows, tmp_path, lora):
    p, model0, processor = tiny
    train, _ = rows
    model = copy.deepcopy(model0)
    p2 = config.load_params(config.AnchorParams, {**p.__dict__, "lora": lora, "steps": 3,
                                                  "checkpoint_every": 0, "lr": 1e-2})
    if lora:
        model = modeling.wrap_lora(model, p2, processor)
    before = {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}
    anchoring.train_supervised(model, processor, train, p2, tmp_path, "focus_anchor")
    changed = [n for n, q in model.named_parameters() if n in before and not torch.equal(q, before[n])]
    assert changed
    if lora:
        assert all("lora_" in n or "visual" in n or "trainable_tokens_delta" in n for n in changed)
        assert any("trainable_tokens_delta" in n for n in changed)  # the new tokens train
        from peft import PeftModel

        model.save_pretrained(tmp_path / "adapter")
        reloaded = PeftModel.from_pretrained(copy.deepcopy(model0), tmp_path / "adapter")
        batch = batching.encode_batch([train[0]], processor, with_response=False)
        model.eval()
        reloaded.eval()
        with torch.no_grad():
            diff = (model(**batch.inputs).logits - reloaded(**batch.inputs).logits).abs().max()
        assert float(diff) < 1e-5


# --------------------------------------------------------------------------------------
# kl and mass: the same on one-cell targets, different on wider ones
# --------------------------------------------------------------------------------------


def test_kl_and_mass_agree_on_one_cell_and_differ_when_smoothed():
    from fmr1lib import modeling

    p = torch.softmax(torch.tensor([0.3, 2.0, -1.0, 0.5, 0.1, 0.0, 1.0, -0.5, 0.2]), -1)
    one = modeling.boxes_to_grid([[28, 0, 56, 28]], (84, 84), (1, 6, 6)).flatten()
    assert int((one > 0).sum()) == 1
    kl, mass = anchoring.anchoring_loss(p, one, "kl"), anchoring.anchoring_loss(p, one, "mass")
    assert float(kl) == pytest.approx(float(mass)) == pytest.approx(-math.log(float(p[1])))
    wide = modeling.boxes_to_grid([[28, 0, 56, 28]], (84, 84), (1, 6, 6), smooth_sigma=1.0).flatten()
    support = one > 0
    assert bool((wide > 0).all())  # a smoothed target has no zero: q > 0 is every token
    kl_w = anchoring.anchoring_loss(p, wide, "kl")
    mass_w = anchoring.anchoring_loss(p, wide, "mass", support)
    assert float(mass_w) == pytest.approx(float(mass))  # mass reads the boxes, not q's tails
    assert abs(float(kl_w) - float(mass_w)) > 0.1
    # Without the support, the smoothed target made the mass loss 0 whatever p is (the old bug).
    assert float(anchoring.anchoring_loss(p, wide, "mass")) == pytest.approx(0.0, abs=1e-6)


def test_batch_supports_are_the_unsmoothed_boxes(tiny, rows):
    p, _, processor = tiny
    train, _ = rows
    three = [train[i] for i in range(3)]
    plain = batching.encode_batch(three, processor, "focus_anchor")
    smooth = batching.encode_batch(three, processor, "focus_anchor", smooth_sigma=1.0)
    for q, qs, sup in zip(plain.targets, smooth.targets, smooth.supports, strict=True):
        assert torch.equal(sup, q > 0)
        assert bool((qs > 0).all()) and not torch.equal(qs, q)
    dists = [torch.full((len(q),), 1.0 / len(q))[None] for q in smooth.targets]
    _, mass = anchoring.batch_attention_loss(dists, smooth.targets, "kl", smooth.supports)
    assert mass == pytest.approx(float(np.mean([float(s.sum()) / len(s) for s in smooth.supports])))


@pytest.mark.parametrize("variant", ["plain", "focus_anchor"])
def test_grad_accum_gives_the_gradient_of_the_global_means(tiny, rows, variant):
    """``grad_accum`` micro-batches give the gradient of the CE over every response token of
    the batch and of the attention loss over every sample with a target, whatever their number
    (the one accumulation of both stages: ``train.loss_shares`` + ``train.micro_batch``, one
    optimiser step). Averaging the micro-batches' own means, as before, weighted the tokens of a
    short micro-batch more than those of a long one."""
    _, model0, processor = tiny
    # Answers of 1-4 words: responses of different lengths, so the micro-batches' own means differ.
    train_rows = [{**rows[0][i], "answer": " ".join([rows[0][i]["answer"]] * (i + 1))}
                  for i in range(4)]
    got = {}
    for accum in (1, 2, 4):
        p = config.load_params(config.AnchorParams, {
            "steps": 1, "batch_size": 4, "grad_accum": accum, "log_every": 1,
            "checkpoint_every": 0, "lr_warmup_steps": 0, "lambda_attn": 2.0})
        model = copy.deepcopy(model0)
        acc = fmr1_train.make_accelerator(p, gradient_accumulation_steps=accum)
        assert acc.gradient_accumulation_steps == accum
        state = fmr1_train.setup_training(model, p, None, acc, micro_batch=4 // accum)
        grads, step = [], state.clip_and_step

        def clip_and_step(grad_clip, state=state, grads=grads, step=step):
            grads.append(torch.cat([q.grad.flatten() for q in state.trainable if q.grad is not None]))
            return step(grad_clip)

        state.clip_and_step = clip_and_step
        cfg = anchoring.anchoring_settings(p, variant)
        layers = attention.resolve_layers(cfg["anchor_layers"], attention.num_text_layers(model))
        stats, _ = anchoring.supervised_step(state, 0, processor=processor, dataset=train_rows,
                                             params=p, variant=variant, settings=cfg,
                                             layers=layers)
        assert len(grads) == 1, "one optimiser step per step"
        got[accum] = (grads[0], stats)
    lengths = batching.encode_batch(train_rows, processor, variant).labels.ne(-100).sum(-1)
    assert len(set(lengths.tolist())) == 4, lengths
    for accum in (2, 4):
        torch.testing.assert_close(got[accum][0], got[1][0], rtol=1e-4, atol=1e-7)
        for key in ("ce", "attn_loss", "focus_mass"):
            if got[1][1][key] is not None:
                assert got[accum][1][key] == pytest.approx(got[1][1][key], rel=1e-5), key
