"""Reward functions of stage 2 (fmr1lib.rewards): pure, no model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fmr1lib import faithful, rewards

GOOD = "<think>look at the circle</think><answer>red</answer>"
WRONG = "<think>look at the circle</think><answer>blue</answer>"
MALFORMED = "<think>look at the circle<answer>red</answer>"
NO_ANSWER = "<think>look at the circle</think>"
NO_TAGS = "red"
EMPTY_ANSWER = "<think>x</think><answer></answer>"


def test_accuracy_reward_values():
    comps = [GOOD, WRONG, MALFORMED, NO_ANSWER, NO_TAGS, None, EMPTY_ANSWER]
    out = rewards.accuracy_reward(comps, ["red"] * len(comps), ["word"] * len(comps))
    # The answer tag is parsed even when the surrounding format is broken.
    assert out == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_accuracy_reward_normalises_and_compares_numbers():
    comps = ["<think>a</think><answer> RED. </answer>", "<think>a</think><answer>3.0</answer>",
             "<think>a</think><answer>three</answer>", "<think>a</think><answer>four</answer>",
             "<think>a</think><answer>many</answer>"]
    out = rewards.accuracy_reward(comps, ["red", "3", "3", "3", "3"], ["word"] + ["number"] * 4)
    # Number words count as their digits (scoring.normalise_answer); other words never match.
    assert out == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_accuracy_reward_maps_choice_letters_with_the_choices():
    comps = ["<answer>B</answer>", "<answer>(b)</answer>", "<answer>blue</answer>",
             "<answer>A</answer>"]
    choices = [["green", "blue"]] * 4
    out = rewards.accuracy_reward(comps, ["blue"] * 4, ["choice"] * 4, choices)
    assert out == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="lengths differ"):
        rewards.accuracy_reward(comps, ["blue"] * 4, ["choice"] * 4, choices[:3])


def test_accuracy_reward_never_raises_on_odd_input():
    out = rewards.accuracy_reward([123, b"<answer>red</answer>", ""], ["red"] * 3)
    assert out == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="lengths differ"):
        rewards.accuracy_reward([GOOD], ["red", "red"])


def test_format_reward_values():
    comps = [GOOD, WRONG, MALFORMED, NO_ANSWER, NO_TAGS, None, EMPTY_ANSWER,
             GOOD + "<|im_end|>", "<Focus>" + GOOD, GOOD + " trailing words"]
    assert rewards.format_reward(comps) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def test_concentration_top_kappa():
    s = [0.1, 0.9, 0.5, 0.0, 0.7]
    share = [0.2, 0.8, 0.4, 1.0, 0.6]
    assert faithful.concentration(s, share, kappa=1) == pytest.approx(0.8)
    assert faithful.concentration(s, share, kappa=3) == pytest.approx((0.8 + 0.6 + 0.4) / 3)
    # kappa beyond the number of tokens averages all of them
    assert faithful.concentration(s, share, kappa=10) == pytest.approx(np.mean(share))


def test_concentration_respects_mask_and_accepts_tensors():
    s = torch.tensor([0.1, 0.9, 0.5, 0.3])
    share = torch.tensor([0.2, 0.8, 0.4, 0.6])
    mask = torch.tensor([1, 0, 1, 1])
    # token 1 has the largest s_t but is masked out
    assert faithful.concentration(s, share, mask, kappa=2) == pytest.approx((0.4 + 0.6) / 2)
    assert faithful.concentration(s, share, torch.zeros(4), kappa=2) == 0.0
    with pytest.raises(ValueError):
        faithful.concentration([0.1], [0.1, 0.2])
    with pytest.raises(ValueError):
        faithful.concentration([0.1], [0.1], kappa=0)


def test_concentration_ties_take_earlier_token():
    assert faithful.concentration([1.0, 1.0, 1.0], [0.1, 0.2, 0.3], kappa=1) == pytest.approx(0.1)


def test_faithful_incorrect_trajectories_get_zero():
    c = [0.9, 0.1, 0.5, 0.7]
    correct = [True, False, True, False]
    raw = faithful.faithful_from_concentration(c, correct, "raw")
    assert raw == [0.9, 0.0, 0.5, 0.0]
    tanh = faithful.faithful_from_concentration(c, correct, "group_tanh")
    assert tanh[1] == 0.0 and tanh[3] == 0.0


def test_faithful_group_tanh_neutral_below_two_correct():
    assert faithful.faithful_from_concentration([0.9, 0.1, 0.5], [True, False, False]) == [0.0] * 3
    assert faithful.faithful_from_concentration([0.9, 0.1], [False, False]) == [0.0, 0.0]
    # equal concentrations carry no signal either
    assert faithful.faithful_from_concentration([0.4, 0.4], [True, True]) == [0.0, 0.0]
    # raw is not neutral with a single correct trajectory
    assert faithful.faithful_from_concentration([0.9, 0.1], [True, False], "raw") == [0.9, 0.0]


def test_faithful_group_tanh_values():
    c = [0.8, 0.2, 0.5, 0.9]
    correct = [True, True, True, False]
    out = faithful.faithful_from_concentration(c, correct, "group_tanh", std_floor=0.0)
    chosen = np.array([0.8, 0.2, 0.5])
    z = (chosen - chosen.mean()) / chosen.std()
    assert out[:3] == pytest.approx(list(0.5 * np.tanh(z)))
    assert out[3] == 0.0
    assert all(abs(v) < 0.5 for v in out)
    assert sum(out) == pytest.approx(0.0, abs=1e-12)  # symmetric around the group mean


def test_group_tanh_floor_makes_noise_count_as_none():
    """Concentrations 7e-5 apart (numerical noise) once became rewards of -0.30 / +0.44 and
    flipped the sign of advantages; below the floor they are a tie."""
    c = [0.41230, 0.41237, 0.41233, 0.9]
    correct = [True, True, True, False]
    assert faithful.faithful_from_concentration(c, correct) == [0.0] * 4
    # Without a floor the same noise is rewarded at full strength (the old behaviour).
    loud = faithful.faithful_from_concentration(c, correct, std_floor=0.0)
    assert max(abs(v) for v in loud) > 0.3


def test_group_tanh_floor_bounds_z_just_above_it():
    # A spread just above the floor is scored, but z is measured in floors, not in a tiny std.
    out = faithful.faithful_from_concentration([0.5, 0.515], [True, True], std_floor=0.01)
    assert out == pytest.approx([-0.5 * math.tanh(0.75), 0.5 * math.tanh(0.75)])
    # A real difference is unaffected by the floor (std 0.3 > 0.01).
    big = faithful.faithful_from_concentration([0.2, 0.8], [True, True], std_floor=0.01)
    assert big == pytest.approx([-0.5 * math.tanh(1.0), 0.5 * math.tanh(1.0)])
    with pytest.raises(ValueError, match="std_floor"):
        faithful.faithful_from_concentration([0.2, 0.8], [True, True], std_floor=-1.0)


def test_faithful_rejects_bad_form_and_lengths():
    with pytest.raises(ValueError, match="form"):
        faithful.faithful_from_concentration([0.1], [True], "softmax")
    with pytest.raises(ValueError):
        faithful.faithful_from_concentration([0.1, 0.2], [True])


def test_faithful_non_finite_concentration_is_zero():
    out = faithful.faithful_from_concentration([math.nan, 0.5], [True, True], "raw")
    assert out == [0.0, 0.5]


def test_combine_rewards_weights_and_components():
    acc, fmt, faith = [1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.3, 0.0, -0.2]
    out = rewards.combine_rewards(acc, fmt, faith, w_acc=1.0, w_fmt=0.5, w_faith=2.0)
    assert set(out) == {"overall", "accuracy", "format", "faithful", "extra"}
    assert out["overall"] == pytest.approx([2.1, 0.5, 0.6])
    assert out["accuracy"] == acc and out["format"] == fmt and out["faithful"] == faith
    plain = rewards.combine_rewards(acc, fmt, None, 1.0, 0.5, 2.0)
    assert plain["faithful"] == [0.0] * 3 and plain["overall"] == pytest.approx([1.5, 0.5, 1.0])
    with pytest.raises(ValueError):
        rewards.combine_rewards([1.0], [1.0, 0.0], None)
