"""Own JSONL data: every bad input named in one line before any work, the profile pointers
``check-params`` flags, and ``profile new`` (fmr1lib/owndata.py, the CLI's ``profile`` command).

The records are the committed study of ``tests/data/jsonl_study/`` (112x84 px images: 12 image
tokens at the default ``image_min_pixels``; no warm-up file).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml

from fmr1lib import cli, config, converters, data, owndata, records

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "tests" / "data" / "jsonl_study"
SPLITS = ("train", "test_id", "test_ood")


def _write(path: Path, values: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _symlinked_study(tmp_path: Path) -> Path:
    """The study's records in ``tmp/data`` with ``images`` a symlink to a folder elsewhere."""
    shutil.copytree(STUDY / "images", tmp_path / "elsewhere" / "images")
    folder = tmp_path / "data"
    folder.mkdir()
    for split in SPLITS:
        shutil.copy(STUDY / f"{split}.jsonl", folder / f"{split}.jsonl")
    (folder / "images").symlink_to(tmp_path / "elsewhere" / "images", target_is_directory=True)
    return folder


def _data_values(folder: Path, **kw) -> dict:
    return {"source": "jsonl", "jsonl_files": {s: str(folder / f"{s}.jsonl") for s in SPLITS},
            **kw}


# --------------------------------------------------------------------------------------
# Bad inputs, named before any work
# --------------------------------------------------------------------------------------


def test_symlinked_image_folder_is_allowed_by_a_data_key_as_records_check_allows_it(tmp_path,
                                                                                   capsys):
    folder = _symlinked_study(tmp_path)
    refused = config.load_params(config.DataParams, _data_values(folder))
    with pytest.raises(records.DataError, match="allow_outside_root"):
        data.load_jsonl_split(refused, "train")
    # The params key lifts it, as `converters check --allow-outside-root` does for the same file.
    allowed = config.load_params(config.DataParams, _data_values(folder, allow_outside_root=True))
    ds, skipped = data.load_jsonl_split(allowed, "train")
    assert (len(ds), skipped) == (24, 0)
    assert converters.main(["check", str(folder / "train.jsonl"), "--allow-outside-root"]) == 0
    # From the command line too, and refused for FocusShapes (it reads no image files).
    f = _write(tmp_path / "01.yaml", _data_values(folder))
    assert cli.main(["data", "--params", f, "--set", "allow_outside_root=true", "--dry-run"]) == 0
    with pytest.raises(config.ParamsError, match="allow_outside_root"):
        config.load_params(config.DataParams, {"allow_outside_root": True})
    capsys.readouterr()


def test_backbone_refuses_a_warmup_without_a_warmup_file_before_any_work(tmp_path, capsys):
    f = _write(tmp_path / "02_backbone.yaml",
               {"profile": "jsonl_study", "data_params_file": str(STUDY / "01_data_construction.yaml")})
    # --dry-run names it too, as one line with exit status 2 (ParamsError), no traceback.
    assert cli.main(["backbone", "--params", f, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ParamsError: {f}: key 'warmup'")
    assert "warmup: false" in err[0] and "01_data_construction.yaml" in err[0]
    assert cli.main(["backbone", "--params", f, "--set", "warmup=false", "--dry-run"]) == 0
    # The stage itself refuses before it makes its run folder.
    from fmr1lib import stages

    p = config.load_params(config.BackboneParams, f, run_root=str(tmp_path / "runs"))
    with pytest.raises(config.ParamsError, match="key 'warmup'"):
        stages.backbone_stage(p)
    assert not (tmp_path / "runs").exists()


def test_small_image_grids_get_one_warning_naming_the_count_and_image_min_pixels(caplog):
    p = config.load_params(config.DataParams, STUDY / "01_data_construction.yaml")
    ds, _ = data.load_jsonl_split(p, "train")
    bp = config.BackboneParams()
    with caplog.at_level(logging.WARNING, logger="fmr1lib"):
        line = owndata.warn_small_grids({"train": ds}, bp, "study")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [line]
    assert "fewer than 16 image tokens (fewest 12, from 112x84 px" in line
    assert line.endswith("raise image_min_pixels (now 3136) to 12544")
    # Raised as it says, the grid is large enough: no warning.
    big = config.BackboneParams(image_min_pixels=15680, image_max_pixels=15680)
    assert owndata.warn_small_grids({"train": ds}, big, "study") is None
    # 64 px images (a 2x2 grid) whose one box touches every cell: both counts in the line.
    report = owndata.grid_report([("a", (64, 64), [[20, 20, 44, 44]]), ("b", (64, 64), [])],
                                 3136, 12544)
    assert (report["small"], report["covered"], report["fewest_tokens"]) == (["a", "b"], ["a"], 4)
    text = owndata.grid_warning(report, 3136, 12544, "f.yaml")
    assert "2 of 2 record(s)" in text and "1 record(s) have evidence boxes on every token cell" in text
    assert text.endswith("to 12544")
    assert owndata.resized(64, 64, 12544, 12544) == (112, 112)


def test_records_without_views_get_one_summary_line(caplog):
    p = config.load_params(config.DataParams, STUDY / "01_data_construction.yaml")
    recs, _ = records.load_jsonl(STUDY / "test_id.jsonl", load_images=False)
    for rec in recs[:3]:
        rec["meta"] = {"split": "test_id", "seed": 0}
        rec["image"] = rec["image_path"]
    ds = records.records_to_dataset(recs[:3])
    full = [[[0.0, 0.0, float(im.size[0]), float(im.size[1])]] for im in ds["image"]]
    ds = ds.remove_columns("evidence_boxes").add_column("evidence_boxes", full)
    with caplog.at_level(logging.DEBUG, logger="fmr1lib"):
        out = data.add_counterfactual_views(ds, p)
    assert [len(b) for b in out["control_boxes"]] == [0, 0, 0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("test_id: 3 record(s) with evidence boxes (of 3) have no "
                                  "counterfactual views")
    assert all(repr(i) in warnings[0] for i in ds["id"])


# --------------------------------------------------------------------------------------
# Profiles: pointers into another profile, and `profile new`
# --------------------------------------------------------------------------------------


def test_check_params_flags_a_copied_profile_that_reads_the_original(tmp_path, capsys):
    shutil.copytree(ROOT / "params" / "tiny", tmp_path / "params" / "copy")
    for f in (tmp_path / "params" / "copy").glob("*.yaml"):  # renamed as a user would
        f.write_text(f.read_text().replace("profile: tiny", "profile: copy"))
    assert cli.main(["check-params", "--params-root", str(tmp_path / "params")]) == 2
    err = capsys.readouterr().err
    assert "copy/02_backbone.yaml: key 'data_params_file' points at " \
           "params/tiny/01_data_construction.yaml" in err
    assert "ParamsError:" in err
    assert cli.main(["check-params"]) == 0  # the repository's profiles point inside themselves


def _profile_new(tmp_path: Path, *extra: str) -> int:
    return cli.main(["profile", "new", "mine", "--from", "tiny", "--params-root",
                     str(tmp_path / "params"), "--jsonl",
                     *(f"{s}={STUDY / f'{s}.jsonl'}" for s in SPLITS), *extra])


def test_profile_new_writes_a_self_contained_profile_sized_for_the_data(tmp_path, capsys):
    shutil.copytree(ROOT / "params" / "tiny", tmp_path / "params" / "tiny")
    assert _profile_new(tmp_path) == 0
    out = capsys.readouterr().out
    assert "image_min_pixels: 15680" in out
    folder = tmp_path / "params" / "mine"
    files = {nb: folder / f"{nb}.yaml" for nb in config.PARAMS_BY_NOTEBOOK}
    assert all(f.is_file() for f in files.values())
    for nb, f in files.items():
        p = config.load_params(config.PARAMS_BY_NOTEBOOK[nb], f)
        assert p.profile == "mine"
        assert owndata.foreign_pointers(f, p, ROOT) == []
    dp = config.load_params(config.DataParams, files["01_data_construction"])
    assert dp.source == "jsonl" and dp.jsonl_files == {
        s: f"tests/data/jsonl_study/{s}.jsonl" for s in SPLITS}
    bp = config.load_params(config.BackboneParams, files["02_backbone"])
    assert (bp.warmup, bp.image_min_pixels, bp.image_max_pixels) == (False, 15680, 15680)
    ap = config.load_params(config.AnchorParams, files["03_anchoring"])
    assert ap.image_min_pixels == 15680
    assert cli.main(["backbone", "--params", str(files["02_backbone"]), "--dry-run"]) == 0
    # An existing profile is never overwritten.
    before = files["02_backbone"].read_text()
    capsys.readouterr()
    assert _profile_new(tmp_path) == 2
    assert "exists" in capsys.readouterr().err
    assert files["02_backbone"].read_text() == before


def test_profile_new_validates_every_record_before_writing(tmp_path, capsys):
    shutil.copytree(ROOT / "params" / "tiny", tmp_path / "params" / "tiny")
    bad = tmp_path / "bad.jsonl"
    lines = (STUDY / "test_ood.jsonl").read_text().splitlines()
    bad.write_text("\n".join([*lines, lines[0].replace('"answer"', '"answr"')]) + "\n")
    shutil.copytree(STUDY / "images", tmp_path / "images")
    status = cli.main(["profile", "new", "mine", "--params-root", str(tmp_path / "params"),
                       "--jsonl", f"train={STUDY / 'train.jsonl'}",
                       f"test_id={STUDY / 'test_id.jsonl'}", f"test_ood={bad}"])
    assert status == 2  # bad input: a params file or a data record
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("DataError:") and "bad.jsonl" in err[0]
    assert sorted(p.name for p in (tmp_path / "params").iterdir()) == ["tiny"]
    assert cli.main(["profile", "new", "mine", "--params-root", str(tmp_path / "params"),
                     "--jsonl", f"train={STUDY / 'train.jsonl'}"]) == 2
    assert "missing" in capsys.readouterr().err


def test_own_data_from_profile_new_to_the_backbone_without_hand_edits(tmp_path, capsys, caplog):
    # Symlinked images, no warm-up file, images too small for the default grid: the command's
    # profile takes the data and the backbone stages as written.
    folder = _symlinked_study(tmp_path)
    shutil.copytree(ROOT / "params" / "tiny", tmp_path / "params" / "tiny")
    assert cli.main(["profile", "new", "own", "--params-root", str(tmp_path / "params"),
                     "--allow-outside-root", "--jsonl",
                     *(f"{s}={folder / f'{s}.jsonl'}" for s in SPLITS)]) == 0
    profile = tmp_path / "params" / "own"
    runs = f"run_root={tmp_path / 'runs'}"
    caplog.clear()  # profile new warned about the grid, and raised image_min_pixels
    with caplog.at_level(logging.WARNING, logger="fmr1lib"):
        assert cli.main(["data", "--params", str(profile / "01_data_construction.yaml"),
                         "--set", runs]) == 0
        assert cli.main(["backbone", "--params", str(profile / "02_backbone.yaml"),
                         "--set", runs]) == 0
    assert not [r for r in caplog.records if "image tokens" in r.getMessage()]
    assert (tmp_path / "runs" / "own" / "backbone" / "model").is_dir()
    capsys.readouterr()


def test_the_resolved_params_of_a_stage_show_the_variants_that_run(capsys):
    tiny = str(ROOT / "params" / "tiny" / "03_anchoring.yaml")
    assert cli.main(["anchor", "--params", tiny, "--variants", "plain", "focus_anchor",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "variants: [plain, focus_anchor]" in out
    assert "anchor/text_perception" not in out


def test_ablation_dry_run_lists_the_runs_it_would_train(tmp_path, capsys):
    tiny = str(ROOT / "params" / "tiny" / "05_evaluation.yaml")
    assert cli.main(["ablation", "--params", tiny, "--set", f"run_root={tmp_path}",
                     "--set", "rows=[backbone, plain_sft, anchoring]", "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  would train ")]
    assert [ln.split()[2] for ln in lines] == ["backbone", "plain_sft", "anchoring"], lines
    assert all(str(tmp_path) in ln for ln in lines)


def test_the_example_profile_is_what_profile_new_writes(tmp_path, capsys):
    # params/jsonl_example/ (the own-data profile `make test` runs notebooks 01-05 on) is the
    # command's output (--quick) for tests/data/jsonl_example/, byte for byte: rerunning the
    # command from the README gives the same files.
    example = ROOT / "tests" / "data" / "jsonl_example"
    shutil.copytree(ROOT / "params" / "tiny", tmp_path / "params" / "tiny")
    assert cli.main(["profile", "new", "jsonl_example", "--from", "tiny", "--quick",
                     "--params-root", str(tmp_path / "params"), "--jsonl",
                     *(f"{s}={example / f'{s}.jsonl'}" for s in SPLITS)]) == 0
    made = tmp_path / "params" / "jsonl_example"
    committed = ROOT / "params" / "jsonl_example"
    assert sorted(p.name for p in made.iterdir()) == sorted(p.name for p in committed.iterdir())
    for f in made.iterdir():  # pointers name the temporary params root where the repo has its own
        assert f.read_text().replace(f"{tmp_path}/", "") == (committed / f.name).read_text(), f.name


def test_profile_new_set_writes_settings_and_refuses_bad_ones_before_any_work(tmp_path, capsys):
    shutil.copytree(ROOT / "params" / "tiny", tmp_path / "params" / "tiny")
    assert _profile_new(tmp_path, "--quick", "--set", "03_anchoring:steps=7", "--set",
                        "seed=3") == 0
    folder = tmp_path / "params" / "mine"
    ap = config.load_params(config.AnchorParams, folder / "03_anchoring.yaml")
    assert (ap.steps, ap.variants, ap.seed) == (7, ["plain", "focus_anchor"], 3)  # --set after --quick
    rp = config.load_params(config.RLParams, folder / "04_counterfactual_rl.yaml")
    assert (rp.steps, rp.variants, rp.seed) == (12, ["grpo", "faithful"], 3)
    assert "# Set by the command (--set / --quick): variants, steps, seed." in \
        (folder / "03_anchoring.yaml").read_text()
    capsys.readouterr()
    for bad, says in (("stepz=3", "not a parameter of any notebook"),
                      ("03_anchoring:group_size=4", "not a parameter of 03_anchoring"),
                      ("07_x:steps=3", "no notebook '07_x'"),
                      ("data_params_file=x.yaml", "sets 'data_params_file' itself"),
                      ("steps", "give [NOTEBOOK:]KEY=VALUE"),
                      ("03_anchoring:variants=[plain, nope]", "variants")):
        shutil.rmtree(folder, ignore_errors=True)
        assert _profile_new(tmp_path, "--set", bad) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ParamsError:") and says in err[0], (bad, err)
        assert not folder.exists(), bad  # nothing is left written
