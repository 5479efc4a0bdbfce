"""The vLLM rollout backend (``fmr1lib.vllm_backend``) on the tiny Qwen2.5-VL, for real, on CPU.

Optional: these tests need the vLLM environment (``scripts/setup_vllm_env.sh``; run them with
``make test-vllm``) and are skipped where vLLM is not installed, as in ``make test``. They check
what the backend promises: the engine reads each prompt as the processor tokenises it, its
log-probs are the policy's, a weight sync equals a fresh load, and stage 2 runs on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fmr1lib import batching, config, data, modeling, repro, rollouts, vllm_backend

if not vllm_backend.available():
    pytest.skip("vLLM is not installed (make test-vllm sets up .venv-vllm)", allow_module_level=True)

pytestmark = [pytest.mark.train, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backbone_params():
    return config.load_params(config.BackboneParams)


@pytest.fixture(scope="module")
def rows():
    dp = config.load_params(config.DataParams)
    return [data.make_example(dp, "train", i) for i in range(4)]


@pytest.fixture(scope="module")
def tiny(backbone_params):
    torch.set_num_threads(1)
    model, processor = modeling.build_tiny_backbone(backbone_params)
    return model.eval(), processor


@pytest.fixture(scope="module")
def engine(tiny):
    model, processor = tiny
    sampler = vllm_backend.VLLMSampler(processor, vllm_backend.EngineSettings(seed=0))
    sampler.build(model)
    yield sampler
    sampler.close()


def _rollout(**kw):
    return dataclasses.replace(config.RolloutParams(), **kw)


def _teacher_forced(model, processor, rows, samples, rollout, vision_bias=None):
    """The policy's log-probs of the sampled tokens (the training forward's, eval mode)."""
    g = rollout.group_size
    tokens, _ = batching.completion_tokens(samples.completion_ids, processor.tokenizer.eos_token_id)
    seqs = batching.build_sequences(rows, [tokens[i * g:(i + 1) * g] for i in range(len(rows))],
                                    processor)
    with torch.no_grad():
        logits = batching.completion_logits(model, seqs.inputs, seqs.completion_ids.shape[1],
                                            rollout.temperature)
    if vision_bias is not None:
        logits[..., modeling.vision_token_ids(processor)] += vision_bias / rollout.temperature
    lp = batching.token_logprobs(logits, seqs.completion_ids, seqs.completion_mask)
    return lp, seqs.completion_mask


def test_prompt_ids_and_image_tokens_are_the_processors(engine, tiny, rows):
    model, processor = tiny
    out = engine.sample(model, rows, _rollout(group_size=2), max_new_tokens=4)
    enc = batching.encode_batch(rows, processor, "plain", with_response=False).inputs
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for i, ids in enumerate(out.prompt_ids):
        want = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        assert ids == want
        _, h, w = enc["image_grid_thw"][i].tolist()
        assert ids.count(image_id) == (h // 2) * (w // 2)
    assert out.completion_ids.shape[0] == 2 * len(rows)
    assert not set(out.completion_ids.flatten().tolist()) & set(modeling.vision_token_ids(processor))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_are_the_teacher_forced_ones(engine, tiny, rows, temperature):
    """The engine returns log_softmax((logits + bias) / T) of the token it sampled: the policy's
    tempered log-probs with the vision tokens biased by -100, to < 1e-5 in fp32."""
    model, processor = tiny
    rollout = _rollout(group_size=4, temperature=temperature)
    torch.manual_seed(0)
    out = engine.sample(model, rows, rollout, max_new_tokens=16)
    want, mask = _teacher_forced(model, processor, rows, out, rollout, vllm_backend.VISION_BIAS)
    got = out.logprobs[:, :want.shape[1]] * mask
    assert float((got - want).abs().max()) < 1e-5
    # against the loss's log-probs (vision tokens not suppressed): the suppressed mass only
    loss_lp, _ = _teacher_forced(model, processor, rows, out, rollout)
    gap = float(((got - loss_lp).abs() * mask).sum() / mask.sum())
    assert 0 <= gap < 0.05


def _perturbed_lora(model, processor, backbone_params):
    import copy

    params = dataclasses.replace(backbone_params, lora=True)
    peft_model = modeling.wrap_lora(copy.deepcopy(model), params, processor)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(0.3 * torch.randn_like(p))
    return peft_model.eval()


def test_a_sync_equals_a_fresh_load(engine, tiny, rows, backbone_params):
    """Sampling after a sync from A to B (a LoRA-wrapped B: merged and renamed) gives the ids and
    log-probs of an engine built on B, with the same seeds."""
    model, processor = tiny
    b_model = _perturbed_lora(model, processor, backbone_params)
    rollout = _rollout(group_size=4, temperature=1.0)
    torch.manual_seed(0)
    engine.sample(model, rows, rollout, max_new_tokens=16)  # fills the caches with A's
    engine.weights_updated()
    torch.manual_seed(3)
    synced = engine.sample(b_model, rows, rollout, max_new_tokens=16)
    assert engine.syncs == 1
    want, mask = _teacher_forced(b_model, processor, rows, synced, rollout, vllm_backend.VISION_BIAS)
    assert float(((synced.logprobs[:, :want.shape[1]] - want) * mask).abs().max()) < 1e-5
    engine.close()
    fresh = vllm_backend.VLLMSampler(processor, vllm_backend.EngineSettings(seed=0))
    rng = torch.get_rng_state()
    fresh.build(b_model)
    assert torch.equal(torch.get_rng_state(), rng)  # the engine's start-up seeding is undone
    torch.manual_seed(3)
    again = fresh.sample(b_model, rows, rollout, max_new_tokens=16)
    fresh.close()
    assert torch.equal(again.completion_ids, synced.completion_ids)
    assert float((again.logprobs - synced.logprobs).abs().max()) < 1e-5
    engine.build(model)  # the module's engine, on A again, for the tests after this one


def test_engine_and_hf_rollout_times(engine, tiny, rows):
    """Times both samplers on the same prompts (recorded in params/accelerate/README.md; printed
    with -s). Checks only that both return what was asked."""
    model, processor = tiny
    hf = rollouts.HFSampler(processor, torch.device("cpu"))
    times = {}
    for name, sampler in (("hf", hf), ("vllm", engine)):
        for p, g, n in ((4, 8, 32), (16, 8, 64)):
            rollout = _rollout(group_size=g)
            batch = (rows * 4)[:p]
            sampler.sample(model, batch[:1], rollout, max_new_tokens=4)  # warm
            t0 = time.perf_counter()
            out = sampler.sample(model, batch, rollout, max_new_tokens=n)
            times[name, p, g, n] = time.perf_counter() - t0
            assert out.completion_ids.shape[0] == p * g
    for (name, p, g, n), t in sorted(times.items()):
        print(f"{name}: {p} prompts x {g} samples x {n} tokens: {t:.3f} s "
              f"(hf / vllm {times['hf', p, g, n] / times['vllm', p, g, n]:.2f})")


def _low_ids(vocab_size):
    def reward(completions, completion_ids, rows):
        return [sum(t < vocab_size // 2 for t in ids) / max(1, len(ids)) for ids in completion_ids]

    return reward


def test_a_resumed_run_samples_as_the_uninterrupted_one(engine, tiny, rows, backbone_params,
                                                       tmp_path):
    """Stopped after 2 of 4 steps and resumed (a new engine, built from the checkpoint's weights,
    torch's RNG restored): the same samples, metrics and weights as 4 steps in one go."""
    from fmr1lib import grpo, train

    engine.close()  # one engine at a time in this process
    model, processor = tiny
    p = config.load_params(config.RLParams, {
        "steps": 4, "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 12, "lr": 1e-2,
        "lr_warmup_steps": 0, "log_every": 1, "checkpoint_every": 2,
        "rollout_backend": "vllm", "is_correction": "token_truncate"})
    hooks = train.Hooks(extra_reward=_low_ids(len(processor.tokenizer)))
    finals = {}
    for name, stops in (("full", [None]), ("split", [2, None])):
        for stop in stops:
            m, _ = modeling.build_tiny_backbone(backbone_params)
            repro.seed_everything(0)
            run_p = config.replace_values(p, resume=stop is None and name == "split")
            res = grpo.train_grpo(m, processor, rows, run_p, tmp_path / name, "grpo",
                                  hooks=dataclasses.replace(hooks, stop_after=stop))
        finals[name] = (m, res)
    (full_m, full), (split_m, resumed) = finals["full"], finals["split"]
    assert resumed.steps == 4 and len(resumed.metrics) == 4

    def comparable(rows_):
        return [{k: v for k, v in r.items() if not k.endswith("_s") and "time" not in k}
                for r in rows_]

    assert comparable(full.metrics) == comparable(resumed.metrics)
    assert (repro.read_jsonl(tmp_path / "full" / "samples.jsonl")
            == repro.read_jsonl(tmp_path / "split" / "samples.jsonl"))
    for (n, a), (_, b) in zip(full_m.named_parameters(), split_m.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), n
    assert all(r["sampler_logp_gap"] is not None for r in full.metrics)
    engine.build(model)


def _chain(root: Path) -> Path:
    """A shrunk tiny profile (tests/test_provenance.py's): 16 examples, 2 steps of stages 0-1."""
    folder = root / "params" / "tiny"
    folder.mkdir(parents=True)
    data_f, bb_f, an_f, rl_f = (folder / f"{n}.yaml" for n in (
        "01_data_construction", "02_backbone", "03_anchoring", "04_counterfactual_rl"))
    head = f"profile: tiny\nrun_root: {root / 'runs'}\n"
    data_f.write_text(head + "n_train: 16\nn_warmup: 16\nn_test_id: 4\nn_test_ood: 4\n")
    bb_f.write_text(head + f"data_params_file: {data_f}\nsteps: 2\nbatch_size: 2\n"
                    "lr_warmup_steps: 0\n")
    an_f.write_text(head + f"data_params_file: {data_f}\nbackbone_params_file: {bb_f}\nsteps: 2\n"
                    "batch_size: 2\nlr_warmup_steps: 0\n")
    rl_f.write_text(head + f"data_params_file: {data_f}\nanchor_params_file: {an_f}\nsteps: 3\n"
                    "prompts_per_step: 2\ngroup_size: 4\ncheckpoint_every: 0\n")
    return rl_f


def test_stage_two_runs_on_the_engine(tmp_path):
    """``python -m fmr1lib rl --set rollout_backend=vllm``: the faithful variant's loss, rewards
    and faithful reward run, and each step logs the sampler's log-prob gap and ratios."""
    rl_file = _chain(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fmr1lib", "rl", "--params", str(rl_file), "--variants",
           "faithful", "--build-missing", "--set", "rollout_backend=vllm", "--set",
           "is_correction=token_truncate"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = list((tmp_path / "runs").rglob("rl/**/metrics.jsonl"))
    assert len(metrics) == 1, metrics
    rows_ = repro.read_jsonl(metrics[0])
    assert len(rows_) == 3
    for row in rows_:
        for key in ("loss", "reward_mean", "faithful_mean", "sampler_logp_gap", "is_ratio_mean",
                    "is_ratio_max", "is_capped_frac"):
            assert row.get(key) is not None, (key, row)
        assert 0 <= row["sampler_logp_gap"] < 0.05
        assert 0.9 < row["is_ratio_mean"] < 1.1
    print(json.dumps([{k: r[k] for k in ("step", "loss", "reward_mean", "sampler_logp_gap",
                                         "is_ratio_mean", "is_ratio_max")} for r in rows_]))
