"""Rewrite the README's generated blocks (the ablation table, the claims, the preconditions) from
``figures/ablation.md`` and ``figures/claims.json``, as ``make reproduce`` left them::

    .venv/bin/python scripts/update_readme.py           # rewrite README.md
    .venv/bin/python scripts/update_readme.py --check   # exit 1 if README.md differs

``tests/test_readme_results.py`` fails while the README holds anything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmr1lib import ablation  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether it differs")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    old = readme.read_text(encoding="utf-8")
    new = ablation.replace_blocks(old, ablation.readme_blocks(ROOT / "figures"))
    if args.check:
        print("README.md is up to date" if new == old else "README.md differs from figures/")
        return int(new != old)
    readme.write_text(new, encoding="utf-8")
    print("README.md: blocks", ", ".join(ablation.README_BLOCKS), "rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
