"""The experiment scripts of docs/experiments/ run end to end (``--quick``: a few steps each), so the
reports cannot rot. They assert that the tables and verdict lines are produced; the verdict logic itself is
unit-tested (tests/unit/test_claims.py). The experiments with several runs run them in the script's process
(``use_ray=false``, the same vLLM and DeepSpeed engines without Ray actors): vLLM and DeepSpeed are imported once
for all runs instead of once per run in fresh actors, and consecutive runs in one process stay tested."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def run_script(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / script), "--quick", "--out", str(tmp_path / "out"),
           "--runs", str(tmp_path / "runs"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_2grpo_quick(tmp_path):
    run_script("experiment_2grpo.py", tmp_path, "use_ray=false")
    report = (tmp_path / "out" / "2-grpo.md").read_text()
    for arm in ("16-GRPO", "2-GRPO lr 1x", "2-GRPO+RS lr 8x"):  # --quick leaves out online DPO
        assert f"| {arm} |" in report, arm
    assert "## The paper's claims at this scale" in report
    # One seed: each claim is stated on both metrics, without an interval (rl/claims.py decides from intervals).
    assert report.count("**no interval (one seed)**") == 4 and "  - mean@2: " in report and "  - greedy: " in report
    results = json.loads((tmp_path / "out" / "2-grpo.json").read_text())
    assert {r["arm"] for r in results} == {"16-GRPO", "2-GRPO lr 1x", "2-GRPO+RS lr 8x"}
    for r in results:
        assert [p["step"] for p in r["curve"]][0] == 0 and r["curve"][-1]["step"] == r["steps"]  # before and after
        assert 0.0 <= r["curve"][-1]["mean_at_k"] <= 1.0 and r["rollouts"] >= 128
    assert (tmp_path / "out" / "2-grpo-curves.png").stat().st_size > 10_000


def test_merging_quick(tmp_path):
    run_script("experiment_merging.py", tmp_path)
    report = (tmp_path / "out" / "merging.md").read_text()
    assert report.startswith("# Merging experts") and "Reproduce: `python scripts/experiment_merging.py --quick" in report
    for kind in ("full", "lora", "sparse"):
        assert f"| {kind} | 2 |" in report, kind  # a normalized-accuracy row per kind
        assert f"| {kind} expert (own sub-task) |" in report, kind
    assert "## Result" in report
    result = json.loads((tmp_path / "out" / "merging.json").read_text())
    assert {"settings", "seeds", "subtasks", "base_accuracy", "experts", "merges", "summary", "claim"} <= set(result)
    assert set(result["summary"]) == {"full", "lora", "sparse"}
    assert {e["kind"] for e in result["experts"]} == {"full", "lora", "sparse"}
    assert all(0.0 <= a <= 1.0 for m in result["merges"] for a in m["accuracy"].values())
    assert isinstance(result["claim"]["text"], str) and result["claim"]["text"]
    assert (tmp_path / "out" / "merging.png").stat().st_size > 5_000
    assert list((tmp_path / "runs" / "experts").glob("sparse-*/sparse_adapter.safetensors"))  # experts cached, safetensors


def test_arrow_mbc_quick(tmp_path):
    run_script("experiment_arrow_mbc.py", tmp_path, "use_ray=false")
    report = (tmp_path / "out" / "arrow-mbc.md").read_text()
    assert report.startswith("# Arrow routing and MBC") and "Reproduce: `python scripts/experiment_arrow_mbc.py --quick" in report
    for start in ("base", "own expert", "best single expert", "per-task merge", "per-task Arrow", "per-task Arrow top-1", "MBC merge",
                  "MBC Arrow"):
        assert f"| {start} |" in report, start
    assert "## The paper's claims at this scale" in report and "## GRPO from each start" in report
    assert (tmp_path / "out" / "arrow-mbc-rl.png").stat().st_size > 0
    result = json.loads((tmp_path / "out" / "arrow-mbc.json").read_text())
    zero_shot = result["zero_shot"]["0"]
    starts = {"base", "per-task merge", "per-task Arrow", "MBC merge", "MBC Arrow"}
    assert set(zero_shot) == starts | {"own expert", "best single expert", "per-task Arrow top-1", "MBC Arrow top-1"}
    assert set(zero_shot["own expert"]) == set(result["library_tasks"])  # no expert of a held-out task
    best = zero_shot.pop("best single expert")  # the held-out tasks' accuracies of one library expert, and its name
    assert best.pop("expert") in result["library_tasks"] and set(best) == {"sub", "add3"}
    assert all(0.0 <= a <= 1.0 for accs in [*zero_shot.values(), best] for a in accs.values())
    clusters = result["clusters"]["0"]
    assert sorted(t for members in clusters for t in members) == sorted(result["library_tasks"])  # a partition
    assert set(result["rl"]) == {"MBC Arrow"} and 0.0 <= result["rl"]["MBC Arrow"]["after"] <= 1.0


def test_allocation_quick(tmp_path):
    run_script("experiment_allocation.py", tmp_path, "use_ray=false")
    report = (tmp_path / "out" / "allocation.md").read_text()
    assert report.startswith("# Rollout allocation") and "Reproduce: `python scripts/experiment_allocation.py --quick" in report
    for arm in ("fixed G=8", "Reinforce-Ada"):
        assert f"| {arm} |" in report, arm
    assert "## The claims at this scale" in report and "**no interval (one seed)**" in report
    results = json.loads((tmp_path / "out" / "allocation.json").read_text())
    fixed, ada = (next(r for r in results if r["arm"] == name) for name in ("fixed G=8", "Reinforce-Ada"))
    assert fixed["rollouts"] == 2 * 256 and fixed["trained_sequences"] == 2 * 256  # 32 prompts x 8, every rollout trained
    assert 2 * 128 <= ada["rollouts"] <= 2 * 256 and ada["trained_sequences"] == 2 * 32 * 4  # capped; 4 of each pool
    assert [p["step"] for p in fixed["curve"]] == [0, 2] and all(0.0 <= p["pass_at_k"] <= 1.0 for p in fixed["curve"])
    # Each row carries the machine its run recorded in summary.json, and the report states it.
    from rl.metrics import describe_machine

    for r in results:
        assert r["machine"] == json.loads((Path(r["run_dir"]) / "summary.json").read_text())["machine"] == describe_machine()
    assert f"Machine: {describe_machine()};" in report
    assert (tmp_path / "out" / "allocation-curves.png").stat().st_size > 10_000
