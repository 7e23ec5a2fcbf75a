"""Where a run's numbers go: one JSON line per step (``metrics.jsonl``), TensorBoard, a progress bar."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool = True, progress: bool = True, start_step: int = 0):
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
                TextColumn("[bold]GRPO"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
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
            info = f"reward {metrics.get('reward_mean', float('nan')):.3f}  acc {metrics.get('accuracy', float('nan')):.3f}"
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
