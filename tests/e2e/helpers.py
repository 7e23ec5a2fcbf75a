"""Pieces several e2e tests share (this directory is on ``sys.path`` under pytest; the cluster
scripts put it there themselves)."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trainer.types import TrainBatch

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART_CLI_STEPS = 6


def quickstart_cli_cmd(tiny_model_root: Path, out: Path, *extra: str) -> list[str]:
    """`rl train recipes/quickstart.yaml` on the tiny test model as a user types it: 6 steps, a checkpoint and an
    evaluation every 2, lr high enough that the policy visibly moves, W&B (offline) and MLflow (file store) on, the
    progress bar on (it shows only on a terminal)."""
    import sys

    return [
        sys.executable, "-m", "rl.cli", "train", str(ROOT / "recipes" / "quickstart.yaml"),
        f"model.path={tiny_model_root / 'model'}", f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
        f"data.test={tiny_model_root / 'data' / 'test.jsonl'}", f"steps={QUICKSTART_CLI_STEPS}", "data.prompts_per_step=8",
        "algorithm.group_size=4", "data.max_test_examples=16", "trainer.lr=2e-3", "eval.every=2", "checkpoint.every=2",
        "checkpoint.keep_last=1", "logging.wandb=true", "logging.mlflow=true", f"output_dir={out}", *extra,
    ]


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class TerminalRun:
    returncode: int
    screen: str  # what the terminal showed, colours and cursor moves taken out


def run_on_a_terminal(cmd: list[str], timeout: float = 600, env: Optional[dict] = None) -> TerminalRun:
    """Run ``cmd`` with a pseudo-terminal as its stdin/stdout/stderr, as a user's shell would."""
    main, secondary = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=secondary, stdout=secondary, stderr=secondary, cwd=ROOT, close_fds=True,
                            env={**(env or os.environ), "COLUMNS": "160", "TERM": "xterm"})
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
    else:  # past the deadline: stop the run as Ctrl-C would (it stops its workers), so no run outlives its test
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(timeout=60)
    os.close(main)
    return TerminalRun(proc.returncode, ANSI.sub(" ", out.decode(errors="replace")).replace("\r", "\n"))


def random_train_batch(tok, n: int = 12, seed: int = 0) -> TrainBatch:
    """n arithmetic prompts with random (mostly wrong) answers and random advantages in [-1, 1]."""
    import random

    rng = random.Random(seed)
    prompts, responses, adv = [], [], []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        prompts.append(tok(f"{a}+{b}=")["input_ids"])
        responses.append(tok(str(rng.randint(0, 198)), add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        adv.append(rng.uniform(-1, 1))
    rollout_lp = [[-1.0] * len(r) for r in responses]
    return TrainBatch(prompts, responses, adv, rollout_lp, num_sequences=n, num_tokens=sum(map(len, responses)))


def vllm_trainer_gap(run, n: int = 4) -> float:
    """Largest |vLLM - trainer| logprob over the gold answers of n held-out prompts of an OnlineRun."""
    prompts, tok = run.test_set.prompt_token_ids[:n], run.tokenizer
    completions = [tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in run.test_set.rows[:n]]
    vllm_lp = run.rollout.score(prompts, completions)
    trainer_lp = run.trainer.compute_logprobs(TrainBatch(prompts, completions, [0.0] * n, [[] for _ in prompts], n, 0))
    return max(abs(a - b) for ra, rb in zip(vllm_lp, trainer_lp) for a, b in zip(ra, rb))
