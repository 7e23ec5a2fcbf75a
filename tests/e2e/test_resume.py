"""Exact resume: SIGKILL a run mid-way, resume it, and compare with an uninterrupted run.

Every step must appear exactly once in metrics.jsonl, and with fixed seeds the resumed steps
must reproduce the uninterrupted run's rewards (vLLM samples with per-request seeds derived
from (seed, step); the trainer restores optimizer, scheduler and RNG state).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import QUICKSTART_CLI_STEPS, quickstart_cli_cmd

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
STEPS = QUICKSTART_CLI_STEPS


def _train_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


def _cmd(tiny_model_root, out: Path, *extra: str) -> list[str]:
    """The reference's command (the session's uninterrupted `rl train`), its trackers off: they change no number."""
    return quickstart_cli_cmd(tiny_model_root, out, "logging.wandb=false", "logging.mlflow=false", *extra)


def test_sigkill_then_resume_matches_uninterrupted_and_refuses_another_recipe(tiny_model_root, quickstart_cli_run, tmp_path):
    ref_dir, run_dir = quickstart_cli_run[0], tmp_path / "interrupted"

    # The whole process group, Ray's own processes included: like a preempted node.
    proc = subprocess.Popen(_cmd(tiny_model_root, run_dir), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if any(r["step"] >= 3 for r in _train_rows(run_dir)):
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(r["step"] for r in _train_rows(run_dir))
    assert 3 <= killed_at < STEPS, f"the run was not interrupted mid-way (last step {killed_at})"
    from rl import checkpoint as ckpt

    assert ckpt.complete_checkpoints(run_dir), "no checkpoint to resume from"  # step 2 (or 4: keep_last=1)

    resumed = subprocess.run(_cmd(tiny_model_root, run_dir, "resume=auto"), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout

    rows = _train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "a step was repeated or skipped"
    ref_rows = _train_rows(ref_dir)
    for got, want in zip(rows, ref_rows):
        assert got["reward_mean"] == pytest.approx(want["reward_mean"], abs=1e-6), got["step"]
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5), got["step"]
    # The final policies agree too.
    from safetensors.torch import load_file

    a = load_file(str(ref_dir / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    # The same run directory under a recipe that trains differently: refused before anything starts.
    other = subprocess.run(_cmd(tiny_model_root, run_dir, "resume=auto", "trainer.lr=1e-2"), capture_output=True, text=True, timeout=120,
                           cwd=ROOT)
    assert other.returncode == 2
    assert "different recipe" in other.stderr and "resume_force" in other.stderr


def test_zero2_two_ranks_resume_exactly(tiny_model_root, ray_session, tmp_path, cut_and_resume):
    """ZeRO-2 on 2 ranks: each rank's fp32 partition and AdamW moments come back from safetensors;
    the resumed steps reproduce the uninterrupted run."""
    from rl.config import load_recipe

    def recipe(run_dir, *more):
        return load_recipe(None, [
            f"model.path={tiny_model_root / 'model'}", f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
            f"data.test={tiny_model_root / 'data' / 'test.jsonl'}", "steps=4", "data.prompts_per_step=16",
            "algorithm.group_size=4", "rollout.max_new_tokens=6", "rollout.max_model_len=64", "trainer.lr=2e-3",
            "trainer.zero_stage=2", "trainer.num_ranks=2", "trainer.micro_batch_size=16", "checkpoint.every=2",
            "eval.before=false", "eval.after=false", "logging.progress=false", f"output_dir={run_dir}", *more])

    ref, resumed = cut_and_resume(recipe, cut=2)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["reward_mean"] == pytest.approx(ref[step]["reward_mean"], abs=1e-6), step
        assert resumed[step]["loss"] == pytest.approx(ref[step]["loss"], abs=1e-5), step
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ref" / "checkpoints" / "step_000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "step_000004" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
