"""The one training skeleton every stage runs in.

A stage is a step function and a loss; this module owns everything around them:

* ``setup_training``: gradient checkpointing, AdamW over the trainable parameters, the learning-
  rate schedule, resume from the latest checkpoint (weights, optimiser, schedule, RNG), and the
  accelerate wrapping;
* ``TrainState.backward`` and ``TrainState.clip_and_step``: the non-finite guard (a NaN/inf loss
  or gradient norm stops the run before the optimiser steps, naming the step and the last good
  checkpoint) in front of ``accelerator.backward`` and ``optimizer.step``;
* ``fit``: the loop: log truncation on resume, the step function, the metrics logs, the
  checkpoint cadence and the final save.

Every checkpoint records the run's trajectory parameters (``trajectory_params``: every
parameter except those in ``RESUMABLE_KEYS``) and the training time so far; a resume with a
changed trajectory parameter is refused (``ResumeMismatchError``) before anything is loaded,
and the ``TrainResult``'s wall time covers every segment of a resumed run.

Under sharding (FSDP, DeepSpeed) every process takes part in a save: the full model state is
gathered (``full_state_dict``), FSDP's optimiser state is gathered to full tensors and DeepSpeed
writes its own engine checkpoint; the main process then writes the files. One process and DDP
save the main process's own parameters and optimiser state, as every process holds all of them.

A step function has the signature ``step_fn(state, step) -> (stats, extra_logs)``: ``stats`` is
the row to append to ``metrics.jsonl`` (None: nothing to log this step) and ``extra_logs`` maps a
log name (e.g. ``samples``) to rows for ``<name>.jsonl``. The stage's own modules
(``anchoring.supervised_step``, ``grpo.grpo_step``) never loop, checkpoint or save.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fmr1lib import attention, checkpoints, params_common, progress, repro

logger = logging.getLogger(__name__)

StepFn = Callable[["TrainState", int], tuple[dict[str, Any] | None, dict[str, list[dict[str, Any]]]]]
"""``step_fn(state, step) -> (metrics row or None, {log name: rows})``."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient norm; the last good checkpoint is kept."""


class ResumeMismatchError(ValueError):
    """A resume would continue a checkpoint with parameters that change its trajectory."""


RESUMABLE_KEYS = frozenset({
    "resume",  # how the run starts, not what it computes
    "log_every", "n_show",  # what is logged (metrics rows, sample completions)
    "log_with",  # which experiment trackers also get the metrics rows
    "checkpoint_every",  # when checkpoints are written; saving draws no random numbers
    "run_root", "profile", "figures_dir",  # where outputs go (the run folder moved or renamed)
    "variants",  # which variants a stage function trains; each run folder is one variant
    "allow_outside_root",  # whether image paths may leave the image root, not what they hold
    "vllm_gpu_memory_utilization",  # the rollout engine's memory share, not what it samples
})
"""Parameters that may differ between a checkpoint and the run resuming it, together with
every ``eval_*`` key (evaluation settings; no training step reads them). Every other
parameter (``lr``, ``steps``, ``batch_size``, ``grad_accum``, ``seed``, the schedule, ``lora``,
``freeze_vision``, the precision, the data and start-model files, the method's settings, and
``max_new_tokens``, which bounds stage 2's rollouts) alters the run's trajectory."""


def trajectory_params(params: Any) -> dict[str, Any]:
    """The parameters a checkpoint must share with the run that resumes it, JSON-normalised
    (keys added later are left out at the value earlier runs had: ``params_common.ADDED_AT``)."""
    import json

    values = {k: v for k, v in params_common.without_added_defaults(
                  repro.params_dict(params)).items()
              if k not in RESUMABLE_KEYS and not k.startswith("eval_")}
    return json.loads(json.dumps(values, default=str))


def check_resume(checkpoint: Path, params: Any) -> dict[str, Any]:
    """Refuse to resume ``checkpoint`` with parameters that alter its trajectory.

    Returns:
        The checkpoint's ``state.json``.

    Raises:
        ResumeMismatchError: naming every changed key with its old and new value.
    """
    meta = checkpoints.read_checkpoint_meta(checkpoint)
    saved = (meta.get("extra") or {}).get("params")
    if saved is None:
        logger.warning("%s records no parameters (written before they were stored): resuming "
                       "it without checking that they are unchanged", checkpoint)
        return meta
    now = trajectory_params(params)
    absent = "<absent>"
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k, absent) != now.get(k, absent))
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k, absent)!r} -> {now.get(k, absent)!r}"
                          for k in changed)
        raise ResumeMismatchError(
            f"cannot resume {checkpoint}: these parameters changed since it was written and "
            f"would alter the run's trajectory: {diffs}. Restore them, or start the run anew "
            f"with resume: false (its checkpoints and logs are then replaced). Keys that may "
            f"change on resume: {', '.join(sorted(RESUMABLE_KEYS))}, eval_*.")
    return meta


@dataclass
class TrainResult:
    """What a training run leaves behind."""

    out_dir: Path
    metrics: list[dict[str, Any]]
    wall_time_s: float
    steps: int
    prepared: Any = field(default=None, repr=False)
    """The model as ``accelerate.prepare`` returned it (the DeepSpeed engine, the FSDP module):
    what ``full_state_dict`` gathers from."""


def make_accelerator(params: Any, **kwargs: Any) -> Any:
    """The ``accelerate.Accelerator`` of a training stage (mixed precision from ``params``).

    On a machine without an accelerator device, processes started by ``accelerate launch``
    (``WORLD_SIZE > 1``) form a CPU process group (gloo) only when the CPU is asked for
    explicitly; otherwise each would train alone on its own copy of the data.

    Args:
        params: stage parameters with ``mixed_precision``.
        **kwargs: further ``Accelerator`` arguments (e.g. ``gradient_accumulation_steps``).
    """
    from accelerate import Accelerator

    cpu_group = (int(os.environ.get("WORLD_SIZE", "1")) > 1
                 and not torch.accelerator.is_available())
    acc = Accelerator(mixed_precision=params.mixed_precision, cpu=True if cpu_group else None,
                      **kwargs)
    if cpu_group and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _use_fsdp_on_cpu(acc)
    return acc


def _use_fsdp_on_cpu(acc: Any) -> None:
    """Turn a CPU process group's accelerator into an FSDP one, as ``accelerate launch`` asked.

    accelerate enables FSDP only on accelerator devices; torch's FSDP2 also shards over a gloo
    group on the CPU (``params/accelerate/cpu_fsdp_2proc.yaml``, ``tests/test_fsdp.py``). The
    plugin reads the ``FSDP_*`` settings ``accelerate launch`` exported.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def uses_fsdp(acc: Any) -> bool:
    """Whether ``acc`` runs FSDP (parameters, gradients and optimiser state sharded)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def uses_deepspeed(acc: Any) -> bool:
    """Whether ``acc`` runs DeepSpeed (any ZeRO stage: the optimiser state is partitioned)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def shards_parameters(acc: Any) -> bool:
    """Whether no process holds all the weights: FSDP or DeepSpeed ZeRO-3."""
    if uses_fsdp(acc):
        return True
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return uses_deepspeed(acc) and plugin is not None and plugin.zero_stage == 3


def full_state_dict(acc: Any, prepared: Any) -> dict[str, torch.Tensor]:
    """The whole model's state dict, gathered from its shards; call it on every process.

    ``Accelerator.get_state_dict`` gathers FSDP to the CPU and ZeRO-3 through
    ``stage3_gather_16bit_weights_on_model_save`` (``zero3_save_16bit_model: true`` in the
    accelerate config); processes other than the main one may get an empty dict.

    Args:
        prepared: the model ``accelerate.prepare`` returned (``TrainState.model``,
            ``TrainResult.prepared``).
    """
    return acc.get_state_dict(prepared)


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, warmup: int,
                total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then ``constant``, ``linear`` or ``cosine`` decay."""
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - frac if kind == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare_training(acc: Any, model: Any, optimizer: Any, scheduler: Any,
                     micro_batch: int = 1) -> tuple[Any, Any, Any]:
    """Wrap model and optimiser with accelerate; the schedule steps once per optimiser step.

    A scheduler handed to ``accelerate.prepare`` steps ``num_processes`` times per call (unless
    the accelerator splits batches). Here batch sizes are per process, so the schedule must
    advance once per optimiser step on every process: a run on N processes then follows the
    learning-rate curve of a single-process run with the same global batch.

    Args:
        micro_batch: sequences per backward pass on one process; DeepSpeed needs it and, with
            no DataLoader to prepare, accelerate cannot infer it.

    Returns:
        ``(model, optimizer, scheduler)``.
    """
    from accelerate.scheduler import AcceleratedScheduler

    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = max(1, micro_batch)
    model, optimizer = acc.prepare(model, optimizer)
    return model, optimizer, AcceleratedScheduler(scheduler, optimizer, split_batches=True)


@dataclass
class TrainState:
    """The model being trained and everything the loop and a step function share."""

    model: Any
    optimizer: Any
    scheduler: Any
    accelerator: Any
    trainable: list[torch.nn.Parameter]
    checkpoint_dir: Path | None = None
    start_step: int = 0
    """Steps already done (from the checkpoint loaded by ``setup_training``)."""
    resumed_from: Path | None = None
    step: int = 0
    """The step being run, 0-based (set by ``fit``); the logs call it ``step + 1``."""
    fail_at_step: int | None = field(default=None, repr=False)
    """Test hook: the loss of the step with this 0-based index is made NaN inside ``backward``
    (logged as step ``fail_at_step + 1``)."""
    trajectory: dict[str, Any] | None = field(default=None, repr=False)
    """``trajectory_params`` of the run, stored in every checkpoint."""
    elapsed_before_s: float = 0.0
    """Training seconds of the earlier segments of a resumed run (from its checkpoint)."""

    def _last_good(self) -> str:
        """The newest checkpoint that verifies and holds only finite weights ("none" if no
        checkpoint does: a corrupted one is never offered as the place to resume from)."""
        try:
            last = (checkpoints.latest_checkpoint(self.checkpoint_dir, finite=True)
                    if self.checkpoint_dir else None)
        except checkpoints.CheckpointError:
            last = None
        return str(last or "none")

    def backward(self, loss: torch.Tensor, what: str = "loss") -> None:
        """``accelerator.backward(loss)`` behind the non-finite guard.

        Raises:
            NonFiniteLossError: ``loss`` is NaN/inf; names the step (1-based, as in the logs)
                and the last good checkpoint, which stays on disk.
        """
        if self.fail_at_step is not None and self.step == self.fail_at_step:
            loss = loss * float("nan")
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite {what} {float(loss.detach())} at step {self.step + 1}; last good "
                f"checkpoint: {self._last_good()}. Lower the learning rate or check the data.")
        self.accelerator.backward(loss)

    def clip_and_step(self, grad_clip: float) -> float | None:
        """Clip the gradient norm (``grad_clip > 0``), step the optimiser, clear gradients.

        The gradient norm is checked before the optimiser steps, also when nothing is clipped:
        a finite loss can still give a NaN/inf gradient, and stepping on it would poison the
        weights and every later checkpoint. Under fp16 the gradient scaler skips such steps
        itself (overflow is expected there), and DeepSpeed clips inside its engine: neither
        is checked here.

        Returns:
            The gradient norm before clipping, or None when not clipped.

        Raises:
            NonFiniteLossError: the gradient norm is NaN/inf; names the step (1-based) and the
                last good checkpoint. No optimiser step and no checkpoint happen.
        """
        acc = self.accelerator
        norm = None
        if acc.sync_gradients and not uses_deepspeed(acc):
            # max_norm inf: the norm only, gradients scaled by exactly 1.
            total = acc.clip_grad_norm_(self.trainable, grad_clip if grad_clip > 0 else math.inf)
            if total is not None:
                total = float(total)
                if not math.isfinite(total) and getattr(acc, "scaler", None) is None:
                    self.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(
                        f"non-finite gradient norm {total} at step {self.step + 1} (the loss "
                        f"was finite); last good checkpoint: {self._last_good()}. Lower the "
                        f"learning rate or check the data.")
                norm = total if grad_clip > 0 else None
        elif grad_clip > 0 and acc.sync_gradients:
            total = acc.clip_grad_norm_(self.trainable, grad_clip)
            norm = None if total is None else float(total)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


def loss_shares(acc: Any, counts: Sequence[float]) -> list[float]:
    """The weight of each micro-batch's mean loss that makes their sum, over the micro-batches
    and the processes, the mean over every unit (token, sequence or target) of the global batch.

    ``counts``: the units of this process's micro-batches. DDP averages the processes'
    gradients, so each weight is ``count / (N / world)`` with ``N`` the units of all processes
    (on one process ``count / N``). Accelerate divides every loss by its
    ``gradient_accumulation_steps`` in ``backward`` (DeepSpeed's engine does the same), so the
    weights carry that factor back: the stages set it to ``grad_accum`` for DeepSpeed's sake.

    >>> from types import SimpleNamespace
    >>> loss_shares(SimpleNamespace(num_processes=1, gradient_accumulation_steps=1), [3, 1])
    [0.75, 0.25]
    """
    total = max(1, sum(counts))
    if acc.num_processes > 1:
        n_all = acc.reduce(torch.tensor(float(sum(counts)), device=acc.device), "sum")
        total = max(1.0, float(n_all) / acc.num_processes)
    scale = getattr(acc, "gradient_accumulation_steps", 1)
    return [c / total * scale for c in counts]


@contextlib.contextmanager
def micro_batch(acc: Any, model: Any, last: bool) -> Iterator[None]:
    """The context of one micro-batch's forward and backward: the processes' gradients are
    averaged only after the last micro-batch of an optimiser step (``no_sync`` before it).

    The accumulation of both stages, in three lines: weight each micro-batch's mean loss by
    :func:`loss_shares`, run its backward inside ``micro_batch(..., last=i == n - 1)``, then one
    ``TrainState.clip_and_step`` and one schedule step per optimiser step.
    """
    with contextlib.nullcontext() if last else acc.no_sync(model):
        yield


@dataclass(frozen=True)
class Hooks:
    """What a caller plugs into a training run besides its params: test hooks, and stage 2's
    extra reward."""

    stop_after: int | None = None
    """Return after this many steps, as if the run were killed (tests)."""
    fail_at_step: int | None = None
    """Make the loss of the step with this 0-based index NaN (tests; the error and the logs
    call it step ``fail_at_step + 1``)."""
    extra_reward: Callable[..., Sequence[float]] | None = None
    """Stage 2: a reward added to the total (``grpo.ExtraReward``; tests, custom tasks)."""


@dataclass(frozen=True)
class Loop:
    """How ``fit`` shows and stores a run."""

    desc: str
    """Progress-bar label."""
    logs: Sequence[str] = ("metrics",)
    """JSONL logs of the run; the first is the metrics log returned."""
    checkpoint_extra: dict[str, Any] | None = None
    """Metadata stored with every checkpoint."""
    postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None
    """The progress bar's postfix from a stats row."""


def setup_training(model: Any, params: Any, out_dir: str | Path | None, accelerator: Any,
                   micro_batch: int) -> TrainState:
    """Optimiser, schedule, resume and accelerate wrapping for one training run.

    Args:
        model: the model to train; only parameters with ``requires_grad`` are optimised.
        params: stage parameters (``lr``, ``weight_decay``, ``lr_schedule``, ``lr_warmup_steps``,
            ``steps``, ``gradient_checkpointing``, ``resume``).
        out_dir: run folder; checkpoints go to ``out_dir/checkpoints`` (None: no checkpoints,
            no resume). With ``params.resume`` the latest checkpoint there is loaded.
        accelerator: the stage's ``accelerate.Accelerator``.
        micro_batch: sequences per backward pass on one process (see ``prepare_training``).

    Returns:
        The ``TrainState``; ``start_step`` is the loaded checkpoint's step, else 0.

    Raises:
        ValueError: a LoRA (peft) model under FSDP or ZeRO-3, whose adapter and merged model
            cannot be saved from shards.
    """
    if shards_parameters(accelerator) and hasattr(model, "peft_config"):
        raise ValueError("LoRA under FSDP / DeepSpeed ZeRO-3 is not supported (the adapter and "
                         "the merged model are saved from whole weights): use DDP, e.g. "
                         "params/accelerate/ddp_8gpu.yaml")
    if params.gradient_checkpointing:
        attention.unwrap_model(model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    scheduler = lr_schedule(optimizer, params.lr_schedule, params.lr_warmup_steps, params.steps)
    ckpt_dir = Path(out_dir) / "checkpoints" if out_dir is not None else None
    ck = checkpoints.latest_checkpoint(ckpt_dir) if params.resume and ckpt_dir is not None else None
    elapsed = 0.0
    if ck is not None:  # before anything is loaded: a changed run is refused untouched
        elapsed = float((check_resume(ck, params).get("extra") or {}).get("elapsed_s", 0.0))
    elif ckpt_dir is not None and ckpt_dir.exists() and accelerator.is_main_process:
        # A fresh start replaces the run: an earlier run's checkpoints would otherwise outrank
        # this run's own (by step) as "latest" and in the cleanup of old checkpoints.
        logger.info("fresh start in %s: removing the earlier run's checkpoints", out_dir)
        shutil.rmtree(ckpt_dir)
    start = 0
    # Sharded optimiser state (and ZeRO-3's partitioned weights) load after the wrapping.
    late = ck is not None and (uses_fsdp(accelerator) or uses_deepspeed(accelerator))
    if ck is not None:
        meta = checkpoints.load_checkpoint(ck, model, None if late else optimizer, scheduler,
                                     weights=not uses_deepspeed(accelerator))
        start = int(meta["step"])
        logger.info("resumed from %s (step %d)", ck, start)
    model.train()
    model, optimizer, scheduler = prepare_training(accelerator, model, optimizer, scheduler,
                                                   micro_batch)
    if uses_fsdp(accelerator):  # fully_shard replaced the parameters by sharded ones
        trainable = [p for p in model.parameters() if p.requires_grad]
    if late:
        _load_sharded_state(accelerator, ck, model, optimizer)
    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler,
                      accelerator=accelerator, trainable=trainable, checkpoint_dir=ckpt_dir,
                      start_step=start, resumed_from=ck, trajectory=trajectory_params(params),
                      elapsed_before_s=elapsed)


def _load_sharded_state(acc: Any, ck: Path, model: Any, optimizer: Any) -> None:
    """Load a checkpoint's optimiser state into a wrapped model's shards, on every process.

    FSDP: the full optimiser state ``_save`` wrote is split into this process's shards.
    DeepSpeed: the engine reloads its own checkpoint (weights and optimiser partitions).
    """
    if uses_deepspeed(acc):
        meta = checkpoints.read_checkpoint_meta(ck)
        if "deepspeed" not in meta:
            raise ValueError(f"{ck}: no DeepSpeed engine state; it was not written under DeepSpeed")
        model.load_checkpoint(str(ck / meta["deepspeed"]["dir"]), tag=meta["deepspeed"]["tag"],
                              load_optimizer_states=True, load_lr_scheduler_states=False)
        return
    checkpoints.load_checkpoint(ck, model, _torch_optimizer(optimizer), restore_rng=False,
                          weights=False)


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _open_logs(state: TrainState, out_dir: Path, names: Sequence[str]) -> dict[str, repro.MetricsLog]:
    """The run's JSONL logs: truncated to the checkpoint's step on resume, else started anew."""
    acc = state.accelerator
    logs = {}
    for name in names:
        path = out_dir / f"{name}.jsonl"
        if state.resumed_from is not None:
            log = repro.MetricsLog(path)
            # Rows written after the checkpoint go, so the log matches an uninterrupted run.
            kept = [r for r in log.read() if r["step"] <= state.start_step]
            if acc.is_main_process:
                repro.write_jsonl(path, kept)
        else:
            log = repro.MetricsLog(path, reset=acc.is_main_process)
        logs[name] = log
    return logs


def _check_extra(checkpoint: Path, extra: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint written with other stage metadata (e.g. another variant)."""
    saved = (checkpoints.read_checkpoint_meta(checkpoint).get("extra") or {})
    changed = sorted(k for k in extra if k in saved and saved[k] != extra[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {extra[k]!r}" for k in changed)
        raise ResumeMismatchError(f"cannot resume {checkpoint}: it was written by another "
                                  f"run ({diffs})")


def _save(state: TrainState, step: int, extra: dict[str, Any]) -> None:
    """Write the checkpoint of ``step``; under sharding every process must call it."""
    acc = state.accelerator
    if state.checkpoint_dir is None:
        return
    if state.trajectory is not None:
        extra = {**extra, "params": state.trajectory}
    if not (uses_fsdp(acc) or uses_deepspeed(acc)):
        if acc.is_main_process:
            checkpoints.save_checkpoint(state.checkpoint_dir, step, acc.unwrap_model(state.model),
                                  state.optimizer, state.scheduler, extra=extra)
        return
    model = acc.unwrap_model(state.model)
    weights = None  # ZeRO-2: the main process holds every weight
    if shards_parameters(acc):
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        weights = {n: t for n, t in full_state_dict(acc, state.model).items() if n in names}
    optimizer_state = _full_optimizer_state(state) if uses_fsdp(acc) else None
    engine = _save_engine_state(state, step) if uses_deepspeed(acc) else None
    if acc.is_main_process:
        sharded = checkpoints.Sharded(weights=weights, optimizer_state=optimizer_state,
                                      engine_dir=engine)
        checkpoints.save_checkpoint(state.checkpoint_dir, step, model, None, state.scheduler,
                                    extra=extra, sharded=sharded)
    acc.wait_for_everyone()


def _full_optimizer_state(state: TrainState) -> dict[str, Any]:
    """FSDP's optimiser state gathered to full tensors on the main process's CPU (keyed by
    parameter name); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(state.model, _torch_optimizer(state.optimizer),
                                    options=StateDictOptions(full_state_dict=True,
                                                             cpu_offload=True))


def _save_engine_state(state: TrainState, step: int) -> Path:
    """Every process writes its partition of DeepSpeed's engine checkpoint (weights, fp32
    master weights, optimiser state) into a folder ``checkpoints.save_checkpoint`` moves in."""
    folder = state.checkpoint_dir / f".deepspeed_{step:07d}"
    state.model.save_checkpoint(str(folder), tag=checkpoints.ENGINE_TAG, save_latest=False)
    state.accelerator.wait_for_everyone()
    return folder


def tracker_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row (``step`` aside), as the trackers get them."""
    import numbers

    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)
            and math.isfinite(float(v))}


def _tracker_config(params: Any) -> dict[str, Any]:
    """The run's parameters as tracker hyper-parameters (scalars; anything else as JSON text)."""
    import json

    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)
            for k, v in repro.params_dict(params).items()}


def start_trackers(acc: Any, params: Any, out_dir: str | Path) -> bool:
    """Start the experiment trackers ``params.log_with`` names on the main process.

    tensorboard writes to ``out_dir/tensorboard``; wandb runs in ``out_dir`` (``out_dir/wandb``);
    trackio keeps its own local store. Every tracker gets the project ``fmr1_<profile>`` and the
    run folder's name (``anchor/focus_anchor``), and the run's parameters as its configuration.

    Returns:
        Whether trackers were started (then ``acc.log`` reaches them and ``finish_trackers``
        must follow).
    """
    names = list(getattr(params, "log_with", None) or [])
    if not names or not acc.is_main_process:
        return False
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    out_dir = Path(out_dir)
    project = f"fmr1_{getattr(params, 'profile', 'run')}"
    try:
        run_name = out_dir.resolve().relative_to(repro.run_dir(params, create=False).resolve()).as_posix()
    except (AttributeError, ValueError):
        run_name = out_dir.name
    trackers = []
    for name in names:
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":
            trackers.append(cls("tensorboard", str(out_dir)))
        elif name == "wandb":
            trackers.append(cls(project, name=run_name, dir=str(out_dir)))
        else:
            trackers.append(cls(project, name=run_name))
    out_dir.mkdir(parents=True, exist_ok=True)
    acc.log_with = trackers  # started by init_trackers, in this order
    acc.init_trackers(project, config=_tracker_config(params))
    logger.info("tracking %s to %s", ", ".join(names), out_dir)
    return True


def finish_trackers(acc: Any) -> None:
    """Close the trackers ``start_trackers`` started. Unlike ``Accelerator.end_training`` this
    keeps the process group: a later stage of the same process still needs it."""
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers = []
    acc.log_with = []


PROGRESS_LINES_ENV = progress.HEADLESS_ENV
"""Environment variable: when set to N, ``fit`` writes a progress line instead of its bar when
a run starts, every N seconds and when it ends, to ``progress.terminal()`` (``cli.run_notebook``
sets it for the notebook kernels: the lines reach the terminal, not the executed notebook)."""


class ProgressLines:
    """A few whole progress lines of one training run on ``progress.terminal()``
    (``PROGRESS_LINES_ENV``)."""

    def __init__(self, name: str, start: int, total: int, every_s: float) -> None:
        self.name, self.start, self.total, self.every_s = name, start, total, every_s
        self.t0 = self.last = time.perf_counter()
        self._write(f"step {start}/{total}, starting")

    @classmethod
    def from_env(cls, name: str, start: int, total: int) -> ProgressLines | None:
        try:
            every = float(os.environ.get(PROGRESS_LINES_ENV, ""))
        except ValueError:
            return None
        return cls(name, start, total, every) if every > 0 else None

    def _write(self, text: str) -> None:
        out = progress.terminal()
        out.write(f"[train] {self.name}: {text}\n")
        out.flush()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s or done >= self.total:
            return
        self.last = now
        spent, ran = now - self.t0, done - self.start
        left = spent / ran * (self.total - done) if ran else 0.0
        self._write(f"step {done}/{self.total} ({100 * done / self.total:.0f}%) in {spent:.0f} s; "
                    f"~{left:.0f} s left (estimate at this run's rate)")

    def close(self, done: int) -> None:
        self._write(f"{done - self.start} steps in {time.perf_counter() - self.t0:.1f} s "
                    f"(step {done}/{self.total})")


def fit(state: TrainState, params: Any, out_dir: str | Path, step_fn: StepFn, loop: Loop,
        hooks: Hooks | None = None) -> TrainResult:
    """Run ``step_fn`` from ``state.start_step`` to ``params.steps``, with logs and checkpoints.

    Every step's ``stats`` row goes to ``metrics.jsonl`` with ``time_s`` (seconds since this
    process started training), and its numbers to the trackers ``params.log_with`` names
    (``start_trackers``); rows of the other logs go to their own files. A checkpoint is
    written every ``params.checkpoint_every`` steps and after the last step; it holds the
    training time so far (``elapsed_s``: this segment plus the earlier ones of a resumed run).

    Args:
        state: from ``setup_training``.
        params: stage parameters (``steps``, ``checkpoint_every``).
        out_dir: run folder.
        step_fn: the stage's step (see the module docstring).
        loop: the progress label, the logs, checkpoint metadata.
        hooks: test hooks (``stop_after``, ``fail_at_step``).

    Returns:
        ``TrainResult``; the model (``state.model`` unwrapped) is left in eval mode. Its
        ``wall_time_s`` is the training time of the whole run: the earlier segments' (up to
        the checkpoint resumed from) plus this one's.

    Raises:
        NonFiniteLossError: a loss or gradient norm became NaN/inf; the last good checkpoint
            stays on disk.
    """
    out_dir = Path(out_dir)
    acc = state.accelerator
    hooks = hooks or Hooks()
    desc, logs, postfix, stop_after = loop.desc, loop.logs, loop.postfix, hooks.stop_after
    state.fail_at_step = hooks.fail_at_step
    extra = loop.checkpoint_extra or {}
    if state.resumed_from is not None:  # before the logs are truncated to the checkpoint
        _check_extra(state.resumed_from, extra)
    open_logs = _open_logs(state, out_dir, logs)
    metrics_log = open_logs[logs[0]]
    start = state.start_step
    t0 = time.perf_counter()

    def elapsed() -> float:  # the run's training time: earlier segments plus this one
        return state.elapsed_before_s + time.perf_counter() - t0

    final = start
    tracking = start_trackers(acc, params, out_dir)
    # Headless (PROGRESS_LINES_ENV set): a few whole lines instead of the bar.
    lines = (ProgressLines.from_env(f"{out_dir.parent.name}/{out_dir.name} ({desc})", start,
                                    params.steps) if acc.is_main_process else None)
    bar = progress.bar(range(start, params.steps), desc=desc, initial=start, total=params.steps,
               disable=not acc.is_main_process or lines is not None)
    try:
        for step in bar:
            state.step = step
            stats, extra_rows = step_fn(state, step)
            done = final = step + 1
            if acc.is_main_process:
                if stats is not None:
                    row = {**stats, "time_s": time.perf_counter() - t0}
                    metrics_log.log(done, **row)
                    if tracking:
                        acc.log(tracker_scalars(row), step=done)
                    if postfix is not None:
                        bar.set_postfix(postfix(stats))
                for name, rows in extra_rows.items():
                    for row in rows:
                        open_logs[name].log(done, **row)
            if (params.checkpoint_every and done % params.checkpoint_every == 0
                    and done < params.steps):
                _save(state, done, {**extra, "elapsed_s": elapsed()})
                acc.wait_for_everyone()
            if lines is not None:
                lines.update(done)
            if stop_after is not None and done >= stop_after:
                break
    finally:
        bar.close()
        if lines is not None:
            lines.close(final)
        if tracking:
            finish_trackers(acc)
    wall = elapsed()
    if final >= params.steps:
        _save(state, final, {**extra, "elapsed_s": wall})
    model = acc.unwrap_model(state.model)
    model.eval()
    return TrainResult(out_dir=out_dir, metrics=metrics_log.read(), wall_time_s=wall, steps=final,
                       prepared=state.model)
