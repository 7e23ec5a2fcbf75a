"""No silent hangs: an actor that stops making progress is named on the terminal while the driver
waits, and at the hard limit the run stops with its last checkpoint intact."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from rl.config import load_recipe

pytestmark = pytest.mark.e2e
PLUGIN = Path(__file__).parent / "plugins" / "stall_rollout.py"


def test_a_frozen_rollout_actor_is_named_and_the_run_stops_at_the_hard_limit(tiny_model_root, ray_session, tmp_path, capfd):
    from rl import checkpoint as ckpt
    from rl.online import OnlineRun
    from rl.watchdog import WorkerStalled

    recipe = load_recipe(None, [
        f"model.path={tiny_model_root / 'model'}", f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
        f"data.test={tiny_model_root / 'data' / 'test.jsonl'}", "steps=6", "checkpoint.every=1",
        "data.prompts_per_step=8", "algorithm.group_size=4", "rollout.max_new_tokens=6", "rollout.max_model_len=64",
        "eval.before=false", "eval.after=false", "logging.progress=false", f"output_dir={tmp_path / 'run'}",
        f"rewards.functions=[{{fn: '{PLUGIN}:freeze_rollout_on_second_call'}}]",
        # Start-up and first calls get 30x: 60 s before a first warning; later calls warn at 2 s, stop at 8 s.
        "watchdog.warn_seconds=2", "watchdog.stop_seconds=8", "watchdog.first_call_factor=30",
    ])
    try:
        with pytest.raises(WorkerStalled, match=r"rollout actor\(s\) \[0\] in 'load_weights'"):
            OnlineRun(recipe).fit()
    finally:
        for pid in _stopped_pids():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    err = capfd.readouterr().err
    assert "[rl] waiting on rollout actor(s) [0] in 'load_weights'" in err and "the weight transport" in err
    # Step 2 froze the engine while its new weights were being pushed: step 1's checkpoint is the last, intact.
    kept = ckpt.complete_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step_000001"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_by"].startswith("WorkerStalled") and summary["checkpoint"].endswith("step_000001")
    # The summary says why and how to go on; `rl runs` shows it as failed.
    assert summary["status"] == "failed" and summary["reason"] == summary["stopped_by"]
    assert "resume=auto" in summary["resume"] and summary["checkpoint"] in summary["resume"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def _stopped_pids() -> list[int]:
    """The actors the plugin froze (the registry keeps modules loaded from a file by their path)."""
    from rewards.registry import _FILE_MODULES

    module = _FILE_MODULES.get(PLUGIN.resolve())
    return list(getattr(module, "STOPPED", []))


def test_a_recipe_asking_for_resources_the_cluster_lacks_is_named(tiny_model_root, ray_session, tmp_path):
    """A rollout actor asking for a GPU on a CPU-only cluster would wait for resources forever in
    Ray: the placement is refused before any actor starts, naming what is asked and what exists."""
    from rl.online import OnlineRun
    from rl.placement import PlacementError

    recipe = load_recipe(None, [
        f"model.path={tiny_model_root / 'model'}", f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
        f"data.test={tiny_model_root / 'data' / 'test.jsonl'}", "rollout.max_model_len=64", "rollout.max_new_tokens=6",
        "rollout.num_gpus_per_actor=1", "logging.progress=false", f"output_dir={tmp_path / 'run'}",
        "watchdog.warn_seconds=1", "watchdog.stop_seconds=4", "watchdog.first_call_factor=1",
    ])
    run = OnlineRun(recipe)
    t0 = time.monotonic()
    try:
        with pytest.raises(PlacementError, match=r"rollout actor 0 asks for 1 CPU, 1 GPU, which no node of the cluster has "
                                                 r"\(.*: \d+ CPU\); lower rollout.num_gpus_per_actor"):
            run.start_workers()
    finally:
        run.stop_workers()
    assert time.monotonic() - t0 < 30  # refused at once, not after the watchdog's limit
