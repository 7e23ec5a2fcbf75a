"""Where a run's numbers go: one JSON line per step (``metrics.jsonl``), TensorBoard, W&B and MLflow
(optional, offline by default), a progress bar."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np


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


class WandbTracker:
    """One W&B run per run directory (a resumed run continues it); the resolved recipe is its config."""

    def __init__(self, run_dir: Path, name: str, config: dict, project: str, mode: str):
        import wandb

        run_id = "rl-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(run_dir), config=config,
                              mode=mode, settings=wandb.Settings(silent=True, console="off"))

    def log(self, step: int, kind: str, values: dict[str, float]) -> None:
        self.run.log({f"{kind}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """One MLflow run; by default in a file store inside the run directory (no server)."""

    def __init__(self, run_dir: Path, name: str, config: dict, uri: Optional[str], experiment: str):
        import mlflow

        if uri is None:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for an opt-in to its file store
        self.client = mlflow.MlflowClient(tracking_uri=uri or (run_dir.resolve() / "mlruns").as_uri())
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        flat = _flatten(config)
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch, values <= 6000 chars
            self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in list(flat.items())[i:i + 100]])
        self.client.log_dict(self.run_id, config, "recipe.resolved.json")

    def log(self, step: int, kind: str, values: dict[str, float]) -> None:
        import mlflow

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[mlflow.entities.Metric(f"{kind}/{k}", v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def make_trackers(run_dir: Path, name: str, config: dict, logging_cfg) -> list:
    """The external trackers the recipe's ``logging`` section asks for."""
    trackers = []
    try:
        if logging_cfg.wandb:
            trackers.append(WandbTracker(run_dir, name, config, logging_cfg.wandb_project, logging_cfg.wandb_mode))
        if logging_cfg.mlflow:
            trackers.append(MlflowTracker(run_dir, name, config, logging_cfg.mlflow_tracking_uri, logging_cfg.mlflow_experiment))
    except ImportError as e:
        raise ImportError(f"logging.wandb / logging.mlflow need the trackers: pip install -e '.[trackers]' ({e})") from e
    return trackers


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool = True, progress: bool = True, start_step: int = 0,
                 label: str = "GRPO", trackers: Optional[list] = None):
        self.trackers = list(trackers or [])  # WandbTracker / MlflowTracker: same rows as metrics.jsonl
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

    def log(self, step: int, metrics: dict[str, float | list[float]], kind: str = "train") -> None:
        """One row: numbers (non-finite ones written as null), strings, and lists of numbers (a distribution over the
        step's prompts or rollouts: a histogram in TensorBoard; trackers get the numbers)."""
        clean = {k: _clean(v) for k, v in metrics.items()}
        record = {"step": step, "kind": kind, **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        numbers = {k: v for k, v in clean.items() if isinstance(v, float)}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(f"{kind}/{k}", v, step)
            for k, v in clean.items():
                if isinstance(v, list) and v:
                    self._tb.add_histogram(f"{kind}/{k}", np.asarray(v, dtype=np.float64), step)
        for tracker in self.trackers:
            tracker.log(step, kind, numbers)
        if self._progress is not None and kind == "train":
            if "reward_mean" in metrics:
                info = f"reward {metrics['reward_mean']:.3f}  acc {metrics.get('accuracy', float('nan')):.3f}"
            else:  # offline DPO
                info = f"loss {metrics.get('loss', float('nan')):.4f}  reward acc {metrics.get('reward_accuracy', float('nan')):.3f}"
            self._progress.update(self._task, completed=step, info=info)

    def print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)  # "[rl]" is not a style tag
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tb is not None:
            self._tb.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        self._file.close()


def _clean(value):
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return [float(x) for x in value if math.isfinite(float(x))]
    return float(value) if isinstance(value, (int, float)) and math.isfinite(float(value)) else None


def read_metrics(run_dir: Path, kind: Optional[str] = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def describe_machine() -> str:
    """One line for benchmark reports: architecture and CPU model (float results differ between CPU
    models), cores, Python, accelerator."""
    import os
    import platform

    import torch

    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} ({cpu_model()}), {os.cpu_count()} CPU cores, Python {platform.python_version()}, {gpu}"


def recorded_machine(result: dict) -> str:
    """The machine a results dict was measured on (``result["machine"]``, ``describe_machine()`` at run time). A
    report rendered again from saved results states this one, never the machine rendering it: float results differ
    between CPU models, so a re-render must not claim another machine."""
    try:
        return result["machine"]
    except KeyError:
        raise KeyError("these results do not record their machine: add a \"machine\" key with the text of the "
                       "report's Machine line (describe_machine() where they were measured)") from None


def machine_of_run(run_dir: str | Path) -> str:
    """The machine a finished run was measured on, as its summary.json records it (``Run.fit``); a run from before
    runs recorded it is taken as this machine's, since a run directory is local."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    return summary.get("machine") or describe_machine()


def recorded_machine_of_rows(rows: list[dict]) -> str:
    """The one machine a list of result rows was measured on (each row's ``recorded_machine``); a table mixing
    machines is refused, because one Machine line cannot describe it."""
    machines = list(dict.fromkeys(recorded_machine(row) for row in rows))
    if len(machines) != 1:
        raise ValueError(f"expected rows measured on one machine, got {len(machines)}: {machines}")
    return machines[0]


def rows_measured_on(rows: list[dict], machine: str) -> list[dict]:
    """The saved rows measured on ``machine``, for a script that re-measures some rows and keeps the rest: its page
    states one machine, so rows from another are dropped, and it says how many."""
    same = [row for row in rows if row.get("machine") == machine]
    if len(same) < len(rows):
        print(f"dropping {len(rows) - len(same)} saved rows measured on another machine", flush=True)
    return same


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), e.g. ``Intel(R) Xeon(R) Processor @ 2.80GHz``; the platform's guess elsewhere."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
