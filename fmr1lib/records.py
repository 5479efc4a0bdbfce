"""Record schema, validation and the JSONL adapter for real region-annotated data.

Paper step: the data behind both stages. Anchoring supervises the ``<Focus>`` token's attention
directly against annotated evidence boxes, and the counterfactual reward removes those boxes from
the image, so a box that is off the image or inverted silently trains the wrong target. Every
record therefore passes ``validate_record`` before use, and a bad one is reported with the file,
the line, the record id and the field (``DataError``); ``on_bad_record="skip"`` skips it and
reports the count instead. Nothing is dropped silently.

One record (one dict per example; see docs/design.md §3.1):

=================  ==========================================================================
``id``             str, unique, non-empty
``image``          PIL image in memory, or in JSONL a path relative to ``image_root``; RGB
``question``       str, non-empty
``answer``         str, the normalised ground truth, non-empty
``answer_type``    one of ``ANSWER_TYPES``
``choices``        list[str] or None; required and non-empty for ``choice`` (answer among them)
``evidence_boxes`` list of ``[x0, y0, x1, y1]`` in original-pixel coordinates; may be empty
``meta``           dict, free-form (missing in JSONL means ``{}``)
=================  ==========================================================================

Real data for the GPU profiles is JSONL in this schema: ``load_jsonl`` reads it, ``check_jsonl``
validates a file and counts it. ``converters`` writes such files from public releases and holds
the command line that converts and checks them (``python -m fmr1lib.converters convert|check``).
A ground-truth answer is stored in one form (``clean_answer``), its type inferred from it
(``infer_answer_type``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from fmr1lib.choices import AnswerType, OnBadRecord, options

if TYPE_CHECKING:  # datasets is imported lazily: the CLI and loaders do not need it
    import datasets

logger = logging.getLogger(__name__)

ANSWER_TYPES = options(AnswerType)
REQUIRED_FIELDS = ("id", "image", "question", "answer", "answer_type", "evidence_boxes")
ON_BAD_RECORD = options(OnBadRecord)
BOX_TOLERANCE = 0.5
"""Pixels a box may stick out of the image: float rounding in converted annotations."""

_Fail = Callable[[str, str], "DataError"]
"""``fail(field, reason)`` builds a DataError already located by file, line and record id."""

_IMAGE_READ_ERRORS = (OSError, ValueError, Image.DecompressionBombError, SyntaxError)


class DataError(ValueError):
    """A bad record, located by file, 1-based line, record id and field.

    ``str(err)`` reads e.g.
    ``data/train.jsonl line 7 (record 'vcot-12'): evidence_boxes[0] = [10, 5, 8, 20]: x1 must be > x0``.

    Attributes:
        path: the file (str) or None.
        line: 1-based line number or None.
        record_id: the record's id or None (unknown when the line is not valid JSON).
        field: the offending field, e.g. ``"evidence_boxes[0]"``, or None.
        reason: the message without the location.
    """

    def __init__(
        self,
        reason: str,
        *,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
        record_id: str | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        self.line = line
        self.record_id = record_id
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.path is not None:
            where.append(self.path)
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.record_id is not None:
            where.append(f"(record {self.record_id!r})")
        body = self.reason
        if self.field is not None and not body.startswith(self.field):
            body = f"{self.field}: {body}"
        return f"{' '.join(where)}: {body}" if where else body

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # Keyword-only attributes would be lost by ValueError's default pickling (num_proc maps).
        rebuild = functools.partial(
            type(self),
            self.reason,
            path=self.path,
            line=self.line,
            record_id=self.record_id,
            field=self.field,
        )
        return rebuild, ()


def _check_on_bad_record(on_bad_record: str) -> None:
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(
            f"on_bad_record must be one of {', '.join(ON_BAD_RECORD)}, got {on_bad_record!r}"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _id_for_message(rec: Any) -> str | None:
    """The record id to name in an error, if the record has a usable one."""
    if isinstance(rec, dict):
        rid = rec.get("id")
        if isinstance(rid, str) and rid.strip():
            return rid
        if isinstance(rid, int) and not isinstance(rid, bool):
            return str(rid)
    return None


def decode_meta(value: Any) -> dict[str, Any]:
    """``meta`` as a dict, from a dict, a JSON string (the dataset column) or None.

    Args:
        value: a dict, a JSON object string, or None.

    Returns:
        A dict (a new one for JSON input; ``{}`` for None or an empty string).

    Raises:
        ValueError: the value is neither a dict nor a JSON object string.

    >>> decode_meta('{"seed": 3}')
    {'seed': 3}
    >>> decode_meta(None)
    {}
    """
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        decoded = json.loads(value)
        if isinstance(decoded, dict):
            return decoded
    raise ValueError(f"meta must be a dict or a JSON object string, got {value!r}")


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays end up in meta (generator seeds); write them as plain JSON.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def validate_record(
    rec: dict[str, Any],
    *,
    image_size: tuple[int, int] | None,
    path: str | os.PathLike[str] | None = None,
    line: int | None = None,
) -> dict[str, Any]:
    """Check one record against the schema and return its normalised form.

    Args:
        rec: the record (``image`` a PIL image or a path string). Not modified.
        image_size: ``(width, height)`` the boxes must lie in; None takes the size of an
            in-memory PIL ``image``, or skips the upper bound check for a path.
        path: file the record came from, for error messages.
        line: 1-based line in ``path``, for error messages.

    Returns:
        A new dict with all input keys, where ``question`` and ``answer`` are stripped,
        ``choices`` is None or a list of stripped strings, ``evidence_boxes`` are lists of 4
        floats (clipped to the image when they stick out by at most ``BOX_TOLERANCE``) and
        ``meta`` is a dict (``{}`` when missing).

    Raises:
        DataError: a missing required field, a wrong type, an empty question or answer, an
            unknown ``answer_type``, a ``choice`` record without choices or with the answer not
            among them, or a box that is not 4 numbers, is empty (``x1 <= x0`` or
            ``y1 <= y0``) or lies outside the image.
    """
    record_id = _id_for_message(rec)

    def fail(field: str, reason: str) -> DataError:
        return DataError(reason, path=path, line=line, record_id=record_id, field=field)

    if not isinstance(rec, dict):
        raise fail("record", f"record must be an object, got {type(rec).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in rec:
            raise fail(name, f"{name}: missing required field")

    rid = rec["id"]
    if not isinstance(rid, str) or not rid.strip():
        raise fail("id", f"id = {rid!r}: must be a non-empty string")

    image = rec["image"]
    if isinstance(image, Image.Image):
        if image_size is None:
            image_size = image.size
    elif not isinstance(image, str) or not image.strip():
        raise fail("image", f"image = {image!r}: must be a PIL image or a non-empty path string")

    texts = {}
    for name in ("question", "answer"):
        value = rec[name]
        if not isinstance(value, str):
            raise fail(name, f"{name} = {value!r}: must be a string, got {type(value).__name__}")
        if not value.strip():
            raise fail(name, f"{name} = {value!r}: must not be empty")
        texts[name] = value.strip()

    answer_type = rec["answer_type"]
    if answer_type not in ANSWER_TYPES:
        raise fail(
            "answer_type",
            f"answer_type = {answer_type!r}: must be one of {', '.join(ANSWER_TYPES)}",
        )

    choices = rec.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise fail("choices", f"choices = {choices!r}: must be a list of strings or null")
        choices = [c.strip() for c in choices]
    if answer_type == "choice":
        if not choices:
            raise fail("choices", f"choices = {choices!r}: a 'choice' record needs choices")
        if texts["answer"] not in choices:
            raise fail(
                "answer",
                f"answer = {texts['answer']!r}: not among choices {choices!r}",
            )

    boxes = rec["evidence_boxes"]
    if not isinstance(boxes, (list, tuple)):
        raise fail("evidence_boxes", f"evidence_boxes = {boxes!r}: must be a list of boxes")
    clean_boxes = [
        _validate_box(box, f"evidence_boxes[{i}]", image_size, fail) for i, box in enumerate(boxes)
    ]

    meta = rec.get("meta")
    try:
        meta = decode_meta(meta)
    except ValueError:
        raise fail("meta", f"meta = {meta!r}: must be an object") from None

    out = dict(rec)
    out.update(
        question=texts["question"],
        answer=texts["answer"],
        choices=choices,
        evidence_boxes=clean_boxes,
        meta=meta,
    )
    return out


def _validate_box(
    box: Any,
    field: str,
    image_size: tuple[int, int] | None,
    fail: _Fail,
) -> list[float]:
    shown = list(box) if isinstance(box, (list, tuple)) else box
    prefix = f"{field} = {shown!r}"
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(map(_is_number, box)):
        raise fail(field, f"{prefix}: must be 4 finite numbers [x0, y0, x1, y1]")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0:
        raise fail(field, f"{prefix}: x1 must be > x0")
    if y1 <= y0:
        raise fail(field, f"{prefix}: y1 must be > y0")
    tol = BOX_TOLERANCE
    if min(x0, y0) < -tol:
        raise fail(field, f"{prefix}: outside the image (negative coordinate)")
    x0, y0 = max(x0, 0.0), max(y0, 0.0)
    if image_size is not None:
        width, height = image_size
        if x1 > width + tol or y1 > height + tol:
            raise fail(
                field,
                f"{prefix}: outside the {width}x{height} image (need x1 <= {width} and y1 <= {height})",
            )
        x1, y1 = min(x1, float(width)), min(y1, float(height))
    if x1 <= x0 or y1 <= y0:  # a sliver that was entirely within the tolerance band
        raise fail(field, f"{prefix}: outside the image (no area left inside it)")
    return [x0, y0, x1, y1]


def resolve_image_path(
    root: str | os.PathLike[str],
    ref: str,
    fail: _Fail,
    allow_outside_root: bool = False,
) -> Path:
    """The absolute path of image ``ref`` (relative to ``root``), confined to ``root``.

    The path is resolved (``..`` and symlinks followed) before the check, so neither an
    absolute path, nor ``../..``, nor a symlink can reach a file outside the image root. The
    error is the same whether the target exists or not.

    Args:
        root: the image root.
        ref: the record's ``image`` string.
        fail: builds the located ``DataError``.
        allow_outside_root: skip the check (absolute paths and paths out of the root allowed).

    Returns:
        ``root / ref`` made absolute (symlinks kept in the name, as the records store it).

    Raises:
        DataError: the resolved path lies outside ``root`` (field ``image``).
    """
    path = Path(os.path.abspath(Path(root) / ref))
    if allow_outside_root:
        return path
    real_root = Path(os.path.realpath(root))
    if not Path(os.path.realpath(path)).is_relative_to(real_root):
        raise fail(
            "image",
            f"image = {ref!r}: the path leads outside the image root {root} (absolute paths, "
            f"'..' and symlinks out of it are refused unless allow_outside_root is set: "
            f"allow_outside_root: true in the data params, --allow-outside-root for records "
            f"check / convert and profile new, --allow-absolute-images for the benchmark)",
        )
    return path


def _read_image(
    image_path: Path, load: bool, fail: _Fail
) -> tuple[Image.Image | None, tuple[int, int]]:
    """Open ``image_path``; return the RGB image (when ``load``) and its size."""
    if not image_path.is_file():
        raise fail("image", f"image file not found: {image_path}")
    try:
        with Image.open(image_path) as im:
            size = im.size
            # convert() decodes every pixel, so truncated files fail here and not mid-training;
            # without load only the header is read (fast checks of large datasets).
            image = im.convert("RGB") if load else None
    except _IMAGE_READ_ERRORS as exc:
        raise fail("image", f"cannot read image {image_path}: {exc}") from None
    return image, size


def _parse_line(raw: bytes, path: Path, line: int) -> dict[str, Any] | None:
    """One JSONL line as a dict; None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8: {exc}", path=path, line=line, field="json") from None
    if not text.strip():
        return None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"invalid JSON: {exc.msg} at column {exc.colno}", path=path, line=line, field="json"
        ) from None
    if not isinstance(rec, dict):
        raise DataError(
            f"a line must hold a JSON object, got {type(rec).__name__}",
            path=path,
            line=line,
            field="json",
        )
    return rec


def _iter_jsonl(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None,
    load_images: bool,
    decode_images: bool | None = None,
    allow_outside_root: bool = False,
) -> Iterator[dict[str, Any] | DataError]:
    """Yield each validated record, or the DataError of each bad one, in file order.

    ``decode_images`` (default: ``load_images``) decodes every pixel, so that a truncated image
    is a bad record, even when only the path is kept. Image paths must stay inside the image
    root (``resolve_image_path``) unless ``allow_outside_root``."""
    decode = load_images if decode_images is None else decode_images
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    first_line: dict[str, int] = {}
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                rec = _parse_line(raw, path, line_no)
                if rec is None:
                    continue
                record_id = _id_for_message(rec)

                def fail(
                    field: str, reason: str, _rid: str | None = record_id, _line: int = line_no
                ) -> DataError:
                    return DataError(reason, path=path, line=_line, record_id=_rid, field=field)

                ref = rec.get("image")
                image, size, image_path = None, None, None
                if isinstance(ref, str) and ref.strip():
                    image_path = resolve_image_path(root, ref, fail, allow_outside_root)
                    image, size = _read_image(image_path, decode, fail)
                valid = validate_record(rec, image_size=size, path=path, line=line_no)
                if valid["id"] in first_line:
                    raise fail("id", f"duplicate id, first seen on line {first_line[valid['id']]}")
            except DataError as exc:
                yield exc
                continue
            first_line[valid["id"]] = line_no
            valid["image_path"] = str(image_path)
            if load_images:
                valid["image"] = image
            yield valid


def load_jsonl(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    on_bad_record: str = "error",
    load_images: bool = True,
    verify_images: bool = False,
    *,
    allow_outside_root: bool = False,
) -> tuple[list[dict[str, Any]], int]:
    """Load and validate a JSONL file of records.

    Blank lines are ignored. Every record is validated against its real image size, and ids
    must be unique (the first occurrence wins in skip mode).

    Args:
        path: the JSONL file.
        image_root: folder that relative ``image`` paths are resolved against (default: the
            JSONL file's folder).
        on_bad_record: ``"error"`` raises on the first bad record; ``"skip"`` logs a warning per
            bad record and a summary, and skips them.
        load_images: True puts the decoded RGB ``PIL.Image`` in ``image``; False keeps the path
            string and reads only each image's header (its size).
        verify_images: with ``load_images`` False, still decode every image (an unreadable or
            truncated one is a bad record) without keeping it in memory: what a loader that
            stores paths needs to fail before training rather than during it.
        allow_outside_root: allow image paths that lead outside ``image_root`` (absolute
            paths, ``..``, symlinks); by default such a record is bad (``resolve_image_path``).

    Returns:
        ``(records, n_skipped)``; every record also has ``image_path``, the absolute path.

    Raises:
        ValueError: ``on_bad_record`` is not ``"error"`` or ``"skip"``.
        DataError: in error mode, the first bad record (invalid JSON, missing or unreadable
            image, an image path outside the root, schema violation, duplicate id); in either
            mode, a file without any valid record (``_no_records``).
        FileNotFoundError: ``path`` does not exist.
    """
    _check_on_bad_record(on_bad_record)
    records: list[dict[str, Any]] = []
    n_skipped = 0
    items = _iter_jsonl(path, image_root, load_images, load_images or verify_images,
                        allow_outside_root)
    for item in items:
        if isinstance(item, DataError):
            if on_bad_record == "error":
                raise item
            n_skipped += 1
            logger.warning("skipping bad record: %s", item)
            continue
        records.append(item)
    if not records:
        raise _no_records(path, n_skipped)
    if n_skipped:
        logger.warning("%s: skipped %d bad record(s), kept %d", path, n_skipped, len(records))
    return records, n_skipped


def _no_records(path: str | os.PathLike[str], n_skipped: int) -> DataError:
    """The error of a file that leaves no record: empty (blank lines only), or every record
    bad in skip mode. The loader, ``check`` and the benchmark all raise it."""
    if n_skipped:
        return DataError(f"no valid record in the file ({n_skipped} bad record(s) skipped)",
                         path=path)
    return DataError("no records in the file", path=path)


def check_jsonl(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    on_bad_record: str = "error",
    *,
    allow_outside_root: bool = False,
) -> dict[str, Any]:
    """Validate a JSONL file, decoding every image, without keeping the images in memory.

    Args:
        path: the JSONL file.
        image_root: as in ``load_jsonl``.
        on_bad_record: as in ``load_jsonl``.
        allow_outside_root: as in ``load_jsonl``.

    Returns:
        ``{"records": n_good, "skipped": n_bad, "with_boxes": n_good_with_boxes,
        "answer_types": {type: count}}``.

    Raises:
        ValueError, DataError, FileNotFoundError: as in ``load_jsonl`` (an empty file, or one
            whose every record is bad, is a DataError in both).
    """
    _check_on_bad_record(on_bad_record)
    n_good = n_bad = n_boxes = 0
    types: Counter[str] = Counter()
    for item in _iter_jsonl(path, image_root, load_images=True,
                            allow_outside_root=allow_outside_root):
        if isinstance(item, DataError):
            if on_bad_record == "error":
                raise item
            n_bad += 1
            logger.warning("bad record: %s", item)
            continue
        n_good += 1
        n_boxes += bool(item["evidence_boxes"])
        types[item["answer_type"]] += 1
    if not n_good:
        raise _no_records(path, n_bad)
    return {
        "records": n_good,
        "skipped": n_bad,
        "with_boxes": n_boxes,
        "answer_types": dict(sorted(types.items())),
    }


def records_to_dataset(records: Sequence[dict[str, Any]]) -> datasets.Dataset:
    """Build a ``datasets.Dataset`` with an ``Image`` column from validated records.

    Column choices: ``choices`` is a list-of-string column that keeps None for non-choice
    records (Arrow stores a null list), so a round trip returns the record's value unchanged;
    ``evidence_boxes`` is float32 (values round to float32 precision); ``meta`` is a JSON string
    column, because a struct column needs one fixed schema and ``meta`` is free-form (read it
    back with ``decode_meta``). ``image_path`` and other extra keys are not stored.

    Args:
        records: records as returned by ``load_jsonl`` (``image`` a PIL image or a path).

    Returns:
        A Dataset with columns id, image, question, answer, answer_type, choices,
        evidence_boxes, meta.

    Raises:
        DataError: a record fails ``validate_record``.
    """
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "answer_type": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
            "evidence_boxes": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
            "meta": datasets.Value("string"),
        }
    )
    columns: dict[str, list[Any]] = {name: [] for name in features}
    for rec in records:
        image = rec.get("image")
        if isinstance(image, str) and rec.get("image_path"):
            # A relative path means nothing once the dataset is saved elsewhere.
            image = rec["image_path"]
        rec = validate_record({**rec, "image": image}, image_size=None)
        for name in ("id", "image", "question", "answer", "answer_type", "choices"):
            columns[name].append(rec[name])
        columns["evidence_boxes"].append(rec["evidence_boxes"])
        columns["meta"].append(json.dumps(rec["meta"], default=_json_default))
    return datasets.Dataset.from_dict(columns, features=features)


# --- The stored answer form -----------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")


def clean_answer(answer: str) -> str:
    """The stored form of a ground-truth answer: stripped, lower case, one trailing period dropped.

    This is what a converted record keeps as ``answer`` (the supervised target), not what
    answers are compared in: ``scoring.normalise_answer`` starts from this form and adds the
    comparison rules (punctuation, articles, numbers), so storing it never changes a verdict.
    A decimal point inside a number is kept.

    Args:
        answer: raw answer text.

    Returns:
        The cleaned answer (``""`` when nothing is left, which ``validate_record`` rejects).

    >>> clean_answer("  Yes. ")
    'yes'
    >>> clean_answer("3.5")
    '3.5'
    """
    answer = answer.strip().lower()
    if answer.endswith("."):
        answer = answer[:-1].rstrip()
    return answer


def infer_answer_type(answer: str) -> str:
    """``yesno`` for yes/no, ``number`` for a plain number, else ``word``.

    Args:
        answer: a cleaned answer (``clean_answer``) or a ``scoring.normalise_answer`` key.

    Returns:
        One of ``"yesno"``, ``"number"``, ``"word"``.

    >>> [infer_answer_type(a) for a in ("yes", "no", "12", "-0.5", "red", "2 cats")]
    ['yesno', 'yesno', 'number', 'number', 'word', 'word']
    """
    if answer in ("yes", "no"):
        return "yesno"
    if _NUMBER.fullmatch(answer):
        return "number"
    return "word"
