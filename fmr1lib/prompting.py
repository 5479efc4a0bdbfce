"""Chat formatting, response templates and answer parsing (docs/design.md §5.1; answer parsing: §9).

The assistant turn always *starts* with ``<Focus>``, forced as part of the prompt, so the
Focus query sees the image and the question but no reasoning yet: perception before
reasoning. The model then writes ``<think>...</think><answer>...</answer>``.

Parsing never raises: a malformed response parses to ``None`` and scores 0. Comparing a parsed
answer with the ground truth is ``scoring.answers_match``'s job, not this module's.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

from fmr1lib.choices import Reasoning, Route, options

FOCUS = "<Focus>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAG_TOKENS = (FOCUS, THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

SYSTEM_PROMPT = (
    "You are a careful visual assistant. First focus on the image region that decides the "
    "answer, then think briefly inside think tags, then give a short answer inside answer tags."
)

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_FORMAT_RE = re.compile(
    r"^\s*(?:<Focus>)?[^<]*<think>[^<]*</think>\s*<answer>[^<]+</answer>\s*$", re.DOTALL)
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")

_SUBJECT_PATTERNS = [
    (re.compile(r"^what color is the (\w+)\??$", re.I), "the {0}"),
    (re.compile(r"^what shape is the (\w+) object\??$", re.I), "the {0} object"),
    (re.compile(r"^how many (\w+) shapes are there\??$", re.I), "the {0} shapes"),
    (re.compile(r"^is the (\w+) left of the (\w+)\??$", re.I), "the {0} and the {1}"),
    (re.compile(r"^is there a (\w+) (\w+)\??$", re.I), "a {0} {1}"),
]


def messages(question: str, system: str | None = SYSTEM_PROMPT) -> list[dict[str, Any]]:
    """Chat messages for one image question (the image placeholder comes first)."""
    msgs: list[dict[str, Any]] = []
    if system:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system}]})
    msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    return msgs


def prompt_text(processor: Any, question: str, system: str | None = SYSTEM_PROMPT) -> str:
    """The chat-formatted prompt, ending with the forced ``<Focus>`` of the assistant turn."""
    text = processor.apply_chat_template(messages(question, system), tokenize=False,
                                         add_generation_prompt=True)
    return text + FOCUS


THINK_VERBS = ("look at", "find", "check", "locate")
"""Phrasings of the reasoning text. Training responses use one per record (``think_variant``),
so sampled completions differ between trajectories, which the faithful reward needs: identical
correct completions would all get the same concentration."""


def think_text(question: str, variant: int = 0) -> str:
    """What the model should look at, phrased from the question alone (never the answer).

    >>> think_text("What color is the circle?")
    'look at the circle'
    >>> think_text("Is the square left of the triangle?", variant=1)
    'find the square and the triangle'
    """
    return f"{THINK_VERBS[variant % len(THINK_VERBS)]} {subject_text(question)}"


def think_variant(record_id: str) -> int:
    """A stable phrasing index for a record (the same in every epoch and process).

    >>> think_variant("fs-train-00001") == think_variant("fs-train-00001")
    True
    """
    return zlib.crc32(record_id.encode("utf-8")) % len(THINK_VERBS)


REASONINGS = options(Reasoning)
"""Reasoning templates of the supervised stages (``TrainParams.reasoning``): ``look`` names what to
look at (``think_text``); ``two_route`` says where the answer was read, from the evidence or from
the shortcut cue (``route_think``), so the two routes are different token sequences."""

ROUTES = options(Route)
"""The two reasoning routes of ``two_route`` responses (``response_route`` tells them apart)."""

CUE_NAMES = {"color_patch": "the corner patch", "shape_glyph": "the corner glyph"}
"""How the cue route names the shortcut cue, by the cue's kind (``data.CUED_FAMILIES``)."""


def subject_text(question: str) -> str:
    """The evidence a question asks about, in words ("the circle"; "the image" if unknown).

    >>> subject_text("What color is the circle?")
    'the circle'
    """
    q = question.strip()
    for pattern, template in _SUBJECT_PATTERNS:
        m = pattern.match(q)
        if m:
            return template.format(*m.groups())
    return "the image"


def route_think(question: str, answer: str, route: str, cue_value: str | None = None,
                cue_kind: str = "color_patch") -> str:
    """The reasoning of one route: the evidence's value or the cue's value, named as such.

    Args:
        question: the question (the evidence route names its subject).
        answer: the normalised answer (what the evidence shows).
        route: ``evidence`` or ``cue``.
        cue_value: the cue's value (the cue route reads it, whatever the answer is).
        cue_kind: ``color_patch`` or a glyph cue.

    >>> route_think("What color is the circle?", "red", "evidence")
    'the circle is red'
    >>> route_think("What color is the circle?", "red", "cue", cue_value="red")
    'the corner patch is red'
    """
    if route == "evidence":
        return f"{subject_text(question)} is {answer}"
    if route == "cue":
        if cue_value is None:
            raise ValueError("route 'cue' needs the cue's value")
        name = CUE_NAMES.get(cue_kind, CUE_NAMES["shape_glyph"])
        return f"{name} is {cue_value}"
    raise ValueError(f"unknown route {route!r}; use one of {ROUTES}")


def response_route(text: Any) -> str | None:
    """Which route a response's reasoning takes: ``cue`` if it names the corner cue, ``evidence``
    if it names anything else before ``is``, None when it has no reasoning of either form.

    >>> response_route("<think>the circle is red</think><answer>red</answer>")
    'evidence'
    >>> response_route("<think>the corner patch is blue</think><answer>blue</answer>")
    'cue'
    >>> response_route("<think>look at the circle</think><answer>red</answer>") is None
    True
    """
    if not isinstance(text, str):
        return None
    m = re.search(r"<think>(.*?)</think>", text, re.DOTALL)
    if not m:
        return None
    think = m.group(1).strip().lower()
    if think.startswith(tuple(f"{name} is" for name in CUE_NAMES.values())):
        return "cue"
    if re.match(r"^(the|a) [\w ]+ is \S", think):
        return "evidence"
    return None


def route_shares(texts: Sequence[Any]) -> dict[str, float]:
    """Share of the responses per reasoning route (``response_route``), and ``none`` for those
    of neither form (all 0.0 for no responses).

    >>> route_shares(["<think>the corner patch is red</think><answer>red</answer>", "x"])
    {'evidence': 0.0, 'cue': 0.5, 'none': 0.5}
    """
    routes = [response_route(t) for t in texts]
    n = max(1, len(routes))
    out = {r: sum(x == r for x in routes) / n for r in ROUTES}
    out["none"] = sum(x is None for x in routes) / n
    return out


def route_choice(record_id: str, share: float) -> bool:
    """Whether a record takes the cue route, stable per record: a hash of its id below ``share``.

    >>> route_choice("fs-train-00001", 0.0), route_choice("fs-train-00001", 1.0)
    (False, True)
    """
    return zlib.crc32(("route:" + record_id).encode("utf-8")) / 2**32 < share


_POSITIONS = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left",
              (1, 1): "center", (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom",
              (2, 2): "bottom right"}


def position_words(box: Sequence[float], image_size: tuple[int, int]) -> str:
    """Coarse position of a box in a 3x3 split of the image.

    >>> position_words([0, 0, 10, 10], (112, 112))
    'top left'
    """
    w, h = image_size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return _POSITIONS[(min(2, int(3 * cy / h)), min(2, int(3 * cx / w)))]


def perception_text(meta: dict[str, Any], image_size: tuple[int, int]) -> str:
    """Words for the evidence of a FocusShapes record ("the red triangle, top left")."""
    objs = [meta["objects"][i] for i in meta.get("evidence_objects", [])]
    if not objs:
        return "nothing"
    parts = []
    for o in objs:
        color = o["color"] or "grey"
        parts.append(f"the {color} {o['shape']}, {position_words(o['box'], image_size)}")
    return " and ".join(parts)


def response_text(answer: str, think: str | None = None, perception: str | None = None) -> str:
    """The target response that follows the forced ``<Focus>``.

    Args:
        answer: the normalised answer.
        think: the reasoning text (default: none beyond the tags).
        perception: a text description of the evidence placed right after ``<Focus>``
            (the ``text_perception`` baseline supervises perception this way).

    >>> response_text("red", "look at the circle")
    '<think>look at the circle</think><answer>red</answer>'
    """
    head = f" {perception}" if perception else ""
    return f"{head}{THINK_OPEN}{think or ''}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def _strip_end(text: str) -> str:
    """Drop end-of-turn tokens at the end of the text only (one inside the text is malformed)."""
    text = text.strip()
    changed = True
    while changed:
        changed = False
        for tok in _END_TOKENS:
            if text.endswith(tok):
                text, changed = text[: -len(tok)].rstrip(), True
    return text


def parse_answer(text: Any) -> str | None:
    """The normalised content of the first ``<answer>`` tag, or ``None`` if absent/empty.

    Args:
        text: a response; anything that is not a string parses to None.

    Returns:
        The answer span in ``normalise``'s form, or None. Compare it with the ground truth
        through ``scoring.answers_match``.

    >>> parse_answer("<think>x</think><answer> Red </answer>")
    'red'
    >>> parse_answer("<think>no answer</think>") is None
    True
    >>> parse_answer(None) is None
    True
    """
    if not isinstance(text, str):
        return None
    m = _ANSWER_RE.search(text)
    if not m:
        return None
    ans = normalise(m.group(1))
    return ans or None


def normalise(text: str) -> str:
    """Lower-case, collapse whitespace, drop trailing periods: the parsed answer's display form.

    Answers are compared with ``scoring.answers_match``, which normalises further (punctuation,
    articles, numbers); this lighter form is what ``parse_answer`` returns and logs show.

    Args:
        text: the raw answer span.

    Returns:
        The cleaned text (``""`` when nothing is left).

    >>> normalise("  Light  Blue. ")
    'light blue'
    """
    return " ".join(text.strip().lower().rstrip(".").split())


def is_well_formed(text: Any) -> bool:
    """Whether a response follows ``[<Focus>] ... <think>...</think><answer>...</answer>``.

    >>> is_well_formed("<think>a</think><answer>b</answer><|im_end|>")
    True
    >>> is_well_formed("<answer>b</answer>")
    False
    """
    if not isinstance(text, str):
        return False
    return bool(_FORMAT_RE.match(_strip_end(text)))
