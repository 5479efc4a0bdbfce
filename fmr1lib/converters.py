"""Converters from public region-annotated formats to records, and the data command line.

Real data for the GPU profiles is JSONL in the record schema (``records``); a converter writes it
from a public release, every record validated as it is written (``validate_record``), a bad one
raising ``DataError`` with the source file, line, record id and field, or skipped and counted with
``on_bad_record="skip"``. ``convert_visual_cot`` converts the Visual CoT release (JSONL with
``bboxs``); ``CONVERTERS`` names every converter by its ``--format``. Command line::

    python -m fmr1lib.converters convert --format visual_cot --src viscot.jsonl --out train.jsonl \\
        --image-root /data/viscot/images --on-bad-record skip
    python -m fmr1lib.converters check train.jsonl --image-root /data/viscot/images
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from fmr1lib.records import (
    ON_BAD_RECORD,
    DataError,
    _check_on_bad_record,
    _is_number,
    _json_default,
    _parse_line,
    _read_image,
    check_jsonl,
    clean_answer,
    infer_answer_type,
    resolve_image_path,
    validate_record,
)

logger = logging.getLogger(__name__)

# --- Visual CoT converter -------------------------------------------------------------------

_VISUAL_COT_INSTRUCTION = re.compile(
    r"\s*Please provide the bounding box coordinate of the region that can help you answer "
    r"the question better\.?\s*$",
    re.IGNORECASE,
)
_VISUAL_COT_REQUIRED = ("question_id", "image", "question", "answer", "bboxs")


def strip_visual_cot_instruction(question: str) -> str:
    """Drop Visual CoT's trailing "provide the bounding box" instruction from a question.

    Args:
        question: the question text.

    Returns:
        The question without the instruction sentence, stripped.

    >>> strip_visual_cot_instruction("What is on the table? Please provide the bounding box "
    ...     "coordinate of the region that can help you answer the question better.")
    'What is on the table?'
    """
    return _VISUAL_COT_INSTRUCTION.sub("", question).strip()


def visual_cot_to_record(src: dict[str, Any]) -> dict[str, Any]:
    """Map one Visual CoT line to a record in our schema (not yet validated).

    Input shape (one JSON object per line of the Visual CoT release; ``bboxs`` in
    original-pixel ``[x0, y0, x1, y1]``; ``width``/``height`` optional)::

        {"question_id": ..., "image": "gqa/xxx.jpg", "question": ..., "answer": ...,
         "bboxs": [[x0, y0, x1, y1], ...], "dataset": "gqa", "split": "train",
         "width": W, "height": H}

    Args:
        src: one parsed line.

    Returns:
        A record with ``id = "vcot-<question_id>"``, the instruction stripped from the question,
        the answer cleaned (``clean_answer``), ``answer_type`` inferred, ``choices`` None and
        ``meta = {"source": "visual_cot", "dataset": ..., "split": ...}``.

    Raises:
        DataError: a required source field is missing or has the wrong type (no location;
            the caller adds it).

    >>> visual_cot_to_record({"question_id": 7, "image": "gqa/1.jpg", "question": "Is it red?",
    ...     "answer": "Yes.", "bboxs": [[1, 2, 3, 4]], "dataset": "gqa", "split": "train"})["answer"]
    'yes'
    """
    qid = src.get("question_id")
    rid = None if qid is None else f"vcot-{qid}"
    for name in _VISUAL_COT_REQUIRED:
        if name not in src:
            raise DataError(f"{name}: missing required field", record_id=rid, field=name)
    for name in ("question", "answer"):
        if not isinstance(src[name], str):
            raise DataError(f"{name} = {src[name]!r}: must be a string", record_id=rid, field=name)
    answer = clean_answer(src["answer"])
    return {
        "id": rid,
        "image": src["image"],
        "question": strip_visual_cot_instruction(src["question"]),
        "answer": answer,
        "answer_type": infer_answer_type(answer),
        "choices": None,
        "evidence_boxes": src["bboxs"],
        "meta": {
            "source": "visual_cot",
            "dataset": src.get("dataset"),
            "split": src.get("split"),
        },
    }


@contextlib.contextmanager
def _atomic_text_writer(out_path: Path) -> Iterator[TextIO]:
    """Stream lines to a temp file next to ``out_path``; ``os.replace`` it only on success."""
    from fmr1lib import repro

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = repro.make_temp_file(out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out_path)
        repro.fsync_dir(out_path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _declared_size(src: dict[str, Any]) -> tuple[int, int] | None:
    width, height = src.get("width"), src.get("height")
    if _is_number(width) and _is_number(height) and width > 0 and height > 0:
        return int(width), int(height)
    return None


def convert_visual_cot(
    src_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    *,
    on_bad_record: str = "error",
    allow_outside_root: bool = False,
) -> dict[str, int]:
    """Convert a Visual CoT JSONL file (``bboxs`` format) to our record JSONL.

    Each converted record is validated. When its image exists under ``image_root`` its header is
    read (unreadable -> bad record; pixels are not decoded, ``check`` does that) and the boxes
    are checked against its real size, which must
    match the declared ``width``/``height`` if given; otherwise boxes are checked against the
    declared size, or only for being non-empty and non-negative when none is declared. Image
    paths stay relative, so load the output with ``load_jsonl(out_path, image_root=...)`` when
    it is written to another folder than the images' root.

    Args:
        src_path: the Visual CoT JSONL file.
        out_path: the output JSONL (written atomically: a temp file in the same folder, then
            ``os.replace``; nothing is written when error mode raises).
        image_root: folder the ``image`` paths are relative to (default: ``src_path``'s folder).
        on_bad_record: ``"error"`` or ``"skip"`` (warn per bad record, count them).
        allow_outside_root: allow image paths that lead outside ``image_root``
            (``resolve_image_path``); by default such a record is bad.

    Returns:
        ``{"written": n, "skipped": m}``.

    Raises:
        ValueError: bad ``on_bad_record``.
        DataError: in error mode, the first bad source line (named by file and line).
    """
    _check_on_bad_record(on_bad_record)
    src_path, out_path = Path(src_path), Path(out_path)
    root = Path(image_root) if image_root is not None else src_path.parent
    written = skipped = no_image = 0
    first_line: dict[str, int] = {}
    with src_path.open("rb") as src_fh, _atomic_text_writer(out_path) as out_fh:
        for line_no, raw in enumerate(src_fh, start=1):
            try:
                src = _parse_line(raw, src_path, line_no)
                if src is None:
                    continue
                try:
                    rec = visual_cot_to_record(src)
                except DataError as exc:
                    raise DataError(
                        exc.reason,
                        path=src_path,
                        line=line_no,
                        record_id=exc.record_id,
                        field=exc.field,
                    ) from None

                def fail(
                    field: str, reason: str, _rid: str | None = rec["id"], _line: int = line_no
                ) -> DataError:
                    return DataError(reason, path=src_path, line=_line, record_id=_rid, field=field)

                size = _declared_size(src)
                ref = rec["image"]
                has_image = False
                image_path = None
                if isinstance(ref, str) and ref.strip():
                    image_path = resolve_image_path(root, ref, fail, allow_outside_root)
                if image_path is not None and image_path.is_file():
                    _, real = _read_image(image_path, False, fail)
                    if size is not None and real != size:
                        raise fail(
                            "image",
                            f"image {ref} is {real[0]}x{real[1]} but the source declares "
                            f"width x height = {size[0]}x{size[1]}",
                        )
                    size = real
                    has_image = True
                valid = validate_record(rec, image_size=size, path=src_path, line=line_no)
                if valid["id"] in first_line:
                    raise fail("id", f"duplicate id, first seen on line {first_line[valid['id']]}")
            except DataError as exc:
                if on_bad_record == "error":
                    raise
                skipped += 1
                logger.warning("skipping bad record: %s", exc)
                continue
            first_line[valid["id"]] = line_no
            no_image += not has_image
            out_fh.write(json.dumps(valid, ensure_ascii=False, default=_json_default) + "\n")
            written += 1
    if no_image:
        logger.info(
            "%d written record(s) have no image file under %s; their boxes were checked "
            "against the declared width/height only (or only for being non-negative)",
            no_image,
            root,
        )
    if skipped:
        logger.warning("%s: skipped %d bad record(s), wrote %d", src_path, skipped, written)
    logger.info("wrote %d record(s) to %s", written, out_path)
    return {"written": written, "skipped": skipped}


# --- command line ---------------------------------------------------------------------------

CONVERTERS = {"visual_cot": convert_visual_cot}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fmr1lib.converters",
        description="Convert region-annotated data to fmr1 records, or check a records file.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a public format to records JSONL")
    conv.add_argument("--format", required=True, choices=sorted(CONVERTERS))
    conv.add_argument("--src", required=True, help="source file")
    conv.add_argument("--out", required=True, help="output records JSONL")
    conv.add_argument("--image-root", default=None, help="folder image paths are relative to")
    conv.add_argument("--on-bad-record", default="error", choices=ON_BAD_RECORD)
    check = sub.add_parser("check", help="validate a records JSONL and print counts")
    check.add_argument("file", help="records JSONL")
    check.add_argument("--image-root", default=None, help="folder image paths are relative to")
    check.add_argument("--on-bad-record", default="error", choices=ON_BAD_RECORD)
    for cmd in (conv, check):
        cmd.add_argument(
            "--allow-outside-root",
            action="store_true",
            help="allow image paths outside the image root (absolute, '..', symlinks)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``convert`` or ``check``; prints the counts as JSON.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success; 2 on a ``DataError`` or a file that cannot be read (bad input, the status
        ``python -m fmr1lib`` gives it too; the message goes to stderr, no traceback).
    """
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kw = {"on_bad_record": args.on_bad_record, "allow_outside_root": args.allow_outside_root}
    try:
        if args.command == "convert":
            counts: dict[str, Any] = CONVERTERS[args.format](
                args.src, args.out, args.image_root, **kw
            )
        else:
            counts = check_jsonl(args.file, args.image_root, **kw)
    except DataError as exc:
        sys.stderr.write(f"DataError: {exc}\n")
        return 2
    except OSError as exc:  # a missing or unreadable input file
        sys.stderr.write(f"error: {exc.strerror or exc}: {exc.filename or ''}\n")
        return 2
    # The counts are the command's result, so they go to stdout for scripts to parse.
    sys.stdout.write(json.dumps(counts) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
