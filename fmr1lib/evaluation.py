"""Accuracy and faithfulness metrics (DESIGN.md section 8).

* answers: greedy decoding, accuracy, format rate, and how often the answer equals the
  shortcut cue (``cue_rate``) or, among wrong answers, equals it (``wrong_is_cue``);
* faithful perception: the ``<Focus>`` token's attention mass inside the evidence and the
  pointing game (its argmax image cell lies in the evidence).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fmr1lib import anchoring, attention, modeling, prompting, records

logger = logging.getLogger(__name__)


def _subset(ds: Any, n: int) -> Any:
    return ds if not n or n >= len(ds) else ds.select(range(n))


@torch.no_grad()
def predict_answers(model: Any, processor: Any, ds: Any, n: int = 0, batch_size: int = 50,
                    max_new_tokens: int = 24, image_column: str = "image") -> list[dict[str, Any]]:
    """Greedy responses for the first ``n`` rows (all if 0), with parsed answers.

    Returns:
        One dict per row: ``id``, ``response``, ``pred`` (None if unparsable), ``answer``,
        ``correct``, ``well_formed``, ``cue`` (the shortcut value or None).
    """
    model.eval()
    ds = _subset(ds, n)
    out: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(ds), batch_size), desc="generate", leave=False):
        rows = [ds[i] for i in range(start, min(len(ds), start + batch_size))]
        if image_column != "image":
            rows = [{**r, "image": r[image_column]} for r in rows]
        batch = anchoring.encode_batch(rows, processor, with_response=False)
        _, texts = modeling.generate(model, processor, batch.inputs, max_new_tokens=max_new_tokens)
        for r, text in zip(rows, texts, strict=True):
            pred = prompting.parse_answer(text)
            meta = records.decode_meta(r["meta"])
            out.append({"id": r["id"], "response": text, "pred": pred, "answer": r["answer"],
                        "correct": prompting.answers_match(pred, r["answer"], r["answer_type"]),
                        "well_formed": prompting.is_well_formed(text),
                        "cue": meta.get("shortcut_value")})
    return out


def answer_metrics(preds: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy, format rate, cue rate and the share of wrong answers equal to the cue.

    >>> answer_metrics([{"correct": True, "well_formed": True, "pred": "red", "cue": "red"},
    ...                 {"correct": False, "well_formed": True, "pred": "blue", "cue": "blue"}])
    {'accuracy': 0.5, 'format_rate': 1.0, 'cue_rate': 1.0, 'wrong_is_cue': 1.0, 'n': 2}
    """
    if not preds:
        return {"accuracy": float("nan"), "format_rate": float("nan"), "cue_rate": float("nan"),
                "wrong_is_cue": float("nan"), "n": 0}
    cued = [p for p in preds if p.get("cue") is not None]
    wrong = [p for p in cued if not p["correct"]]
    return {
        "accuracy": float(np.mean([p["correct"] for p in preds])),
        "format_rate": float(np.mean([p["well_formed"] for p in preds])),
        "cue_rate": float(np.mean([p["pred"] == p["cue"] for p in cued])) if cued else float("nan"),
        "wrong_is_cue": float(np.mean([p["pred"] == p["cue"] for p in wrong])) if wrong else float("nan"),
        "n": len(preds),
    }


@torch.no_grad()
def focus_attention(model: Any, processor: Any, rows: Sequence[dict[str, Any]],
                    layers: Any = "last_half", batch_size: int = 50) -> list[dict[str, Any]]:
    """The ``<Focus>`` token's layer-averaged attention over each sample's image grid.

    Returns:
        Per row: ``grid`` (``[rows, cols]`` numpy, sums to 1), ``target`` (same shape, from
        the evidence boxes; zeros when there are none), ``id``.
    """
    model.eval()
    idx = anchoring.resolve_layers(layers, anchoring.num_text_layers(model))
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = list(rows[start:start + batch_size])
        batch = anchoring.encode_batch(chunk, processor, with_response=False)
        with attention.AttentionCapture(model, batch.focus_pos[:, None], layers=idx) as cap:
            model(**batch.inputs)
        dists = anchoring.focus_distributions(cap.attentions, batch, image_token_id)
        for b, (row, p) in enumerate(zip(chunk, dists, strict=True)):
            thw = batch.inputs["image_grid_thw"][b]
            grid = attention.to_grid(p.mean(0), thw).cpu().numpy()
            target = modeling.boxes_to_grid([list(x) for x in row["evidence_boxes"]],
                                            row["image"].size, thw).numpy()
            out.append({"id": row["id"], "grid": grid, "target": target})
    return out


def perception_metrics(maps: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean Focus mass inside the evidence and pointing-game accuracy (rows with evidence).

    >>> g = np.array([[0.9, 0.1], [0.0, 0.0]]); t = np.array([[1.0, 0.0], [0.0, 0.0]])
    >>> perception_metrics([{"grid": g, "target": t}])
    {'focus_mass': 0.9, 'pointing': 1.0, 'n': 1}
    """
    masses, hits = [], []
    for m in maps:
        inside = m["target"] > 0
        if not inside.any():
            continue
        masses.append(float(m["grid"][inside].sum()))
        hits.append(bool(inside.flat[int(np.argmax(m["grid"]))]))
    if not masses:
        return {"focus_mass": float("nan"), "pointing": float("nan"), "n": 0}
    return {"focus_mass": float(np.mean(masses)), "pointing": float(np.mean(hits)), "n": len(masses)}


def uniform_mass(maps: Sequence[dict[str, Any]]) -> float:
    """The Focus mass a uniform attention would put inside the evidence (the chance level)."""
    vals = [float((m["target"] > 0).mean()) for m in maps if (m["target"] > 0).any()]
    return float(np.mean(vals)) if vals else float("nan")


def cue_object_mass(maps: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Focus mass on the object coloured like the shortcut cue (FocusShapes colour questions).

    On ``test_ood`` the cue's colour differs from the answer; an attention that follows the
    cue's colour instead of the named shape lands on that object. Rows without such an object
    (or without a colour cue) are skipped.

    Returns:
        ``cue_object_mass`` (mean over the rows used), ``evidence_mass`` on the same rows, ``n``.
    """
    on_cue, on_evidence = [], []
    for m, row in zip(maps, rows, strict=True):
        meta = records.decode_meta(row["meta"])
        colour = meta.get("shortcut_color")
        objs = [o for o in meta.get("objects", []) if colour and o["color"] == colour]
        if not objs or m["grid"].ndim != 2:
            continue
        rows_, cols = m["grid"].shape
        thw = (1, 2 * rows_, 2 * cols)
        inside = modeling.boxes_to_grid([objs[0]["box"]], row["image"].size, thw).numpy() > 0
        on_cue.append(float(m["grid"][inside].sum()))
        on_evidence.append(float(m["grid"][m["target"] > 0].sum()))
    if not on_cue:
        return {"cue_object_mass": float("nan"), "evidence_mass": float("nan"), "n": 0}
    return {"cue_object_mass": float(np.mean(on_cue)), "evidence_mass": float(np.mean(on_evidence)),
            "n": len(on_cue)}
