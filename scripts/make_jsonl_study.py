"""Write the small region-annotated JSONL study under ``tests/data/jsonl_study/``.

Hand-made scenes (coloured shapes on a plain background, drawn with PIL) in the record schema of
docs/design.md §3.1, as a real-data source would provide them: images of several sizes, free-form
``meta`` without the FocusShapes generator facts (no task family, no shortcut cue), answers of
every ``answer_type``, and some records without evidence boxes (unannotated). The files are
committed; rerunning the script rewrites them byte for byte. Usage::

    python scripts/make_jsonl_study.py [--out tests/data/jsonl_study]
    python scripts/make_jsonl_study.py --out tests/data/jsonl_example --counts train=320 test_id=40 test_ood=40

The study's data params (``tests/data/jsonl_study/01_data_construction.yaml``) point
``source: jsonl`` at the three files; ``tests/test_jsonl_data.py`` trains and evaluates on them.
The second call writes the larger sample of the own-data example profile
(``params/jsonl_example/``, made by ``python -m fmr1lib profile new``; ``make test`` runs the
notebooks on it): 40 held-out records per split, enough boxed records for notebook 03 to test
anchoring's held-out effect (the 40-record study has 11).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220),
          "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"train": [(112, 112), (112, 84), (84, 112)], "test_id": [(112, 112), (112, 84)],
         "test_ood": [(140, 112), (112, 140)]}
BACKGROUNDS = {"train": (235, 235, 235), "test_id": (235, 235, 235), "test_ood": (210, 225, 240)}
COUNTS = {"train": 24, "test_id": 8, "test_ood": 8}
UNANNOTATED = 2
"""Records whose index is ``UNANNOTATED`` modulo 5 carry no evidence boxes (besides the ``no``
answers of the exists family, which have none to show)."""


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: list[int], color: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    xe, ye = x1 - 1, y1 - 1  # PIL boxes include their last pixel; record boxes are half-open
    xm, ym = (x0 + xe) / 2, (y0 + ye) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, xe, ye], fill=color)
    elif shape == "square":
        draw.rectangle([x0, y0, xe, ye], fill=color)
    elif shape == "triangle":
        draw.polygon([(xm, y0), (x0, ye), (xe, ye)], fill=color)
    else:
        draw.polygon([(xm, y0), (xe, ym), (xm, ye), (x0, ym)], fill=color)


def _place(rng: random.Random, size: tuple[int, int], n: int) -> list[list[int]]:
    """``n`` non-overlapping object boxes, one per 28 px cell, 14-22 px wide."""
    cols, rows = size[0] // 28, size[1] // 28
    cells = rng.sample([(r, c) for r in range(rows) for c in range(cols)], n)
    boxes = []
    for r, c in cells:
        side = rng.randint(14, 22)
        x0 = c * 28 + rng.randint(0, 28 - side)
        y0 = r * 28 + rng.randint(0, 28 - side)
        boxes.append([x0, y0, x0 + side, y0 + side])
    return boxes


def make_record(split: str, index: int, image_dir: Path) -> dict:
    """One scene and its record; the question family cycles color, count, exists, choice."""
    rng = random.Random(f"{split}-{index}")
    size = SIZES[split][index % len(SIZES[split])]
    names = rng.sample(list(COLORS), 3)
    shapes = rng.sample(SHAPES, 3)
    objects = [{"shape": s, "color": c} for s, c in zip(shapes, names, strict=True)]
    family = ("color", "count", "exists", "choice")[index % 4]
    if family == "count":  # add copies of the first shape, so the answer is 1, 2 or 3
        objects += [{"shape": shapes[0], "color": rng.choice(list(COLORS))}
                    for _ in range(rng.randint(0, 2))]
    for obj, box in zip(objects, _place(rng, size, len(objects)), strict=True):
        obj["box"] = box
    target = objects[0]
    if family == "color":
        question, answer, answer_type, choices = (f"What color is the {target['shape']}?",
                                                  target["color"], "word", None)
        evidence = [target["box"]]
    elif family == "count":
        same = [o for o in objects if o["shape"] == target["shape"]]
        question, answer, answer_type, choices = (f"How many {target['shape']}s are there?",
                                                  str(len(same)), "number", None)
        evidence = [o["box"] for o in same]
    elif family == "exists":
        present = rng.random() < 0.5
        color = target["color"] if present else next(c for c in COLORS if c not in names)
        question, answer, answer_type, choices = (f"Is there a {color} {target['shape']}?",
                                                  "yes" if present else "no", "yesno", None)
        evidence = [target["box"]] if present else []
    else:
        question, answer, answer_type = (f"Which shape is {target['color']}?", target["shape"],
                                         "choice")
        choices = sorted(shapes)
        evidence = [target["box"]]
    image = Image.new("RGB", size, BACKGROUNDS[split])
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj["shape"], obj["box"], COLORS[obj["color"]])
    name = f"{split}_{index:02d}.png"
    # A palette PNG of a few colours is a few hundred bytes.
    image.quantize(colors=8, dither=Image.Dither.NONE).save(image_dir / name, optimize=True)
    annotated = index % 5 != UNANNOTATED
    rec = {"id": f"study-{split}-{index:02d}", "image": f"images/{name}", "question": question,
           "answer": answer, "answer_type": answer_type, "choices": choices,
           "evidence_boxes": [[float(v) for v in b] for b in evidence] if annotated else []}
    if index % 3:  # meta is free-form and may be missing; never the FocusShapes facts
        rec["meta"] = {"source": "jsonl_study", "family": family}
    return rec


def _counts(items: list[str]) -> dict[str, int]:
    counts = dict(COUNTS)
    for item in items:
        split, sep, n = item.partition("=")
        if not sep or split not in COUNTS or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--counts {item!r}: expected SPLIT=N with SPLIT one of {list(COUNTS)}")
        counts[split] = int(n)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data"
                                             / "jsonl_study"))
    parser.add_argument("--counts", nargs="*", default=[], metavar="SPLIT=N",
                        help=f"records per split (default {COUNTS})")
    args = parser.parse_args(argv)
    out = Path(args.out)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for split, n in _counts(args.counts).items():
        lines = [json.dumps(make_record(split, i, image_dir)) for i in range(n)]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
