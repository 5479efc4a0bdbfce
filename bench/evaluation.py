"""Benchmark 6: the evaluation pass, batched vs separate passes.

``evaluation.evaluate_split`` answers each example greedily on the original image and on both
intervened views, and reads the ``<Focus>`` row and the answer rows. ``batched=True`` (the
default) generates the three views of a batch in one call and reads both kinds of rows from one
teacher-forced forward; ``batched=False`` runs the five passes apart (three generations, the
prompt-only forward, the answer forward). Both run interleaved in one process on FocusShapes
``test_ood`` with its views, batch 50, 24 new tokens:

* ``112 px``: the tiny backbone after a short SFT (``focus_anchor``, 200 steps: it answers and
  stops, as the evaluated models do);
* ``448 px``: the freshly initialised tiny backbone (its greedy answers run to the length limit).

Reports examples per second and checks that the two give the same records (every field equal,
floats to 1e-5).

    python bench/evaluation.py                # about 2 min on 2 cores
    python bench/evaluation.py --examples 50 --repeats 2
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

from fmr1lib import config, data, evaluation


def same_records(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[int, float]:
    """``(fields that differ, largest float difference)`` between two lists of records."""
    differ, worst = 0, 0.0
    for x, y in zip(a, b, strict=True):
        for k in x.keys() | y.keys():
            u, v = x.get(k), y.get(k)
            if isinstance(u, float) and isinstance(v, float):
                worst = max(worst, abs(u - v))
                differ += abs(u - v) > 1e-5
            else:
                differ += u != v
    return differ, worst


def run(name: str, model: Any, processor: Any, px: int, n: int, repeats: int) -> dict[str, Any]:
    p = config.DataParams(image_size=px)
    ds = data.add_counterfactual_views(data.make_split(p, "test_ood", n), p)
    out: dict[str, list[dict[str, Any]]] = {}

    def make(batched: bool) -> Any:
        def call() -> Any:
            out[str(batched)] = evaluation.evaluate_split(
                model, processor, ds, evaluation.Settings(batch_size=50, batched=batched))
            return None
        return call

    times = common.interleaved({"separate": make(False), "batched": make(True)}, repeats=repeats,
                               warmup=1)
    med = {k: common.median(v) for k, v in times.items()}
    differ, worst = same_records(out["True"], out["False"])
    return {"name": name, "px": px, "examples": len(ds), "median_s": med, "times_s": times,
            "examples_per_s": {k: len(ds) / v for k, v in med.items()},
            "fields_differing": differ, "max_float_diff": worst}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Both sizes; prints the table, writes ``runs/bench/evaluation.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="test_ood examples per size")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    common.setup(args.threads)
    t0 = time.perf_counter()
    sft, processor = common.sft_model(200, 256, "focus_anchor")
    fresh, processor448 = common.build_model(448)
    results = [run("SFT tiny", sft, processor, 112, args.examples, args.repeats),
               run("fresh tiny", fresh, processor448, 448, args.examples, args.repeats)]
    lines = [[r["name"], r["px"], r["examples"], r["examples_per_s"]["separate"],
              r["examples_per_s"]["batched"], r["median_s"]["separate"] / r["median_s"]["batched"],
              r["fields_differing"], format(r["max_float_diff"], ".1e")] for r in results]
    text = common.table(f"evaluate_split, batched vs separate passes on {common.device_name()} "
                        f"(test_ood with views, batch 50, 24 new tokens; median of {args.repeats})",
                        ["model", "px", "examples", "separate ex/s", "batched ex/s", "speed-up",
                         "fields differing", "max float diff"], lines)
    print(text)
    wall = time.perf_counter() - t0
    path = common.write_json("evaluation", {"results": results, "table": text, "wall_s": wall})
    print(f"\n{wall:.0f} s; wrote {path}")
    return {"results": results}


if __name__ == "__main__":
    main()
