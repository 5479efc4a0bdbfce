"""The numbers the notebooks recorded equal the committed expectations.

nbval runs the notebooks with ``--nbval-lax``: no cell output is compared. This module sits in
``notebooks/`` and sorts after the ``.ipynb`` files, so ``pytest tests notebooks`` (``make test``)
collects it after every notebook cell: it then reads what each notebook recorded
(``runs/tiny/results/*.json``, notebook 05 in smoke mode) and compares it with
``tests/data/expected_results_tiny.json`` (counts and strings exactly, floats within the file's
``abs_tol``, wall times left out). A change in what the code produces fails here until the
expectations are regenerated with ``scripts/update_expected_results.py`` (tests/README.md).

A result file that is absent (only ``tests/`` ran, or the notebooks never ran here) skips its
test; one that is present and differs fails it. The expectations name the machine they were made
on (CPU model, torch's vector capability, torch version): a run on another kind of machine skips
the comparison, naming both, since training repeats bit for bit on one kind of machine only.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

# The tier of the notebooks it checks (tests/conftest.py keeps a tier marker set in the module).
pytestmark = pytest.mark.notebook

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("update_expected_results",
                                               ROOT / "scripts" / "update_expected_results.py")
expected_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(expected_results)

REGENERATE = ("FMR1_SMOKE=1 MPLBACKEND=Agg .venv/bin/python -m pytest notebooks --nbval-lax "
              "--nbval-current-env -q && .venv/bin/python scripts/update_expected_results.py")


def _expected() -> dict:
    return json.loads(expected_results.EXPECTED.read_text(encoding="utf-8"))


def test_expectations_cover_every_result_file():
    doc = _expected()
    assert sorted(doc["results"]) == sorted(expected_results.RESULT_FILES)
    assert 0 < doc["abs_tol"] <= 1e-4


@pytest.mark.parametrize("name", expected_results.RESULT_FILES, ids=lambda n: n.removesuffix(".json"))
def test_recorded_results_match_expectations(name):
    path = expected_results.RESULTS_DIR / name
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} absent: the notebooks did not run here "
                    "(make test runs them before this check)")
    doc = _expected()
    here = expected_results.machine()
    if doc.get("machine") != here:
        pytest.skip(f"the expectations were recorded on {doc.get('machine')}, this is {here}: "
                    "a CPU training run repeats bit for bit on one kind of machine only "
                    f"(to check here, regenerate: {REGENERATE})")
    actual = expected_results.comparable(json.loads(path.read_text(encoding="utf-8")))
    diffs = expected_results.differences(doc["results"][name], actual, abs_tol=doc["abs_tol"])
    shown = "\n  ".join(diffs[:25]) + (f"\n  ... and {len(diffs) - 25} more" if len(diffs) > 25 else "")
    hint = ("Values missing: did the notebook fail before recording them (see its cells above)? "
            if any(d.endswith(": missing") for d in diffs) else "")
    assert not diffs, (
        f"{path.relative_to(ROOT)} differs from tests/data/expected_results_tiny.json "
        f"({len(diffs)} values, abs_tol {doc['abs_tol']:g}):\n  {shown}\n"
        f"{hint}If the change is intended, regenerate the expectations: {REGENERATE}")
