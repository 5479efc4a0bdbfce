"""The committed results are those of the current code's parameters, and the README shows them.

* The README's generated blocks (ablation table, claims, preconditions) equal what
  ``scripts/update_readme.py`` makes from ``figures/``: no number in them is typed.
* ``figures/claims.json`` and every line of ``figures/ablation.csv`` name the same commit and the
  hash of the study profile's parameters as they are now: a change of any parameter of the study
  (or of a stage default it inherits) fails here until ``make reproduce`` has run again.
* The claims in ``claims.json`` are what ``fmr1lib.claims`` computes from ``ablation.csv``.

The fast profile's numbers are checked against the code itself, by running it
(``notebooks/test_recorded_results.py``); the study profile takes too long for that.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fmr1lib import ablation, claims, config, repro, study_plots

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "figures"
STUDY = "study"


def _block(text: str, name: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    assert start in text and end in text, f"markers {start!r} / {end!r} missing"
    return text[text.index(start) + len(start):text.index(end)].strip()


def _doc() -> dict:
    return json.loads((FIGURES / "claims.json").read_text(encoding="utf-8"))


def _study_params() -> config.EvalParams:
    return config.load_params(config.EvalParams,
                              repro.resolve_path(f"params/{STUDY}/05_evaluation.yaml"))


@pytest.mark.parametrize("name", ablation.README_BLOCKS)
def test_readme_block_is_generated_from_the_committed_figures(name):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    expected = ablation.readme_blocks(FIGURES)[name]
    assert _block(readme, name) == expected.strip(), (
        f"README.md's {name} block differs from what figures/ gives: run "
        f".venv/bin/python scripts/update_readme.py")


def test_committed_results_were_made_with_the_current_study_params():
    doc = _doc()
    ep = _study_params()
    assert doc["profile"] == STUDY
    assert doc["seeds"] == list(ep.seeds)
    assert doc["params_sha256"] == ablation.study_params_hash(ep), (
        "figures/claims.json was made with other parameters than params/study/ resolve to now: "
        "run make reproduce (PROFILE=study) and commit figures/")
    with open(FIGURES / "ablation.csv", encoding="utf-8", newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert lines and {(r["commit"], r["params_sha256"]) for r in lines} == {
        (doc["commit"], doc["params_sha256"])}, "ablation.csv and claims.json come from different runs"
    assert not doc["commit"].endswith("+dirty") and doc["commit"] != "unknown", doc["commit"]


def test_committed_claims_recompute_from_the_committed_table():
    doc = _doc()
    long = study_plots.read_ablation_csv(FIGURES / "ablation.csv")
    again = claims.json_safe(claims.evaluate_claims(long, ablation.study_claims(_study_params()),
                                                    doc["seeds"]))
    assert [c["claim"] for c in again] == [c["claim"] for c in doc["claims"]]
    for old, new in zip(doc["claims"], again, strict=True):
        assert old["verdict"] == new["verdict"], (old, new)
        for key in ("diff_mean",):
            assert (old[key] is None and new[key] is None) or math.isclose(
                old[key], new[key], abs_tol=1e-5), (key, old, new)
        # The CSV rounds to 6 significant digits; the interval follows.
        for o, n in zip(old["ci95"], new["ci95"], strict=True):
            assert (o is None and n is None) or math.isclose(o, n, abs_tol=1e-4), (old, new)


def test_claims_json_holds_what_the_study_needs():
    doc = _doc()
    pre = doc["preconditions"]
    assert len(doc["seeds"]) >= 5
    for key in ("shortcut_baseline_conflict_accuracy", "rl_answer_change",
                "faithful_group_std_correct", "route_shares"):
        assert key in pre, key
    for c in doc["claims"]:
        assert set(c) >= {"claim", "metric", "split", "a", "b", "diff_mean", "ci95", "n_seeds",
                          "verdict"}
        assert c["verdict"] in claims.VERDICTS and c["n_seeds"] == len(doc["seeds"])
