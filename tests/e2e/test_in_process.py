"""``use_ray: false``: the same vLLM and DeepSpeed engines in the driver's process, as in a notebook or a
debugger. A second run in that process must be the run a fresh process would give: the first run's engines
share torch.distributed with it and must leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]

RUNS = """
import sys
from rl.config import load_recipe
from rl.online import OnlineRun
for out in sys.argv[1:]:
    OnlineRun(load_recipe("recipes/grpo16-arithmetic.yaml", [
        "use_ray=false", "steps=2", f"output_dir={out}", "logging.progress=false", "data.max_test_examples=16",
        "eval.every=2", "checkpoint.save_final=false"])).fit()
"""


def _measured(row: dict) -> dict:
    """A metrics row without what depends on the machine's load (times, speeds, memory)."""
    return {k: v for k, v in row.items() if not any(word in k for word in ("time", "second", "rss"))}


def test_later_runs_in_the_same_process_repeat_the_first(tmp_path):
    # Three runs: without the workers' release() the third one failed (the second run's garbage-collected
    # engine destroyed the world group that DeepSpeed had cached).
    runs = [tmp_path / name for name in ("first", "second", "third")]
    proc = subprocess.run([sys.executable, "-c", RUNS, *map(str, runs)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [[_measured(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in runs]
    assert [r["step"] for r in rows[0] if r["kind"] == "train"] == [1, 2]
    assert any(r["loss"] != 0.0 for r in rows[0] if r["kind"] == "train")  # the policy moved, and step 2 sampled from it
    assert rows[1] == rows[0] and rows[2] == rows[0]  # same rollouts, rewards, losses, gradient norms, evaluations
