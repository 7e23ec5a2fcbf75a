"""README's and the quickstart guide's numbers are the runs' own: each quoted value is formatted from
docs/guide/quickstart.json (written by scripts/quickstart_results.py from the run directories), so a page
cannot quote a number no run gave, and a re-recorded run that changed it fails here until the pages say so."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROWS = json.loads((ROOT / "docs" / "guide" / "quickstart.json").read_text())


def _text(page: str) -> str:
    """A page with its line breaks and runs of spaces as single spaces (quoted values may wrap)."""
    return re.sub(r"\s+", " ", (ROOT / page).read_text())


def _row(recipe: str, seed: int, cpu: str) -> dict:
    (row,) = [r for r in ROWS if r["recipe"] == recipe and r["seed"] == seed and cpu in r["machine"]]
    return row


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _pct1(x: float) -> str:
    return f"{100 * x:.1f}%"


def test_readme_real_model_rows_are_the_recorded_runs():
    readme = _text("README.md")
    for recipe, seed in (("smollm2-arithmetic", 0), ("smollm2-arithmetic", 1), ("smollm2-arithmetic", 2),
                         ("smollm2-arithmetic-lora", 0)):
        r = _row(recipe, seed, "AMD EPYC")  # README's table is the AMD machine's, as it says
        e = r["evals"]
        quoted = (f"**{_pct(r['accuracy_before'])} -> {_pct(r['accuracy_after'])}** ({_pct(e['5'])} at step 5, "
                  f"{_pct(e['10'])} at 10, {_pct(e['15'])} at 15) | {r['steps']} steps, {r['train_seconds']:.0f} s of "
                  f"training, {r['total_seconds']:.0f} s in all")
        assert quoted in readme, (recipe, seed, quoted)


def test_readme_embedded_range_is_the_recorded_seeds():
    runs = [_row("quickstart", seed, "AMD EPYC") for seed in (0, 1, 2)]
    (start,) = {r["accuracy_before"] for r in runs}  # the shipped weights: one start for every seed
    finals = [r["accuracy_after"] for r in runs]
    totals = [r["total_seconds"] for r in runs]
    quoted = (f"**{_pct1(start)} -> {100 * min(finals):.1f}-{_pct1(max(finals))}** over seeds 0-2 "
              f"({_pct1(runs[0]['accuracy_after'])} at seed 0) in {runs[0]['steps']} steps, "
              f"{min(totals):.0f}-{max(totals):.0f} s in all")
    assert quoted in _text("README.md"), quoted


def test_quickstart_guide_quotes_both_machines_runs():
    guide = _text("docs/guide/quickstart.md")
    amd, intel = (_row("quickstart", 0, cpu) for cpu in ("AMD EPYC", "Intel"))
    e = amd["evals"]
    assert (f"**{_pct1(amd['accuracy_before'])} before RL -> {_pct1(amd['accuracy_after'])} after** "
            f"(+{100 * (amd['accuracy_after'] - amd['accuracy_before']):.1f} points); "
            + ", ".join(f"{_pct1(e[s])} at {'step ' if s == '25' else ''}{s}" for s in ("25", "50", "75", "100", "125"))) in guide
    for seed in (1, 2):
        r = _row("quickstart", seed, "AMD EPYC")
        assert f"-> **{_pct1(r['accuracy_after'])}** (seed {seed}, {r['total_seconds']:.0f} s" in guide, seed
    # The table of the two machines: the real model at each evaluation, the embedded model's last two and its runs.
    real = [_row("smollm2-arithmetic", 0, cpu)["evals"] for cpu in ("AMD EPYC", "Intel")]
    steps = ("0", "5", "10", "15", "20")
    assert real[0] == real[1]  # the guide says "(the same)"
    assert f"| {', '.join(f'{100 * real[0][s]:.0f}' for s in steps)}% | {', '.join(f'{100 * real[1][s]:.0f}' for s in steps)}% " \
           "(the same) |" in guide
    assert (f"| {100 * amd['evals']['125']:.1f}, **{_pct1(amd['accuracy_after'])}** | "
            f"{100 * intel['evals']['125']:.1f}, **{_pct1(intel['accuracy_after'])}** |") in guide
    assert (f"| {amd['train_seconds']:.0f} s of training, {amd['total_seconds']:.0f} s in all | "
            f"{intel['train_seconds']:.0f} s of training, {intel['total_seconds']:.0f} s in all |") in guide
    others = [_row("quickstart", seed, "Intel") for seed in (1, 2)]
    finals = [r["accuracy_after"] for r in (intel, *others)]
    assert (f"| {', '.join(_pct1(r['accuracy_after']) for r in others)} ({100 * min(finals):.1f}-{_pct1(max(finals))} "
            f"over seeds 0-2; {others[0]['total_seconds']:.0f} s and {others[1]['total_seconds']:.0f} s in all) |") in guide


def test_recording_a_run_replaces_its_row_and_keeps_the_others():
    sys.path.insert(0, str(ROOT / "scripts"))
    from quickstart_results import record

    old = {"recipe": "quickstart", "seed": 0, "policy": "none", "machine": "m1", "accuracy_after": 0.70}
    other = {**old, "machine": "m2"}
    new = {**old, "accuracy_after": 0.75}
    assert record([old, other], new) == [other, new]
