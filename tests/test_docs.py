"""The user docs stay true where that can be checked mechanically.

* The README names every launcher of ``params/accelerate/`` and none that is missing; every
  ``accelerate launch`` command in the README and in ``params/accelerate/README.md`` names an
  existing config, a stage meant for it and an existing parameter file.
* What the README says about sharded checkpoints agrees with ``params/accelerate/README.md``:
  FSDP checkpoints hold full (gathered) state there, tested by ``tests/test_fsdp.py``, so the
  README may not call them unusable.
* The README says early that no GPU run has been made.
* ``docs/design.md``'s contents list every numbered section.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
ACCEL_DIR = ROOT / "params" / "accelerate"
ACCEL_README = (ACCEL_DIR / "README.md").read_text(encoding="utf-8")
LAUNCHABLE = {"backbone", "anchor", "rl"}
"""Stages meant for ``accelerate launch`` (params/accelerate/README.md)."""

LAUNCH = re.compile(r"accelerate launch --config_file (\S+)\s+-m fmr1lib (\w+)\s+--params (\S+)")


def test_readme_names_every_launcher_and_no_missing_one():
    configs = {p.name for p in ACCEL_DIR.glob("*.yaml")}
    named = set(re.findall(r"[\w.]+\.yaml", README))
    assert configs <= named, f"README.md does not name the launchers {sorted(configs - named)}"
    launcher_like = {n for n in named if re.search(r"(gpu|proc|zero\d)\.yaml$", n)}
    assert launcher_like <= configs, \
        f"README.md names launchers that params/accelerate/ lacks: {sorted(launcher_like - configs)}"


def test_every_launch_command_names_existing_files_and_a_launchable_stage():
    commands = LAUNCH.findall(README) + LAUNCH.findall(ACCEL_README)
    assert len(commands) >= 5
    for config, stage, params in commands:
        assert (ROOT / config).is_file(), f"accelerate launch names a missing config {config}"
        assert stage in LAUNCHABLE, f"accelerate launch ... -m fmr1lib {stage}: not a launchable stage"
        assert (ROOT / params).is_file(), f"accelerate launch names a missing params file {params}"


def test_readme_agrees_with_the_accelerate_readme_on_sharded_checkpoints():
    assert "holds full shapes" in ACCEL_README and (ROOT / "tests" / "test_fsdp.py").is_file()
    assert (ACCEL_DIR / "cpu_fsdp_2proc.yaml").is_file()
    for stale in ("not usable yet", "not bit-exact", "main process's shard only"):
        assert stale not in README, f"README.md says {stale!r}; params/accelerate/README.md: full-state saves"
    assert re.search(r"FSDP[^.]*full", README), "README.md should say FSDP checkpoints hold full state"


def test_readme_says_early_that_no_gpu_run_has_been_made():
    head = "\n".join(README.splitlines()[:40])
    assert "No GPU run has been made" in head
    assert "an estimate, not a measurement" in README  # the GPU time table is labelled


def test_design_contents_list_every_section():
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## (\d+)\. ", text, flags=re.M)
    listed = re.findall(r"^(\d+)\. \[", text, flags=re.M)
    assert sections and listed == sections, f"contents {listed} vs sections {sections}"
