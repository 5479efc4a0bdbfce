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


def test_namespace_takes_only_fields_and_requires_all():
    ns = {f.name: getattr(DataParams(), f.name) for f in dataclasses.fields(DataParams)}
    ns.update({"np": object(), "some_local": 3, "n_train": 7})
    assert load_params(DataParams, ns, namespace=True).n_train == 7
    del ns["seed"]
    with pytest.raises(ParamsError, match="missing parameters.*seed"):
        load_params(DataParams, ns, namespace=True)


def test_format_params_roundtrip():
    p = DataParams(n_train=5)
    again = load_params(DataParams, yaml.safe_load(config.format_params(p)))
    assert again == p
