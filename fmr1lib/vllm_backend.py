"""``rollout_backend: vllm``: stage 2's rollouts sampled by a vLLM engine (optional install).

vLLM is imported only here and only when the backend is used (``scripts/setup_vllm_env.sh``
makes an environment that has it; README "Rollouts by an inference engine"). The engine:

* is built from the policy as the first rollout finds it (the stage's start model, or the
  checkpoint a resumed run loaded): its merged weights (``rollouts.engine_weights``), config
  and processor are written to a temporary folder the engine loads, removed on ``close``;
* reads each prompt as its chat text (``prompting.prompt_text``) and its image, never as token
  ids: vLLM expands an image placeholder in ids it is given once more (87 tokens for the
  processor's 56 on the tiny model, without an error);
* samples with every decoding setting explicit (``sampling_params``): ``softmax(logits / T)``,
  ``top_p``, ``top_k`` (0: off), no penalties, nothing from the checkpoint's generation config
  (``generation_config="vllm"``), vision tokens suppressed by a logit bias of -100, ``G``
  completions per prompt drawn from this process's torch RNG (the engine runs in this process
  and its requests carry no seed of their own, so a resumed run, whose RNG is restored, samples
  as the uninterrupted one; the engine's own seeding at start-up is undone by building it under
  ``torch.random.fork_rng``), and returns the log-probability of each sampled token
  under the distribution it sampled from (``logprobs_mode="processed_logprobs"``: temperature,
  logit bias, ``top_p`` / ``top_k`` applied);
* gets the policy's weights once per optimiser step, before the next rollout (``sync``):
  ``reload_weights`` through ``collective_rpc`` with checkpoint-named tensors, then, on CPU
  with a tied output head, the head's kernel re-packed from the new embedding (vLLM's CPU
  linear layers keep a pre-packed copy; without this the logits come from the old weights),
  then the prefix and encoder caches cleared (a stale encoder cache fails with "Encoder cache
  miss", a stale prefix cache serves the old weights' keys and values).

On a machine without a GPU, ``VLLM_CPU_KVCACHE_SPACE`` (1 GiB) and ``VLLM_CPU_OMP_THREADS_BIND``
(``nobind``) are set unless already set; everywhere the engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which ``collective_rpc`` with a tensor iterator and
``apply_model`` need.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fmr1lib import modeling, prompting, rollouts

logger = logging.getLogger(__name__)

ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
"""Set (unless already set) before vLLM is imported: the engine runs in this process."""
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
"""Also set on a machine without a GPU: a 1 GiB KV cache, no pinning of OpenMP threads to cores."""
PROMPT_ALLOWANCE = 4096
"""Prompt tokens the engine's sequences allow beside ``max_new_tokens`` (an image of 3.2 MP is 4096
image tokens; the GPU profiles' 448 px images are 256). vLLM reserves KV cache for at least one
sequence of its ``max_model_len``, which would otherwise be the model's 128 k positions (7.3 GB for
Qwen2.5-VL-7B in bf16)."""
VISION_BIAS = -100.0
"""Logit bias of the vision tokens: vLLM's largest negative bias, a probability of about e^-100."""


def available() -> bool:
    """Whether vLLM can be imported here (the optional install)."""
    return importlib.util.find_spec("vllm") is not None


def on_cpu() -> bool:
    """Whether the engine runs on the CPU (no CUDA device)."""
    return not torch.cuda.is_available()


def _import_vllm() -> Any:
    for key, value in {**ENGINE_ENV, **(CPU_ENV if on_cpu() else {})}.items():
        os.environ.setdefault(key, value)
    if not available():
        raise ImportError("rollout_backend 'vllm' needs vLLM: run scripts/setup_vllm_env.sh and "
                          "use .venv-vllm (README: Rollouts by an inference engine)")
    import vllm

    return vllm


@dataclass(frozen=True)
class EngineSettings:
    """How the engine is built (the sampling settings come with each rollout)."""

    seed: int = 0
    """The engine's seed (its start-up seeding; sampling draws from torch's RNG)."""
    gpu_memory_utilization: float = 0.3
    """The GPU memory share the engine may take (``RolloutParams.vllm_gpu_memory_utilization``)."""
    max_model_len: int | None = None
    """Longest prompt + completion, at most the model's own limit (None: that limit)."""

    @classmethod
    def of(cls, params: Any) -> EngineSettings:
        """The settings of a stage's ``RLParams``."""
        return cls(seed=params.seed,
                   gpu_memory_utilization=params.rollout.vllm_gpu_memory_utilization,
                   max_model_len=params.max_new_tokens + PROMPT_ALLOWANCE)


def sampling_params(rollout: Any, max_new_tokens: int, processor: Any) -> Any:
    """vLLM ``SamplingParams`` for ``G`` completions of one prompt, every setting that decides
    which token is emitted given explicitly (``modeling.decoding_kwargs`` is the ``hf`` twin).

    Args:
        rollout: ``RolloutParams`` (group size, temperature, top_p, top_k).
        max_new_tokens: the most tokens per completion.
        processor: the policy's processor (stop and vision token ids).

    No per-request ``seed``: the draws come from torch's RNG. (A seeded request also fails on
    vLLM's CPU build once a prefill is split over steps: "CPU Generator does not use offset".)
    """
    vllm = _import_vllm()
    tok = processor.tokenizer
    return vllm.SamplingParams(
        n=rollout.group_size, temperature=float(rollout.temperature), top_p=float(rollout.top_p),
        top_k=int(rollout.top_k), min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0,
        repetition_penalty=1.0, max_tokens=int(max_new_tokens), min_tokens=0, seed=None,
        stop_token_ids=[tok.convert_tokens_to_ids("<|im_end|>")], ignore_eos=False,
        logprobs=0, logit_bias={int(i): VISION_BIAS for i in modeling.vision_token_ids(processor)},
        skip_special_tokens=False, detokenize=False)


def engine_request(processor: Any, row: dict[str, Any]) -> dict[str, Any]:
    """One prompt as the engine reads it: the chat text and the image (never expanded ids)."""
    return {"prompt": prompting.prompt_text(processor, row["question"]),
            "multi_modal_data": {"image": row["image"].convert("RGB")}}


def write_engine_folder(model: Any, processor: Any, folder: str | Path) -> Path:
    """The policy as a checkpoint folder the engine loads: merged weights (safetensors, named by
    ``rollouts.engine_weights``), the base model's config, the tokenizer and image processor."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weights = {n: t.detach().to("cpu").contiguous() for n, t in rollouts.engine_weights(model)}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = base.config.to_dict()
    cfg["architectures"] = [type(base).__name__]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    return folder


def _repack_lm_head(model: Any) -> int:
    """Re-run the output head's post-load processing (CPU: re-pack its kernel from the weight it
    shares with the embedding). Runs inside the engine (``LLM.apply_model``)."""
    done = 0
    for name, module in model.named_modules():
        if name.endswith("lm_head") and hasattr(module, "quant_method"):
            module.quant_method.process_weights_after_loading(module)
            done += 1
    return done


class VLLMSampler:
    """``rollout_backend: vllm``: the sampler interface (``rollouts.HFSampler``) on a vLLM engine."""

    def __init__(self, processor: Any, settings: EngineSettings | None = None):
        self.processor = processor
        self.settings = settings or EngineSettings()
        self.llm: Any = None
        self.folder: Path | None = None
        self.stale = False
        self.tied = False
        self.syncs = 0
        self.sync_s = 0.0

    def build(self, model: Any) -> None:
        """Start the engine on ``model``'s current weights."""
        vllm = _import_vllm()
        t0 = time.perf_counter()
        self.folder = Path(tempfile.mkdtemp(prefix="fmr1-vllm-"))
        write_engine_folder(model, self.processor, self.folder)
        dtype = next(model.parameters()).dtype
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        text_cfg = base.config.get_text_config()
        self.tied = bool(getattr(text_cfg, "tie_word_embeddings", False))
        s = self.settings
        limit = getattr(text_cfg, "max_position_embeddings", None)
        max_len = min(v for v in (s.max_model_len, limit) if v) if s.max_model_len or limit else None
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # vLLM seeds torch's RNG at start-up
            self.llm = vllm.LLM(
                model=str(self.folder), dtype=str(dtype).removeprefix("torch."), seed=s.seed,
                max_model_len=max_len, enforce_eager=on_cpu(),
                gpu_memory_utilization=s.gpu_memory_utilization,
                limit_mm_per_prompt={"image": 1, "video": 0}, generation_config="vllm",
                logprobs_mode="processed_logprobs", trust_remote_code=False)
        self.stale = False
        logger.info("vLLM engine built in %.1f s from %s", time.perf_counter() - t0, self.folder)

    def sync(self, model: Any) -> None:
        """Load ``model``'s current weights into the engine and clear what the old ones left."""
        t0 = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": rollouts.engine_weights(model), "is_checkpoint_format": True})
        if self.tied and on_cpu():
            self.llm.apply_model(_repack_lm_head)
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.stale = False
        self.syncs += 1
        self.sync_s += time.perf_counter() - t0

    def sample(self, model: Any, rows: Sequence[dict[str, Any]], rollout: Any,
               max_new_tokens: int, share_prefill: bool = True) -> rollouts.Samples:
        """``rollout.group_size`` completions of each of ``rows`` (``rollouts.HFSampler.sample``;
        ``share_prefill`` is the engine's own business: its prefix cache)."""
        if self.llm is None:
            self.build(model)
        elif self.stale:
            self.sync(model)
        requests = [engine_request(self.processor, r) for r in rows]
        params = sampling_params(rollout, max_new_tokens, self.processor)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return to_samples(outputs, self.processor, rollout.group_size)

    def weights_updated(self) -> None:
        """The policy took an optimiser step: sync before the next rollout."""
        self.stale = True

    def close(self) -> None:
        """Shut the engine down (another can then start in this process) and remove its folder."""
        if self.llm is not None:
            import gc

            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            self.llm = None
            gc.collect()
            cleanup_dist_env_and_memory()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def to_samples(outputs: Sequence[Any], processor: Any, group_size: int) -> rollouts.Samples:
    """vLLM's ``RequestOutput`` list as ``rollouts.Samples`` (ids right-padded with the pad id)."""
    pad = processor.tokenizer.pad_token_id
    seqs, logps, prompt_ids = [], [], []
    for out in outputs:
        if len(out.outputs) != group_size:
            raise RuntimeError(f"vLLM returned {len(out.outputs)} completions, not {group_size}")
        prompt_ids.append(list(out.prompt_token_ids))
        for c in sorted(out.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            seqs.append(ids)
            logps.append([float(c.logprobs[k][t].logprob) for k, t in enumerate(ids)])
    width = max(1, max(len(s) for s in seqs))
    comp = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, ids in enumerate(seqs):
        comp[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return rollouts.Samples(prompt_ids=prompt_ids, completion_ids=comp,
                            texts=modeling.decode_completions(processor, comp),
                            logprobs=rollouts.pad_logprobs(logps, width))
