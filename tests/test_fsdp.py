"""Stage 1 under FSDP on two CPU processes (gloo): gathered checkpoints, exact resume, saved model.

``tests/fsdp_train.py`` trains the tiny backbone with full fine-tuning for four anchoring steps
under ``accelerate launch`` with ``params/accelerate/cpu_fsdp_2proc.yaml`` (each process holds
half of every parameter), once uninterrupted and once stopped after two steps and resumed from
its checkpoint. Checked:

* the resumed run ends with the uninterrupted run's parameters and logs the same metrics (the
  optimiser state was gathered whole and split into the shards again);
* a checkpoint holds every trainable tensor and its AdamW moments at full shape, not one
  process's shard, and its weights are the gathered weights of the trained model;
* the saved ``model/`` loads in one process and gives the logits of the gathered weights.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from launch import NEEDS_GLOO, launch_command, launch_env
from safetensors.torch import load_file

from fmr1lib import batching, config, data, modeling

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "fsdp_train.py"
CONFIG = ROOT / "params" / "accelerate" / "cpu_fsdp_2proc.yaml"
TIMEOUT_S = 180
STEPS, STOP_AFTER = 4, 2

pytestmark = NEEDS_GLOO


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """The three runs of ``tests/fsdp_train.py`` (full, part, resume) in one launch."""
    folder = tmp_path_factory.mktemp("fsdp")
    cmd = launch_command(CONFIG, SCRIPT, "--out", str(folder), "--steps", str(STEPS),
                         "--stop-after", str(STOP_AFTER), "--run", "full", "part", "resume")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # A save only the main process enters waits for the other one forever. The workers
        # run in sessions of their own: SIGTERM lets the launcher (torchrun) stop them.
        proc.terminate()
        try:
            log, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            log = ""
        pytest.fail(f"accelerate launch (FSDP, 2 processes) timed out after {TIMEOUT_S} s:\n"
                    f"{log[-4000:]}")
    assert proc.returncode == 0, (f"accelerate launch (FSDP, 2 processes) failed "
                                  f"(exit {proc.returncode}):\n{log[-4000:]}")
    return folder


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _metrics(out: Path, run: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def test_resumed_run_ends_where_the_uninterrupted_run_does(out):
    assert not (out / "part_gathered.safetensors").exists()  # the stopped run saved no model
    full = load_file(str(out / "full_gathered.safetensors"))
    resumed = load_file(str(out / "resume_gathered.safetensors"))
    assert _max_diff(full, resumed) <= 1e-7
    m_full, m_resumed = _metrics(out, "full"), _metrics(out, "part")
    assert [r["step"] for r in m_full] == [r["step"] for r in m_resumed] == list(range(1, STEPS + 1))
    for a, b in zip(m_full, m_resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)


@pytest.mark.parametrize("run", ["full", "part"])
def test_checkpoints_hold_full_tensors_not_shards(out, run):
    shapes = json.loads((out / "shapes.json").read_text())
    kept = sorted((out / run / "checkpoints").glob("step_*"))
    assert [ck.name for ck in kept] == [f"step_{s:07d}" for s in (STEPS - 1, STEPS)]
    for ck in kept:  # in ``part``: written after the resume split the state into shards again
        weights = load_file(str(ck / "trainable.safetensors"))
        assert set(weights) == set(shapes)  # full fine-tuning: every parameter
        for name, tensor in weights.items():
            assert list(tensor.shape) == shapes[name], (ck.name, name)
        moments = load_file(str(ck / "optimizer.safetensors"))
        for name, shape in shapes.items():
            for slot in ("exp_avg", "exp_avg_sq"):
                assert list(moments[f"{name}.{slot}"].shape) == shape, (ck.name, name, slot)
    last = load_file(str(kept[-1] / "trainable.safetensors"))
    gathered = load_file(str(out / f"{'full' if run == 'full' else 'resume'}_gathered.safetensors"))
    assert _max_diff(last, {k: gathered[k] for k in last}) == 0.0


def test_saved_model_loads_in_one_process_with_the_gathered_weights(out):
    bp = config.load_params(config.BackboneParams)
    saved, processor = modeling.load_saved_backbone(out / "part" / "model", bp)
    gathered = load_file(str(out / "resume_gathered.safetensors"))
    state = saved.state_dict()
    assert _max_diff({k: state[k] for k in gathered}, gathered) == 0.0
    reference, _ = modeling.build_tiny_backbone(bp, seed=1)
    reference.load_state_dict(gathered)
    rows = data.make_split(config.DataParams(), "train", 2)
    inputs = batching.encode_batch(rows, processor, "focus_anchor").inputs
    saved.eval()
    reference.eval()
    with torch.no_grad():
        got, want = saved(**inputs).logits, reference(**inputs).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
