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
# params/accelerate/ holds launcher configs, not stage params; they are checked separately.
YAMLS = sorted(p for p in (ROOT / "params").glob("*/*.yaml") if p.parent.name != "accelerate")
ACCELERATE_YAMLS = sorted((ROOT / "params" / "accelerate").glob("*.yaml"))


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


@pytest.mark.parametrize("path", ACCELERATE_YAMLS, ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    """Each launcher config is one YAML mapping accelerate can read (process count and type)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1, path.name
    assert str(cfg.distributed_type) in {"DistributedType.NO", "DistributedType.MULTI_GPU",
                                         "DistributedType.MULTI_CPU", "DistributedType.FSDP",
                                         "DistributedType.DEEPSPEED", "NO", "MULTI_GPU",
                                         "MULTI_CPU", "FSDP", "DEEPSPEED"}, path.name


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


REAL_CHECKPOINTS = {"qwen2_5_vl_3b": "Qwen/Qwen2.5-VL-3B-Instruct",
                    "qwen2_5_vl_7b": "Qwen/Qwen2.5-VL-7B-Instruct"}


@pytest.mark.parametrize("profile", sorted(REAL_CHECKPOINTS))
def test_real_profiles_name_their_checkpoint(profile):
    files = sorted((ROOT / "params" / profile).glob("*.yaml"))
    assert {f.stem for f in files} >= {"01_data_construction", "02_backbone"}
    for f in files:
        p = config.load_params(config.PARAMS_BY_NOTEBOOK[f.stem], f)
        if hasattr(p, "model_name"):
            assert p.model_name == REAL_CHECKPOINTS[profile], f
            assert p.dtype == "bfloat16" and p.trust_remote_code is False
        for key in ("data_params_file", "backbone_params_file", "anchor_params_file"):
            if hasattr(p, key):
                assert f"params/{profile}/" in getattr(p, key), (f, key)
                assert (ROOT / getattr(p, key)).exists(), (f, key)
