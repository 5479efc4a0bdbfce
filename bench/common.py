"""Shared pieces of the benchmarks: device name, tiny models and data, timing, memory, output.

Every benchmark measures its variants side by side in one process, interleaved (round-robin,
the order rotated each round) so that load from other processes falls on all variants alike,
and reports medians and ratios (docs/design.md §10.1). Results go to ``runs/bench/<name>.json``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# tqdm reads its TQDM_* settings when it is imported: silence the progress bars of data
# generation and training before fmr1lib imports it.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fmr1lib import anchoring, config, data, grpo, modeling, rewards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "runs" / "bench"

logger = logging.getLogger(__name__)


def quiet() -> None:
    """Silence library chatter so that the tables stay readable."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING)


def setup(threads: int = 1) -> None:
    """Quiet logs, fix the torch thread count and the seed before a benchmark.

    One thread by default: on a machine whose cores are shared, several processes each
    spinning OpenMP threads slow one another by large, erratic factors, which drowns the
    ratios; one thread per process keeps them stable.
    """
    quiet()
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)


def device() -> torch.device:
    """The device the benchmarks run on: the first GPU if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name() -> str:
    """GPU name, or the CPU model with the number of cores and torch threads in use."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def machine_info() -> dict[str, Any]:
    """What the JSON records about where and with what it ran."""
    import transformers

    info: dict[str, Any] = {"device": device_name(), "torch": torch.__version__,
                            "transformers": transformers.__version__,
                            "threads": torch.get_num_threads()}
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------


def model_params(**overrides: Any) -> config.BackboneParams:
    """Tiny-profile backbone parameters with ``overrides`` (e.g. ``hidden_size=512``)."""
    return config.load_params(config.BackboneParams, **overrides)


def build_model(image_size: int = 112, **overrides: Any) -> tuple[Any, Any]:
    """The tiny backbone (or a larger one, through ``overrides``) able to read ``image_size`` px.

    Returns:
        ``(model, processor)``, the model fp32, in eval mode, on :func:`device`.
    """
    overrides.setdefault("image_max_pixels", max(12544, image_size * image_size))
    model, processor = modeling.build_tiny_backbone(model_params(**overrides), seed=0)
    return model.to(device()).eval(), processor


def make_rows(n: int, image_size: int = 112, split: str = "train") -> list[dict[str, Any]]:
    """``n`` FocusShapes records of ``split`` at ``image_size`` px, as a list of dicts."""
    ds = data.make_split(config.DataParams(image_size=image_size), split, n)
    return [ds[i] for i in range(len(ds))]


def sft_warmup(model: Any, processor: Any, rows: Sequence[dict[str, Any]], steps: int = 60,
               batch_size: int = 8, lr: float = 5e-3, variant: str = "plain") -> Any:
    """A short SFT (``variant``: plain, or focus_anchor to anchor as well) so that the model
    answers in format and often correctly.

    The faithful reward scores answer-correct trajectories only: timing it on a random model
    would time nothing. Returns the model (trained in place, eval mode).
    """
    p = config.load_params(config.BackboneParams, steps=steps, batch_size=batch_size, lr=lr,
                           lr_warmup_steps=0, log_every=0, checkpoint_every=0)
    # train_supervised shows its progress bar explicitly; keep it out of the tables.
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        anchoring.train_supervised(model, processor, list(rows), p, tmp, variant=variant)
    return model.eval()


def sft_model(steps: int = 60, n_rows: int = 64, variant: str = "plain") -> tuple[Any, Any]:
    """The tiny backbone after :func:`sft_warmup` (a few seconds on one CPU thread).

    Returns:
        ``(model, processor)`` in eval mode on :func:`device`.
    """
    torch.manual_seed(0)
    model, processor = build_model(112)
    sft_warmup(model, processor, make_rows(n_rows), steps=steps, variant=variant)
    return model.eval(), processor


def rl_params(**overrides: Any) -> config.RLParams:
    """RL parameters of the benchmarks: P = 4 prompts, G = 8 samples, 32 new tokens; the training
    step alone, without the reading diagnostic (an instrument, docs/design.md §6.6)."""
    base = {"prompts_per_step": 4, "group_size": 8, "max_new_tokens": 32, "log_every": 0,
            "checkpoint_every": 0, "n_show": 0, "reading_diagnostic": False}
    base.update(overrides)
    return config.load_params(config.RLParams, **base)


def grpo_context(model: Any, processor: Any, variant: str = "grpo",
                 min_new_tokens: int = 0, **overrides: Any) -> grpo.GRPOContext:
    """A GRPO context on a private copy of ``model`` (each variant trains its own copy).

    Args:
        min_new_tokens: when > 0, generation may not stop before this many tokens
            (``generation_config.min_new_tokens``: EOS is masked until then), so completion
            lengths do not drift between variants and steps.
    """
    own = copy.deepcopy(model)
    if min_new_tokens:
        own.generation_config.min_new_tokens = min_new_tokens
    return grpo.setup_grpo(own, processor, rl_params(**overrides), variant)


@contextlib.contextmanager
def half_correct() -> Iterator[None]:
    """``rewards.accuracy_reward`` = 1 for every other completion of a group while the block
    runs: the accuracy advantages are non-zero and each group has 2 distinct correct ones, so
    the faithful reward scores every group even on a random model (a fixed workload)."""
    original = rewards.accuracy_reward

    def stand_in(completions: Any, *args: Any, **kwargs: Any) -> list[float]:
        return [float(k % 2 == 0) for k in range(len(completions))]

    rewards.accuracy_reward = stand_in
    try:
        yield
    finally:
        rewards.accuracy_reward = original


# --------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------


def synchronize() -> None:
    """Wait for queued GPU work, so that a timer measures it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of ``fn()`` in seconds (GPU work included) and its result."""
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return time.perf_counter() - start, result


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                on_result: Callable[[str, Any], None] | None = None) -> dict[str, list[float]]:
    """Run the variants round-robin and return each one's timings (warm-up rounds dropped).

    The order rotates every round, so no variant always follows the same one.

    Args:
        fns: name -> zero-argument callable; one call is one timed run.
        repeats: timed rounds.
        warmup: untimed rounds first (allocator, caches, lazy initialisation).
        on_result: called with ``(name, result)`` after every timed call.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            dt, result = timed(fns[name])
            if r >= warmup:
                times[name].append(dt)
                if on_result is not None:
                    on_result(name, result)
    return times


def median(xs: Sequence[float]) -> float:
    """Median (NaN for an empty list)."""
    return float(statistics.median(xs)) if xs else float("nan")


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by tensors during ``fn()``, above what was allocated before.

    GPU: ``torch.cuda.max_memory_allocated``. CPU: the tensor allocations and frees that the
    torch profiler records (``profile_memory``), summed in time order; unlike the process RSS
    this is not blurred by the C allocator keeping freed pages.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del result
        return int(peak)
    import sys

    from torch.profiler import ProfilerActivity, profile

    # The profiler's C++ side logs start/stop lines on stderr: keep them out of the tables.
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
            del result
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    events = [(e.start_ns(), i, e.nbytes()) for i, e in
              enumerate(prof.profiler.kineto_results.events()) if e.name() == "[memory]"]
    running = peak = 0
    for _, _, nbytes in sorted(events):
        running += nbytes
        peak = max(peak, running)
    return int(peak)


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``: ``y ~ x^slope``.

    >>> round(loglog_slope([1, 2, 4], [3, 12, 48]), 6)
    2.0
    """
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(lx, ly, 1)[0])


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".3f") -> str:
    """A table cell: floats formatted, None/NaN as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table under a title line (printed, and pasted into bench/README.md)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in cells]
    return "\n".join([title, "", line, sep, *body])


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """``runs/bench/<name>.json`` with the machine info added."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_info(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path
