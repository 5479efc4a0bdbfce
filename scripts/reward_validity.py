"""Reward validity on the study's models: each faithful-reward candidate against ``reading``.

For each seed and start model (plain SFT: correct rollouts that differ in what they read;
anchoring: the stage-2 start), samples G rollouts on the first ``--prompts`` train prompts along
the stage-2 code path and prints, per candidate, the mean within-group rank correlation of the
reward with the causal ``reading`` (``fmr1lib.validity``). Writes ``runs/<profile>/validity.json``.

    python scripts/reward_validity.py --seeds 0 1 2 --prompts 48
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fmr1lib import config, reading, records, repro, stages, validity


def _paper(**kw: object) -> config.RewardParams:
    """A candidate: the paper's literal reading (``top_kappa``, std floor 0.01) but for ``kw``."""
    return config.RewardParams(**{"concentration": "top_kappa", "faithful_std_floor": 0.01, **kw})


CANDIDATES = {
    "top_kappa (kappa 4)": _paper(kappa=4),
    "top_kappa (kappa 1)": _paper(kappa=1),
    "weighted": _paper(concentration="weighted"),
    "relative (rho 0.5)": _paper(concentration="relative", relative_rho=0.5),
    "dependency": _paper(concentration="dependency"),
    "top_kappa (kappa 8)": _paper(kappa=8),
    "top_kappa (kappa 4) + floor": _paper(kappa=4, min_dependency=0.1),
    "top_kappa (kappa 4) + floor 0.5": _paper(kappa=4, min_dependency=0.5),
    "weighted + floor": _paper(concentration="weighted", min_dependency=0.1),
    "relative (rho 0.5) + floor": _paper(concentration="relative", min_dependency=0.1),
}
"""The candidates (``floor``: ``min_dependency`` 0.1 nats)."""


def table_markdown(results: list[dict]) -> str:
    """Per candidate, the mean within-group rank correlation with ``reading`` on each seed (its
    number of groups) and the mean over seeds, for each start model; then the instrument check."""
    rows = sorted({r["row"] for r in results}, key=lambda r: r != "plain_sft")
    head = " | ".join(f"{r}: seeds {' / '.join(str(x['seed']) for x in results if x['row'] == r)} "
                      f"(groups) | mean" for r in rows)
    lines = [f"| candidate | {head} |", "| --- |" + " --- | --- |" * len(rows)]
    for name in results[0]["candidates"]:
        cells = []
        for row in rows:
            rs = [r for r in results if r["row"] == row]
            m = [r["candidates"][name]["spearman_mean"] for r in rs]
            g = [r["candidates"][name]["n_groups"] for r in rs]
            cells += [" / ".join(f"{x:+.2f} ({k})" for x, k in zip(m, g, strict=True)), f"{np.nanmean(m):+.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| start model | cue-dependent share of distinct correct rollouts | evidence answers with "
              "reading > 0 (n) | cue answers with reading < 0 (n) |", "| --- | --- | --- | --- |"]
    for row in rows:
        rs = [r for r in results if r["row"] == row]
        spread = " / ".join(f"{r['reading_spread']:.2f}" for r in rs)
        ev = " / ".join(f"{r['instrument']['evidence_positive']:.2f} ({r['instrument']['n_evidence']})"
                        for r in rs)
        cue = " / ".join(f"{r['instrument']['cue_negative']:.2f} ({r['instrument']['n_cue']})" for r in rs)
        lines.append(f"| {row} | {spread} | {ev} | {cue} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/study/05_evaluation.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=["plain_sft", "anchoring"])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--reading", default="logprob", choices=reading.READINGS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", default=None, metavar="JSON",
                    help="print the markdown table of a results file and stop")
    args = ap.parse_args()
    if args.table:
        with open(args.table) as fh:
            print(table_markdown(json.load(fh)))
        return
    torch.set_num_threads(1)
    ep = config.load_params(config.EvalParams, repro.resolve_path(args.params))
    results = []
    for seed in args.seeds:
        _, _, rp = stages.seed_params(ep, seed)
        dsd = stages.stage_data(rp)
        rows = [dsd[rp.train_split][i] for i in range(args.prompts)]
        for row in args.rows:
            folder = stages.ensure_trained(ep, row, seed, dsd)
            model, processor = stages.load_model(folder, rp, "03_anchoring")
            model.eval()
            t0 = time.perf_counter()
            got = validity.measure(model, processor, rows, rp, CANDIDATES, seed=seed, how=args.reading)
            got.update(seed=seed, row=row, reading=args.reading, seconds=time.perf_counter() - t0)
            conflict = [r for r in dsd["test_ood"] if records.decode_meta(r["meta"]).get(
                "shortcut_agrees") is False][:args.prompts]
            got["instrument"] = validity.instrument_check(model, processor, conflict, rp, seed=seed,
                                                          how=args.reading)
            results.append(got)
            print(f"seed {seed} {row}: {got['n_correct']} correct, {got['n_distinct']} distinct, "
                  f"cue-dependent share {got['reading_spread']:.2f} ({got['seconds']:.0f} s)")
            ins = got["instrument"]
            print(f"  instrument on conflict prompts: {ins['n_evidence']} answers from the evidence "
                  f"({ins['evidence_positive']:.2f} with reading > 0), {ins['n_cue']} from the cue "
                  f"({ins['cue_negative']:.2f} with reading < 0)")
            for name, c in got["candidates"].items():
                print(f"  {name:30s} spearman {c['spearman_mean']:+.2f}  positive "
                      f"{c['positive_share']:.2f}  groups {c['n_groups']}")
    out = args.out or str(repro.run_dir(ep, f"validity_{args.reading}.json", create=False))
    with open(out, "w") as fh:
        json.dump(results, fh, indent=1, default=float)
    print(table_markdown(results))
    print("wrote", out)


if __name__ == "__main__":
    main()
