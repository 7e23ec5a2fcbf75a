"""A pids cgroup for one sandboxed run: a cap on its number of tasks that holds for root, and the list of every
process it started, for the end-of-run kill.

``RLIMIT_NPROC`` does not bind uid 0 (nor holders of ``CAP_SYS_RESOURCE``), and a trainer in a container or in CI
usually runs as root; a fork loop was then bounded only by the wall-clock kill. A pids cgroup (``pids.max``)
binds every task in it whatever its uid, and it keeps the processes that left the process group with
``setsid``, so they are killed too. Used where the machine lets this process create one (cgroup v1's ``pids``
hierarchy or cgroup v2 with the ``pids`` controller enabled for children, writable: root, or a delegated
subtree); elsewhere :func:`create` returns None and ``RLIMIT_NPROC`` is what limits processes.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path
from typing import Optional

_V1 = Path("/sys/fs/cgroup/pids")
_V2 = Path("/sys/fs/cgroup")
_COUNTER = itertools.count()


def _parents() -> list[Path]:
    """Where a child cgroup with ``pids.max`` can be made: v1's pids hierarchy, or v2's root when it hands the
    pids controller to its children."""
    out = []
    if (_V1 / "cgroup.procs").is_file():
        out.append(_V1)
    try:
        if "pids" in (_V2 / "cgroup.subtree_control").read_text().split():
            out.append(_V2)
    except OSError:
        pass
    return out


class PidsCgroup:
    def __init__(self, path: Path):
        self.path = path
        self.procs = str(path / "cgroup.procs")  # the child writes its pid here before exec

    @classmethod
    def create(cls, max_tasks: int) -> Optional["PidsCgroup"]:
        """A new cgroup allowing ``max_tasks`` tasks (processes and threads), or None where none can be made."""
        for parent in _parents():
            path = parent / f"rl-sandbox-{os.getpid()}-{next(_COUNTER)}"
            try:
                path.mkdir()
            except OSError:
                continue
            try:
                (path / "pids.max").write_text(str(int(max_tasks)))
                return cls(path)
            except OSError:
                path.rmdir()
        return None

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def remove(self, wait_s: float = 5.0) -> None:
        """Kill every process still in the cgroup (``setsid`` escapers included), then remove it."""
        deadline = time.monotonic() + wait_s
        while True:
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                self.path.rmdir()  # succeeds only once the cgroup is empty
                return
            except OSError:
                if time.monotonic() > deadline:
                    return  # left for the kernel to empty; an empty stale cgroup holds no resources
                time.sleep(0.02)
