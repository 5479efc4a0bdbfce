"""What each faithful-reward candidate does in training: one side run per candidate.

From the study's plain-SFT start (seed 0 by default), trains ``faithful_plain`` for the study's
40 steps once per concentration candidate (and once as plain GRPO, ``w_faith 0``), then reports
for each run the within-group rank correlation of its reward with ``reading`` (from its own
stage-2 log), the cue-dependent share of its scored rollouts (first and last five steps), and its
greedy ``test_ood`` conflict accuracy and reasoning-route shares. Single runs, not a study: they
show the direction each candidate pushes, with no interval (docs/design.md §6.6).

    python scripts/candidate_effects.py            # after make reproduce (needs runs/study)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from fmr1lib import claims, config, evaluation, grpo, repro, stages

CANDIDATES = {
    "GRPO (no faithful reward)": {"w_faith": 0.0},
    "top_kappa (kappa 4), summed, floor 0.01 (the paper's literal reading, the old default)":
        {"concentration": "top_kappa", "faithful_advantage": "summed", "faithful_std_floor": 0.01},
    "top_kappa (kappa 4)": {"concentration": "top_kappa", "faithful_std_floor": 0.01},
    "weighted": {"concentration": "weighted", "faithful_std_floor": 0.01},
    "relative (rho 0.5)": {"concentration": "relative", "faithful_std_floor": 0.01},
    "dependency (default)": {},
}
"""Overrides of the study's stage-2 params per run (the rest: the study's, i.e. the defaults)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/study/05_evaluation.yaml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    ep = config.load_params(config.EvalParams, repro.resolve_path(args.params))
    _, _, rp = stages.seed_params(ep, args.seed)
    dsd = stages.stage_data(rp)
    start = stages.ensure_trained(ep, "plain_sft", args.seed, dsd)
    results = []
    for name, over in CANDIDATES.items():
        p = config.replace_values(rp, **over, resume=False, checkpoint_every=0)
        repro.seed_everything(p.seed)
        model, processor = stages.load_model(start, p, "03_anchoring")
        with tempfile.TemporaryDirectory() as tmp:
            res = grpo.train_grpo(model, processor, dsd[p.train_split], p, Path(tmp),
                                  "faithful_plain")
        recs = evaluation.evaluate_split(
            model, processor, dsd["test_ood"],
            evaluation.Settings(n=ep.eval_n, batch_size=ep.eval_batch_size, views=False),
            desc=name[:20])
        steps = res.metrics
        validity = claims.validity_summary([steps])
        out = {"candidate": name, "overrides": over,
               "spearman": validity["seed_values"][0], "groups": validity["n_groups"][0],
               "cue_share_first": claims.mean_or_nan([m.get("reading_cue_share") for m in steps[:5]]),
               "cue_share_last": claims.mean_or_nan([m.get("reading_cue_share") for m in steps[-5:]]),
               "conflict_accuracy": float(np.mean([r["correct"] for r in recs
                                                   if r.get("cue_agrees") is False])),
               "routes": claims.route_shares(recs)}
        results.append(out)
        print(json.dumps(out), flush=True)
    print("\n| run | reward–reading rank corr. (groups) | cue-dependent share, first → last 5 steps "
          "| test_ood conflict accuracy | greedy routes: evidence / cue |")
    print("| --- | --- | --- | --- | --- |")
    def num(x: float, fmt: str = ".2f") -> str:
        return format(x, fmt) if np.isfinite(x) else "–"

    for r in results:
        print(f"| {r['candidate']} | {num(r['spearman'], '+.2f')} ({r['groups']}) | "
              f"{num(r['cue_share_first'])} → {num(r['cue_share_last'])} | "
              f"{r['conflict_accuracy']:.3f} | "
              f"{r['routes']['evidence']:.2f} / {r['routes']['cue']:.2f} |")
    path = Path(args.out or repro.run_dir(ep, "candidate_effects.json", create=False))
    path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print("wrote", path)


if __name__ == "__main__":
    main()
