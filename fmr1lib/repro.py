"""Reproducibility plumbing: seeding, run directories, atomic writes, recorded results.

Every artifact the pipeline writes goes through ``atomic_write_*`` (temp file in the
same folder, fsynced, then ``os.replace`` and an fsync of the folder), so a run killed
mid-write never leaves a torn file; folders (checkpoints, models, datasets) are built in a
temp folder next to their target and swapped in (``swap_folder``). Temp files and folders
get the permissions the umask gives (``make_temp_file`` / ``make_temp_dir``), not
``tempfile``'s private 0600 / 0700. Checkpoints carry a manifest (sizes and SHA-256 of every
file) that ``latest_checkpoint`` / ``load_checkpoint`` verify before resuming.
Notebooks record their results with ``Recorder.record(name, value)``; tests and later
notebooks read them back as data with ``read_records``.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
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


def sha256_text(text: str) -> str:
    """SHA-256 hex digest of a string (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def git_commit(root: str | Path | None = None) -> str:
    """The checkout's commit, with ``+dirty`` when tracked files under ``fmr1lib/``, ``params/``
    or ``notebooks/`` differ from it; ``unknown`` outside a git checkout."""
    import subprocess

    cwd = Path(root) if root is not None else project_root()
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "fmr1lib", "params", "notebooks"], cwd=cwd, capture_output=True,
                               text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def run_dir(params: Any, *parts: str, create: bool = True) -> Path:
    """``<run_root>/<profile>/<parts...>`` for a params object with those two fields."""
    path = resolve_path(params.run_root) / params.profile
    for part in parts:
        path = path / part
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def figures_dir(params: Any) -> Path:
    """The figures folder named by ``params.figures_dir``, by default ``<run_root>/<profile>/figures``
    (created if missing)."""
    path = (resolve_path(params.figures_dir) if params.figures_dir
            else run_dir(params, "figures", create=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells it (Linux ``/proc``).

    Elsewhere it is read by setting it and setting it back, under a lock, through the most
    private value (0o077), so a file another thread creates meanwhile is never more open.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def make_temp_file(folder: str | Path, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``folder``, with the mode a plain ``open`` would give
    (``0o666 & ~umask``) instead of mkstemp's 0600: renamed into place, the file is as
    readable as any other the user writes."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def _owner_tag() -> str:
    """``pid<pid>-<host>``: who made a temp folder, so that a later save can tell a dead
    writer's leftovers (``clean_stale_temps``) from a live one's."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
    return f"pid{os.getpid()}-{host}"


def make_temp_dir(folder: str | Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``folder`` (name: ``prefix``, the owner tag, random), with
    mode ``0o777 & ~umask`` instead of mkdtemp's 0700."""
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f"{prefix}{_owner_tag()}."))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def apply_umask_modes(folder: str | Path) -> None:
    """Give ``folder`` and everything under it the modes a plain ``open`` / ``mkdir`` would
    (``0o666 & ~umask``, ``0o777 & ~umask``): some writers (safetensors) create files 0600
    whatever the umask, and a saved model or checkpoint should be as readable as the rest."""
    mask = current_umask()
    folder = Path(folder)
    os.chmod(folder, 0o777 & ~mask)
    for root, subdirs, files in os.walk(folder):
        for name in subdirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder, so that the renames and new entries in it survive a crash (a no-op
    where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under ``folder``, then every folder (deepest first, ``folder`` last)."""
    folder = Path(folder)
    dirs = [folder]
    for root, subdirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        dirs.extend(Path(root) / d for d in subdirs)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_FOLDER_SHA: dict[str, tuple[tuple, str]] = {}
"""``folder_sha256`` results with the (name, size, mtime, inode) of every file then: an
unchanged folder is not hashed again by the same process."""


def folder_sha256(folder: str | Path) -> str:
    """SHA-256 over the names and contents of every file under ``folder`` ("" if it holds
    none): a saved model's identity, as its run's completion marker records it."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    if not files:
        return ""
    signature = []
    for f in files:
        st = f.stat()
        signature.append((f.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns, st.st_ino))
    key = str(folder.resolve())
    cached = _FOLDER_SHA.get(key)
    if cached is not None and cached[0] == tuple(signature):
        return cached[1]
    h = hashlib.sha256()
    for (rel, *_), f in zip(signature, files, strict=True):
        h.update(rel.encode() + b"\0" + file_sha256(f).encode() + b"\n")
    _FOLDER_SHA[key] = (tuple(signature), h.hexdigest())
    return h.hexdigest()


STALE_TEMP_S = 3600.0
"""Age (seconds since the last change) after which a temp folder whose writer cannot be
checked (another host, an old name without owner tag) counts as a leftover."""

_OWNER = re.compile(r"pid(\d+)-([A-Za-z0-9-]*)\.")


def _writer_alive(name: str) -> bool | None:
    """Whether the process that made temp folder ``name`` still runs (None: unknown)."""
    m = _OWNER.search(name)
    if m is None or m.group(2) != _owner_tag().split("-", 1)[1]:
        return None
    pid = int(m.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temps(folder: str | Path, prefix: str, max_age_s: float = STALE_TEMP_S,
                      keep: tuple[str | Path, ...] = ()) -> list[Path]:
    """Delete the leftover temp folders ``folder/<prefix>*`` of saves that were killed.

    A temp folder is a leftover when the process that made it (named in it by
    ``make_temp_dir``) is gone, or, when that cannot be told, when it has not changed for
    ``max_age_s`` seconds. A live writer's folder and the paths in ``keep`` stay.

    Returns:
        The folders deleted (each logged).
    """
    folder = Path(folder)
    kept = {Path(k).resolve() for k in keep}
    removed = []
    now = time.time()
    for path in sorted(folder.glob(f"{glob.escape(prefix)}*")):
        if not path.is_dir() or path.is_symlink() or path.resolve() in kept:
            continue
        alive = _writer_alive(path.name)
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if alive or (alive is None and age < max_age_s):
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.warning("removed %s, left by an interrupted save", path)
        removed.append(path)
    return removed


def old_folder(folder: str | Path) -> Path:
    """Where ``swap_folder`` parks the previous version of ``folder`` during the swap."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.old")


@contextlib.contextmanager
def dir_lock(folder: str | Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` of the directory ``folder`` for the duration of the block
    (blocking; the kernel drops it with its process, so a killed holder leaves none behind)."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def recover_interrupted_swap(folder: str | Path) -> bool:
    """Put back the previous version of ``folder`` when a swap was killed between its two
    renames (``folder`` gone, ``.<name>.old`` there); drop a stale ``.old`` otherwise.

    It runs under the swap lock of ``folder``'s parent (``dir_lock``), which ``swap_folder``
    holds across its two renames: a reader arriving mid-swap waits for the swap to end instead
    of taking the writer's parked old version for an interrupted one.

    Returns:
        True when the previous version was put back.
    """
    folder = Path(folder)
    if not old_folder(folder).is_dir():
        return False
    with dir_lock(folder.parent):
        return _recover_swap(folder)


def _recover_swap(folder: Path) -> bool:
    """``recover_interrupted_swap``'s work, under the swap lock."""
    old = old_folder(folder)
    if not old.is_dir():
        return False
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        return False
    old.rename(folder)
    fsync_dir(folder.parent)
    logger.warning("%s: a save was interrupted mid-swap; the previous version was restored "
                   "from %s", folder, old.name)
    return True


def swap_folder(tmp: str | Path, folder: str | Path) -> Path:
    """Replace ``folder`` by the complete folder ``tmp`` (same parent): rename the old one
    aside, rename ``tmp`` in, fsync the parent, delete the old one. At every moment either
    the old or the new version is complete on disk (``recover_interrupted_swap``)."""
    tmp, folder = Path(tmp), Path(folder)
    old = old_folder(folder)
    with dir_lock(folder.parent):
        _recover_swap(folder)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        fsync_dir(folder.parent)
        if old.exists():
            shutil.rmtree(old)
    return folder


@contextlib.contextmanager
def staged_folder(folder: str | Path) -> Iterator[Path]:
    """Build a replacement of ``folder`` in a temp folder next to it, then swap it in.

    First a save killed mid-swap is undone (``recover_interrupted_swap``) and stale temp
    folders of killed saves go (``clean_stale_temps``). The block writes into the yielded temp
    folder; when it returns, the folder gets the umask's modes, is fsynced and swapped in
    (``swap_folder``). When it raises, the temp folder is removed and ``folder`` is untouched.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(folder)
    clean_stale_temps(folder.parent, f".{folder.name}.")
    tmp = make_temp_dir(folder.parent, f".{folder.name}.")
    try:
        yield tmp
        apply_umask_modes(tmp)
        fsync_tree(tmp)
        swap_folder(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file (fsynced) and ``os.replace``; the
    folder is fsynced after the rename. The file gets the umask's mode, as ``open`` gives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
    fsync_dir(path.parent)
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
        self._tail_checked = False

    def log(self, step: int, **metrics: Any) -> None:
        """Append ``{"step": step, **metrics}`` as one line. Before the first append, a torn
        last line (a kill mid-write) is cut off with a warning, so that the file stays JSONL."""
        line = json.dumps(_to_jsonable({"step": step, **metrics}))
        if not self._tail_checked:
            self._tail_checked = True
            _cut_torn_tail(self.path)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All logged rows, in order."""
        return read_jsonl(self.path)


def _cut_torn_tail(path: Path) -> None:
    """Truncate ``path`` after its last newline when it does not end with one."""
    if not path.exists():
        return
    with open(path, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        block = min(size, 1 << 20)
        while True:
            fh.seek(size - block)
            cut = fh.read(block).rfind(b"\n")
            if cut >= 0 or block == size:
                break
            block = min(size, block * 4)
        keep = size - block + cut + 1 if cut >= 0 else 0
        fh.truncate(keep)
    logger.warning("%s: cut a torn last line (%d bytes) before appending", path, size - keep)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (blank lines skipped); empty list when the file is missing.

    A torn last line (a run killed while appending it) is skipped with a warning naming the
    file, so that a resume can go on; an unreadable line before it raises ``ValueError``
    naming the file and the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == last:
                logger.warning("%s line %d: skipped a torn last line (%s): %.80r", path, i + 1,
                               exc.msg, line)
                continue
            raise ValueError(f"{path} line {i + 1}: invalid JSON ({exc.msg}); only a torn "
                             f"last line is skipped") from None
    return rows


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

    ``manifest.json``, written last, holds the size and SHA-256 of every other file
    (``verify_checkpoint``); every file and folder is fsynced before the rename. Temp folders
    left by killed saves (``.step_*``) are deleted first (``clean_stale_temps``).
    """
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(folder, f".{CHECKPOINT_PREFIX}")
    final = folder / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = make_temp_dir(folder, f".{final.name}.")
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
        apply_umask_modes(tmp)
        fsync_tree(tmp)
        atomic_write_json(tmp / MANIFEST, checkpoint_manifest(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    atomic_write_text(folder / "latest", final.name + "\n")
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
            files[rel] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
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
        if file_sha256(path / rel) != sha:
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
