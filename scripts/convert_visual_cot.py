"""Convert Visual CoT (JSONL with ``bboxs``) to fmr1 records JSONL.

A thin wrapper over ``python -m fmr1lib.converters convert --format visual_cot``, for the real-data
step of 01_data_construction on the GPU profiles. Usage::

    python scripts/convert_visual_cot.py --src viscot.jsonl --out data/train.jsonl \\
        --image-root /data/viscot/images [--on-bad-record skip]
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from fmr1lib.converters import main
except ImportError:  # run from a checkout where the package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fmr1lib.converters import main

if __name__ == "__main__":
    raise SystemExit(main(["convert", "--format", "visual_cot", *sys.argv[1:]]))
