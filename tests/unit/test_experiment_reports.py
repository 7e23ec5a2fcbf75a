"""The committed experiment reports are what their scripts write from the committed results: re-rendered with
``--report-only`` from the JSON, every line but the command line is the same, so no number in them was edited by
hand; the Machine line too, since it is the machine recorded in the JSON (rl/metrics.py::recorded_machine), not the
one rendering it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "experiments"


@pytest.mark.parametrize("script, stem, args", [("experiment_2grpo.py", "2-grpo", ["--pair-lr-ratio", "1"]),
                                               ("experiment_2grpo.py", "2-grpo-smollm2", ["--task", "smollm2", "--lr-ratios", "8"]),
                                               ("experiment_ppo_distill.py", "ppo-distill", []),
                                               ("experiment_allocation.py", "allocation", []),
                                               ("experiment_allocation.py", "allocation-smollm2", ["--task", "smollm2", "--seeds", "0",
                                                                                                  "1"]),
                                               ("experiment_allocation.py", "allocation-smollm2-revisit",
                                                ["--task", "smollm2-revisit", "--arms", "fixed G=4", "fixed G=4 + unlikely",
                                                 "Knapsack", "Knapsack + unlikely", "Reinforce-Ada", "Reinforce-Ada + unlikely",
                                                 "2-GRPO+RS", "2-GRPO+RS + unlikely"]),
                                               ("experiment_arrow_mbc.py", "arrow-mbc", ["--sft-steps", "400"]),
                                               ("experiment_arrow_mbc.py", "arrow-mbc-smollm2", ["--family", "smollm2"]),
                                               ("experiment_merging.py", "merging", ["--seeds", "0", "1", "--sft-steps", "400"]),
                                               ("experiment_merging.py", "merging-smollm2", ["--family", "smollm2"]),
                                               ("experiment_tool_reward.py", "tool-reward", [])])
def test_report_is_the_scripts_rendering_of_its_results(script, stem, args, tmp_path):
    shutil.copy(DOCS / f"{stem}.json", tmp_path / f"{stem}.json")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--report-only", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def lines(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if not line.startswith("Reproduce:")]

    assert lines(tmp_path / f"{stem}.md") == lines(DOCS / f"{stem}.md")
    curves = tmp_path / f"{stem}-curves.png"
    assert not (DOCS / curves.name).exists() or curves.stat().st_size > 10_000
