"""README's step ratios are the benchmark pages' own: each is read from the page that scripts/bench_step.py wrote
for its run, so README cannot quote a ratio no run gave, and a re-run that changed one fails here until README
says so."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", (ROOT / page).read_text())  # quoted values may wrap


def _ratios(page: str) -> dict[str, str]:
    """The page's bold ratios, by their label ("this project / raw parts": "0.96")."""
    return dict(re.findall(r"^- (.+?): \*\*([0-9.]+)\*\*$", (ROOT / page).read_text(), re.MULTILINE))


def test_readme_quotes_the_step_benchmarks_ratios():
    toy = _ratios("docs/benchmarks/step.md")
    real = _ratios("docs/benchmarks/step-smollm2.md")
    quoted = (f"one GRPO step takes {toy['this project / raw parts']}x the time of raw vLLM plus a raw torch training "
              f"step, and TRL's `GRPOTrainer` {toy['TRL / this project']}x as long, on a 2-core CPU (a 51.7M model, one run). "
              f"On SmolLM2-135M with GSM8K replies of varied length: {real['this project / raw parts']}x the raw parts, "
              f"TRL {real['TRL / this project']}x as long ({real['this project packed / raw parts']}x and "
              f"{real['TRL / this project packed']}x packed)")
    assert quoted in _text("README.md"), quoted
