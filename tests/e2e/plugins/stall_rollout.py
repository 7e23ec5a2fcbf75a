"""A reward that, on its second call (step 2), freezes the rollout actor with SIGSTOP: a stand-in
for an engine that hangs. The reward itself is an ordinary exact-match check."""

import os
import signal
from pathlib import Path

STOPPED: list[int] = []


def _rollout_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::RolloutWorker"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def freeze_rollout_on_second_call(prompts, completions, answer, **columns):
    freeze_rollout_on_second_call.calls = getattr(freeze_rollout_on_second_call, "calls", 0) + 1
    if freeze_rollout_on_second_call.calls == 2:
        for pid in _rollout_pids():
            os.kill(pid, signal.SIGSTOP)
            STOPPED.append(pid)
    return [float(c.strip() == a) for c, a in zip(completions, answer)]
