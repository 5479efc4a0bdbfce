"""Every params/*/*.yaml builds, and notebook defaults equal params/tiny/ (no drift)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nbformat
import pytest
import yaml

from fmr1lib import config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
YAMLS = sorted((ROOT / "params").glob("*/*.yaml"))


def _parameters_cell(nb_path: Path) -> dict:
    nb = nbformat.read(nb_path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{nb_path.name}: expected one cell tagged 'parameters'"
    ns: dict = {}
    exec(cells[0].source, {}, ns)  # literals only, by design
    return ns


def test_every_notebook_has_a_params_class_and_tiny_file():
    assert NOTEBOOKS, "no notebooks found"
    for nb in NOTEBOOKS:
        assert nb.stem in config.PARAMS_BY_NOTEBOOK, f"{nb.name} has no params dataclass"
        assert (ROOT / "params" / "tiny" / f"{nb.stem}.yaml").exists()


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_yaml_builds(path):
    cls = config.PARAMS_BY_NOTEBOOK[path.stem]
    p = config.load_params(cls, path)
    assert p.profile == path.parent.name


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_defaults_equal_tiny_yaml(nb_path):
    cls = config.PARAMS_BY_NOTEBOOK[nb_path.stem]
    ns = _parameters_cell(nb_path)
    names = {f.name for f in dataclasses.fields(cls)}
    assert set(ns) == names, f"parameters cell names differ: {set(ns) ^ names}"
    from_nb = config.load_params(cls, ns)
    from_yaml = config.load_params(cls, ROOT / "params" / "tiny" / f"{nb_path.stem}.yaml")
    assert from_nb == from_yaml
    # The tiny YAML spells out every field, so a reader sees the whole profile.
    assert set(yaml.safe_load((ROOT / "params" / "tiny" / f"{nb_path.stem}.yaml").read_text())) == names
