"""What a user sees: `rl train` on a real terminal (a pseudo-terminal here) shows the framework's
lines and its progress bar; the engines' and Ray's logs go to files in the run directory."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_a_terminal(cmd: list[str], timeout: float = 600) -> tuple[int, str]:
    """Run ``cmd`` with a pseudo-terminal as its stdin/stdout/stderr; returns (exit code, screen text)."""
    main, secondary = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=secondary, stdout=secondary, stderr=secondary, cwd=ROOT, close_fds=True,
                            env={**os.environ, "COLUMNS": "160", "TERM": "xterm"})
    os.close(secondary)
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(main)
    return proc.returncode, ANSI.sub(" ", out.decode(errors="replace")).replace("\r", "\n")


def test_the_terminal_holds_the_runs_lines_and_the_bar(tiny_model_root, tmp_path):
    run_dir = tmp_path / "run"
    code, screen = run_on_a_terminal([
        sys.executable, "-m", "rl.cli", "train", "recipes/quickstart.yaml", f"model.path={tiny_model_root / 'model'}",
        f"data.train={tiny_model_root / 'data' / 'train.jsonl'}", f"data.test={tiny_model_root / 'data' / 'test.jsonl'}",
        "steps=4", "data.prompts_per_step=8", "algorithm.group_size=4", "data.max_test_examples=16", f"output_dir={run_dir}",
    ])
    assert code == 0, screen[-4000:]
    lines = [l.strip() for l in screen.splitlines() if l.strip()]
    assert any(l.startswith("[rl] quickstart: B=8 prompts x G=4") for l in lines), screen[-4000:]
    assert any("held-out accuracy:" in l for l in lines)
    assert any(re.search(r"GRPO .*4/4", l) for l in lines), screen[-4000:]  # the progress bar, finished
    assert any(l.startswith("[rl] engine and trainer logs:") for l in lines)
    # Not on the screen: vLLM's INFO lines, its per-reload weight warnings, DeepSpeed's accelerator notice.
    noise = [l for l in lines if re.search(r"\bINFO\b|Failed to load weights|Setting accelerator to CPU|\(RolloutWorker|"
                                           r"\(PolicyTrainer|Token authentication", l)]
    assert noise == [], noise[:10]
    # ... they are in the run's log files instead.
    engine_log = (run_dir / "logs" / "rollout-0.log").read_text()
    assert "INFO" in engine_log
    assert (run_dir / "logs" / "trainer-rank0.log").exists()
