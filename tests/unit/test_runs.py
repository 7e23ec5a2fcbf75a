"""`rl runs`: each run directory's status, steps and accuracy, read from what the run wrote."""

from __future__ import annotations

import json
import socket

from rl.runs import describe_run, find_runs


def _run(tmp_path, name, status=None, pid=None, summary=None, steps_logged=0):
    d = tmp_path / name
    d.mkdir()
    (d / "recipe.resolved.yaml").write_text(f"name: {name}\nsteps: 10\n")
    rows = [{"step": 0, "kind": "eval", "accuracy": 0.25}] + [{"step": s, "kind": "train"} for s in range(1, steps_logged + 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status:
        (d / "run.json").write_text(json.dumps({"status": status, "pid": pid, "host": socket.gethostname()}))
    if summary:
        (d / "summary.json").write_text(json.dumps(summary))
    return d


def test_statuses_steps_and_accuracy(tmp_path):
    import os

    done = _run(tmp_path, "done", "finished", os.getpid(), {"steps": 10, "accuracy_before": 0.25, "accuracy_after": 0.5}, 10)
    live = _run(tmp_path, "live", "running", os.getpid(), None, 3)
    dead = _run(tmp_path, "dead", "running", 2**22 + 12345, None, 4)  # no such process: killed without a word
    failed = _run(tmp_path, "failed", "failed", os.getpid(), {"steps": 6, "reason": "NodeLost: node 10.0.0.2 was lost"}, 6)
    assert sorted(p.name for p in find_runs([str(tmp_path)])) == ["dead", "done", "failed", "live"]
    rows = {r["name"]: r for r in map(describe_run, (done, live, dead, failed))}
    assert (rows["done"]["status"], rows["done"]["steps"], rows["done"]["accuracy_after"]) == ("finished", 10, 0.5)
    assert (rows["live"]["status"], rows["live"]["steps"], rows["live"]["accuracy_before"]) == ("running", 3, 0.25)
    assert rows["dead"]["status"] == "died" and rows["dead"]["steps"] == 4
    assert rows["failed"]["status"] == "failed" and rows["failed"]["reason"].startswith("NodeLost")
    assert all(r["planned_steps"] == 10 for r in rows.values())
