"""Test tiers: every collected item gets exactly one of the markers ``unit``, ``train``, ``notebook``.

* ``notebook``: the nbval items (one per cell of ``notebooks/*.ipynb``).
* ``train``: a test that trains (optimiser steps on the tiny backbone), launches processes, or
  runs a model for more than about a second: the modules in ``TRAIN_MODULES``, the tests in
  ``TRAIN_TESTS``, and any test that requests a fixture in ``TRAIN_FIXTURES``.
* ``unit``: everything else (pure functions, data, tiny-model forwards under a second).

A test may also carry one of these markers itself (``@pytest.mark.train``); it is then left as it
is. ``slow`` (the modules in ``SLOW_MODULES``) is added on top of the tier, never instead of it. See ``tests/README.md`` for the
tiers, the commands that run each and their measured times.
"""

from __future__ import annotations

import pytest
import torch

TIERS = ("unit", "train", "notebook")

# Whole modules whose every test is a training run (file names under tests/).
TRAIN_MODULES = {
    "test_multiprocess.py",  # two processes under accelerate launch, two stages (~20 s)
    "test_fsdp.py",  # two FSDP processes under accelerate launch, three short runs (~35 s)
}

# Fixtures that train: a test requesting one is a training test, whatever else it does.
TRAIN_FIXTURES = {
    "sft_state",  # tests/test_grpo.py: 60 supervised steps on the tiny backbone (~7 s)
}

# Single tests (module file name, function name; all parametrisations) that take optimiser steps.
TRAIN_TESTS = {
    ("test_anchoring.py", "test_tiny_anchoring_run_raises_focus_mass"),
    ("test_anchoring.py", "test_resume_matches_uninterrupted_run"),
    ("test_anchoring.py", "test_non_finite_loss_stops_and_keeps_last_checkpoint"),
    ("test_anchoring.py", "test_full_and_lora_training_change_weights"),
    ("test_grpo.py", "test_grpo_run_changes_parameters_and_raises_reward"),
    ("test_grpo.py", "test_faithful_reward_only_for_correct_and_evidence"),
    ("test_grpo.py", "test_faithful_occlusion_runs"),
    ("test_grpo.py", "test_group_tanh_scores_distinct_correct_trajectories"),
    ("test_grpo.py", "test_resume_matches_an_uninterrupted_run"),
    ("test_grpo.py", "test_non_finite_loss_raises_and_keeps_the_last_checkpoint"),
    ("test_grpo.py", "test_dynamic_sampling_drops_degenerate_groups"),
    ("test_grpo.py", "test_kl_to_frozen_reference_and_lora_reference"),
    ("test_grpo.py", "test_grad_accum_chunks_give_the_same_loss"),
    ("test_grpo.py", "test_faithful_reward_free_of_dropout_noise"),
    ("test_jsonl_data.py", "test_stages_train_and_evaluate_on_jsonl"),
    ("test_runs.py", "test_killed_or_stopped_restart_is_never_complete"),
    ("test_runs.py", "test_resume_refuses_changed_trajectory_params_and_allows_logging_ones"),
    ("test_runs.py", "test_nan_gradient_with_finite_loss_stops_before_the_step"),
    ("test_runs.py", "test_resumed_run_reports_the_time_of_every_segment"),
    ("test_cli.py", "test_fit_sends_metrics_rows_to_trackers_and_progress_lines"),
    ("test_cli.py", "test_tensorboard_events_hold_the_rows_of_metrics_jsonl"),
}


# Marked ``slow`` as well (over ~10 s on their own): module file names under tests/.
SLOW_MODULES = {
    "test_multiprocess.py",
    "test_fsdp.py",
}


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module's tests, restored after: the tiny model gains
    nothing from more, and on a busy 2-core machine oversubscribed threads slow it many times."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tier_of(item: pytest.Item) -> str:
    """The tier of one collected item (``unit``, ``train`` or ``notebook``)."""
    own = [m.name for m in item.iter_markers() if m.name in TIERS]
    if own:
        return own[0]
    if item.path.suffix == ".ipynb":
        return "notebook"
    module = item.path.name
    function = getattr(item, "originalname", None) or item.name.split("[")[0]
    if (module in TRAIN_MODULES or (module, function) in TRAIN_TESTS
            or TRAIN_FIXTURES & set(getattr(item, "fixturenames", ()))):
        return "train"
    return "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item)
        if not any(m.name == tier for m in item.iter_markers()):
            item.add_marker(getattr(pytest.mark, tier))
        if item.path.name in SLOW_MODULES and not any(m.name == "slow" for m in item.iter_markers()):
            item.add_marker(pytest.mark.slow)
