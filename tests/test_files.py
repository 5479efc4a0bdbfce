"""What the file-writing and file-reading code guarantees when things go wrong.

Atomic dataset rebuilds, checkpoint manifests and fallback, torn metrics lines, benchmark images
checked before the model loads (skip mode, rows written as they come), permissions that follow
the umask, image paths confined to the image root, and the small error cases of the records
tools (empty file, missing file, a ``.bin``-only model, temp folders left by killed saves).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from fmr1lib import (
    benchmark,
    checkpoints,
    config,
    converters,
    data,
    evaluation,
    modeling,
    records,
    repro,
)
from fmr1lib.records import DataError

BENCH = Path(__file__).parent / "data" / "benchmark_sample"


# ------------------------------------------------------------------- dataset rebuild (3)


def _data_params(tmp_path: Path, **kw) -> config.DataParams:
    base = {"n_train": 2, "n_warmup": 0, "n_test_id": 1, "n_test_ood": 1,
            "run_root": str(tmp_path / "runs")}
    return config.load_params(config.DataParams, {**base, **kw})


def test_failed_rebuild_keeps_the_old_dataset_and_params(tmp_path, monkeypatch):
    old = _data_params(tmp_path)
    folder = data.data_dir(old)
    data.load_or_make(old)
    before = data.load_dataset_dir(folder)["train"]["question"]

    save = datasets.Dataset.save_to_disk

    def fail_on_test_id(self, path, *args, **kw):
        if Path(path).name == "test_id":
            raise OSError("disk full (test)")
        return save(self, path, *args, **kw)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", fail_on_test_id)
    new = _data_params(tmp_path, n_train=3, seed=1)
    with pytest.raises(OSError, match="disk full"):
        data.load_or_make(new)
    monkeypatch.undo()

    assert repro.saved_params_equal(folder, old) and not repro.saved_params_equal(folder, new)
    kept = data.load_dataset_dir(folder)
    assert kept.num_rows["train"] == 2 and kept["train"]["question"] == before
    assert [p.name for p in folder.parent.iterdir()] == ["data"]  # no temp folder left
    assert data.load_or_make(old)["train"]["question"] == before


# ------------------------------------------------------------------- checkpoints (6)


def _save_two(folder: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for step in (1, 2):
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
        checkpoints.save_checkpoint(folder, step, model, opt, extra={"tag": step})
    return model, opt


def test_a_sharded_save_writes_the_gathered_weights_and_moves_the_engine_folder(tmp_path):
    from safetensors.torch import load_file

    engine = tmp_path / ".deepspeed_0000001"
    engine.mkdir()
    (engine / "shard.bin").write_bytes(b"x")
    gathered = {"weight": torch.full((2, 2), 3.0)}
    ck = checkpoints.save_checkpoint(
        tmp_path / "ck", 1, torch.nn.Linear(2, 2),
        sharded=checkpoints.Sharded(weights=gathered, engine_dir=engine))
    assert torch.equal(load_file(str(ck / "trainable.safetensors"))["weight"], gathered["weight"])
    assert not engine.exists() and (ck / "deepspeed" / "shard.bin").read_bytes() == b"x"
    assert checkpoints.read_checkpoint_meta(ck)["deepspeed"] == {"dir": "deepspeed",
                                                                 "tag": checkpoints.ENGINE_TAG}
    checkpoints.verify_checkpoint(ck)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(("name", "damage"), [
    ("trainable.safetensors", _truncate),
    ("state.json", lambda p: p.write_text('{"step": 2, "extra": ')),
    ("optimizer.safetensors", _flip_a_byte),
])
def test_damaged_newest_checkpoint_falls_back_on_the_older_one(tmp_path, caplog, name, damage):
    ckpts = tmp_path / "checkpoints"
    model, opt = _save_two(ckpts)
    bad = ckpts / "step_0000002" / name
    damage(bad)
    with caplog.at_level(logging.WARNING, logger="fmr1lib.repro"):
        found = checkpoints.latest_checkpoint(ckpts)
    assert found == ckpts / "step_0000001"
    assert any(str(bad) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert checkpoints.load_checkpoint(found, model, opt)["extra"] == {"tag": 1}
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.load_checkpoint(bad.parent, model, opt)
    assert str(bad) in str(err.value) and err.value.files == [str(bad)]


def test_no_valid_checkpoint_is_a_clear_error_naming_the_files(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _save_two(ckpts)
    bad = [ckpts / f"step_000000{i}" / "trainable.safetensors" for i in (1, 2)]
    for f in bad:
        _truncate(f)
    with pytest.raises(ValueError, match="no valid checkpoint") as err:  # a CheckpointError
        checkpoints.latest_checkpoint(ckpts)
    assert sorted(err.value.files) == sorted(map(str, bad))
    assert all(str(f) in str(err.value) for f in bad)
    assert checkpoints.latest_checkpoint(tmp_path / "none") is None


def test_checkpoint_manifest_lists_every_file_and_everything_is_fsynced(tmp_path, monkeypatch):
    synced: list[int] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd))[1])
    _save_two(tmp_path)
    ck = tmp_path / "step_0000002"
    manifest = json.loads((ck / "manifest.json").read_text())["files"]
    assert set(manifest) == {"trainable.safetensors", "optimizer.safetensors",
                             "rng.safetensors", "state.json"}
    for rel, entry in manifest.items():
        assert entry == {"size": (ck / rel).stat().st_size, "sha256": repro.file_sha256(ck / rel)}
    # Per save at least: 4 files + manifest, the temp folder, the checkpoints folder.
    assert len(synced) >= 2 * 7
    # A checkpoint without a manifest is passed over: nothing vouches for its tensors.
    (ck / checkpoints.MANIFEST).unlink()
    assert checkpoints.latest_checkpoint(tmp_path) == tmp_path / "step_0000001"


def test_torn_last_metrics_line_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="fmr1lib.repro"):
        rows = repro.read_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2]
    assert any(str(path) in r.getMessage() and "line 3" in r.getMessage()
               for r in caplog.records)
    # Resume: the log is read, truncated to the checkpoint's step and appended to.
    log = repro.MetricsLog(path)
    repro.write_jsonl(path, [r for r in log.read() if r["step"] <= 1])
    log.log(2, loss=0.3)
    assert [r["step"] for r in repro.read_jsonl(path)] == [1, 2]
    # Appending straight after a torn line cuts it off first.
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    repro.MetricsLog(path).log(2, loss=0.1)
    assert repro.read_jsonl(path) == [{"step": 1}, {"step": 2, "loss": 0.1}]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        repro.read_jsonl(path)


# ------------------------------------------------------------------- benchmark images (7)


@pytest.fixture
def bench_copy(tmp_path: Path) -> Path:
    """The benchmark sample copied, with ``three_dots.png`` (line 6, ``count-2``) truncated:
    its header still reads, its pixels do not."""
    dst = tmp_path / "bench"
    shutil.copytree(BENCH, dst)
    _truncate(dst / "images" / "three_dots.png")
    return dst / "sample.jsonl"


class _Model:
    def eval(self):
        return self


def _fake_model(monkeypatch, fail_on_call: int | None = None) -> list[int]:
    """``load_model`` and ``generate_greedy`` replaced: every answer is "2"."""
    calls: list[int] = []

    def generate(model, processor, rows, max_new_tokens):
        calls.append(len(rows))
        if len(calls) == fail_on_call:
            raise RuntimeError("CUDA error (test)")
        return None, ["<Focus><think>t</think><answer>2</answer>" for _ in rows]

    monkeypatch.setattr(benchmark, "load_model", lambda *a, **k: (_Model(), object()))
    monkeypatch.setattr(evaluation, "generate_greedy", generate)
    return calls


def test_truncated_image_fails_before_the_model_loads(bench_copy, monkeypatch, capsys):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the images were checked")

    monkeypatch.setattr(benchmark, "load_model", no_model)
    rc = benchmark.main(["--model", "unused", "--file", str(bench_copy)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bench_copy} line 6 (record 'count-2'): image: cannot read image" in err


def test_skip_mode_counts_bad_records_and_rows_are_written_as_they_come(bench_copy, monkeypatch,
                                                                         capsys):
    calls = _fake_model(monkeypatch)
    out = bench_copy.parent / "res" / "result.json"
    rc = benchmark.main(["--model", "unused", "--file", str(bench_copy), "--out", str(out),
                         "--on-bad-record", "skip", "--batch-size", "3"])
    assert rc == 0 and calls == [3, 3, 1]
    assert "(1 bad record(s) skipped)" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert (result["n"], result["n_in_file"], result["n_skipped"]) == (7, 7, 1)
    rows = repro.read_jsonl(benchmark.partial_results_path(out))
    assert [r["id"] for r in rows] == [r["id"] for r in result["per_record"]]
    assert "count-2" not in {r["id"] for r in rows}


def test_evaluate_benchmark_reads_with_its_reading_options(bench_copy, monkeypatch):
    calls = _fake_model(monkeypatch)
    with pytest.raises(DataError, match="count-2"):
        benchmark.evaluate_benchmark(_Model(), None, bench_copy)
    reading = benchmark.Reading(image_root=bench_copy.parent, on_bad_record="skip")
    result = benchmark.evaluate_benchmark(_Model(), None, bench_copy, reading, batch_size=3)
    assert calls == [3, 3, 1]
    assert (result["n_in_file"], result["n_skipped"]) == (7, 1)
    assert result["image_root"] == str(bench_copy.parent)


def test_a_crash_mid_run_keeps_the_rows_already_answered(tmp_path, monkeypatch):
    _fake_model(monkeypatch, fail_on_call=2)
    out = tmp_path / "result.json"
    with pytest.raises(RuntimeError, match="CUDA error"):
        benchmark.evaluate_benchmark(_Model(), None, BENCH / "sample.jsonl", batch_size=3,
                                     out_path=out)
    rows = repro.read_jsonl(out.with_name("result.records.jsonl"))
    assert [r["id"] for r in rows] == ["color-1", "color-2", "color-3"]
    assert rows[0]["pred"] == "2" and rows[0]["correct"] is False
    assert not out.exists()


# ------------------------------------------------------------------- permissions (8)


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


class _Saves:
    """Stand-in for a model, tokenizer and image processor: ``save_pretrained`` writes a file."""

    def __init__(self, name: str, fail: bool = False):
        self.name, self.fail = name, fail

    def save_pretrained(self, folder, **kw):
        if self.fail:
            raise OSError("disk full (test)")
        (Path(folder) / self.name).write_text("{}")


class _Processor:
    tokenizer = _Saves("tokenizer.json")
    image_processor = _Saves("preprocessor_config.json")


def test_written_files_and_folders_follow_the_umask(tmp_path, umask_022):
    assert _mode(repro.atomic_write_json(tmp_path / "a.json", {"x": 1})) == 0o644
    ck = checkpoints.save_checkpoint(tmp_path / "ck", 1, torch.nn.Linear(2, 2))
    assert _mode(ck) == 0o755
    assert {_mode(f) for f in ck.iterdir()} == {0o644}
    tiny = modeling.build_tiny_backbone(config.ModelParams(), seed=0)
    model = modeling.save_backbone(*tiny, tmp_path / "m" / "model")  # safetensors writes 0600
    assert _mode(model) == 0o755 and {_mode(f) for f in model.iterdir()} == {0o644}
    p = _data_params(tmp_path)
    folder = data.save_dataset(data.make_dataset(p)[0], tmp_path / "data", p)
    assert _mode(folder) == 0o755 and _mode(folder / "train") == 0o755
    assert {_mode(f) for f in folder.rglob("*") if f.is_file()} == {0o644}
    out = tmp_path / "conv.jsonl"
    with converters._atomic_text_writer(out) as fh:
        fh.write("\n")
    assert _mode(out) == 0o644
    assert repro.current_umask() == 0o022
    os.umask(0o077)
    assert _mode(repro.atomic_write_text(tmp_path / "b.txt", "x")) == 0o600


# ------------------------------------------------------------------- image paths (9)


def _record(rid: str, image: str) -> dict:
    return {"id": rid, "image": image, "question": "What color?", "answer": "red",
            "answer_type": "word", "choices": None, "evidence_boxes": [[1, 1, 8, 8]]}


@pytest.fixture
def escape_root(tmp_path: Path) -> tuple[Path, Path]:
    """``root/`` with one good image and a symlink out of it; ``outside.png`` next to it."""
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 0, 0)).save(root / "img" / "ok.png")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (16, 16), (0, 0, 200)).save(outside)
    (root / "img" / "link.png").symlink_to(outside)
    return root, outside


@pytest.mark.parametrize("ref", ["../outside.png", "img/../../outside.png", "OUTSIDE",
                                 "img/link.png", "/etc/passwd", "/etc/no-such-file-here"])
def test_image_paths_are_confined_to_the_image_root(escape_root, ref):
    root, outside = escape_root
    ref = str(outside) if ref == "OUTSIDE" else ref
    path = root / "recs.jsonl"
    path.write_text(json.dumps(_record("ok", "img/ok.png")) + "\n"
                    + json.dumps(_record("esc", ref)) + "\n")
    with pytest.raises(DataError) as err:
        records.load_jsonl(path)
    exc = err.value
    assert (exc.path, exc.line, exc.record_id, exc.field) == (str(path), 2, "esc", "image")
    assert "outside the image root" in str(exc) and "not found" not in str(exc)
    assert records.load_jsonl(path, on_bad_record="skip")[1] == 1
    bench = root / "bench.jsonl"
    bench.write_text(json.dumps({"id": "ok", "image": "img/ok.png", "question": "Q?",
                                 "answer": "red"}) + "\n"
                     + json.dumps({"id": "esc", "image": ref, "question": "Q?",
                                   "answer": "red"}) + "\n")
    with pytest.raises(DataError, match="outside the image root") as err:
        benchmark.load_benchmark(bench)
    assert (err.value.line, err.value.record_id, err.value.field) == (2, "esc", "image")


def test_outside_paths_load_when_explicitly_allowed(escape_root, monkeypatch, capsys):
    root, outside = escape_root
    path = root / "recs.jsonl"
    path.write_text(json.dumps(_record("abs", str(outside))) + "\n"
                    + json.dumps(_record("link", "img/link.png")) + "\n")
    recs, _ = records.load_jsonl(path, allow_outside_root=True)
    assert recs[0]["image"].getpixel((0, 0)) == (0, 0, 200)
    bench = root / "bench.jsonl"
    bench.write_text(json.dumps({"id": "abs", "image": str(outside), "question": "Q?",
                                 "answer": "2"}) + "\n")
    _fake_model(monkeypatch)
    assert benchmark.main(["--model", "unused", "--file", str(bench)]) == 2
    assert benchmark.main(["--model", "unused", "--file", str(bench),
                           "--allow-absolute-images"]) == 0
    assert converters.main(["check", str(path), "--allow-outside-root"]) == 0
    assert converters.main(["check", str(path)]) == 2
    assert "outside the image root" in capsys.readouterr().err


# ------------------------------------------------------------------- small cases (10)


def test_empty_records_file_is_an_error_in_loader_and_check(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(DataError, match="no records in the file") as err:
        records.load_jsonl(path)
    assert err.value.path == str(path)
    assert converters.main(["check", str(path)]) == 2
    assert capsys.readouterr().err == f"DataError: {path}: no records in the file\n"
    with pytest.raises(DataError, match="no records"):
        benchmark.load_benchmark(path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    with pytest.raises(DataError, match=r"no valid record in the file \(1 bad record"):
        records.load_jsonl(bad, on_bad_record="skip")


def test_records_check_on_a_missing_file_is_a_clean_error(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert converters.main(["check", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err


def test_bin_only_model_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(FileNotFoundError, match="only safetensors") as err:
        modeling.load_saved_backbone(folder, config.ModelParams())
    assert str(folder) in str(err.value) and "pytorch_model.bin" in str(err.value)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_are_cleaned_at_the_start_of_a_save(tmp_path):
    two_hours_ago = time.time() - 7200
    model = tmp_path / "stage" / "model"
    model.mkdir(parents=True)
    leftovers = [model.with_name(".model.old"), model.with_name(".model.k2j3h4g5")]
    for d in leftovers:
        d.mkdir()
        os.utime(d, (two_hours_ago, two_hours_ago))
    modeling.save_backbone(_Saves("config.json"), _Processor(), model)
    assert [p.name for p in model.parent.iterdir()] == ["model"]
    assert (model / "config.json").exists()

    ckpts = tmp_path / "checkpoints"
    tag = repro._owner_tag().split("-", 1)[1]
    old = ckpts / ".step_0000003.x1y2z3"  # no owner tag, untouched for two hours
    dead = ckpts / f".step_0000004.pid{_dead_pid()}-{tag}.abcd1234"  # its writer is gone
    young = ckpts / ".step_0000005.q9w8e7"  # no owner tag, recent: maybe a live writer
    engine = ckpts / ".deepspeed_0000004"  # not a checkpoint temp folder
    for d in (old, dead, young, engine):
        d.mkdir(parents=True)
    os.utime(old, (two_hours_ago, two_hours_ago))
    checkpoints.save_checkpoint(ckpts, 1, torch.nn.Linear(2, 2))
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(
        [young.name, engine.name, "latest", "step_0000001"])


def test_a_save_killed_mid_swap_gets_the_previous_version_back(tmp_path):
    model = tmp_path / "model"
    parked = tmp_path / ".model.old"  # the previous model, renamed aside by the killed swap
    parked.mkdir()
    (parked / "config.json").write_text('{"previous": true}')
    # The new save fails: the previous model is back in place, nothing else is left.
    with pytest.raises(OSError, match="disk full"):
        modeling.save_backbone(_Saves("config.json", fail=True), _Processor(), model)
    assert json.loads((model / "config.json").read_text()) == {"previous": True}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
