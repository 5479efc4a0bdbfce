"""One writer per run folder: a lock file naming its owner (docs/design.md §10.2).

A stage that writes a run folder holds ``RunLock(folder)`` while it runs. The lock is the file
``<folder>/run.lock``, created with ``O_CREAT | O_EXCL`` (so of two processes racing for it,
exactly one gets it) and holding the owner's pid, host and start time as JSON. A second writer
gets ``RunLockedError`` naming the folder and the owner. A lock left by a process that no
longer exists on this host (killed, crashed) is stale: it is taken over with a warning, and so
is an empty or unreadable lock file (its writer was killed between creating and writing it). A
lock from another host cannot be checked and is refused like a live one.

Taking the lock, and taking over a stale one, happen under an ``fcntl.flock`` of the folder
itself (``repro.dir_lock``, the guard): of two restarts that both find the same stale lock, the
second to get the guard finds the first one's live lock, never the stale one, so exactly one
holds the folder. The kernel drops the guard with its process, so a killed holder leaves nothing
to clean up. The lock goes when the ``with`` block ends, also on an exception; only the owner's
own lock file is removed.

Under ``accelerate launch`` only the main process takes the lock (``enabled=False`` elsewhere):
the other processes write no run-level files.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from fmr1lib import repro

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
"""The lock file's name inside a run folder."""


class RunLockedError(RuntimeError):
    """Another process is writing the run folder."""


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def read_lock(folder: str | Path) -> dict[str, Any] | None:
    """The owner record of ``folder``'s lock (None: not locked; ``{}``: unreadable)."""
    path = Path(folder) / LOCK_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


class RunLock:
    """Exclusive ownership of a run folder while a stage writes it.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with RunLock(folder):
    ...     read_lock(folder)["pid"] == os.getpid()
    True
    >>> read_lock(folder) is None
    True

    Args:
        folder: the run folder (created if missing).
        enabled: False makes the lock a no-op (processes other than the main one).

    Raises:
        RunLockedError: on entry, when a live process (or one on another host) holds the lock.
    """

    def __init__(self, folder: str | Path, enabled: bool = True):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.enabled = enabled
        self.token = uuid.uuid4().hex
        self.held = False

    def acquire(self) -> RunLock:
        """Take the lock (a stale one is taken over, with a warning)."""
        if not self.enabled or self.held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with repro.dir_lock(self.folder):  # the guard
            for _ in range(3):  # a stale lock removed by us is retried
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    self._take_over_if_stale()
                    continue
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                self.held = True
                return self
        raise RunLockedError(f"{self.folder}: could not take the run lock {self.path}")

    def _take_over_if_stale(self) -> None:
        """Remove the lock file if its owner is a process of this host that no longer exists, or
        if it is empty or unreadable (under the guard, no live writer is still filling it in);
        otherwise raise ``RunLockedError`` naming the owner. Called under the guard."""
        owner = read_lock(self.folder)
        if owner is None:  # released meanwhile
            return
        if not owner:
            logger.warning("%s: taking over an empty or unreadable run lock (its writer was "
                           "killed while creating it)", self.folder)
            self.path.unlink(missing_ok=True)
            return
        pid, host = owner.get("pid"), owner.get("host")
        same_host = host == socket.gethostname()
        if isinstance(pid, int) and same_host and not _pid_alive(pid):
            logger.warning("%s: taking over the stale run lock of pid %d on %s (that process "
                           "no longer exists; its run was interrupted)", self.folder, pid, host)
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            return
        who = f"pid {pid} on host {host}" + ("" if same_host else " (cannot be checked)")
        raise RunLockedError(
            f"{self.folder} is being written by {who} since {owner.get('started', '?')}: two "
            f"runs in one folder would interleave its logs and checkpoints. Wait for that run, "
            f"or, if it is no longer running, delete {self.path}.")

    def release(self) -> None:
        """Remove the lock file if it is still this lock's own."""
        if not self.held:
            return
        self.held = False
        owner = read_lock(self.folder)
        if owner and owner.get("token") == self.token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        else:
            logger.warning("%s: the run lock was no longer this process's own at release",
                           self.folder)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
