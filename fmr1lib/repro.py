"""Reproducibility plumbing: seeding, run directories, atomic writes, recorded results.

Every artifact the pipeline writes goes through ``atomic_write_*`` (temp file in the
same folder, fsynced, then ``os.replace`` and an fsync of the folder), so a run killed
mid-write never leaves a torn file; folders (checkpoints, models, datasets) are built in a
temp folder next to their target and swapped in (``swap_folder``). Temp files and folders
get the permissions the umask gives (``make_temp_file`` / ``make_temp_dir``), not
``tempfile``'s private 0600 / 0700. Checkpoints are written and verified by
``fmr1lib.checkpoints`` with these tools.
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


def params_dict(params: Any) -> dict[str, Any]:
    """The fields of a params dataclass as a flat dict of copies: a field that holds a dataclass
    (a section, e.g. ``RLParams.reward``) contributes its own fields in its place."""
    import copy
    import dataclasses

    out: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if dataclasses.is_dataclass(value):
            out.update(params_dict(value))
        else:
            out[f.name] = copy.deepcopy(value)
    return out


def save_params(params: Any, folder: str | Path, name: str = "params.json") -> Path:
    """Store the resolved parameters (flat, ``params_dict``) next to the artifacts they made."""
    return atomic_write_json(Path(folder) / name, {
        "class": type(params).__name__, "params": params_dict(params)})


def saved_params_equal(folder: str | Path, params: Any, name: str = "params.json") -> bool:
    """Whether ``folder/name`` (written by ``save_params``) holds exactly ``params``."""
    stored = Path(folder) / name
    if not stored.exists():
        return False
    saved = json.loads(stored.read_text()).get("params")
    return saved == json.loads(json.dumps(_to_jsonable(params_dict(params))))


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
