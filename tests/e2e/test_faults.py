"""Faults a long run meets: a non-finite loss, SIGTERM, a full disk while checkpointing."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer import algorithms
from rl.config import load_recipe

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]

_calls = {"n": 0}


def _nan_from_third_step(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO advantages for two steps, then NaN: a stand-in for a loss that blows up."""
    _calls["n"] += 1
    adv = algorithms.grpo_advantages(rewards)
    return adv if _calls["n"] <= 2 else torch.full_like(adv, float("nan"))


@pytest.fixture
def nan_advantage():
    """Registered for one test only, so the registry other tests see is the built-in one."""
    from trainer.algorithms import registry

    algorithms.register("advantage", "test_nan_from_third_step")(_nan_from_third_step)
    yield
    del registry.REGISTRIES["advantage"]._entries["test_nan_from_third_step"]


def _overrides(tiny_model_root, out, *extra):
    return [
        f"model.path={tiny_model_root / 'model'}",
        f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
        f"data.test={tiny_model_root / 'data' / 'test.jsonl'}",
        "data.prompts_per_step=8", "algorithm.group_size=4", "data.max_test_examples=8",
        "rollout.max_new_tokens=6", "rollout.max_model_len=64", "logging.progress=false", f"output_dir={out}", *extra,
    ]


def _rows(run_dir: Path, kind: str = "train") -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind] if path.exists() else []


def test_nonfinite_loss_skips_updates_then_stops_with_last_good_checkpoint(tiny_model_root, ray_session, tmp_path, nan_advantage):
    from rl.online import OnlineRun as Trainer, TrainingDiverged

    _calls["n"] = 0
    recipe = load_recipe(None, _overrides(tiny_model_root, tmp_path, "steps=10", "algorithm.advantage=test_nan_from_third_step",
                                          "trainer.max_nonfinite_steps=2", "eval.before=false", "eval.after=false"))
    with pytest.raises(TrainingDiverged, match="last good policy is in"):
        Trainer(recipe).fit()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["updates_skipped_nonfinite"] for r in rows] == [0, 0, 1, 1]
    assert [r["policy_version"] for r in rows] == [1, 2, 2, 2]  # skipped steps pushed nothing
    state = json.loads((tmp_path / "checkpoints" / "step_000004" / "driver_state.json").read_text())
    assert state["policy_version"] == 2
    weights = (tmp_path / "checkpoints" / "step_000004" / "model.safetensors")
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(weights)).values())


def test_full_disk_during_checkpoint_keeps_previous_checkpoint(tiny_model_root, ray_session, tmp_path, monkeypatch):
    from rl.online import OnlineRun as Trainer

    recipe = load_recipe(None, _overrides(tiny_model_root, tmp_path, "steps=4", "checkpoint.every=2",
                                          "eval.before=false", "eval.after=false"))
    t = Trainer(recipe)
    real_save = t.save_checkpoint
    calls = {"n": 0}

    def save_then_disk_full():
        calls["n"] += 1
        if calls["n"] == 1:
            return real_save()
        # The disk fills while the driver state is written, after the weights went into the tmp dir.
        real_write = Path.write_text

        def failing_write(self, *a, **k):
            if self.name == "driver_state.json":
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(self, *a, **k)

        monkeypatch.setattr(Path, "write_text", failing_write)
        try:
            return real_save()
        finally:
            monkeypatch.setattr(Path, "write_text", real_write)

    t.save_checkpoint = save_then_disk_full
    with pytest.raises(OSError, match="No space left"):
        t.fit()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_000002"]  # intact, and no half-written step_000004(.tmp)
    assert (tmp_path / "checkpoints" / "step_000002" / "driver_state.json").exists()
    from rl import checkpoint

    assert checkpoint.complete_checkpoints(tmp_path)[-1].name == "step_000002"


def test_sigterm_checkpoints_and_leaves_no_processes(tiny_model_root, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rl.cli", "train", str(ROOT / "recipes" / "quickstart.yaml"),
           *_overrides(tiny_model_root, out, "steps=200", "eval.every=0", "checkpoint.every=0")]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not any(r["step"] >= 2 for r in _rows(out)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # to the driver only, as a scheduler would
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    last = max(r["step"] for r in _rows(out))
    assert 2 <= last < 200
    assert (out / "checkpoints" / f"step_{last:06d}" / "driver_state.json").exists()
    assert "SIGTERM: checkpoint at step" in output
    # Nothing of the run is left: no process of its session survives.
    time.sleep(2)
    survivors = subprocess.run(["ps", "-o", "pid=,comm=", "-s", str(proc.pid)], capture_output=True, text=True).stdout.strip()
    assert survivors == "", survivors
