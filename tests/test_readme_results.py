"""The README's results block is the committed ablation table, never an older copy of it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _block(text: str, start: str, end: str) -> str:
    assert start in text and end in text, f"markers {start!r} / {end!r} missing"
    return text[text.index(start) + len(start):text.index(end)].strip()


def test_readme_results_block_equals_the_ablation_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = (ROOT / "figures" / "ablation.md").read_text(encoding="utf-8")
    block = _block(readme, "<!-- results:start -->", "<!-- results:end -->")
    assert block == table[table.index("**test_id**"):].strip(), (
        "README.md's results block differs from figures/ablation.md: copy the table from "
        "figures/ablation.md (written by make reproduce) into the block")
