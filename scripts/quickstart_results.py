"""The quickstart's measured results in one file, docs/guide/quickstart.json, which README's quickstart numbers
are checked against (tests/unit/test_quickstart_numbers.py): a page cannot quote a number no run gave.

    python scripts/quickstart_results.py runs/smollm2-arithmetic-20261207-041847 /tmp/qs1 ...

records each finished run (its summary.json, resolved recipe and evaluations), replacing the row of the same
recipe, seed and machine. Rows marked ``"recorded": "transcribed"`` were copied from a run's printed summary on
a machine whose run directory is gone; every other row was written by this script from the run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

RESULTS = ROOT / "docs" / "guide" / "quickstart.json"


def run_row(run_dir: Path) -> dict:
    """One finished run as a results row: recipe name, seed, policy kind, machine, date, held-out greedy accuracy
    before, after and at each evaluation, seconds of training and in all."""
    import yaml

    from rl.metrics import machine_of_run, read_metrics

    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("status") != "finished":
        raise ValueError(f"{run_dir}: the run did not finish ({summary.get('status')})")
    recipe = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    evals = {str(e["step"]): e["accuracy"] for e in read_metrics(run_dir, "eval")}
    return {"recipe": summary["name"], "seed": recipe["seed"], "policy": (recipe.get("adapter") or {}).get("kind", "none"),
            "machine": machine_of_run(run_dir),
            "date": time.strftime("%Y-%m-%d", time.localtime((run_dir / "summary.json").stat().st_mtime)),
            "steps": summary["steps"], "accuracy_before": summary["accuracy_before"],
            "accuracy_after": summary["accuracy_after"], "evals": evals,
            "train_seconds": summary["train_seconds"], "total_seconds": summary["total_seconds"],
            "recorded": "run"}


def record(rows: list[dict], new: dict) -> list[dict]:
    """``rows`` with ``new`` in place of the row of the same recipe, seed, policy and machine."""
    key = lambda r: (r["recipe"], r["seed"], r["policy"], r["machine"])  # noqa: E731
    return [r for r in rows if key(r) != key(new)] + [new]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    args = ap.parse_args()
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for run_dir in args.run_dirs:
        rows = record(rows, run_row(run_dir))
        print(f"recorded {run_dir}: {rows[-1]['recipe']} seed {rows[-1]['seed']}, "
              f"{rows[-1]['accuracy_before']:.3f} -> {rows[-1]['accuracy_after']:.3f}")
    rows.sort(key=lambda r: (r["recipe"], r["policy"], r["machine"], r["seed"]))
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
