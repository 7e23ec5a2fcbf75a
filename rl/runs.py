"""``rl runs [DIR ...]``: the run directories under ``runs/`` (or the given ones) with their name,
status, steps and held-out accuracy before/after, newest first.

Status comes from ``run.json`` (written by the run: running, finished, failed, interrupted); a run
that says ``running`` but whose process is gone on this host was killed (``died``:
``resume=auto`` continues it from its last checkpoint).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Optional

import yaml

from rl.metrics import read_metrics
from rl.run import RUN_STATUS


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def describe_run(run_dir: Path) -> dict:
    """One row: name, status, steps done / planned, accuracy before -> after, reason when stopped."""
    summary, info = _read_json(run_dir / "summary.json"), _read_json(run_dir / RUN_STATUS)
    try:
        recipe = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text()) or {}
    except OSError:
        recipe = {}
    status = info.get("status") or summary.get("status") or ("finished" if "steps" in summary else "unknown")
    if status == "running" and info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", 0))):
        status = "died"
    train, evals = read_metrics(run_dir, "train"), read_metrics(run_dir, "eval")
    steps = summary.get("steps", train[-1]["step"] if train else 0)
    before = summary.get("accuracy_before", evals[0].get("accuracy") if evals and evals[0]["step"] == 0 else None)
    after = summary.get("accuracy_after")
    return {"run_dir": str(run_dir), "name": recipe.get("name", summary.get("name", run_dir.name)), "status": status,
            "steps": steps, "planned_steps": recipe.get("steps"), "accuracy_before": before, "accuracy_after": after,
            "reason": info.get("reason") or summary.get("reason"), "mtime": (run_dir / "metrics.jsonl").stat().st_mtime
            if (run_dir / "metrics.jsonl").exists() else run_dir.stat().st_mtime}


def find_runs(roots: list[str]) -> list[Path]:
    """Directories that hold a run (a resolved recipe), searched one level below each root too."""
    found = []
    for root in map(Path, roots):
        for d in [root, *sorted(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []:
            if (d / "recipe.resolved.yaml").exists():
                found.append(d)
    return found


def print_runs(roots: Optional[list[str]] = None) -> list[dict]:
    from rich.console import Console
    from rich.table import Table

    rows = sorted((describe_run(d) for d in find_runs(roots or ["runs"])), key=lambda r: r["mtime"], reverse=True)
    table = Table(show_edge=False)
    for col in ("run", "name", "status", "steps", "accuracy", "why stopped"):
        table.add_column(col)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for r in rows:
        steps = f"{r['steps']}/{r['planned_steps']}" if r["planned_steps"] else str(r["steps"])
        table.add_row(r["run_dir"], r["name"], r["status"], steps, f"{pct(r['accuracy_before'])} -> {pct(r['accuracy_after'])}",
                      (r["reason"] or "")[:80])
    Console().print(table if rows else f"no runs under {', '.join(roots or ['runs'])}")
    return rows
