"""Reproducibility plumbing: seeding, run directories, atomic writes, recorded results.

Every artifact the pipeline writes goes through ``atomic_write_*`` (temp file in the
same folder, then ``os.replace``), so a run killed mid-write never leaves a torn file.
Notebooks record their results with ``Recorder.record(name, value)``; tests and later
notebooks read them back as data with ``read_records``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # torch is a dependency, but data generation does not need it
        return
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: cwd) holding ``pyproject.toml``.

    Notebooks run with their own folder as cwd (under nbval and papermill), so paths in
    parameters are resolved against the project root rather than the cwd.
    """
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "fmr1lib").is_dir():
            return folder
    return here


def resolve_path(path: str | Path) -> Path:
    """``path`` if absolute, else relative to the project root."""
    path = Path(path)
    return path if path.is_absolute() else project_root() / path


def run_dir(params: Any, *parts: str, create: bool = True) -> Path:
    """``<run_root>/<profile>/<parts...>`` for a params object with those two fields."""
    path = resolve_path(params.run_root) / params.profile
    for part in parts:
        path = path / part
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def figures_dir(params: Any) -> Path:
    """The figures folder named by ``params.figures_dir`` (created if missing)."""
    path = resolve_path(params.figures_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "tolist") and hasattr(value, "dim"):  # torch tensors
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (numpy / torch values converted)."""
    return atomic_write_text(path, json.dumps(_to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def save_params(params: Any, folder: str | Path, name: str = "params.json") -> Path:
    """Store the resolved parameters next to the artifacts they made."""
    import dataclasses

    return atomic_write_json(Path(folder) / name, {
        "class": type(params).__name__, "params": dataclasses.asdict(params)})


def saved_params_equal(folder: str | Path, params: Any, name: str = "params.json") -> bool:
    """Whether ``folder/name`` (written by ``save_params``) holds exactly ``params``."""
    import dataclasses

    stored = Path(folder) / name
    if not stored.exists():
        return False
    saved = json.loads(stored.read_text()).get("params")
    return saved == json.loads(json.dumps(_to_jsonable(dataclasses.asdict(params))))


class Recorder:
    """Results of one notebook run, kept as a JSON dict on disk.

    >>> import tempfile, pathlib
    >>> rec = Recorder(pathlib.Path(tempfile.mkdtemp()) / "results.json")
    >>> rec.record("accuracy", 0.5)
    0.5
    >>> read_records(rec.path)
    {'accuracy': 0.5}
    """

    def __init__(self, path: str | Path, reset: bool = True):
        self.path = Path(path)
        self.values: dict[str, Any] = {}
        if not reset and self.path.exists():
            self.values = read_records(self.path)
        atomic_write_json(self.path, self.values)

    def record(self, name: str, value: Any) -> Any:
        """Store ``value`` under ``name`` (rewriting the file atomically) and return it."""
        self.values[name] = _to_jsonable(value)
        atomic_write_json(self.path, self.values)
        logger.info("recorded %s = %r", name, self.values[name])
        return value


def read_records(path: str | Path) -> dict[str, Any]:
    """Read a ``Recorder`` file back as a dict."""
    return json.loads(Path(path).read_text())


class MetricsLog:
    """Append-only JSONL log of training metrics, one object per logged step."""

    def __init__(self, path: str | Path, reset: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if reset and self.path.exists():
            self.path.unlink()

    def log(self, step: int, **metrics: Any) -> None:
        """Append ``{"step": step, **metrics}`` as one line."""
        line = json.dumps(_to_jsonable({"step": step, **metrics}))
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All logged rows, in order."""
        return read_jsonl(self.path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (blank lines skipped); empty list when the file is missing."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Atomically write rows as JSONL."""
    text = "".join(json.dumps(_to_jsonable(r)) + "\n" for r in rows)
    return atomic_write_text(path, text)


# --------------------------------------------------------------------------------------
# Checkpoints: safetensors for every tensor, JSON for the rest; no pickle anywhere
# --------------------------------------------------------------------------------------

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


def save_checkpoint(folder: str | Path, step: int, model: Any, optimizer: Any = None,
                    scheduler: Any = None, extra: dict[str, Any] | None = None,
                    keep: int = 2, weights: dict[str, Any] | None = None,
                    optimizer_state: dict[str, Any] | None = None,
                    engine_dir: str | Path | None = None) -> Path:
    """Write ``<folder>/step_<step>/`` atomically: trainable weights, optimizer, scheduler, RNG.

    Only parameters with ``requires_grad`` are saved (all of them for full fine-tuning,
    the adapters for LoRA): the frozen rest is rebuilt from the starting checkpoint.
    Older checkpoints beyond the last ``keep`` are deleted.

    Args:
        weights: the trainable tensors to save instead of ``model``'s own (under sharding:
            gathered from every process's shard, full shapes).
        optimizer_state: an optimiser state dict to save instead of ``optimizer.state_dict()``
            (FSDP: gathered to full tensors, parameters keyed by name).
        engine_dir: a DeepSpeed engine checkpoint written by every process; it is moved into
            the checkpoint as ``deepspeed/``.
    """
    import shutil

    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{final.name}."))
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
        if engine_dir is not None:
            os.replace(engine_dir, tmp / "deepspeed")
            meta["deepspeed"] = {"dir": "deepspeed", "tag": ENGINE_TAG}
        if scheduler is not None:
            meta["scheduler"] = scheduler.state_dict()
        rng_t, rng_meta = rng_state()
        save_file(rng_t, str(tmp / "rng.safetensors"))
        meta["rng"] = rng_meta
        atomic_write_json(tmp / "state.json", meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    atomic_write_text(folder / "latest", final.name + "\n")
    for old in sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint under ``folder`` (or None)."""
    folder = Path(folder)
    pointer = folder / "latest"
    if pointer.exists():
        path = folder / pointer.read_text().strip()
        if (path / "state.json").exists():
            return path
    done = sorted(p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.json").exists())
    return done[-1] if done else None


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``: step, extra, optimiser layout, scheduler, RNG."""
    return json.loads((Path(path) / "state.json").read_text())


def read_optimizer_state(path: str | Path) -> dict[str, Any] | None:
    """A checkpoint's optimiser state dict as saved (None: it holds none)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_checkpoint_meta(path)
    if "optimizer" not in meta:
        return None
    opt_t = load_file(str(path / "optimizer.safetensors"))
    opt_t.pop("_empty", None)
    return _unflatten_optimizer(opt_t, meta["optimizer"])


def load_checkpoint(path: str | Path, model: Any, optimizer: Any = None, scheduler: Any = None,
                    restore_rng: bool = True, weights: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``; returns its ``state.json`` dict.

    Args:
        optimizer: loaded from an index-keyed optimiser state; one keyed by name (gathered
            from FSDP shards) goes through ``set_optimizer_state_dict`` with ``model``.
        weights: False leaves the weights alone (a DeepSpeed engine reloads its own).
    """
    from safetensors.torch import load_file

    path = Path(path)
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
        set_rng_state(load_file(str(path / "rng.safetensors")), meta["rng"])
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
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise KeyError(f"{path}: checkpoint holds parameters the model lacks: {missing[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].dtype))
