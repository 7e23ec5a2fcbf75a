"""Where a run's numbers go: one JSON line per step (``metrics.jsonl``), TensorBoard, a progress bar."""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional


class PhaseTimer:
    """Wall time of a step's phases (``with timer.phase("train"): ...``), each counted exclusively:
    a phase entered inside another pauses it, so the phases add up to the step.

    >>> t = PhaseTimer()
    >>> with t.phase("generate"):
    ...     with t.phase("reward"):
    ...         pass
    >>> sorted(t.metrics())
    ['time_generate', 'time_reward']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[str] = []
        self._mark = 0.0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._mark
        self._stack.append(name)
        self._mark = now
        try:
            yield
        finally:
            now = time.perf_counter()
            self.seconds[self._stack.pop()] += now - self._mark
            self._mark = now

    def metrics(self) -> dict[str, float]:
        return {f"time_{k}": v for k, v in self.seconds.items()}


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool = True, progress: bool = True, start_step: int = 0,
                 label: str = "GRPO"):
        self.path = run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events a resumed run is about to log again.
                self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
            except ImportError:  # tensorboard is optional at run time
                self._tb = None
        self._progress = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
            self._progress.start()

    def log(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None) if not isinstance(v, str) else v for k, v in metrics.items()}
        record = {"step": step, "kind": kind, **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
        if self._progress is not None and kind == "train":
            if "reward_mean" in metrics:
                info = f"reward {metrics['reward_mean']:.3f}  acc {metrics.get('accuracy', float('nan')):.3f}"
            else:  # offline DPO
                info = f"loss {metrics.get('loss', float('nan')):.4f}  reward acc {metrics.get('reward_accuracy', float('nan')):.3f}"
            self._progress.update(self._task, completed=step, info=info)

    def print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tb is not None:
            self._tb.close()
        self._file.close()


def read_metrics(run_dir: Path, kind: Optional[str] = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def describe_machine() -> str:
    """One line for benchmark reports: architecture, cores, Python, accelerator."""
    import os
    import platform

    import torch

    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, {gpu}"
