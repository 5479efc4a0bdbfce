"""Every parameter value lives once: a dataclass default, or a profile's file where it differs.

``params/<profile>/*.yaml`` hold only what a profile changes (plus ``profile`` and the pointers to
the other stages' files); the notebooks' ``parameters`` cells name a few knobs set to None, and
``cli.run_notebook`` injects only the profile and explicit overrides.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml

from fmr1lib import cli, config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# params/accelerate/ holds launcher configs, not stage params; they are checked separately.
YAMLS = sorted(p for p in (ROOT / "params").glob("*/*.yaml") if p.parent.name != "accelerate")
ACCELERATE_YAMLS = sorted((ROOT / "params" / "accelerate").glob("*.yaml"))


def _yaml_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


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


@pytest.mark.parametrize("path", YAMLS, ids=_yaml_id)
def test_yaml_builds(path):
    """(a) Every file loads and validates, in its own profile, through the notebooks' loader."""
    cls = config.PARAMS_BY_NOTEBOOK[path.stem]
    p = config.load_params(cls, path)
    assert p.profile == path.parent.name
    assert config.notebook_params(path.stem, {"profile": path.parent.name}) == p
    for key in ("data_params_file", "backbone_params_file", "anchor_params_file", "rl_params_file"):
        if hasattr(p, key):
            assert (ROOT / getattr(p, key)).exists(), (path, key)


TEST_DATA_YAMLS = sorted((ROOT / "tests" / "data").rglob("*.yaml"))


@pytest.mark.parametrize("path", TEST_DATA_YAMLS, ids=_yaml_id)
def test_test_data_params_files_load(path):
    """The params files under tests/data load with the same checks as the profiles' files."""
    p = config.load_params(config.PARAMS_BY_NOTEBOOK[path.stem], path)
    assert p.profile == path.parent.name


@pytest.mark.parametrize("path", YAMLS, ids=_yaml_id)
def test_yaml_holds_only_what_differs_from_the_defaults(path):
    """(b) No key repeats its dataclass default, so a value cannot exist twice.

    ``profile`` and the ``*_params_file`` pointers are the exceptions: every file names its
    profile and the files of the stages it builds on, so a reader sees how they connect.
    """
    defaults = config.params_to_dict(config.PARAMS_BY_NOTEBOOK[path.stem]())
    raw = yaml.safe_load(path.read_text()) or {}
    assert raw.get("profile") == path.parent.name, "every file names its profile"
    repeated = [k for k, v in raw.items()
                if k != "profile" and not k.endswith("_params_file") and v == defaults[k]]
    assert not repeated, f"{_yaml_id(path)} repeats the defaults of {repeated} (fmr1lib/config.py)"
    assert "fmr1lib/config.py" in path.read_text().split("\nprofile:")[0], \
        "the header says where the other values come from"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_holds_profile_and_knobs_set_to_none(nb_path):
    """(c) The cell names the profile and a few knobs of the notebook's dataclass, all None."""
    cls = config.PARAMS_BY_NOTEBOOK[nb_path.stem]
    names = set(config.section_of(cls))
    ns = _parameters_cell(nb_path)
    assert ns.get("profile") == "tiny"
    knobs = {k: v for k, v in ns.items() if k != "profile"}
    assert set(knobs) <= names, f"not fields of {cls.__name__}: {set(knobs) - names}"
    assert all(v is None for v in knobs.values()), \
        f"knobs must be None (from the profile's file), got {knobs}"
    assert 1 <= len(knobs) <= 5, f"{nb_path.name}: a handful of knobs, got {sorted(knobs)}"
    # As the cell leaves them, the notebook runs the profile's file unchanged.
    assert config.notebook_params(nb_path.stem, ns) == config.load_params(
        cls, ROOT / "params" / "tiny" / f"{nb_path.stem}.yaml")


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)
def test_config_cell_loads_through_notebook_params(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert f'config.notebook_params("{nb_path.stem}", globals())' in code
    assert "format_params" not in code, "the full dump repeats every parameter"


def test_run_notebook_injects_only_profile_and_overrides(monkeypatch, tmp_path):
    """(e) Papermill gets ``profile`` and the overrides, not every key of the file."""
    import papermill

    calls = []
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda src, out, **kw: calls.append(kw["parameters"]))
    cli.run_notebook("03_anchoring", "tiny", out_dir=tmp_path)
    assert calls == [{"profile": "tiny"}]
    cli.run_notebook("03_anchoring", "tiny", out_dir=tmp_path, overrides={"steps": 5})
    assert calls[1] == {"profile": "tiny", "steps": 5}


@pytest.mark.parametrize("overrides,key", [({"stepz": 5}, "stepz"), ({"steps": "five"}, "steps")])
def test_run_notebook_checks_overrides_before_papermill(monkeypatch, tmp_path, overrides, key):
    import papermill

    calls = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **kw: calls.append(kw))
    with pytest.raises(config.ParamsError, match=f"03_anchoring.yaml.*{key}"):
        cli.run_notebook("03_anchoring", "tiny", out_dir=tmp_path, overrides=overrides)
    assert not calls


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
            assert p.trust_remote_code is False
        if hasattr(p, "dtype"):
            assert p.dtype == "bfloat16", f
        for key in ("data_params_file", "backbone_params_file", "anchor_params_file"):
            if hasattr(p, key):
                assert f"params/{profile}/" in getattr(p, key), (f, key)
                assert (ROOT / getattr(p, key)).exists(), (f, key)
