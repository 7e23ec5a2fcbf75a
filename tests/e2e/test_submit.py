"""`rl submit`: a recipe runs as a Ray Job on a cluster (a local head node started here)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_submit_runs_the_recipe_as_a_ray_job(tiny_model_root, tmp_path):
    from rl.workers import free_port

    ray_bin = Path(sys.executable).parent / "ray"
    gcs_port, dash_port, agent_port = free_port(), free_port(), free_port()
    # Its own agent port too: the default one may be held by another local cluster (the tests' own).
    head = subprocess.Popen([str(ray_bin), "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
                             f"--dashboard-agent-listen-port={agent_port}", "--num-cpus=3", "--include-dashboard=true", "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = tmp_path / "run"
    try:
        proc = subprocess.run([
            sys.executable, "-m", "rl.cli", "submit", "recipes/quickstart.yaml",
            f"model.path={tiny_model_root / 'model'}", f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
            f"data.test={tiny_model_root / 'data' / 'test.jsonl'}", "steps=2", "data.prompts_per_step=8",
            "algorithm.group_size=4", "data.max_test_examples=8", "logging.progress=false", f"output_dir={out}",
            "--address", f"http://127.0.0.1:{dash_port}", "--python", sys.executable,
        ], capture_output=True, text=True, timeout=400, cwd=ROOT)
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
