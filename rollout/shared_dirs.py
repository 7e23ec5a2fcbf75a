"""Directories in RAM (``/dev/shm``) for published weights, and nothing left there by a process that died.

A process removes its directory when it closes; one killed with SIGKILL (or by the OOM killer) cannot,
and a full model's version stays in RAM until the machine restarts. So each directory is owned: its
process holds an exclusive ``flock`` on ``<directory>/.owner`` for as long as it lives (the kernel
lets go of it when the process dies, however it dies), and whoever makes a new directory first
removes those whose lock is free. A lock works across PID namespaces (containers sharing
``/dev/shm``), where a process id would not.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import uuid
from pathlib import Path

PREFIX = "rl-weights-"
OWNER = ".owner"


SHM = Path("/dev/shm")


def shm_free() -> int | None:
    """Bytes free in ``/dev/shm`` (RAM); None where there is none this process can write to."""
    return shutil.disk_usage(SHM).free if SHM.is_dir() and os.access(SHM, os.W_OK) else None


def default_shared_dir(room_bytes: int = 0) -> Path:
    """A new directory name in ``/dev/shm`` (RAM) when it is writable and has ``room_bytes`` free, else in the
    temporary directory on disk: Docker gives a container 64 MB of ``/dev/shm`` by default, where a real
    model's first push would fail half-written. Orphans in that place are removed first."""
    free = shm_free()
    base = SHM if free is not None and free >= room_bytes else Path(tempfile.gettempdir())
    remove_orphans(base)
    return base / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"


class OwnedDir:
    """A weight directory this process owns once it is made: ``make()`` creates it and takes its lock (once),
    ``remove()`` deletes it and lets the lock go."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock: int | None = None  # the descriptor holding the lock

    def make(self) -> Path:
        if self._lock is None:
            self.path.mkdir(parents=True, exist_ok=True)
            pending = self.path / f"{OWNER}.{uuid.uuid4().hex[:8]}"
            self._lock = os.open(pending, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(pending, self.path / OWNER)  # only ever seen locked: a sweep never takes a directory being made
        return self.path

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def remove_orphans(base: Path) -> list[Path]:
    """Remove the weight directories under ``base`` whose owner is gone (their lock is free); returns them.
    Directories without an owner file (made by an older version) are left alone."""
    removed = []
    for directory in base.glob(f"{PREFIX}*"):
        try:
            fd = os.open(directory / OWNER, os.O_RDWR)
        except OSError:
            continue  # no owner file, or another sweep removed it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # its process is alive
        shutil.rmtree(directory, ignore_errors=True)
        os.close(fd)
        removed.append(directory)
    return removed
