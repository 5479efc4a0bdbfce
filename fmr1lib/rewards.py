"""Reward functions of stage 2, Reinforcing (DESIGN.md section 7): pure, model-free, never raising.

Each function maps a batch of completions (plus the dataset columns it needs) to one float per
completion, in the style of TRL / EasyR1 reward functions:

* ``accuracy_reward``: 1 if the parsed ``<answer>`` matches the ground truth, else 0;
* ``format_reward``: 1 if the completion follows ``<think>...</think><answer>...</answer>``;
* ``concentration`` and ``faithful_from_concentration``: the counterfactual faithful reward.
  For an answer-correct trajectory, ``s_t = KL(pi(.|I, y<t) || pi(.|I', y<t))`` measures how much
  response token ``t`` depends on the causal region ``C`` (``I'`` is the image with ``C``
  removed); the concentration ``c`` is the mean, over the top-``kappa`` tokens by ``s_t``, of the
  share of that token's image attention that falls inside ``C``. The reward is ``c`` (``raw``) or
  ``0.5 * tanh(z)`` with ``z`` the standardised ``c`` among the group's correct trajectories
  (``group_tanh``), and 0 for incorrect trajectories;
* ``combine_rewards``: ``w_acc * accuracy + w_fmt * format + w_faith * faithful``, returned with
  every component so each can be logged.

The tensors ``s_t`` and the attention shares come from ``fmr1lib.grpo``; here they are plain
sequences of numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fmr1lib import prompting

FAITHFUL_FORMS = ("raw", "group_tanh")


def accuracy_reward(completions: Sequence[Any], answers: Sequence[str],
                    answer_types: Sequence[str] | None = None) -> list[float]:
    """1.0 where the completion's ``<answer>`` matches the ground truth, else 0.0.

    Malformed completions (no answer tag, empty answer, ``None``) score 0 and never raise.

    Args:
        completions: generated texts (after the forced ``<Focus>``).
        answers: normalised ground-truth answers, one per completion.
        answer_types: ``word``, ``number``, ``yesno`` or ``choice`` per completion
            (default ``word``; numbers compare by value).

    Returns:
        One float per completion.

    >>> accuracy_reward(["<think>a</think><answer>Red</answer>", "<answer>blue</answer>", None],
    ...                 ["red", "red", "red"])
    [1.0, 0.0, 0.0]
    """
    types = list(answer_types) if answer_types is not None else ["word"] * len(completions)
    if not len(completions) == len(answers) == len(types):
        raise ValueError(f"lengths differ: {len(completions)} completions, {len(answers)} answers, "
                         f"{len(types)} answer types")
    out = []
    for text, gold, kind in zip(completions, answers, types, strict=True):
        try:
            ok = prompting.answers_match(prompting.parse_answer(text), str(gold), kind or "word")
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


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensors
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def concentration(s_t: Any, share_in_region: Any, mask: Any = None, kappa: int = 4) -> float:
    """Mean attention share inside the causal region over the top-``kappa`` tokens by ``s_t``.

    Args:
        s_t: ``[T]`` visual dependency of each response token.
        share_in_region: ``[T]`` share of each token's image attention inside the region.
        mask: ``[T]`` valid response tokens (default: all); at most ``kappa`` valid tokens
            with the largest ``s_t`` enter the mean (ties: the earlier token).
        kappa: number of tokens averaged.

    Returns:
        The concentration ``c`` in ``[0, 1]``; 0.0 when no token is valid.

    >>> round(concentration([0.1, 0.9, 0.5, 0.0], [0.2, 0.8, 0.4, 1.0], kappa=2), 6)
    0.6
    >>> concentration([0.1, 0.9], [0.2, 0.8], mask=[1, 0], kappa=2)
    0.2
    """
    if kappa < 1:
        raise ValueError(f"kappa must be >= 1, got {kappa}")
    s = _as_array(s_t)
    share = _as_array(share_in_region)
    if s.shape != share.shape:
        raise ValueError(f"s_t {s.shape} and share_in_region {share.shape} differ in shape")
    valid = np.ones_like(s, dtype=bool) if mask is None else _as_array(mask) > 0
    idx = np.flatnonzero(valid & np.isfinite(s) & np.isfinite(share))
    if idx.size == 0:
        return 0.0
    order = idx[np.argsort(-s[idx], kind="stable")][:kappa]
    return float(share[order].mean())


def faithful_from_concentration(c: Sequence[float], correct: Sequence[bool],
                                form: str = "group_tanh", eps: float = 1e-6) -> list[float]:
    """Faithful reward of ONE group of trajectories from their concentrations.

    Args:
        c: concentration of each trajectory of the group (ignored where incorrect).
        correct: whether each trajectory's answer is correct.
        form: ``raw`` (reward = c) or ``group_tanh`` (reward = 0.5 * tanh(z), z = (c - mean) /
            std over the group's correct trajectories, population std; neutral 0 when fewer
            than two trajectories are correct or their concentrations are all equal).
        eps: added to the std.

    Returns:
        One reward per trajectory; 0.0 for incorrect ones.

    >>> faithful_from_concentration([0.9, 0.1, 0.5], [True, True, False], "raw")
    [0.9, 0.1, 0.0]
    >>> [round(r, 3) for r in faithful_from_concentration([0.9, 0.1, 0.5], [True, True, False])]
    [0.381, -0.381, 0.0]
    >>> faithful_from_concentration([0.9, 0.1], [True, False])
    [0.0, 0.0]
    """
    if form not in FAITHFUL_FORMS:
        raise ValueError(f"unknown faithful form {form!r}; use one of {FAITHFUL_FORMS}")
    if len(c) != len(correct):
        raise ValueError(f"{len(c)} concentrations but {len(correct)} correctness flags")
    ok = [bool(k) for k in correct]
    vals = [float(v) if math.isfinite(float(v)) else 0.0 for v in c]
    if form == "raw":
        return [v if k else 0.0 for v, k in zip(vals, ok, strict=True)]
    chosen = np.array([v for v, k in zip(vals, ok, strict=True) if k], dtype=np.float64)
    if chosen.size < 2:
        return [0.0] * len(vals)
    mean, std = chosen.mean(), chosen.std()
    if chosen.max() == chosen.min():
        return [0.0] * len(vals)
    return [float(0.5 * math.tanh((v - mean) / (std + eps))) if k else 0.0
            for v, k in zip(vals, ok, strict=True)]


def combine_rewards(acc: Sequence[float], fmt: Sequence[float], faith: Sequence[float] | None,
                    w_acc: float = 1.0, w_fmt: float = 0.5,
                    w_faith: float = 1.0) -> dict[str, list[float]]:
    """The total reward and its components.

    Args:
        acc: accuracy rewards.
        fmt: format rewards.
        faith: faithful rewards (``None``: all zero, e.g. for the plain GRPO variant).
        w_acc: weight of accuracy.
        w_fmt: weight of format.
        w_faith: weight of the faithful reward.

    Returns:
        ``{"overall", "accuracy", "format", "faithful"}``, each one float per completion.

    >>> combine_rewards([1.0, 0.0], [1.0, 1.0], [0.25, 0.0], 1.0, 0.5, 2.0)["overall"]
    [2.0, 0.5]
    """
    faith = [0.0] * len(acc) if faith is None else list(faith)
    if not len(acc) == len(fmt) == len(faith):
        raise ValueError(f"lengths differ: {len(acc)} accuracy, {len(fmt)} format, "
                         f"{len(faith)} faithful")
    overall = [w_acc * a + w_fmt * f + w_faith * r for a, f, r in zip(acc, fmt, faith, strict=True)]
    return {"overall": [float(v) for v in overall], "accuracy": [float(v) for v in acc],
            "format": [float(v) for v in fmt], "faithful": [float(v) for v in faith]}
