"""The rollout side of every transport: node-local copies of the served version, removed once a newer one is loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

from rollout.shared_dirs import OwnedDir, default_shared_dir
from rollout.types import WeightHandle
from rollout.weight_sync.registry import Transports


class LocalCopies:
    """The rollout side of a transport: turns a handle into one this node's processes can read
    (``localize``), and removes the node-local copies once a newer version is loaded."""

    def __init__(self):
        self._dir = OwnedDir(default_shared_dir())
        self._current: list[Path] = []  # the served version's copy
        self._previous: list[Path] = []  # copies to remove once the new version is loaded
        self.transports = Transports()  # this process's reading side of each transport, kept for the run

    @property
    def directory(self) -> Path:
        return self._dir.path

    def localize(self, handle: WeightHandle) -> WeightHandle:
        local = self.transports[handle.transport].localize(handle, self._dir.make())
        if local is not handle:  # a copy on this node, kept until a newer version is loaded
            self._previous, self._current = self._current, [Path(local.location)]
        return local

    def loaded(self) -> None:
        """The engine holds the new version: the copies of older ones can go (a LoRA is read at its first use, so the current stays)."""
        for p in self._previous:
            shutil.rmtree(p.parent if p.is_file() else p, ignore_errors=True)
        self._previous = []

    def close(self) -> None:
        self._dir.remove()
