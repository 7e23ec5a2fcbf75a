"""What an arm experiment reports when only some of its runs are finished (``--finished-only``): the finished
(arm, seed) runs and no others, each arm with its own seeds in the table's heading."""

from __future__ import annotations

import json
from types import SimpleNamespace

from experiments import arms
from experiments.arms import ROOT, Arm, finished_or_run, recorded_path, resolved_path, run_dir_of, seeds_line


def test_the_heading_names_each_arms_seeds_only_where_they_differ():
    rows = [{"arm": a, "seed": s} for a, s in [("A", 0), ("A", 1), ("B", 0), ("B", 1)]]
    assert seeds_line(rows, ["A", "B"]) == "2 seeds: 0, 1"
    assert seeds_line([*rows, {"arm": "A", "seed": 2}], ["A", "B"]) == "seeds per arm: A 0, 1, 2; B 0, 1"


def test_finished_only_reads_the_finished_runs_and_trains_nothing(tmp_path, monkeypatch):
    import experiments.arms as arms

    a, b = Arm("fixed G=4", "r.yaml"), Arm("Knapsack + unlikely", "r.yaml")
    for arm, seed, status in [(a, 0, "finished"), (a, 1, "finished"), (b, 0, "finished"), (b, 1, "failed")]:
        run_dir_of(arm, str(tmp_path), seed).mkdir(parents=True)
        (run_dir_of(arm, str(tmp_path), seed) / "summary.json").write_text(json.dumps({"status": status}))
    asked = []
    monkeypatch.setattr(arms, "run_arm", lambda arm, args, seed, extra=None: asked.append((arm.name, seed)) or {})
    args = SimpleNamespace(seeds=[0, 1, 2], runs=str(tmp_path), finished_only=True)
    finished_or_run([a, b], args)
    assert asked == [("fixed G=4", 0), ("Knapsack + unlikely", 0), ("fixed G=4", 1)]  # seed by seed, as a full run goes
    asked.clear()
    finished_or_run([a, b], SimpleNamespace(**{**vars(args), "finished_only": False}))
    assert len(asked) == 6  # without the flag every (arm, seed) is run or read


def test_results_record_run_directories_relative_to_the_repository_root(tmp_path):
    run = ROOT / "runs" / "experiment-x" / "arm-seed0"  # runs/ may be a link to another checkout's: not followed
    assert recorded_path(run) == "runs/experiment-x/arm-seed0" and resolved_path("runs/experiment-x/arm-seed0") == run
    assert recorded_path(tmp_path / "a") == str(tmp_path / "a") and resolved_path(str(tmp_path / "a")) == tmp_path / "a"


def test_a_checkout_reached_through_a_link_records_the_same_relative_paths(tmp_path, monkeypatch):
    link = tmp_path / "checkout"
    link.symlink_to(ROOT)
    monkeypatch.setattr(arms, "_ROOTS", (ROOT, link))  # as when the scripts are started from the linked path
    assert recorded_path(link / "runs" / "experiment-x" / "arm-seed0") == "runs/experiment-x/arm-seed0"
