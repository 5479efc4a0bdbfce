"""Typed parameters: unknown keys, wrong types and bad YAML fail naming file and key."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from fmr1lib import config
from fmr1lib.config import DataParams, ParamsError, load_params


def test_defaults_build():
    p = load_params(DataParams)
    assert p == DataParams()


def test_yaml_overrides_and_int_to_float(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("n_train: 10\nshortcut_p: 1\n")
    p = load_params(DataParams, f)
    assert p.n_train == 10 and p.shortcut_p == 1.0 and isinstance(p.shortcut_p, float)


def test_unknown_key_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("n_trian: 10\n")
    with pytest.raises(ParamsError) as exc:
        load_params(DataParams, f)
    assert str(f) in str(exc.value) and "n_trian" in str(exc.value)


@pytest.mark.parametrize("key,value,expected", [
    ("n_train", "10", "expected int"),
    ("n_train", 1.5, "expected int"),
    ("n_train", True, "expected int"),
    ("shortcut_p", "high", "expected float"),
    ("colors", "red", "expected list"),
    ("colors", ["red", 3], "colors"),
    ("tasks", {"color": "a"}, "tasks"),
    ("profile", 3, "expected str"),
])
def test_wrong_type_names_file_and_key(tmp_path, key, value, expected):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({key: value}))
    with pytest.raises(ParamsError) as exc:
        load_params(DataParams, f)
    msg = str(exc.value)
    assert str(f) in msg and repr(key) in msg and expected in msg


def test_bad_yaml_names_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("n_train: [1, 2\n")
    with pytest.raises(ParamsError, match="broken.yaml.*invalid YAML"):
        load_params(DataParams, f)


def test_non_mapping_yaml(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="list.yaml.*mapping"):
        load_params(DataParams, f)


def test_missing_file():
    with pytest.raises(ParamsError, match="no_such.yaml"):
        load_params(DataParams, "no_such.yaml")


def test_value_range_checked(tmp_path):
    f = tmp_path / "range.yaml"
    f.write_text("image_size: 100\n")
    with pytest.raises(ParamsError, match="range.yaml.*image_size"):
        load_params(DataParams, f)
    with pytest.raises(ParamsError, match="tasks"):
        load_params(DataParams, {"tasks": {"colour": 1.0}})


def _profile(root, notebook, text):
    """A params folder under ``root`` with one file, ``params/tiny/<notebook>.yaml``."""
    folder = root / "params" / "tiny"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{notebook}.yaml").write_text(text)
    return folder / f"{notebook}.yaml"


def test_notebook_params_reads_the_profile_file_then_the_namespace(tmp_path):
    _profile(tmp_path, "01_data_construction", "profile: tiny\nn_train: 10\nshortcut_p: 0.9\n")
    ns = {"profile": "tiny", "n_train": None, "shortcut_p": 0.5, "np": object(), "some_local": 3}
    p = config.notebook_params("01_data_construction", ns, root=tmp_path)
    # None: the file's value; a set field overrides the file; other names are ignored.
    assert (p.n_train, p.shortcut_p) == (10, 0.5)
    assert p == dataclasses.replace(DataParams(), n_train=10, shortcut_p=0.5)
    assert config.notebook_params("01_data_construction", {"profile": "tiny"}, root=tmp_path,
                                  n_test_id=3).n_test_id == 3


def test_notebook_params_rejects_unknown_and_mistyped_keys_naming_file_and_key(tmp_path):
    f = _profile(tmp_path, "01_data_construction", "profile: tiny\n")
    with pytest.raises(ParamsError) as exc:
        config.notebook_params("01_data_construction", {"profile": "tiny"}, root=tmp_path,
                               n_trian=10)
    assert str(f) in str(exc.value) and "n_trian" in str(exc.value)
    with pytest.raises(ParamsError) as exc:
        config.notebook_params("01_data_construction", {"profile": "tiny", "n_train": "many"},
                               root=tmp_path)
    assert str(f) in str(exc.value) and "'n_train'" in str(exc.value)
    with pytest.raises(ParamsError, match="shortcut_p"):
        config.notebook_params("01_data_construction", {"shortcut_p": 2.0}, root=tmp_path)
    f.write_text("profile: tiny\nbatch_size: 3\n")
    with pytest.raises(ParamsError) as exc:
        config.notebook_params("01_data_construction", {}, root=tmp_path)
    assert str(f) in str(exc.value) and "batch_size" in str(exc.value)


def test_notebook_params_needs_the_file_of_its_own_profile(tmp_path):
    with pytest.raises(ParamsError, match="no parameter file.*'qwen'"):
        config.notebook_params("01_data_construction", {"profile": "qwen"}, root=tmp_path)
    with pytest.raises(ParamsError, match="unknown notebook"):
        config.notebook_params("06_nothing", {}, root=tmp_path)
    _profile(tmp_path, "01_data_construction", "profile: other\n")
    with pytest.raises(ParamsError, match="'profile' is 'other'"):
        config.notebook_params("01_data_construction", {"profile": "tiny"}, root=tmp_path)


def test_params_summary_is_short_and_names_file_and_overrides(tmp_path):
    f = _profile(tmp_path, "04_counterfactual_rl", "profile: tiny\nkappa: 2\n")
    p = config.notebook_params("04_counterfactual_rl", {"profile": "tiny", "steps": 3},
                               root=tmp_path)
    lines = config.params_summary(p, f).splitlines()
    assert str(f) in lines[0] and "RLParams" in lines[0]
    assert f"{len(dataclasses.fields(config.RLParams))} parameters, 2 differ" in lines[0]
    assert sorted(lines[1:]) == ["  kappa: 2", "  steps: 3  # override; the file gives 24"]
    # The notebooks' default: the profile's own file, one line when nothing differs.
    assert len(config.params_summary(config.load_params(config.RLParams)).splitlines()) == 1


def test_stage_params_hold_no_field_their_stage_never_reads():
    """Stage 2 samples prompts_per_step x group_size (no batch_size), loads the stage-1 model
    (no model_name, tiny shape or processor size); notebook 05 draws no random numbers."""
    fields = {cls: {f.name for f in dataclasses.fields(cls)}
              for cls in (config.RLParams, config.AnchorParams, config.EvalParams)}
    assert not fields[config.RLParams] & {
        "batch_size", "model_name", "trust_remote_code", "image_min_pixels", "image_max_pixels",
        "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
        "vision_depth", "vision_hidden", "vision_heads", "vocab_size"}
    assert not fields[config.AnchorParams] & {"model_name", "trust_remote_code"}
    assert "seed" not in fields[config.EvalParams]
    # What stage 2 does read stays: accumulation splits its forwards, checkpointing saves memory.
    assert {"grad_accum", "gradient_checkpointing", "max_new_tokens", "lora"} <= fields[config.RLParams]


def test_format_params_roundtrip():
    p = DataParams(n_train=5)
    again = load_params(DataParams, yaml.safe_load(config.format_params(p)))
    assert again == p
