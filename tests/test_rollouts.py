"""The rollout interface (``fmr1lib.rollouts``) without vLLM: the importance-sampling maths, the
weight names an engine reads, the new keys' place in the params hashes, and a GRPO step whose
sampler returns its own log-probs (the plumbing the vLLM backend uses).

The vLLM engine itself is tested in ``tests/test_vllm.py`` (``make test-vllm``)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from fmr1lib import batching, config, data, grpo, modeling, repro, rollouts, stages, train


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """One torch thread (``conftest.one_torch_thread``)."""


# --------------------------------------------------------------------------------------
# Importance-sampling maths
# --------------------------------------------------------------------------------------


def _logps():
    old = torch.log(torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.2, 0.9]]))
    samp = torch.log(torch.tensor([[0.1, 0.4, 0.9], [0.2, 0.05, 0.1]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return old, samp, mask


def test_token_level_ratios_truncate_and_mask():
    old, samp, mask = _logps()
    w, st = rollouts.importance_weights(old, samp, mask, "token_truncate", 3.0)
    ratio = torch.exp(old - samp)
    assert w.shape == (2, 3)
    assert w[0, :2].tolist() == pytest.approx([3.0, 1.0])  # 5 capped at 3
    assert w[1].tolist() == pytest.approx([1.0, 3.0, 3.0])  # 4 and 9 capped
    wm, _ = rollouts.importance_weights(old, samp, mask, "token_mask", 3.0)
    assert wm[0, :2].tolist() == pytest.approx([0.0, 1.0])
    assert wm[1].tolist() == pytest.approx([1.0, 0.0, 0.0])
    valid = mask.bool()
    assert st["is_ratio_max"] == pytest.approx(float(ratio[valid].max()))
    assert st["is_ratio_min"] == pytest.approx(1.0)
    assert st["is_capped_frac"] == pytest.approx(3 / 5)
    assert st["sampler_logp_gap"] == pytest.approx(float((old - samp).abs()[valid].mean()))
    assert st["sampler_logp_gap_max"] == pytest.approx(math.log(9))


def test_sequence_level_ratio_is_the_product_over_valid_tokens():
    old, samp, mask = _logps()
    w, st = rollouts.importance_weights(old, samp, mask, "sequence_truncate", 100.0)
    assert w.shape == (2, 1)
    assert float(w[0, 0]) == pytest.approx(5.0)  # 5 * 1; the masked third token is left out
    assert float(w[1, 0]) == pytest.approx(36.0)  # 1 * 4 * 9
    w3, st3 = rollouts.importance_weights(old, samp, mask, "sequence_truncate", 3.0)
    assert w3[:, 0].tolist() == pytest.approx([3.0, 3.0]) and st3["is_capped_frac"] == 1.0
    wm, _ = rollouts.importance_weights(old, samp, mask, "sequence_mask", 10.0)
    assert wm[:, 0].tolist() == pytest.approx([5.0, 0.0])


def test_no_correction_gives_no_weights_and_equal_policies_give_ratio_one():
    old, samp, mask = _logps()
    w, st = rollouts.importance_weights(old, samp, mask, "none")
    assert w is None and st["is_ratio_max"] > 1
    w, st = rollouts.importance_weights(old, old.clone(), mask, "token_mask")
    assert torch.equal(w * mask, mask.float())
    assert st["sampler_logp_gap"] == 0.0 and st["is_ratio_mean"] == 1.0
    with pytest.raises(ValueError, match="importance-sampling"):
        rollouts.importance_weights(old, samp, mask, "token")


def test_weights_scale_the_policy_term_only():
    logp = torch.zeros(2, 3, requires_grad=True)
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 3)
    settings = config.PolicyLossParams(beta=0.5)
    ref = torch.full((2, 3), -0.1)
    plain, st0 = grpo.clipped_policy_loss(logp, logp.detach(), adv, mask, settings, ref)
    ones, st1 = grpo.clipped_policy_loss(logp, logp.detach(), adv, mask, settings, ref,
                                         torch.ones(2, 3))
    assert torch.equal(plain, ones) and st0 == st1
    w = torch.tensor([[2.0], [0.0]])
    loss, st = grpo.clipped_policy_loss(logp, logp.detach(), adv, mask, settings, ref, w)
    # policy term: -(2 * 1 * A_0 + 0 * A_1) averaged over 6 tokens; the KL term unweighted
    assert st["pg_loss"] == pytest.approx(-2.0 * 3 / 6)
    assert float(loss) == pytest.approx(st["pg_loss"] + 0.5 * st["kl"], abs=1e-6)


def test_sampler_logprobs_follow_the_kept_tokens():
    ids = torch.tensor([[5, 6, 2, 0], [5, 9, 7, 7]])
    lp = torch.tensor([[-0.1, -0.2, -0.3, 0.0], [-1.0, -2.0, -3.0, -4.0]])
    tokens, ok = batching.completion_tokens(ids, eos_id=2, forbidden_ids=[9])
    cut = rollouts.cut_logprobs(lp, tokens)
    assert cut == [pytest.approx([-0.1, -0.2, -0.3]), pytest.approx([-1.0])]
    assert rollouts.pad_logprobs(cut, 4).shape == (2, 4)


# --------------------------------------------------------------------------------------
# Weight names for an engine
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone_params():
    return config.load_params(config.BackboneParams)


def test_engine_weights_of_a_lora_model_equal_its_merged_copy(backbone_params):
    model, processor = modeling.build_tiny_backbone(backbone_params)
    plain = dict(rollouts.engine_weights(model))
    assert set(plain) == {n for n, _ in model.named_parameters()}
    params = dataclasses.replace(backbone_params, lora=True, freeze_vision=False)
    peft_model = modeling.wrap_lora(model, params, processor)
    torch.manual_seed(1)
    with torch.no_grad():  # trained-looking adapters: LoRA B and the token rows non-zero
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(0.05 * torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    got = dict(rollouts.engine_weights(peft_model))
    after = {n: p.detach() for n, p in peft_model.named_parameters()}
    assert all(torch.equal(before[n], after[n]) for n in before)  # the policy is untouched
    merged = copy.deepcopy(peft_model).merge_and_unload()
    want = dict(merged.named_parameters())
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor.detach(), rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(got[n], plain[n]) for n in got)  # the adapters changed weights


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


def test_added_keys_are_recorded_at_their_defaults():
    values = repro.params_dict(config.RLParams()) | repro.params_dict(config.DataParams())
    assert {k: values[k] for k in config.ADDED_AT} == config.ADDED_AT


@pytest.mark.parametrize("key, value", [("rollout_backend", "vllm"), ("is_cap", 2.0)])
def test_new_keys_enter_the_hashes_only_away_from_their_default(key, value):
    p = config.load_params(config.RLParams, config.notebook_params_file("tiny", "04_counterfactual_rl"))
    default = {"rollout_backend": "hf", "is_cap": 3.0}[key]
    same = config.replace_values(p, **{key: default})
    other = config.replace_values(p, **{key: value})
    assert stages.params_hash(same) == stages.params_hash(p)
    assert stages.content_hash(same) == stages.content_hash(p)
    assert key not in train.trajectory_params(p)
    assert stages.params_hash(other) != stages.params_hash(p)
    assert stages.content_hash(other) != stages.content_hash(p)
    assert train.trajectory_params(other)[key] == value


def test_correction_needs_a_sampler_that_is_not_the_policy():
    with pytest.raises(config.ParamsError, match="is_correction"):
        config.load_params(config.RLParams, {"is_correction": "token_truncate"})
    p = config.load_params(config.RLParams, {"is_correction": "sequence_mask",
                                             "rollout_backend": "vllm"})
    assert p.loss.is_correction == "sequence_mask" and p.rollout.rollout_backend == "vllm"
    with pytest.raises(config.ParamsError, match="is_cap"):
        config.load_params(config.RLParams, {"is_cap": 0.5})


# --------------------------------------------------------------------------------------
# A step whose sampler returns log-probs
# --------------------------------------------------------------------------------------


class ShiftedSampler(rollouts.HFSampler):
    """The ``hf`` sampler, returning as its log-probs the policy's own (teacher-forced) ones
    minus ``log 2`` on even completions and ``log 4`` on odd ones: a stand-in for an engine that
    gives every token of a completion a half (a quarter) of the policy's probability."""

    def __init__(self, processor, device):
        super().__init__(processor, device)
        self.updates = 0

    def sample(self, model, rows, rollout, max_new_tokens, share_prefill=True):
        out = super().sample(model, rows, rollout, max_new_tokens, share_prefill)
        g = rollout.group_size
        seqs = batching.build_sequences(rows, [out.completion_ids[i * g:(i + 1) * g].tolist()
                                               for i in range(len(rows))], self.processor)
        with torch.no_grad(), batching.eval_mode(model):
            logits = batching.completion_logits(model, seqs.inputs, seqs.completion_ids.shape[1],
                                                rollout.temperature)
        lp = batching.token_logprobs(logits, seqs.completion_ids)
        shift = torch.log(torch.tensor([2.0, 4.0])).repeat(len(lp) // 2)[:, None]
        return dataclasses.replace(out, logprobs=lp - shift)

    def weights_updated(self):
        self.updates += 1


def _low_ids(vocab_size):
    def reward(completions, completion_ids, rows):
        return [sum(t < vocab_size // 2 for t in ids) / max(1, len(ids)) for ids in completion_ids]

    return reward


@pytest.mark.train
def test_a_step_with_sampler_logprobs_logs_the_gap_and_corrects(backbone_params, monkeypatch):
    dp = config.load_params(config.DataParams)
    rows = [data.make_example(dp, "train", i) for i in range(2)]
    seen = []
    real = grpo._advantages

    def advantages(ctx, chunk, scores):
        adv = real(ctx, chunk, scores)
        seen.append((adv, chunk.batch.completion_mask.sum(dim=1).float()))
        return adv

    monkeypatch.setattr(grpo, "_advantages", advantages)
    stats = {}
    for mode in ("none", "token_truncate"):
        model, processor = modeling.build_tiny_backbone(backbone_params)
        p = config.load_params(config.RLParams, {
            "steps": 1, "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 8,
            "lr": 1e-12, "rollout_backend": "vllm", "is_correction": mode, "is_cap": 3.0})
        hf = dataclasses.replace(p, rollout=dataclasses.replace(p.rollout, rollout_backend="hf"),
                                 loss=dataclasses.replace(p.loss, is_correction="none"))
        ctx = grpo.setup_grpo(model, processor, hf, "grpo",
                              extra_reward=_low_ids(len(processor.tokenizer)))
        ctx.params = p
        ctx.sampler = ShiftedSampler(processor, ctx.accelerator.device)
        repro.seed_everything(0)
        stats[mode], _ = grpo.grpo_step(ctx, rows, 0)
        assert ctx.sampler.updates == 1
    for st in stats.values():
        # ratios 2 and 4 (the training forward in train mode equals the eval forward: the tiny
        # model has no dropout); 4 is above the cap
        assert st["is_ratio_min"] == pytest.approx(2.0, abs=1e-3)
        assert st["is_ratio_max"] == pytest.approx(4.0, abs=1e-3)
        assert math.log(2) - 1e-4 < st["sampler_logp_gap"] < math.log(4) + 1e-4
        assert 0 < st["is_capped_frac"] < 1
    assert stats["none"]["extra_mean"] == stats["token_truncate"]["extra_mean"]
    # With one update every ratio pi/pi_old is 1, so the policy term is -sum_i w_i n_i A_i / sum n_i
    # with w_i = 2 (even completions) or 3 (odd: 4, truncated at the cap).
    (adv, n), _ = seen
    w = torch.tensor([2.0, 3.0]).repeat(len(adv) // 2)
    for mode, weight in (("none", torch.ones_like(w)), ("token_truncate", w)):
        want = -float((weight * n * adv).sum() / n.sum())
        assert stats[mode]["loss"] == pytest.approx(want, abs=1e-6)
    assert stats["token_truncate"]["loss"] != pytest.approx(stats["none"]["loss"], abs=1e-4)


def test_the_hf_sampler_logs_no_sampler_statistics():
    from fmr1lib import grpo_stats

    log = grpo_stats.StepLog()
    assert all(log.lists[k] == [] for k in grpo_stats.IS_KEYS)
    assert rollouts.Samples([[1]], torch.zeros(1, 1, dtype=torch.long), [""]).logprobs is None


def test_the_backend_is_set_from_the_command_line():
    from fmr1lib import cli

    sets = cli.parse_sets(["rollout_backend=vllm", "temperature=0.7", "is_cap=2"], config.RLParams)
    assert sets == {"rollout_backend": "vllm", "temperature": 0.7, "is_cap": 2}
    p = cli.load_stage_params(config.RLParams, "params/tiny/04_counterfactual_rl.yaml",
                              ["rollout_backend=vllm", "is_correction=sequence_mask"])
    assert p.rollout.rollout_backend == "vllm" and p.loss.is_correction == "sequence_mask"
    with pytest.raises(config.ParamsError, match="unknown key 'rollout'"):
        cli.parse_sets(["rollout=1"], config.RLParams)


@pytest.mark.parametrize("module", ["rollouts", "grpo_stats", "params_common"])
def test_doctests(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"fmr1lib.{module}"))
    assert result.failed == 0 and result.attempted > 0
