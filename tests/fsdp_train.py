"""Stage 1 (anchoring, full fine-tuning) of the tiny backbone under FSDP, whole or stopped and resumed.

Run by ``tests/test_fsdp.py`` under ``accelerate launch`` with
``params/accelerate/cpu_fsdp_2proc.yaml`` (two CPU processes, gloo, FSDP2); never collected by
pytest (its name does not start with ``test_``). ``--run`` names the runs, done in order, each
from a freshly built model with its own accelerator, in its own folder under ``--out``:

* ``full``: all ``--steps`` steps, then ``stages.save_stage`` (``full/model/``);
* ``part``: stops after ``--stop-after`` steps, as if killed (``part/checkpoints/`` only);
* ``resume``: continues ``part`` from its latest checkpoint to the end (weights, optimiser state,
  schedule and RNG read back from disk), then saves (``part/model/``).

Each run that ends also writes ``<run>_gathered.safetensors``: the trained model's full state,
gathered from both processes' shards. ``shapes.json`` holds the unsharded parameter shapes.

    accelerate launch --config_file params/accelerate/cpu_fsdp_2proc.yaml tests/fsdp_train.py --out DIR --run full part resume
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors.torch import save_file

from fmr1lib import anchoring, config, data, modeling, repro, stages, train

GLOBAL_BATCH = 8
"""Examples per optimiser step over all processes (``batch_size`` is per process)."""


def anchor_params(steps: int, world: int, resume: bool) -> config.AnchorParams:
    """Full fine-tuning, a checkpoint every step, a warm-up then a cosine decay.

    AdamW at ``lr = 1e-3`` moves every element by about ``lr`` per step from its moments: a
    resume that lost or mis-sharded the optimiser state ends visibly elsewhere.
    """
    return config.load_params(config.AnchorParams, steps=steps, batch_size=GLOBAL_BATCH // world,
                              lr=1e-3, lr_warmup_steps=1, lr_schedule="cosine", log_every=1,
                              checkpoint_every=1, grad_clip=1.0, lora=False,
                              freeze_vision=False, resume=resume)


def run(name: str, out: Path, args: argparse.Namespace) -> None:
    """One run (see the module docstring) from the seeded tiny backbone.

    Each run has its own accelerator, as each stage has: accelerate's gradient clipping looks
    the model up among those the accelerator prepared.
    """
    acc = train.make_accelerator(config.load_params(config.AnchorParams))
    if acc.distributed_type != DistributedType.FSDP:
        raise SystemExit(f"expected FSDP, got {acc.distributed_type}")
    repro.seed_everything(0)
    model, processor = modeling.build_tiny_backbone(config.load_params(config.BackboneParams),
                                                    seed=0)
    if acc.is_main_process:
        shapes = {n: list(p.shape) for n, p in model.named_parameters()}
        (out / "shapes.json").write_text(json.dumps(shapes))
    rows = data.make_split(config.DataParams(), "train", 32)
    folder = out / ("full" if name == "full" else "part")
    ap = anchor_params(args.steps, acc.num_processes, resume=name == "resume")
    res = anchoring.train_supervised(model, processor, rows, ap, folder, variant="focus_anchor",
                                     accelerator=acc,
                                     hooks=train.Hooks(stop_after=args.stop_after if name == "part" else None))
    if name == "part":
        assert res.steps == args.stop_after
        return
    assert res.steps == args.steps
    stages.save_stage(model, processor, ap, acc, folder, "focus_anchor", res)
    gathered = acc.get_state_dict(model)  # FSDP2 wrapped ``model`` in place
    if acc.is_main_process:
        # Tied weights share storage, which safetensors refuses: save copies.
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in gathered.items()},
                  str(out / f"{name}_gathered.safetensors"))
    acc.wait_for_everyone()


def main() -> None:
    """Do the runs of ``--run`` in order."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--run", nargs="+", choices=("full", "part", "resume"), required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--stop-after", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    for name in args.run:
        run(name, out, args)
    train.make_accelerator(config.load_params(config.AnchorParams)).end_training()


if __name__ == "__main__":
    main()
