"""Benchmark 5: how well the cheaper occlusion searches agree with the exhaustive one.

On FocusShapes test images at 112 px (the tiny profile's size), for a tiny backbone after a
short SFT (``focus_anchor``: answers and anchoring, so that it reads the evidence, as the
stage-2 policy does; and ``plain`` for comparison), each search of ``fmr1lib.occlusion``
against ``exhaustive``:

* **top-cell agreement**: the search's most damaging cell is among the exhaustive search's 2
  most damaging cells (the issue's criterion);
* **overlap**: the share of the ``n_cells`` = 2 selected cells that the exhaustive search also
  selects;
* **reward rank correlation**: on rollouts of the same model (P prompts x G samples of the train
  split), the faithful reward of every scored trajectory with the region from the search and
  from the exhaustive search (Spearman, ``raw`` concentration and ``group_tanh`` reward);
* **time** per image of the search alone, and the occluded forwards it needs per image at 112
  and 448 px (``occlusion.forwards_per_image``).

    python bench/occlusion_search.py              # about 2 min on 2 cores
    python bench/occlusion_search.py --images 50
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

from fmr1lib import attention, batching, faithful, grpo, occlusion, reading

N_CELLS = 2


spearman = reading.rank_correlation


def reward_correlation(model: Any, processor: Any, rows: list[dict[str, Any]],
                       group_size: int = 8) -> dict[str, dict[str, float]]:
    """Spearman of the faithful reward (region from each search vs exhaustive) across the
    scored trajectories of one batch of rollouts."""
    ctx = common.grpo_context(model, processor, "faithful_occlusion", prompts_per_step=len(rows),
                              group_size=group_size, max_new_tokens=32)
    policy = ctx.accelerator.unwrap_model(ctx.model)
    torch.manual_seed(0)
    groups = grpo.rollout(ctx, rows)
    batch = batching.build_sequences([g.row for g in groups], [g.tokens for g in groups], processor)
    with batching.eval_mode(policy), attention.AttentionCapture(
            policy, batch.query_positions, layers=ctx.layers) as cap:
        logits = batching.completion_logits(policy, batch.inputs, batch.completion_ids.shape[1])
    distinct = [faithful.distinct_correct(g.tokens, g.correct) for g in groups]
    scored = [d if len(d) >= 1 else [] for d in distinct]
    rewards: dict[str, dict[str, list[float]]] = {}
    for how in occlusion.SEARCHES:
        reward = dataclasses.replace(ctx.params.reward, occlusion_cells=N_CELLS,
                                     occlusion_search=how, concentration="top_kappa",
                                     faithful_std_floor=0.01)
        view = faithful.counterfactual_view(policy, processor, batch, rows, scored, reward,
                                            "occlusion")
        rewards[how] = {form: faithful.faithful_rewards(
            view, batch, logits, cap.attentions,
            dataclasses.replace(reward, faithful_form=form)).rewards
            for form in ("raw", "group_tanh")}
    mask = [i for i, ok in enumerate(c for g in groups for c in g.correct) if ok]
    out = {}
    for how in occlusion.SEARCHES:
        out[how] = {f"spearman_{form}": spearman([rewards[how][form][i] for i in mask],
                                                 [rewards["exhaustive"][form][i] for i in mask])
                    for form in ("raw", "group_tanh")}
        out[how]["n_scored"] = len(mask)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Both models, both measures; prints the table, writes ``runs/bench/occlusion_search.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="FocusShapes test_id images")
    parser.add_argument("--prompts", type=int, default=16, help="prompts of the rollout batch")
    parser.add_argument("--sft-steps", type=int, default=200, help="SFT steps of each model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    common.setup(args.threads)
    t0 = time.perf_counter()
    test_rows = common.make_rows(args.images, 112, "test_id")
    train_rows = common.make_rows(256, 112)
    results: dict[str, Any] = {}
    lines = []
    for variant in ("focus_anchor", "plain"):
        model, processor = common.sft_model(args.sft_steps, len(train_rows), variant)
        agree = occlusion.agreement(model, processor, test_rows, N_CELLS)
        corr = reward_correlation(model, processor, train_rows[:args.prompts])
        results[variant] = {"agreement": agree, "reward_correlation": corr}
        for how in occlusion.SEARCHES:
            a, c = agree[how], corr[how]
            lines.append([variant, how, a["top_cell_agreement"], a["overlap"],
                          c["spearman_raw"], c["spearman_group_tanh"], c["n_scored"],
                          1000 * a["time_per_image_s"],
                          occlusion.forwards_per_image(how, 4, 4, N_CELLS),
                          occlusion.forwards_per_image(how, 16, 16, N_CELLS)])
    title = (f"Occlusion searches vs exhaustive on {common.device_name()} ({args.images} FocusShapes "
             f"test_id images at 112 px, {N_CELLS} cells; rewards on {args.prompts} x 8 rollouts; "
             f"SFT {args.sft_steps} steps)")
    text = common.table(title, ["SFT", "search", "top cell in top-2", "overlap", "rho raw",
                                "rho group_tanh", "scored", "ms / image", "forwards 112 px",
                                "forwards 448 px"], lines)
    print(text)
    wall = time.perf_counter() - t0
    path = common.write_json("occlusion_search", {"results": results, "n_cells": N_CELLS,
                                                  "images": args.images, "table": text,
                                                  "wall_s": wall})
    print(f"\n{wall:.0f} s; wrote {path}")
    return results


if __name__ == "__main__":
    main()
