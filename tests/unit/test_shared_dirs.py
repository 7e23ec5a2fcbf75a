"""Weights left in RAM by a process killed with SIGKILL are removed by the next run that makes a weight
directory; a live process's directory and directories without an owner are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from rollout.shared_dirs import OWNER, PREFIX, default_shared_dir, remove_orphans
from rollout.weight_sync import SharedFileTransport

ROOT = Path(__file__).resolve().parents[2]
PUBLISH_THEN_WAIT = """
import sys, time, torch
from rollout.weight_sync import SharedFileTransport
t = SharedFileTransport(sys.argv[1] if len(sys.argv) > 1 else None)
t.publish([("w", torch.ones(1000))], 1)
print(t.directory, flush=True)
time.sleep(600)
"""


def _publisher(*args: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", PUBLISH_THEN_WAIT, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_processs_weights_are_removed_and_a_live_ones_kept(tmp_path):
    killed, killed_dir = _publisher(str(tmp_path / f"{PREFIX}killed"))
    alive, alive_dir = _publisher(str(tmp_path / f"{PREFIX}alive"))
    legacy = tmp_path / f"{PREFIX}legacy"  # made before directories had owners: not ours to judge
    legacy.mkdir()
    try:
        assert (killed_dir / "policy-v000001.safetensors").exists()
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert killed_dir.exists()  # nobody cleaned up
        assert remove_orphans(tmp_path) == [killed_dir]
        assert not killed_dir.exists() and (alive_dir / OWNER).exists() and legacy.exists()
    finally:
        alive.kill()
        alive.wait(timeout=30)
    assert remove_orphans(tmp_path) == [alive_dir]


def test_the_default_directory_sweeps_dev_shm_and_a_closed_transport_leaves_nothing():
    killed, killed_dir = _publisher()  # the default place: /dev/shm
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    mine = SharedFileTransport(default_shared_dir())
    # Removed when the next directory was chosen (here or, under pytest-xdist, by a run of another test first).
    assert not killed_dir.exists()
    mine.publish([("w", torch.zeros(3))], 1)
    assert mine.directory not in remove_orphans(mine.directory.parent)  # this process holds it
    mine.close()
    assert not mine.directory.exists()
