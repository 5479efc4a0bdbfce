"""A few steps of stage 1 (and one of stage 2) on the tiny backbone, on 1 or N processes.

Run by ``tests/test_multiprocess.py``, once under ``accelerate launch --num_processes 2`` and
once as a plain single process with the same *global* batch; never collected by pytest (its
name does not start with ``test_``). Every process writes what the test compares into
``--out``:

* ``anchor/``: ``metrics.jsonl`` and ``checkpoints/`` of stage 1 (main process only);
* ``rank<r>_anchor.safetensors``: that process's parameters after stage 1;
* ``rank<r>_rl.safetensors`` and ``rank<r>_rl.json`` (with ``--rl``): its parameters after one
  GRPO step, the completions it sampled, and the step's loss.

Stage 2 trains on copies of one record, so both processes get the same prompt: their
completions differ only if their sampling RNGs do.

    accelerate launch --config_file params/accelerate/cpu_2proc.yaml tests/mp_train.py --out DIR --rl
    python tests/mp_train.py --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fmr1lib import anchoring, config, data, grpo, modeling, repro, train

GLOBAL_BATCH = 8
"""Examples per optimiser step over all processes (``batch_size`` is per process)."""


def _params_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters()}


def main() -> None:
    """Train, then write the artifacts listed in the module docstring."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rl", action="store_true", help="also run one GRPO step")
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)

    # The library's own accelerator: under `accelerate launch` on a machine without GPUs it
    # joins the processes in a CPU (gloo) group.
    acc = train.make_accelerator(config.load_params(config.AnchorParams))
    world, rank = acc.num_processes, acc.process_index
    if GLOBAL_BATCH % world:
        raise SystemExit(f"global batch {GLOBAL_BATCH} does not split over {world} processes")
    repro.seed_everything(0)
    bp = config.load_params(config.BackboneParams)
    model, processor = modeling.build_tiny_backbone(bp, seed=0)
    rows = data.make_split(config.DataParams(), "train", 32)

    # A warm-up and a cosine decay inside the run make any extra scheduler step visible in lr.
    ap = config.load_params(config.AnchorParams, steps=args.steps, batch_size=GLOBAL_BATCH // world,
                            lr=1e-3, lr_warmup_steps=1, lr_schedule="cosine", log_every=1,
                            checkpoint_every=1, grad_clip=1.0)
    res = anchoring.train_supervised(model, processor, rows, ap, out / "anchor",
                                     variant="focus_anchor", accelerator=acc)
    # Training updated ``model`` in place (``res`` holds the logs); DDP only wrapped it.
    assert res.steps == args.steps
    save_file(_params_state(model), str(out / f"rank{rank}_anchor.safetensors"))

    if args.rl:
        same = [rows[0]] * 16
        rp = config.load_params(config.RLParams, steps=1, prompts_per_step=2, group_size=4,
                                max_new_tokens=8, lr=5e-4, lambda_attn_rl=0.1,
                                checkpoint_every=0)
        ctx = grpo.setup_grpo(model, processor, rp, "grpo", accelerator=acc)
        first, _ = grpo.collect_groups(ctx, same, 0)
        again, _ = grpo.collect_groups(ctx, same, 0)
        stats, _ = grpo.grpo_step(ctx, same, 0)
        acc.wait_for_everyone()
        unwrapped = acc.unwrap_model(ctx.model)
        save_file(_params_state(unwrapped), str(out / f"rank{rank}_rl.safetensors"))
        (out / f"rank{rank}_rl.json").write_text(json.dumps({
            "tokens": [g.tokens for g in first],
            "tokens_again": [g.tokens for g in again],
            "loss": stats["loss"], "lr": stats["lr"], "world": world}))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
