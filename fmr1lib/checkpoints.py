"""Checkpoints: safetensors for every tensor, JSON for the rest; no pickle anywhere.

``save_checkpoint`` writes ``<folder>/step_<step>/`` atomically (trainable weights, optimiser,
scheduler, RNG) with a manifest of every file's size and SHA-256, written last;
``latest_checkpoint`` / ``load_checkpoint`` verify it before a resume, and a checkpoint that
fails, or has no manifest, is passed over with a warning naming the file (docs/design.md §10.2).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmr1lib import repro

logger = logging.getLogger(__name__)


CHECKPOINT_PREFIX = "step_"

ENGINE_TAG = "engine"
"""Tag of the DeepSpeed engine checkpoint inside a checkpoint's ``deepspeed/`` folder."""


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    tensors: dict[str, Any] = {}
    scalars: dict[str, Any] = {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            key = f"{pid}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``_flatten_optimizer``: parameters keyed by index (``Optimizer.state_dict``)
    or, in a state gathered from FSDP shards, by name (``key_by: "name"``)."""
    by_name = meta.get("key_by") == "name"
    state: dict[int | str, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.rsplit(".", 1) if by_name else key.split(".", 1)
        state.setdefault(pid if by_name else int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, json) holding the python, numpy and torch RNG states."""
    import torch

    py = random.getstate()
    np_state = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    import torch

    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


@dataclass(frozen=True)
class Sharded:
    """What a sharded run saves in place of the main process's own model and optimiser."""

    weights: dict[str, Any] | None = None
    """The trainable tensors to save instead of the model's own (gathered from every
    process's shard, full shapes)."""
    optimizer_state: dict[str, Any] | None = None
    """An optimiser state dict to save instead of ``optimizer.state_dict()`` (FSDP: gathered
    to full tensors, parameters keyed by name)."""
    engine_dir: str | Path | None = None
    """A DeepSpeed engine checkpoint written by every process; it is moved into the checkpoint
    as ``deepspeed/``."""


def save_checkpoint(folder: str | Path, step: int, model: Any, optimizer: Any = None,
                    scheduler: Any = None, extra: dict[str, Any] | None = None,
                    keep: int = 2, sharded: Sharded | None = None) -> Path:
    """Write ``<folder>/step_<step>/`` atomically: trainable weights, optimizer, scheduler, RNG.

    Only parameters with ``requires_grad`` are saved (all of them for full fine-tuning,
    the adapters for LoRA): the frozen rest is rebuilt from the starting checkpoint.
    Older checkpoints beyond the last ``keep`` are deleted. Under sharding, ``sharded`` holds
    the gathered weights and optimiser state, or the DeepSpeed engine folder, to save instead.

    ``manifest.json``, written last, holds the size and SHA-256 of every other file
    (``verify_checkpoint``); every file and folder is fsynced before the rename. Temp folders
    left by killed saves (``.step_*``) are deleted first (``clean_stale_temps``).
    """
    import torch
    from safetensors.torch import save_file

    sharded = sharded or Sharded()
    weights, optimizer_state = sharded.weights, sharded.optimizer_state
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    repro.clean_stale_temps(folder, f".{CHECKPOINT_PREFIX}")
    final = folder / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = repro.make_temp_dir(folder, f".{final.name}.")
    try:
        if weights is None:
            weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                       if p.requires_grad}
        else:
            weights = {n: t.detach().cpu().contiguous() for n, t in weights.items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        meta: dict[str, Any] = {"step": step, "extra": extra or {}}
        if optimizer_state is None and optimizer is not None:
            optimizer_state = optimizer.state_dict()
        if optimizer_state is not None:
            opt_t, opt_meta = _flatten_optimizer(optimizer_state)
            if any(isinstance(pid, str) for pid in optimizer_state["state"]):
                opt_meta["key_by"] = "name"
            save_file(opt_t or {"_empty": torch.zeros(1)}, str(tmp / "optimizer.safetensors"))
            meta["optimizer"] = opt_meta
        if sharded.engine_dir is not None:
            os.replace(sharded.engine_dir, tmp / "deepspeed")
            meta["deepspeed"] = {"dir": "deepspeed", "tag": ENGINE_TAG}
        if scheduler is not None:
            meta["scheduler"] = scheduler.state_dict()
        rng_t, rng_meta = rng_state()
        save_file(rng_t, str(tmp / "rng.safetensors"))
        meta["rng"] = rng_meta
        repro.atomic_write_json(tmp / "state.json", meta)
        repro.apply_umask_modes(tmp)
        repro.fsync_tree(tmp)
        repro.atomic_write_json(tmp / MANIFEST, checkpoint_manifest(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        repro.fsync_dir(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    repro.atomic_write_text(folder / "latest", final.name + "\n")
    for old in sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


MANIFEST = "manifest.json"
"""A checkpoint's list of files with their sizes and SHA-256, written last."""


class CheckpointError(ValueError):
    """A checkpoint that is incomplete or corrupted; ``files`` names the bad file(s)."""

    def __init__(self, message: str, files: list[str | Path] | None = None):
        super().__init__(message)
        self.files = [str(f) for f in files or []]


def checkpoint_manifest(folder: str | Path) -> dict[str, Any]:
    """``{"files": {relative path: {"size", "sha256"}}}`` of every file under ``folder``
    but the manifest itself."""
    folder = Path(folder)
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if rel != MANIFEST:
            files[rel] = {"size": f.stat().st_size, "sha256": repro.file_sha256(f)}
    return {"files": files}


_VERIFIED: dict[str, tuple] = {}
"""Checkpoints whose hashes matched, with the (size, mtime, inode) of each file then: a
second check of an unchanged checkpoint (``latest_checkpoint`` then ``load_checkpoint``)
does not hash it again."""


def verify_checkpoint(path: str | Path) -> Path:
    """Check a checkpoint against its manifest (every file there, of its size and SHA-256).

    A checkpoint written before manifests existed is checked for a readable ``state.json``
    and readable safetensors headers (a truncated file fails there).

    Returns:
        ``path``.

    Raises:
        CheckpointError: a file is missing, truncated or corrupted; the message names it.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        _verify_legacy_checkpoint(path)
        return path
    try:
        files = json.loads(manifest_path.read_text())["files"]
        listed = [(rel, int(v["size"]), str(v["sha256"])) for rel, v in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})",
                              [manifest_path]) from None
    signature = []
    for rel, size, _ in listed:
        f = path / rel
        try:
            st = f.stat()
        except FileNotFoundError:
            raise CheckpointError(f"{f}: missing (listed in {manifest_path})", [f]) from None
        if st.st_size != size:
            raise CheckpointError(f"{f}: {st.st_size} bytes, the manifest says {size} "
                                  f"(truncated or overwritten)", [f])
        signature.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
    key = str(path.resolve())
    if _VERIFIED.get(key) == tuple(signature):
        return path
    for rel, _, sha in listed:
        if repro.file_sha256(path / rel) != sha:
            raise CheckpointError(f"{path / rel}: SHA-256 differs from {manifest_path} "
                                  f"(corrupted)", [path / rel])
    _VERIFIED[key] = tuple(signature)
    return path


def _verify_legacy_checkpoint(path: Path) -> None:
    from safetensors import safe_open

    state = path / "state.json"
    if not state.exists():
        raise CheckpointError(f"{state}: missing (incomplete checkpoint)", [state])
    meta = read_checkpoint_meta(path)
    names = ["trainable.safetensors", "rng.safetensors"]
    if "optimizer" in meta:
        names.append("optimizer.safetensors")
    for name in names:
        f = path / name
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: all mean unreadable
            raise CheckpointError(f"{f}: unreadable ({exc})", [f]) from None


TRUST_UNVERIFIED_ENV = "FMR1_TRUST_UNVERIFIED_CHECKPOINT"
"""Environment variable: set to 1, ``latest_checkpoint`` resumes from a checkpoint without a
manifest (written before manifests existed) when it is the only checkpoint of the run; without
it such a checkpoint is passed over with a warning (nothing vouches for its contents)."""


def checkpoint_finite(path: str | Path) -> bool:
    """Whether every trainable tensor of a checkpoint is finite (no NaN/inf weight)."""
    import torch

    try:
        tensors = _load_tensors(Path(path) / "trainable.safetensors")
    except CheckpointError:
        return False
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def latest_checkpoint(folder: str | Path, finite: bool = False) -> Path | None:
    """The newest valid checkpoint under ``folder`` (``verify_checkpoint``), or None if there
    is none at all.

    The ``latest`` pointer's checkpoint comes first, then the others newest first; a
    checkpoint that fails verification is passed over with a warning naming the bad file,
    so a resume falls back on the previous complete one. A checkpoint without a manifest is
    passed over too (nothing vouches for its tensors), unless it is the only checkpoint and
    ``TRUST_UNVERIFIED_ENV`` asks for it.

    Args:
        finite: also pass over checkpoints holding a non-finite weight (what the non-finite
            guard calls the last good checkpoint).

    Raises:
        CheckpointError: there are checkpoints but none is valid (names every bad file).
    """
    folder = Path(folder)
    found = sorted((p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()),
                   reverse=True)
    pointer = folder / "latest"
    if pointer.exists():
        try:
            named = folder / pointer.read_text().strip()
        except OSError:
            named = None
        if named in found:
            found.remove(named)
            found.insert(0, named)
    trust = os.environ.get(TRUST_UNVERIFIED_ENV, "") not in ("", "0") and len(found) == 1
    errors: list[CheckpointError] = []
    for path in found:
        try:
            if not (path / MANIFEST).exists() and not trust:
                raise CheckpointError(
                    f"{path / MANIFEST}: missing, so nothing vouches for the checkpoint's "
                    f"tensors (set {TRUST_UNVERIFIED_ENV}=1 to resume from it when it is the "
                    f"run's only checkpoint)", [path / MANIFEST])
            verify_checkpoint(path)
            if finite and not checkpoint_finite(path):
                raise CheckpointError(f"{path / 'trainable.safetensors'}: non-finite weights",
                                      [path / "trainable.safetensors"])
        except CheckpointError as exc:
            logger.warning("skipping checkpoint %s: %s", path, exc)
            errors.append(exc)
            continue
        if errors:
            logger.warning("resuming from the older checkpoint %s", path)
        return path
    if errors:
        raise CheckpointError(
            f"no valid checkpoint in {folder}: " + "; ".join(str(e) for e in errors),
            [f for e in errors for f in e.files])
    return None


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``: step, extra, optimiser layout, scheduler, RNG.

    Raises:
        CheckpointError: ``state.json`` is missing or not valid JSON (names it).
    """
    state = Path(path) / "state.json"
    try:
        meta = json.loads(state.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{state}: missing (incomplete checkpoint)", [state]) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state}: unreadable ({exc})", [state]) from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{state}: not a checkpoint state (no 'step')", [state])
    return meta


def _load_tensors(file: Path) -> dict[str, Any]:
    """``safetensors.torch.load_file``, its errors naming the file (``CheckpointError``)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: all mean unreadable
        raise CheckpointError(f"{file}: unreadable ({exc})", [file]) from None


def read_optimizer_state(path: str | Path) -> dict[str, Any] | None:
    """A checkpoint's optimiser state dict as saved (None: it holds none)."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    if "optimizer" not in meta:
        return None
    opt_t = _load_tensors(path / "optimizer.safetensors")
    opt_t.pop("_empty", None)
    return _unflatten_optimizer(opt_t, meta["optimizer"])


def load_checkpoint(path: str | Path, model: Any, optimizer: Any = None, scheduler: Any = None,
                    restore_rng: bool = True, weights: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``; returns its ``state.json`` dict.

    Args:
        optimizer: loaded from an index-keyed optimiser state; one keyed by name (gathered
            from FSDP shards) goes through ``set_optimizer_state_dict`` with ``model``.
        weights: False leaves the weights alone (a DeepSpeed engine reloads its own).

    Raises:
        CheckpointError: the checkpoint fails ``verify_checkpoint`` or a file is unreadable.
    """
    path = Path(path)
    verify_checkpoint(path)
    meta = read_checkpoint_meta(path)
    if weights:
        _load_weights(path, model)
    if optimizer is not None and "optimizer" in meta:
        state = read_optimizer_state(path)
        if meta["optimizer"].get("key_by") == "name":
            _load_named_optimizer(model, optimizer, state)
        else:
            optimizer.load_state_dict(state)
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(meta["scheduler"])
    if restore_rng:
        set_rng_state(_load_tensors(path / "rng.safetensors"), meta["rng"])
    return meta


def _load_named_optimizer(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a full optimiser state keyed by parameter name; under FSDP each process keeps the
    part of every tensor that matches its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def _load_weights(path: Path, model: Any) -> None:
    """Copy a checkpoint's trainable tensors into ``model``'s parameters of the same name."""
    import torch

    weights = _load_tensors(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise KeyError(f"{path}: checkpoint holds parameters the model lacks: {missing[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].dtype))
