"""What a user sees: `rl train` on a real terminal (a pseudo-terminal here) shows the framework's
lines and its progress bar; the engines' and Ray's logs go to files in the run directory."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.e2e


def test_the_terminal_holds_the_runs_lines_and_the_bar(quickstart_cli_run):
    """The session's `rl train` run on a pseudo-terminal (tests/conftest.py), progress bar on."""
    run_dir, terminal = quickstart_cli_run
    screen = terminal.screen
    lines = [l.strip() for l in screen.splitlines() if l.strip()]
    assert any(l.startswith("[rl] quickstart: B=8 prompts x G=4") for l in lines), screen[-4000:]
    assert any("held-out accuracy:" in l for l in lines)
    assert any(re.search(r"GRPO .*6/6", l) for l in lines), screen[-4000:]  # the progress bar, finished
    assert any(l.startswith("[rl] engine and trainer logs:") for l in lines)
    # Not on the screen: vLLM's INFO lines, its per-reload weight warnings, DeepSpeed's accelerator notice.
    noise = [l for l in lines if re.search(r"\bINFO\b|Failed to load weights|Setting accelerator to CPU|\(RolloutWorker|"
                                           r"\(PolicyTrainer|Token authentication", l)]
    assert noise == [], noise[:10]
    # ... they are in the run's log files instead.
    engine_log = (run_dir / "logs" / "rollout-0.log").read_text()
    assert "INFO" in engine_log
    assert (run_dir / "logs" / "trainer-rank0.log").exists()
