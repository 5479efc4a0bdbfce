"""Answer comparison and bootstrap intervals: the one place where answers are scored.

Paper step: every accuracy. The RL accuracy reward (``rewards.accuracy_reward``), the evaluation
(``evaluation.predict_answers`` and ``evaluation.evaluate_split``) and the benchmark
(``benchmark.score_predictions``) all call :func:`answers_match`, so a benchmark accuracy, an
evaluation accuracy and the reward give the same verdict on the same answer; and
``evaluation.summarise`` and the benchmark's ``accuracy_ci`` draw their intervals from the same
bootstrap (:func:`bootstrap_cis`).

Normalisation (:func:`normalise_answer`), in order:

1. ``records.clean_answer`` (the stored ground-truth form: stripped, lower case, one
   trailing period dropped), then whitespace collapsed;
2. surrounding punctuation and quotes stripped (``"yes!"``, ``'"light blue".'``, ``"(b)"``), a
   number keeping its sign and decimal point (``"-2.5"``, ``".5"``);
3. leading articles (``a``, ``an``, ``the``) dropped when a word follows (``"the cat"`` ->
   ``"cat"``); a lone ``"a"`` stays, since it may be a choice letter;
4. a number becomes its canonical value whatever the answer type: thousands separators
   removed (``"1,000"`` -> ``"1000"``, only with valid 3-digit groups, so ``"1,2"`` is not a
   number), ``"2.0"`` -> ``"2"``, ``"03"`` -> ``"3"``, ``"1e3"`` -> ``"1000"``. A whole answer
   that is a number word ``zero`` .. ``twenty`` becomes its digits, also whatever the type (as
   the VQA evaluation does), because a count is often stored or asked as a plain word;
5. ``yesno`` answers only: ``"true"`` / ``"false"`` mean ``"yes"`` / ``"no"``. Other types
   keep them as words, since there ``true`` can be a legitimate word answer. ``"Yes."``,
   ``"YES"`` and ``"yes!"`` are ``"yes"`` for every type through steps 1-2. Longer forms
   (``"yes, it is"``, ``"yeah"``) are not accepted: the reward would otherwise pay for hedges.

For ``choice`` answers with their ``choices``, :func:`choice_index` resolves either side to a
choice: a choice's text (by normalised form, so ``"2.0"`` finds choice ``"2"``), its letter
(``"B"``, ``"b"``, ``"(b)"``, ``"b."``, ``"B)"``), or ``"<letter>. <text>"`` naming the same
choice. Text wins over a letter when a choice's text is itself a letter.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from fmr1lib import records

LETTERS = string.ascii_lowercase
ARTICLES = ("a", "an", "the")
NUMBER_WORDS: dict[str, str] = {
    word: str(i)
    for i, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
"""Number words that normalise to their digits (whole answers only)."""
YESNO_ALIASES: dict[str, str] = {"true": "yes", "false": "no"}
"""Words that mean yes/no for ``yesno`` answers only."""

_QUOTES = "\u201c\u201d\u2018\u2019\u00ab\u00bb\u2026"
_EDGE_CHARS = string.punctuation + string.whitespace + _QUOTES
# A number's sign and decimal point are part of it: "-2.5" must not lose its minus.
_NUMBER_EDGE_CHARS = "".join(c for c in _EDGE_CHARS if c not in "+-.")
_NUMBER_RE = re.compile(
    r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?", re.IGNORECASE
)
_LETTERED_RE = re.compile(r"\(?([a-z])[.):]\s*(.+)")


def parse_number(text: Any) -> float | None:
    """The value of a plain number, or None.

    Surrounding punctuation and quotes are allowed (``"(3)"``, ``"50%"``), and so are
    thousands separators in valid groups, a trailing period and an exponent. Number words
    are not numbers here (:func:`normalise_answer` maps them).

    Args:
        text: the answer (a non-string is formatted first).

    Returns:
        The finite value, or None when the text is not a plain number.

    >>> parse_number("1,000"), parse_number("-2.50"), parse_number("3."), parse_number("1e3")
    (1000.0, -2.5, 3.0, 1000.0)
    >>> parse_number("1,2") is None, parse_number("2 cats") is None, parse_number("inf") is None
    (True, True, True)
    """
    t = str(text).strip().strip(_NUMBER_EDGE_CHARS)
    if not _NUMBER_RE.fullmatch(t):
        return None
    value = float(t.replace(",", ""))
    return value if math.isfinite(value) else None


def _number_key(value: float) -> str:
    # Integers print without ".0" so "2.0" and "2" share a key; repr is exact for the rest.
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _check_type(answer_type: str | None) -> None:
    if answer_type is not None and answer_type not in records.ANSWER_TYPES:
        raise ValueError(
            f"answer_type must be None or one of {', '.join(records.ANSWER_TYPES)}, "
            f"got {answer_type!r}"
        )


def normalise_answer(text: Any, answer_type: str | None = None) -> str:
    """The canonical form two answers are compared in (rules in the module docstring).

    Idempotent, and unchanged by ``records.clean_answer`` or ``prompting.normalise``
    applied first, so a stored or parsed answer keeps its verdict.

    Args:
        text: the answer (a non-string, e.g. a number, is formatted first).
        answer_type: None or one of ``records.ANSWER_TYPES``; only ``yesno`` changes the
            result (true/false). Choices are resolved by :func:`choice_index`, not here.

    Returns:
        The canonical string; ``""`` when nothing but punctuation is left.

    Raises:
        ValueError: an unknown ``answer_type``.

    >>> normalise_answer("  The Cat. "), normalise_answer('"Light  Blue".')
    ('cat', 'light blue')
    >>> normalise_answer("1,000"), normalise_answer("2.0"), normalise_answer("Three", "number")
    ('1000', '2', '3')
    >>> normalise_answer("Yes!"), normalise_answer("True", "yesno"), normalise_answer("true")
    ('yes', 'yes', 'true')
    """
    _check_type(answer_type)
    t = " ".join(records.clean_answer(str(text)).split())
    while True:
        value = parse_number(t)
        if value is not None:
            return _number_key(value)
        stripped = t.strip(_EDGE_CHARS)
        first, _, rest = stripped.partition(" ")
        if first in ARTICLES and rest:
            stripped = rest
        # Stripping can expose an article or punctuation ("the 'cat'"), so repeat to a fixed
        # point: that makes the function idempotent.
        if stripped == t:
            break
        t = stripped
    t = NUMBER_WORDS.get(t, t)
    if answer_type == "yesno":
        t = YESNO_ALIASES.get(t, t)
    return t


def letter_index(text: Any, n_choices: int) -> int | None:
    """The choice a bare letter names (``"B"``, ``"b"``, ``"(b)"``, ``"b."``), or None.

    Args:
        text: the answer.
        n_choices: how many choices there are (letters beyond them name nothing).

    Returns:
        The 0-based index, or None when the text is not one of the first ``n_choices`` letters.

    >>> letter_index("(B)", 3), letter_index("c.", 3), letter_index("D", 3)
    (1, 2, None)
    """
    key = normalise_answer(text)
    if len(key) == 1 and key in LETTERS[:n_choices]:
        return LETTERS.index(key)
    return None


def choice_index(text: Any, choices: Sequence[str]) -> int | None:
    """The choice an answer names: by its text, its letter, or ``"<letter>. <text>"``.

    Args:
        text: the answer (prediction or ground truth).
        choices: the choices, in letter order (A first).

    Returns:
        The 0-based index of the named choice, or None when it names none (including a
        ``"<letter>. <text>"`` whose letter and text disagree).

    >>> colours = ["green", "blue", "red"]
    >>> choice_index("Blue", colours), choice_index("b", colours), choice_index("B) blue", colours)
    (1, 1, 1)
    >>> choice_index("b. red", colours) is None, choice_index("purple", colours) is None
    (True, True)
    >>> choice_index("A", ["B", "A"])  # the text of choice B wins over the letter A
    1
    """
    keys = [normalise_answer(c) for c in choices]
    key = normalise_answer(text)
    if key and key in keys:
        return keys.index(key)
    by_letter = letter_index(text, len(choices))
    if by_letter is not None:
        return by_letter
    m = _LETTERED_RE.fullmatch(" ".join(str(text).lower().split()))
    if m and m.group(1) in LETTERS[: len(choices)]:
        index = LETTERS.index(m.group(1))
        if normalise_answer(m.group(2)) == keys[index]:
            return index
    return None


def answers_match(
    pred: Any,
    gold: Any,
    answer_type: str | None = None,
    choices: Sequence[str] | None = None,
) -> bool:
    """Whether a predicted answer is the ground truth, after normalisation.

    Args:
        pred: the predicted answer (None: no answer, never correct).
        gold: the ground truth (for ``choice`` the choice's text or its letter).
        answer_type: None or one of ``records.ANSWER_TYPES``.
        choices: the choices of a ``choice`` answer; without them a letter is compared as
            text, so callers must pass them for letters to count.

    Returns:
        True when both normalise to the same non-empty form (numbers are canonical, so they
        compare by value), or, for ``choice`` answers, when both name the same choice.

    Raises:
        ValueError: an unknown ``answer_type``.

    >>> answers_match("the cat", "cat"), answers_match("1,000", "1000", "number")
    (True, True)
    >>> answers_match("(b)", "blue", "choice", ["green", "blue"]), answers_match(None, "red")
    (True, False)
    """
    _check_type(answer_type)
    if pred is None or gold is None:
        return False
    if answer_type == "choice" and choices:
        p, g = choice_index(pred, choices), choice_index(gold, choices)
        if p is not None and g is not None:
            return p == g
    p_key, g_key = normalise_answer(pred, answer_type), normalise_answer(gold, answer_type)
    return bool(p_key) and p_key == g_key


# --- bootstrap ----------------------------------------------------------------------------


class Interval(NamedTuple):
    """A mean over examples and its percentile bootstrap interval."""

    mean: float
    """Mean over the examples where the value applies (NaN when none does)."""
    lo: float
    """The ``alpha / 2`` percentile of the resampled means."""
    hi: float
    """The ``1 - alpha / 2`` percentile of the resampled means."""
    n: int
    """Number of examples where the value applies (not NaN)."""


_MAX_RESAMPLED = 2_000_000
"""Entries of the resampled table held at once; bounds the memory of a large bootstrap."""


def bootstrap_cis(
    table: Sequence[Sequence[float]] | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> list[Interval]:
    """Means and percentile bootstrap intervals of the columns of a per-example table.

    The examples (rows) are resampled jointly: one index draw per replicate serves every
    column, so all metrics of a summary see the same resample. NaN marks a value that does
    not apply to an example; a column's mean, in the data and in each replicate, is over the
    entries that apply, and replicates where none applies are left out of its percentiles.

    Args:
        table: ``[n_examples, n_columns]`` numbers (e.g. 0/1 correctness), NaN = not applicable.
        n_boot: number of resamples.
        seed: seed of the ``numpy.random.Generator`` that draws them.
        alpha: 1 - coverage (0.05 gives the 95% interval).

    Returns:
        One :class:`Interval` per column; ``(nan, nan, nan, 0)`` for a column where nothing
        applies (and for every column of an empty table).

    Raises:
        ValueError: ``table`` is not 2-D, ``n_boot < 1`` or ``alpha`` not in (0, 1).

    >>> [tuple(ci) for ci in bootstrap_cis([[1.0, 0.0], [1.0, float("nan")]])]
    [(1.0, 1.0, 1.0, 2), (0.0, 0.0, 0.0, 1)]
    """
    arr = np.asarray(table, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"table must be 2-D [examples, columns], got shape {arr.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n, m = arr.shape
    nan = float("nan")
    if n == 0:
        return [Interval(nan, nan, nan, 0) for _ in range(m)]
    valid = ~np.isnan(arr)
    filled = np.where(valid, arr, 0.0)
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, m))
    # Generator.integers yields the same stream whether drawn at once or in row chunks, so
    # chunking bounds memory without changing any interval.
    chunk = max(1, _MAX_RESAMPLED // (n * max(m, 1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        for start in range(0, n_boot, chunk):
            stop = min(n_boot, start + chunk)
            idx = rng.integers(0, n, size=(stop - start, n))
            boot[start:stop] = filled[idx].sum(axis=1) / valid[idx].sum(axis=1)
        means = filled.sum(axis=0) / valid.sum(axis=0)
    out = []
    for j in range(m):
        b = boot[:, j][~np.isnan(boot[:, j])]
        lo, hi = np.quantile(b, [alpha / 2, 1 - alpha / 2]) if b.size else (nan, nan)
        out.append(Interval(float(means[j]), float(lo), float(hi), int(valid[:, j].sum())))
    return out


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> Interval:
    """Mean and percentile bootstrap interval of one per-example value (:func:`bootstrap_cis`).

    Args:
        values: a 1-D sequence of numbers (e.g. 0/1 correctness); NaN entries do not apply.
        n_boot: number of resamples.
        seed: seed of the ``numpy.random.Generator`` that draws them.
        alpha: 1 - coverage (0.05 gives the 95% interval).

    Returns:
        The :class:`Interval`; ``(nan, nan, nan, 0)`` when no value applies.

    Raises:
        ValueError: ``values`` is not 1-D, ``n_boot < 1`` or ``alpha`` not in (0, 1).

    >>> bootstrap_ci([1, 1, 1])
    Interval(mean=1.0, lo=1.0, hi=1.0, n=3)
    >>> bootstrap_ci([])
    Interval(mean=nan, lo=nan, hi=nan, n=0)
    """
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {arr.shape}")
    return bootstrap_cis(arr[:, None], n_boot=n_boot, seed=seed, alpha=alpha)[0]
