"""Regenerate ``tests/data/expected_results_tiny.json``: the numbers the notebooks record.

Every notebook writes what it measured to ``runs/<profile>/results/*.json`` (``repro.Recorder``).
Under nbval the cells are run but their outputs are not compared (``--nbval-lax``), so
``notebooks/test_recorded_results.py`` compares those files, after the notebooks ran in
``make test``, with the expectations committed here. When a change to the code is meant to change
what the notebooks produce, run the notebooks as ``make test`` does (tiny profile, smoke mode),
then this script, and commit the new expectations with the change::

    FMR1_SMOKE=1 MPLBACKEND=Agg .venv/bin/python -m pytest notebooks --nbval-lax --nbval-current-env -q
    .venv/bin/python scripts/update_expected_results.py            # rewrite the expectations
    .venv/bin/python scripts/update_expected_results.py --check    # only list the differences

Compared: every recorded value except wall times (any key ending in ``_s`` or containing
``wall_time``). Strings, booleans, None and integers (counts, sizes) must be equal; floats
within ``ABS_TOL`` (training and evaluation on CPU repeat bit for bit on one machine; another CPU
or torch build can change the last bits, then regenerate); NaN equals NaN.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "runs" / "tiny" / "results"
EXPECTED = ROOT / "tests" / "data" / "expected_results_tiny.json"
# What `make test` writes: notebooks 01-04 as in `make reproduce`, notebook 05 in smoke mode.
RESULT_FILES = ("01_data_construction.json", "02_backbone.json", "03_anchoring.json",
                "04_counterfactual_rl.json", "05_evaluation_smoke.json")
ABS_TOL = 1e-6


def is_excluded(key: str) -> bool:
    """Keys left out of the comparison: wall times (``*_s``, ``*wall_time*``)."""
    return key.endswith("_s") or "wall_time" in key


def comparable(value: Any) -> Any:
    """``value`` without the excluded keys (at any depth)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if not is_excluded(str(k))}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def load_results(results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    """``{file name: comparable values}`` for the result files that exist."""
    out = {}
    for name in RESULT_FILES:
        path = Path(results_dir) / name
        if path.exists():
            out[name] = comparable(json.loads(path.read_text(encoding="utf-8")))
    return out


def differences(expected: Any, actual: Any, where: str = "", abs_tol: float = ABS_TOL) -> list[str]:
    """Every place where ``actual`` differs from ``expected``, as ``"path: expected != actual"``."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = [f"{where}/{k}: missing" for k in expected if k not in actual]
        out += [f"{where}/{k}: not expected" for k in actual if k not in expected]
        for k in expected:
            if k in actual:
                out += differences(expected[k], actual[k], f"{where}/{k}", abs_tol)
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{where}: {len(expected)} items expected, {len(actual)} found"]
        out = []
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            out += differences(e, a, f"{where}[{i}]", abs_tol)
        return out
    numbers = (int, float)
    if (isinstance(expected, numbers) and isinstance(actual, numbers)
            and not isinstance(expected, bool) and not isinstance(actual, bool)
            and (isinstance(expected, float) or isinstance(actual, float))):
        e, a = float(expected), float(actual)
        if math.isnan(e) and math.isnan(a):
            return []
        if math.isnan(e) or math.isnan(a) or not abs(e - a) <= abs_tol:
            return [f"{where}: {expected!r} != {actual!r}"]
        return []
    if type(expected) is not type(actual) or expected != actual:
        return [f"{where}: {expected!r} != {actual!r}"]
    return []


def machine() -> dict[str, str]:
    """What decides the last bits of a CPU training run: the CPU model, the vector instructions
    torch dispatches to and the torch build. Training repeats bit for bit on one machine; on
    another CPU a 200-step run can end elsewhere (seen: anchored `test_id` accuracy 0.48 on one
    host, 0.64 on another, with identical inputs and code)."""
    import platform

    import torch

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or "unknown"
    return {"cpu": model, "arch": platform.machine(),
            "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--out", type=Path, default=EXPECTED)
    ap.add_argument("--check", action="store_true",
                    help="list the differences with --out instead of rewriting it (exit 1 if any)")
    args = ap.parse_args(argv)
    results = load_results(args.results_dir)
    missing = [n for n in RESULT_FILES if n not in results]
    if args.check:
        expected = json.loads(args.out.read_text(encoding="utf-8"))["results"]
        diffs = [f"{n}{d}" for n in expected if n in results
                 for d in differences(expected[n], results[n])]
        print("\n".join(diffs) or "no differences", f"\n(absent: {missing})" if missing else "")
        return 1 if diffs else 0
    if missing:
        print(f"missing result files in {args.results_dir}: {missing}; run the notebooks first "
              "(see this script's docstring)", file=sys.stderr)
        return 2
    doc = {
        "about": ("Numbers the notebooks record (runs/tiny/results/*.json) in `make test` "
                  "(tiny profile, notebook 05 in smoke mode), wall times left out. Checked by "
                  "notebooks/test_recorded_results.py; regenerated by "
                  "scripts/update_expected_results.py."),
        "abs_tol": ABS_TOL,
        "machine": machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({len(results)} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
