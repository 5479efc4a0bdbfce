"""Reward functions of stage 2, Reinforcing (docs/design.md §6.2): pure, model-free, never raising.

Each function maps a batch of completions (plus the dataset columns it needs) to one float per
completion, in the style of TRL / EasyR1 reward functions:

* ``accuracy_reward``: 1 if the parsed ``<answer>`` matches the ground truth, else 0;
* ``format_reward``: 1 if the completion follows ``<think>...</think><answer>...</answer>``;
* ``faithful``: the counterfactual faithful reward, which needs the model (attention and a
  forward on the counterfactual image); it lives with its ingredients in ``fmr1lib/faithful.py``
  and reaches this module as numbers;
* ``combine_rewards``: ``w_acc * accuracy + w_fmt * format + w_faith * faithful``, returned with
  every component so each can be logged.

``combine_rewards`` is the one place the components are summed: the GRPO step calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fmr1lib import prompting, scoring


def accuracy_reward(completions: Sequence[Any], answers: Sequence[str],
                    answer_types: Sequence[str | None] | None = None,
                    choices: Sequence[Sequence[str] | None] | None = None) -> list[float]:
    """1.0 where the completion's ``<answer>`` matches the ground truth, else 0.0.

    The verdict is ``scoring.answers_match``'s, the same as the evaluation's and the
    benchmark's. Malformed completions (no answer tag, empty answer, ``None``) score 0 and
    never raise.

    Args:
        completions: generated texts (after the forced ``<Focus>``).
        answers: ground-truth answers, one per completion.
        answer_types: ``word``, ``number``, ``yesno`` or ``choice`` per completion
            (default ``word``; numbers compare by value).
        choices: the choices of each ``choice`` answer (None entries elsewhere); without them
            a choice letter is compared as plain text.

    Returns:
        One float per completion.

    Raises:
        ValueError: the sequences differ in length.

    >>> accuracy_reward(["<think>a</think><answer>Red</answer>", "<answer>blue</answer>", None],
    ...                 ["red", "red", "red"])
    [1.0, 0.0, 0.0]
    >>> accuracy_reward(["<answer>(B)</answer>"], ["blue"], ["choice"], [["green", "blue"]])
    [1.0]
    """
    n = len(completions)
    types = list(answer_types) if answer_types is not None else ["word"] * n
    options = list(choices) if choices is not None else [None] * n
    if not n == len(answers) == len(types) == len(options):
        raise ValueError(f"lengths differ: {n} completions, {len(answers)} answers, "
                         f"{len(types)} answer types, {len(options)} choice lists")
    out = []
    for text, gold, kind, opts in zip(completions, answers, types, options, strict=True):
        try:
            ok = scoring.answers_match(prompting.parse_answer(text), str(gold), kind or "word",
                                       opts)
        except Exception:  # noqa: BLE001 - a reward must never stop a run
            ok = False
        out.append(1.0 if ok else 0.0)
    return out


def format_reward(completions: Sequence[Any]) -> list[float]:
    """1.0 where the completion follows ``[<Focus>] ... <think>...</think><answer>...</answer>``.

    Args:
        completions: generated texts; ``None`` or non-strings score 0.

    Returns:
        One float per completion.

    >>> format_reward(["<think>x</think><answer>red</answer>", "<answer>red</answer>", None])
    [1.0, 0.0, 0.0]
    """
    return [1.0 if prompting.is_well_formed(text) else 0.0 for text in completions]


def combine_rewards(acc: Sequence[float], fmt: Sequence[float], faith: Sequence[float] | None,
                    w_acc: float = 1.0, w_fmt: float = 0.5, w_faith: float = 1.0,
                    extra: Sequence[float] | None = None) -> dict[str, list[float]]:
    """The total reward and its components.

    Args:
        acc: accuracy rewards.
        fmt: format rewards.
        faith: faithful rewards (``None``: all zero, e.g. for the plain GRPO variant).
        w_acc: weight of accuracy.
        w_fmt: weight of format.
        w_faith: weight of the faithful reward.
        extra: a further reward added with weight 1 (``None``: none), e.g. a custom task's.

    Returns:
        ``{"overall", "accuracy", "format", "faithful", "extra"}``, each one float per
        completion.

    >>> combine_rewards([1.0, 0.0], [1.0, 1.0], [0.25, 0.0], 1.0, 0.5, 2.0)["overall"]
    [2.0, 0.5]
    """
    faith = [0.0] * len(acc) if faith is None else list(faith)
    extra = [0.0] * len(acc) if extra is None else list(extra)
    if not len(acc) == len(fmt) == len(faith) == len(extra):
        raise ValueError(f"lengths differ: {len(acc)} accuracy, {len(fmt)} format, "
                         f"{len(faith)} faithful, {len(extra)} extra")
    overall = [w_acc * a + w_fmt * f + e + w_faith * r
               for a, f, r, e in zip(acc, fmt, faith, extra, strict=True)]
    return {"overall": [float(v) for v in overall], "accuracy": [float(v) for v in acc],
            "format": [float(v) for v in fmt], "faithful": [float(v) for v in faith],
            "extra": [float(v) for v in extra]}
