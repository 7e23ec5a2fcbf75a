"""Every metric docs/guide/metrics.md explains is one the code writes: a renamed or removed metric fails here until
the guide says so (the guide's names are looked for as the keys the code writes them under)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rl", "trainer", "rollout", "rewards")


def _guide_metric_names() -> list[str]:
    """The names in the first column of the guide's step-metrics table; ``a_min/median/max`` is three names, and a
    placeholder (``reward/<name>``) stands for its prefix (``reward/``)."""
    text = (ROOT / "docs" / "guide" / "metrics.md").read_text()
    table = text[text.index("## The metrics of a step"):text.index("## What healthy looks like")]
    names = []
    for row in table.splitlines():
        if row.startswith("| `"):
            for name in re.findall(r"`([^`]+)`", row.split("|")[1]):
                stem, _, suffixes = name.partition("_min/")
                names += [f"{stem}_{s}" for s in ["min", *suffixes.split("/")]] if suffixes else [name.split("<")[0]]
    return names


def _writes(source: str, name: str) -> bool:
    """Whether ``source`` writes a metric ``name``: as a string key ("name" or an f-string "prefix{...}") or a keyword."""
    quoted = re.escape(name)
    return bool(re.search(rf"[\"']{quoted}(?:[\"']|{{)", source) or re.search(rf"\b{quoted}=", source))


def test_the_guide_explains_only_metrics_the_code_writes():
    source = "\n".join(p.read_text() for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    names = _guide_metric_names()
    assert len(names) > 50 and "logprob_mismatch" in names and "rollouts_per_prompt_median" in names
    missing = [name for name in names if not _writes(source, name)]
    assert not missing, f"docs/guide/metrics.md explains metrics the code does not write: {missing}"


def test_a_renamed_metric_would_be_caught():
    assert _writes('metrics["clip_frac"] = 0', "clip_frac") and _writes("update(ties_sampled=1)", "ties_sampled")
    assert _writes('f"reward/{name}"', "reward/") and not _writes('"clip_fraction"', "clip_frac")
