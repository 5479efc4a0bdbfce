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
    with pytest.raises(ParamsError, match="key 'profile': no profile 'qwen'.*profiles: \\[\\]"):
        config.notebook_params("01_data_construction", {"profile": "qwen"}, root=tmp_path)
    _profile(tmp_path, "02_backbone", "profile: tiny\n")
    with pytest.raises(ParamsError, match="no parameter file.*'tiny'"):
        config.notebook_params("01_data_construction", {"profile": "tiny"}, root=tmp_path)
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
    assert f"{len(config.section_of(config.RLParams))} parameters, 2 differ" in lines[0]
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


# --------------------------------------------------------------------------------------
# Values out of range, bad YAML, profiles, layer and head indices: all before any work
# --------------------------------------------------------------------------------------

TINY_BACKBONE = "params/tiny/02_backbone.yaml"  # 2 decoder layers, 4 heads (BuildParams defaults)
CLASSES = {"data": config.DataParams, "backbone": config.BackboneParams,
           "anchor": config.AnchorParams, "rl": config.RLParams, "eval": config.EvalParams}

BAD_VALUES = [
    ("rl", "lr", 0), ("rl", "lr", -1e-4), ("rl", "lr", float("nan")), ("rl", "lr", float("inf")),
    ("anchor", "lr", 0.0),
    ("rl", "clip_low", 1.5), ("rl", "clip_low", 1.0), ("rl", "clip_low", -0.1),
    ("rl", "clip_high", -0.1),
    ("rl", "top_p", 1.5), ("rl", "top_p", 0.0),
    ("rl", "temperature", 0.0), ("rl", "temperature", -1.0),
    ("rl", "kappa", 0), ("rl", "prompts_per_step", 0), ("rl", "num_iterations", 0),
    ("rl", "occlusion_cells", 0), ("rl", "n_prompts", -1), ("rl", "beta", -0.1),
    ("rl", "occlusion_search", "nope"), ("rl", "occlusion_budget", 0),
    ("backbone", "num_heads", 0), ("backbone", "num_layers", 0), ("backbone", "num_kv_heads", 0),
    ("anchor", "num_heads", 0),
    ("anchor", "variants", []), ("rl", "variants", []), ("rl", "variants", ["grpo", "grpo"]),
    ("anchor", "anchor_layers", []), ("rl", "reward_layers", []), ("eval", "eval_layers", []),
    ("anchor", "anchor_layers", [1, 1]),
    ("anchor", "grad_clip", -1.0), ("rl", "grad_clip", -1.0), ("anchor", "weight_decay", -0.1),
    ("anchor", "lr_warmup_steps", -1), ("rl", "lr_warmup_steps", -5),
    ("anchor", "checkpoint_every", -1), ("rl", "checkpoint_every", -1),
    ("anchor", "log_every", -1), ("anchor", "batch_size", 0), ("anchor", "eval_batch_size", 0),
    ("anchor", "eval_n", -1), ("anchor", "max_new_tokens", 0), ("anchor", "lora_r", 0),
    ("anchor", "lora_dropout", 1.0), ("anchor", "smooth_sigma", -1.0),
    ("data", "n_train", -1), ("data", "n_train", 0), ("data", "n_warmup", -1),
    ("data", "n_test_id", 0), ("data", "n_test_ood", -3), ("data", "n_distractors", -1),
    ("data", "n_blobs", -1), ("data", "intervention_pad", -1),
    ("eval", "seeds", [0, 0]), ("eval", "seeds", []), ("eval", "n_boot", 0),
    ("eval", "rows", ["backbone", "backbone"]), ("eval", "efficiency_variants", ["grpo_bogus"]),
    ("eval", "efficiency_prompts", [8, 8]), ("eval", "splits", []),
    ("data", "profile", "../../etc"), ("rl", "profile", "tiny/../qwen"), ("eval", "profile", ""),
    ("data", "shortcut_p", float("nan")),
    # indices beyond the backbone (tiny: 2 layers, 4 heads; known from 02_backbone.yaml)
    ("anchor", "anchor_layers", [2]), ("anchor", "anchor_layers", [-3]),
    ("anchor", "anchor_layers", [1, -1]), ("anchor", "head_select", [4]),
    ("anchor", "head_select", [-1]), ("anchor", "head_select", []),
    ("rl", "reward_layers", [0, 5]), ("eval", "eval_layers", [7]),
]


@pytest.mark.parametrize("kind,key,value", BAD_VALUES,
                         ids=[f"{k}-{key}={v!r}" for k, key, v in BAD_VALUES])
def test_bad_value_fails_at_load_naming_file_and_key(tmp_path, kind, key, value):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"profile": "tiny", key: value}))
    with pytest.raises(ParamsError) as exc:
        load_params(CLASSES[kind], f)
    msg = str(exc.value)
    assert msg.startswith(str(f)) and f"key {key!r}" in msg, msg


def test_values_at_the_edge_of_their_range_load():
    """The limits themselves are fine: 0 is "off" where the docs say so."""
    load_params(config.RLParams, {"clip_low": 0.0, "clip_high": 0.0, "top_p": 1.0, "kappa": 1,
                                  "checkpoint_every": 0, "grad_clip": 0, "log_every": 0,
                                  "reward_layers": [0, 1], "n_prompts": 0})
    load_params(config.AnchorParams, {"anchor_layers": [-2, -1], "head_select": [0, 3],
                                      "weight_decay": 0, "lr_warmup_steps": 0})
    load_params(config.EvalParams, {"efficiency_prompts": [], "eval_layers": [1]})
    load_params(DataParams, {"n_warmup": 0, "n_distractors": 0, "n_blobs": 0})


def _file(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_layer_indices_of_a_real_checkpoint_are_checked_without_loading_it(tmp_path):
    """A hub id the profiles name: its known shape; a local folder: its config.json."""
    f = _file(tmp_path / "a.yaml", "backbone_params_file: params/qwen2_5_vl_3b/02_backbone.yaml\n"
                                   "anchor_layers: [35, 36]\n")
    with pytest.raises(ParamsError, match=r"a.yaml: key 'anchor_layers': layer index \[36\].*36 "
                                          r"decoder layers"):
        load_params(config.AnchorParams, f)
    folder = tmp_path / "ckpt"
    _file(folder / "config.json", '{"text_config": {"num_hidden_layers": 3, '
                                  '"num_attention_heads": 6}}')
    bb = _file(tmp_path / "b.yaml", f"model_name: {folder}\n")
    f = _file(tmp_path / "a.yaml", f"backbone_params_file: {bb}\nanchor_layers: [-3, 2]\n"
                                   f"head_select: [5]\n")
    load_params(config.AnchorParams, f)
    with pytest.raises(ParamsError, match=r"key 'head_select'.*6 attention heads.*config.json"):
        load_params(config.AnchorParams, f, head_select=[6])
    # Stage 2 reaches the backbone through its anchor file.
    rl = _file(tmp_path / "r.yaml", f"anchor_params_file: {f}\nreward_layers: [3]\n")
    with pytest.raises(ParamsError, match=r"r.yaml: key 'reward_layers'.*3 decoder layers"):
        load_params(config.RLParams, rl)
    # A shape known from nowhere (hub id not cached, not known): checked on the loaded config.
    bb.write_text("model_name: someone/uncached-model-for-tests\n")
    p = load_params(config.AnchorParams, f, anchor_layers=[9])
    with pytest.raises(ParamsError, match=r"<config>: key 'anchor_layers'.*3 decoder layers"):
        config.check_indices(p, 3, 6, "the checkpoint's config", "<config>")


def test_yaml_that_is_not_utf8_names_the_file(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("profile: tiny\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ParamsError, match="latin1.yaml: not UTF-8"):
        load_params(DataParams, f)


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "null\n"])
def test_empty_yaml_is_refused_and_explicit_braces_mean_defaults(tmp_path, text):
    f = tmp_path / "empty.yaml"
    f.write_text(text)
    with pytest.raises(ParamsError, match="empty.yaml: no parameters.*profile.*{}"):
        load_params(DataParams, f)
    f.write_text("{}\n")
    assert load_params(DataParams, f) == DataParams()


@pytest.mark.parametrize("text,key", [
    ("profile: tiny\nlr: 0.1\nsteps: 3\nlr: 0.2\n", "lr"),
    ("profile: tiny\nsource: jsonl\njsonl_files:\n  train: a.jsonl\n  train: b.jsonl\n", "train"),
])
def test_duplicate_yaml_keys_are_refused_naming_key_and_file(tmp_path, text, key):
    f = tmp_path / "twice.yaml"
    f.write_text(text)
    with pytest.raises(ParamsError) as exc:
        load_params(config.RLParams if key == "lr" else DataParams, f)
    assert str(exc.value).startswith(str(f)) and f"key {key!r} is set twice" in str(exc.value)


def test_yaml_merge_keys_may_still_be_overridden():
    data = yaml.load("a: &b {x: 1}\nc:\n  <<: *b\n  x: 2\n", Loader=config.UniqueKeyLoader)
    assert data["c"] == {"x": 2}


def test_profile_must_be_a_folder_under_params(tmp_path):
    with pytest.raises(ParamsError) as exc:
        config.notebook_params("01_data_construction", {"profile": "qwen"})
    assert "key 'profile': no profile 'qwen'" in str(exc.value)
    assert "'qwen2_5_vl_3b', 'qwen2_5_vl_7b', 'study', 'tiny'" in str(exc.value)
    with pytest.raises(ParamsError, match="'../../etc' is not a profile name"):
        config.notebook_params("01_data_construction", {"profile": "../../etc"})
    with pytest.raises(ParamsError, match="'tiny/..' is not a profile name"):
        config.notebook_params("01_data_construction", profile="tiny/..")
    f = _profile(tmp_path, "01_data_construction", "n_train: 5\n")
    with pytest.raises(ParamsError, match=f"{f}: key 'profile' missing"):
        config.notebook_params("01_data_construction", {"profile": "tiny"}, root=tmp_path)


@pytest.mark.parametrize("argv,expected", [
    (["rl", "--params", "params/tiny/04_counterfactual_rl.yaml", "--variants", "grpo_bogus"],
     "--variants (with params/tiny/04_counterfactual_rl.yaml): key 'variants': unknown "
     "['grpo_bogus']"),
    (["anchor", "--params", "params/tiny/03_anchoring.yaml", "--variants", "plain", "plain"],
     "key 'variants': ['plain'] listed more than once"),
    (["notebook", "01_data_construction", "--profile", "nope"],
     "--profile: no profile 'nope'"),
    (["reproduce", "--profile", "../tiny"], "--profile: '../tiny' is not a profile name"),
])
def test_cli_checks_variants_and_profile_before_any_work(monkeypatch, capsys, argv, expected):
    import sys
    import types

    import fmr1lib
    from fmr1lib import cli

    def no_work(*args, **kwargs):
        pytest.fail("a stage or notebook ran")

    stages = types.SimpleNamespace(anchor_stage=no_work, rl_stage=no_work)
    monkeypatch.setitem(sys.modules, "fmr1lib.stages", stages)
    monkeypatch.setattr(fmr1lib, "stages", stages, raising=False)
    monkeypatch.setattr(cli, "run_notebook", no_work)
    monkeypatch.chdir(config.PARAMS_ROOT)
    assert cli.main(argv) == 2
    assert expected in capsys.readouterr().err


def test_cli_runs_the_variants_it_is_given(monkeypatch, capsys):
    import sys
    import types

    import fmr1lib
    from fmr1lib import cli

    ran = []
    result = types.SimpleNamespace(steps=1, wall_time_s=0.0, out_dir="x")
    stages = types.SimpleNamespace(rl_stage=lambda p, v: ran.append(v) or (None, None, result))
    monkeypatch.setitem(sys.modules, "fmr1lib.stages", stages)
    monkeypatch.setattr(fmr1lib, "stages", stages, raising=False)
    monkeypatch.chdir(config.PARAMS_ROOT)
    argv = ["rl", "--params", "params/tiny/04_counterfactual_rl.yaml", "--variants"]
    assert cli.main([*argv, "faithful", "grpo"]) == 0 and ran == ["faithful", "grpo"]
    assert cli.main(argv) == 0 and ran[2:] == ["grpo_backbone", "grpo", "faithful", "faithful_occlusion"]


@pytest.mark.parametrize("profile", ["tiny", "qwen2_5_vl_3b", "qwen2_5_vl_7b"])
def test_every_micro_batch_of_a_profile_holds_examples(profile):
    """The GPU anchoring files once set batch_size 4 with grad_accum 8: batch_size counts a whole
    optimiser step, so four of the eight micro-batches were empty and stage 1 crashed."""
    import numpy as np

    p = config.load_params(config.AnchorParams, config.notebook_params_file(profile, "03_anchoring"))
    parts = np.array_split(np.arange(p.batch_size), p.grad_accum)
    assert all(len(part) > 0 for part in parts), (p.batch_size, p.grad_accum)


def test_grad_accum_above_batch_size_is_refused(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("batch_size: 4\ngrad_accum: 8\n")
    with pytest.raises(config.ParamsError, match="grad_accum") as err:
        config.load_params(config.AnchorParams, f)
    assert str(f) in str(err.value)
