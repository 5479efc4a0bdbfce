"""Benchmark 3: how the time of one GRPO step grows with G, completion length and image size.

One axis at a time, the others at P = 4 prompts, G = 8 samples, 32 new tokens, 112 px:

* ``group_size``: G = 2, 4, 8, 16;
* ``completion_len``: 8, 16, 32, 64 new tokens;
* ``image_px``: 112, 224, 336, 448 px images (4x4 to 16x16 image tokens).

Every completion runs to the length limit: the model's ``generation_config.min_new_tokens`` is
set to ``max_new_tokens``, so ``<|im_end|>`` is masked until then (sampling otherwise unchanged)
and a step's work does not depend on when a sample happens to stop. The model is the tiny
backbone freshly initialised (its answers do not matter here) with the ``grpo`` variant
(accuracy + format). The points of an axis are interleaved in one process; the exponent is
the least-squares slope of log(time) on log(x): time ~ x^k.

    python bench/scaling.py               # about 1-2 min on 2 cores
    python bench/scaling.py --repeats 2
"""

from __future__ import annotations

import argparse
import time
from typing import Any

# common first: it silences tqdm, which torch imports.
try:
    from bench import common
except ImportError:  # run as a script: bench/ itself is on sys.path
    import common  # type: ignore[no-redef]

from fmr1lib import grpo

BASE = {"group_size": 8, "max_new_tokens": 32, "image_px": 112}
AXES = {
    "group_size": [2, 4, 8, 16],
    "max_new_tokens": [8, 16, 32, 64],
    "image_px": [112, 224, 336, 448],
}


def run_axis(axis: str, values: list[int], model: Any, processor: Any, repeats: int,
             rows_by_px: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Interleaved step times for the points of one axis."""
    contexts, rows = {}, {}
    for v in values:
        point = {**BASE, axis: v}
        contexts[v] = common.grpo_context(
            model, processor, "grpo", min_new_tokens=point["max_new_tokens"],
            prompts_per_step=4, group_size=point["group_size"],
            max_new_tokens=point["max_new_tokens"])
        rows[v] = rows_by_px[point["image_px"]]
    step = {"n": 0}
    lengths: dict[int, list[float]] = {v: [] for v in values}

    def make(v: int) -> Any:
        def call() -> Any:
            stats, _ = grpo.grpo_step(contexts[v], rows[v], step["n"] // len(values))
            step["n"] += 1
            return stats
        return call

    def record(name: str, stats: Any) -> None:
        lengths[int(name)].append(stats["completion_len"])

    times = common.interleaved({str(v): make(v) for v in values}, repeats=repeats, warmup=1,
                               on_result=record)
    med = [common.median(times[str(v)]) for v in values]
    return {"values": values, "median_s": med, "times_s": times,
            "completion_len": [sum(lengths[v]) / len(lengths[v]) for v in values],
            "exponent": common.loglog_slope(values, med),
            # The fixed cost per step flattens the low end; the last two points show the trend.
            "exponent_last_two": common.loglog_slope(values[-2:], med[-2:])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the three axes, print the tables, write ``runs/bench/scaling.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per point")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    common.setup(args.threads)
    t0 = time.perf_counter()
    model, processor = common.build_model(max(AXES["image_px"]))
    rows_by_px = {px: common.make_rows(16, px) for px in AXES["image_px"]}
    results = {axis: run_axis(axis, values, model, processor, args.repeats, rows_by_px)
               for axis, values in AXES.items()}
    lines = []
    for axis, r in results.items():
        base = r["median_s"][r["values"].index(BASE[axis])]
        for v, m, n in zip(r["values"], r["median_s"], r["completion_len"], strict=True):
            lines.append([axis, v, m, m / base, n])
    title = (f"GRPO step time vs G, completion length and image size on {common.device_name()} "
             f"(P=4; others at G=8, 32 tokens, 112 px; completions forced to the length limit; "
             f"median of {args.repeats})")
    text = common.table(title, ["axis", "value", "step s", "/ base point", "mean len"], lines)
    exps = {axis: r["exponent"] for axis, r in results.items()}
    last = {axis: r["exponent_last_two"] for axis, r in results.items()}
    # Image tokens grow as the square of the side.
    exps["image_tokens"], last["image_tokens"] = exps["image_px"] / 2, last["image_px"] / 2
    fit = common.table("Fitted exponents (time ~ x^k, log-log least squares)",
                       ["x", "k (all 4 points)", "k (last 2 points)"],
                       [[k, v, last[k]] for k, v in exps.items()])
    print(text + "\n\n" + fit)
    wall = time.perf_counter() - t0
    path = common.write_json("scaling", {"base": BASE, "axes": results, "exponents": exps,
                                         "exponents_last_two": last,
                                         "repeats": args.repeats,
                                         "forced_length": "generation_config.min_new_tokens = "
                                                          "max_new_tokens",
                                         "table": text + "\n\n" + fit, "wall_s": wall})
    print(f"\n{wall:.0f} s; wrote {path}")
    return {"exponents": exps, "exponents_last_two": last}


if __name__ == "__main__":
    main()
