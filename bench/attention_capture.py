"""Benchmark 1: attention capture against the plain SDPA forward and eager attention.

Three forwards over the same batch, interleaved in one process:

* ``sdpa``: the model as it trains (SDPA attention), no capture;
* ``capture``: the same forward inside ``fmr1lib.attention.AttentionCapture``, recording the
  softmax rows of the ``<Focus>`` token and of the last 8 positions (the answer rows) in every
  decoder layer;
* ``eager``: a second instance with the same weights whose language model is switched to eager
  attention (``set_attn_implementation({"text_config": "eager"})``; the vision tower stays on
  SDPA in all three, so the comparison isolates the decoder), called with
  ``output_attentions=True``: the usual way to get attention maps, O(layers x heads x seq^2).

Each is timed as an inference forward (``no_grad``) and as a training forward + backward (the
captured rows, or eager's returned maps, enter the loss as they do in anchoring). Median of
interleaved repeats after warm-up; peak tensor memory of one call; the largest difference
between captured and eager rows (docs/design.md §10.1 asks <= 1e-5 in fp32).

    python bench/attention_capture.py            # tiny, mid-448 and mid-896 (about 2 min on 2 cores)
    python bench/attention_capture.py --quick    # tiny only
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

# common first: it silences tqdm, which torch imports.
try:
    from bench import common
except ImportError:  # run as a script: bench/ itself is on sys.path
    import common  # type: ignore[no-redef]

import torch

from fmr1lib import attention, batching

ANSWER_ROWS = 8
"""Query rows captured at the end of every sequence, besides the ``<Focus>`` row."""

MID = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4,
       "intermediate_size": 1024, "vision_depth": 2, "vision_hidden": 128, "vision_heads": 2}
"""The mid-size model: 8 decoder layers of width 512, GQA 8 query / 4 kv heads."""

SIZES = [
    # name, model overrides, image px, batch, timed repeats (forward, train)
    ("tiny-112", {}, 112, 8, (30, 15)),
    ("mid-448", MID, 448, 2, (5, 3)),
    ("mid-896", MID, 896, 1, (3, 2)),
]


def _inputs(processor: Any, image_size: int, batch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A left-padded batch of prompts + responses and the query positions ``[B, 1 + 8]``."""
    rows = common.make_rows(batch, image_size)
    enc = batching.encode_batch(rows, processor, "plain", with_response=True)
    seq = enc.inputs["input_ids"].shape[1]
    tail = torch.arange(seq - ANSWER_ROWS, seq).expand(batch, ANSWER_ROWS)
    positions = torch.cat([enc.focus_pos[:, None], tail], dim=1)
    dev = common.device()
    return {k: v.to(dev) for k, v in enc.inputs.items()}, positions.to(dev)


def _eager_rows(out: Any, positions: torch.Tensor) -> torch.Tensor:
    """Eager's maps at the query positions, head-averaged: ``[B, layers, n_q, seq]``."""
    maps = torch.stack(out.attentions, dim=1).mean(dim=2)  # [B, L, S, S]
    index = positions[:, None, :, None].expand(-1, maps.shape[1], -1, maps.shape[-1])
    return maps.gather(2, index)


def measure(name: str, overrides: dict[str, Any], image_size: int, batch: int,
            repeats: tuple[int, int]) -> dict[str, Any]:
    """Time and memory of the three forwards for one model size and image size."""
    model, processor = common.build_model(image_size, **overrides)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation({"text_config": "eager"})
    inputs, positions = _inputs(processor, image_size, batch)
    n_layers = len(attention.language_attention_modules(model))
    layers = list(range(n_layers))

    def sdpa() -> Any:
        return model(**inputs).logits

    def capture() -> Any:
        with attention.AttentionCapture(model, positions, layers=layers) as cap:
            logits = model(**inputs).logits
        return logits, cap.attentions

    def eager_fwd() -> Any:
        out = eager(**inputs, output_attentions=True)
        return out.logits, out.attentions

    def train(fn: Any, mdl: torch.nn.Module) -> Any:
        def step() -> float:
            res = fn()
            if isinstance(res, tuple):
                logits, att = res
                att = torch.stack(att, 1) if isinstance(att, tuple) else att
                loss = logits.float().mean() + att.float().mean()
            else:
                loss = res.float().mean()
            loss.backward()
            # Freed here, so that every call starts without gradients and its peak counts them.
            mdl.zero_grad(set_to_none=True)
            return float(loss.detach())
        return step

    def infer(fn: Any) -> Any:
        def call() -> Any:
            with torch.no_grad():
                return fn()
        return call

    forward_fns = {"sdpa": infer(sdpa), "capture": infer(capture), "eager": infer(eager_fwd)}
    train_fns = {"sdpa": train(sdpa, model), "capture": train(capture, model),
                 "eager": train(eager_fwd, eager)}

    with torch.no_grad():
        _, captured = capture()
        out = eager(**inputs, output_attentions=True)
        max_diff = float((captured - _eager_rows(out, positions)).abs().max())
        del out, captured

    result: dict[str, Any] = {"size": name, "image_px": image_size, "batch": batch,
                              "seq_len": int(inputs["input_ids"].shape[1]),
                              "image_tokens": int(inputs["image_grid_thw"].prod(-1).sum() // 4),
                              "layers": n_layers, "query_rows": int(positions.shape[1]),
                              "max_abs_diff_vs_eager": max_diff, "modes": {}}
    for mode, fns, reps in (("forward", forward_fns, repeats[0]), ("train", train_fns, repeats[1])):
        for fn in fns.values():  # lazy first-call allocations must not count as anyone's peak
            fn()
        memory = {k: common.peak_memory(fn) for k, fn in fns.items()}
        times = common.interleaved(fns, repeats=reps, warmup=0)
        med = {k: common.median(v) for k, v in times.items()}
        result["modes"][mode] = {
            "repeats": reps, "median_s": med, "times_s": times, "peak_bytes": memory,
            "capture_over_sdpa": med["capture"] / med["sdpa"],
            "eager_over_sdpa": med["eager"] / med["sdpa"],
            "capture_mem_over_sdpa": memory["capture"] / max(1, memory["sdpa"]),
            "eager_mem_over_sdpa": memory["eager"] / max(1, memory["sdpa"]),
        }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sizes, print the table, write ``runs/bench/attention_capture.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny size only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    common.setup(args.threads)
    t0 = time.perf_counter()
    results = [measure(*size) for size in (SIZES[:1] if args.quick else SIZES)]
    rows = []
    for r in results:
        for mode, m in r["modes"].items():
            mb = {k: v / 2**20 for k, v in m["peak_bytes"].items()}
            rows.append([r["size"], mode, r["seq_len"], f"{m['median_s']['sdpa'] * 1e3:.1f}",
                         m["capture_over_sdpa"], m["eager_over_sdpa"],
                         f"{mb['sdpa']:.1f}", f"{mb['capture']:.1f}", f"{mb['eager']:.1f}",
                         f"{r['max_abs_diff_vs_eager']:.1e}"])
    title = (f"Attention capture vs SDPA vs eager (output_attentions) on {common.device_name()}; "
             f"capture = Focus row + last {ANSWER_ROWS} rows, all decoder layers")
    text = common.table(title, ["size", "mode", "seq", "sdpa ms", "capture/sdpa", "eager/sdpa",
                                "sdpa MiB", "capture MiB", "eager MiB", "max |capture-eager|"],
                        rows)
    print(text)
    wall = time.perf_counter() - t0
    path = common.write_json("attention_capture", {"results": results, "table": text,
                                                   "wall_s": wall})
    print(f"\n{wall:.0f} s; wrote {path}")
    return {"results": results}


if __name__ == "__main__":
    main()
