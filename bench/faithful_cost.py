"""Benchmark 4: what the faithful reward adds to a GRPO step as the image grows, and what
encoding each image once per prompt saves.

At 112, 224, 336 and 448 px (16 to 256 image cells) on the tiny backbone, interleaved in one
process per size, P = 4 prompts x G = 8 samples, 32 new tokens (forced: EOS is masked until the
limit), the variants

* ``grpo``: accuracy + format (the baseline every ratio divides by);
* ``boxes``: + the faithful reward, causal region from the evidence boxes;
* ``occlusion_<search>``: + the faithful reward, annotation-free region from each occlusion
  search (``fmr1lib.occlusion.SEARCHES``).

The model is freshly initialised, so every other completion of a group counts as correct
(``common.half_correct``): the counterfactual pass then runs for every group, a fixed workload
(the worst case: in training it runs only for groups with two distinct correct completions).
"added" is the variant's median step time over the baseline's, minus 1; the exponent k is the
log-log slope of the added seconds (and of the ratio) against the number of image cells.

At 448 px two more variants repeat ``grpo`` and ``boxes`` with each image repeated per sample
(``build_sequences(share_images=False)``: the vision tower runs G times per prompt, the layout
before images were encoded once); and one batch is scored both ways to show that log-probs,
captured attention rows and faithful rewards agree to float tolerance.

    python bench/faithful_cost.py               # about 5 min on 2 cores
    python bench/faithful_cost.py --sizes 112 224 --repeats 2
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

# common first: it silences tqdm, which torch imports.
try:
    from bench import common
except ImportError:  # run as a script: bench/ itself is on sys.path
    import common  # type: ignore[no-redef]

import torch

from fmr1lib import attention, batching, faithful, grpo, occlusion

SIZES = [112, 224, 336, 448]
SETTINGS = {"prompts_per_step": 4, "group_size": 8, "max_new_tokens": 32}


def variants(px: int, before_after: bool) -> dict[str, dict[str, Any]]:
    """name -> (variant, overrides, share_images) of one size."""
    out: dict[str, dict[str, Any]] = {
        "grpo": {"variant": "grpo"}, "boxes": {"variant": "faithful"}}
    for how in occlusion.SEARCHES:
        out[f"occlusion_{how}"] = {"variant": "faithful_occlusion", "occlusion_search": how}
    if before_after:
        out["grpo_repeated"] = {"variant": "grpo", "share_images": False}
        out["boxes_repeated"] = {"variant": "faithful", "share_images": False}
    return out


def run_size(px: int, model: Any, processor: Any, repeats: int, before_after: bool) -> dict[str, Any]:
    """Interleaved step times of every variant at one image size."""
    rows = common.make_rows(16, px)
    contexts = {}
    for name, spec in variants(px, before_after).items():
        spec = dict(spec)
        share = spec.pop("share_images", True)
        variant = spec.pop("variant")
        ctx = common.grpo_context(model, processor, variant, min_new_tokens=SETTINGS["max_new_tokens"],
                                  **SETTINGS, **spec)
        ctx.share_images = share
        contexts[name] = ctx
    steps = {name: 0 for name in contexts}
    faith: dict[str, list[float]] = {name: [] for name in contexts}

    def make(name: str) -> Any:
        def call() -> Any:
            stats, _ = grpo.grpo_step(contexts[name], rows, steps[name])
            steps[name] += 1
            return stats
        return call

    def record(name: str, stats: Any) -> None:
        faith[name].append(stats["faithful_s"])

    with common.half_correct():
        times = common.interleaved({n: make(n) for n in contexts}, repeats=repeats, warmup=1,
                                   on_result=record)
    med = {n: common.median(t) for n, t in times.items()}
    grid = processor.image_processor(images=[rows[0]["image"]], return_tensors="pt")["image_grid_thw"][0]
    cells = int(grid.prod() // 4)
    return {"px": px, "cells": cells, "median_s": med, "times_s": times,
            "faithful_s": {n: common.median(v) for n, v in faith.items()}}


def agreement_check(model: Any, processor: Any, px: int) -> dict[str, float]:
    """One batch scored with images shared and repeated: the largest differences."""
    rows = common.make_rows(4, px)
    ctx = common.grpo_context(model, processor, "faithful", min_new_tokens=16, prompts_per_step=4,
                              group_size=4, max_new_tokens=16)
    torch.manual_seed(0)
    with common.half_correct():
        groups = grpo.rollout(ctx, rows)
    policy = ctx.accelerator.unwrap_model(ctx.model)
    policy.train()
    out: dict[str, Any] = {}
    for share in (True, False):
        batch = batching.build_sequences([g.row for g in groups], [g.tokens for g in groups],
                                         processor, share_images=share)
        policy.zero_grad()
        with attention.AttentionCapture(policy, batch.query_positions, layers=ctx.layers) as cap:
            logits = batching.completion_logits(policy, batch.inputs, batch.completion_ids.shape[1])
            logp = batching.token_logprobs(logits, batch.completion_ids, batch.completion_mask)
            logp.sum().backward()
        distinct = [faithful.distinct_correct(g.tokens, g.correct) for g in groups]
        reward = dataclasses.replace(ctx.params.reward, faithful_form="raw",
                                     concentration="top_kappa", faithful_std_floor=0.01)
        view = faithful.counterfactual_view(policy, processor, batch, rows, distinct, reward)
        rew = faithful.faithful_rewards(view, batch, logits, cap.attentions, reward).rewards
        grads = torch.cat([p.grad.flatten() for n, p in policy.named_parameters()
                           if p.grad is not None and "visual" in n])
        out[share] = (logp.detach(), cap.attentions.detach(), torch.tensor(rew), grads)
    a, b = out[True], out[False]
    return {"logp_max_abs": float((a[0] - b[0]).abs().max()),
            "attention_rows_max_abs": float((a[1] - b[1]).abs().max()),
            "faithful_reward_max_abs": float((a[2] - b[2]).abs().max()),
            "vision_grad_max_rel": float((a[3] - b[3]).abs().max() / b[3].abs().max()),
            "scored": int((a[2] != 0).sum())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every size, print the tables, write ``runs/bench/faithful_cost.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="image sides in px")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    common.setup(args.threads)
    t0 = time.perf_counter()
    model, processor = common.build_model(max(args.sizes))
    top = max(args.sizes)
    results = [run_size(px, model, processor, args.repeats, px == top) for px in args.sizes]
    names = [n for n in results[0]["median_s"] if not n.endswith("_repeated")]
    lines = []
    for r in results:
        base = r["median_s"]["grpo"]
        for n in names:
            m = r["median_s"][n]
            lines.append([r["px"], r["cells"], n, m, m / base - 1.0, r["faithful_s"][n]])
    title = (f"Faithful reward cost per GRPO step vs image size on {common.device_name()} "
             f"(P=4, G=8, 32 tokens forced, every group scored; median of {args.repeats})")
    text = common.table(title, ["px", "cells", "variant", "step s", "added", "faithful s"], lines)
    fits = []
    exps: dict[str, dict[str, float]] = {}
    if len(results) >= 2:
        cells = [r["cells"] for r in results]
        for n in names[1:]:
            added = [max(1e-6, r["median_s"][n] - r["median_s"]["grpo"]) for r in results]
            ratio = [r["median_s"][n] / r["median_s"]["grpo"] for r in results]
            exps[n] = {"added_s": common.loglog_slope(cells, added),
                       "ratio": common.loglog_slope(cells, ratio),
                       "faithful_s": common.loglog_slope(cells, [max(1e-6, r["faithful_s"][n])
                                                                 for r in results])}
            fits.append([n, exps[n]["added_s"], exps[n]["faithful_s"], exps[n]["ratio"]])
        exps["grpo"] = {"step_s": common.loglog_slope(cells, [r["median_s"]["grpo"] for r in results])}
        fits.append(["grpo (step itself)", exps["grpo"]["step_s"], None, None])
    fit = common.table("Fitted exponents in image cells (x ~ cells^k, log-log least squares)",
                       ["variant", "k of added s", "k of faithful s", "k of step ratio"], fits)
    last = results[-1]
    ba = []
    for n in ("grpo", "boxes"):
        before, after = last["median_s"][f"{n}_repeated"], last["median_s"][n]
        ba.append([n, before, after, before / after])
    ba_text = common.table(f"Images encoded once per prompt vs once per sample at {last['px']} px",
                           ["variant", "repeated s", "shared s", "speed-up"], ba)
    check = agreement_check(model, processor, last["px"])
    check_text = common.table(f"Shared vs repeated images, one batch at {last['px']} px "
                              f"(train mode, {check['scored']} trajectories scored)",
                              ["quantity", "max difference"],
                              [[k, format(v, ".2e")] for k, v in check.items() if k != "scored"])
    full = "\n\n".join([text, fit, ba_text, check_text])
    print(full)
    wall = time.perf_counter() - t0
    path = common.write_json("faithful_cost", {"settings": SETTINGS, "sizes": results,
                                               "exponents": exps, "shared_vs_repeated": ba,
                                               "agreement": check, "repeats": args.repeats,
                                               "table": full, "wall_s": wall})
    print(f"\n{wall:.0f} s; wrote {path}")
    return {"sizes": results, "exponents": exps, "agreement": check}


if __name__ == "__main__":
    main()
