"""A long run that must leak nothing: the quickstart recipe for many steps with checkpoints and asynchronous
rollout, sampled every ``--every`` steps (not part of the test suite: ~30 min for 2,000 steps on 2 cores).

    .venv/bin/python scripts/soak.py [--steps 2000] [--every 50] [key=value ...]

At each sample: the resident memory (RSS) and open file descriptors of the driver and of every actor (the
rollout engine, the trainer rank: this run's own Ray processes, found as the driver's descendants), the run
directory's size, and the mean step time over the last window. Reports each series' slope per 1,000 steps
(least squares over the samples after the first, which still includes start-up growth) beside its range, so a
leak shows as a slope well above the sample-to-sample noise. Checkpoints every ``--checkpoint-every`` steps
with ``checkpoint.keep_last`` 2: the run directory must stay bounded. Writes docs/benchmarks/soak.md (+ .json)
with the machine described. The run goes to runs/soak/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def processes() -> dict[str, "psutil.Process"]:  # noqa: F821
    """This process and its Ray actors (named by their ``ray::Class`` title), keyed by a stable label."""
    import psutil

    me = psutil.Process()
    out = {"driver": me}
    for p in me.children(recursive=True):
        try:
            title = p.cmdline()[0] if p.cmdline() else ""
        except psutil.Error:
            continue
        for cls in ("RolloutWorker", "PolicyTrainer"):
            if title.startswith(f"ray::{cls}"):
                out.setdefault(cls, p)
    return out


def sample(run_dir: Path, step: int, step_times: list[float]) -> dict:
    import psutil

    row = {"step": step, "run_dir_mib": dir_bytes(run_dir) / 2**20, "step_seconds": statistics.mean(step_times)}
    for name, p in processes().items():
        try:
            row[f"{name}_rss_mib"] = p.memory_info().rss / 2**20
            row[f"{name}_fds"] = p.num_fds()
        except psutil.Error:
            pass
    return row


def slope_per_1000(rows: list[dict], key: str) -> float:
    import numpy as np

    pts = [(r["step"], r[key]) for r in rows if key in r]
    if len(pts) < 2:
        return float("nan")
    x, y = np.array(pts, dtype=float).T
    return float(np.polyfit(x, y, 1)[0] * 1000)


def report(rows: list[dict], args, command: str) -> str:
    from rl.metrics import recorded_machine_of_rows

    keys = [k for k in rows[-1] if k not in ("step", "machine")]  # the series
    lines = ["# Soak: memory, open files, disk and step time over a long run", "", f"Reproduce: `{command}`", "",
             f"Machine: {recorded_machine_of_rows(rows)}. recipes/quickstart.yaml for {rows[-1]['step']} steps, rollout.max_staleness=1 "
             f"(truncated IS, cap 2), a checkpoint every {args.checkpoint_every} steps with keep_last=2, sampled every "
             f"{args.every} steps.", "",
             "| series | first sample | last sample | min | max | slope per 1,000 steps (from the 2nd sample) | "
             "slope per 1,000 steps (second half) |",
             "|---|---|---|---|---|---|---|"]
    half = len(rows) // 2
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        lines.append(f"| {k} | {vals[0]:.2f} | {vals[-1]:.2f} | {min(vals):.2f} | {max(vals):.2f} | "
                     f"{slope_per_1000(rows[1:], k):+.3f} | {slope_per_1000(rows[half:], k):+.3f} |")
    lines += ["", "A series that grows and then levels off (an allocator or cache warming up) has a first-slope above "
              "zero and a second-half slope near zero; a leak keeps its slope in the second half."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "soak"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("--report-only", action="store_true", help="write the report again from <out>/soak.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    argv = [a for a in os.sys.argv[1:] if a != "--report-only"]
    command = "python scripts/soak.py" + (" " + " ".join(argv) if argv else "")
    os.chdir(ROOT)
    out = Path(args.out)
    if args.report_only:
        rows = json.loads((out / "soak.json").read_text())
        (out / "soak.md").write_text(report(rows, args, command))
        return

    from rl.config import load_recipe
    from rl.metrics import describe_machine
    from rl.online import OnlineRun

    run_dir = Path(args.runs)
    shutil.rmtree(run_dir, ignore_errors=True)
    rows: list[dict] = []
    window: list[float] = []
    machine = describe_machine()  # recorded in every sample: a re-render states it

    class SoakRun(OnlineRun):
        def on_step(self, metrics: dict, logger) -> None:
            super().on_step(metrics, logger)
            window.append(metrics["time_step"])
            if self.step % args.every == 0:
                rows.append({**sample(run_dir, self.step, window), "machine": machine})
                window.clear()
                print(json.dumps(rows[-1]), flush=True)

    recipe = load_recipe("recipes/quickstart.yaml", [
        f"steps={args.steps}", "rollout.max_staleness=1", "algorithm.tis_cap=2.0", "eval.before=false", "eval.after=false",
        f"checkpoint.every={args.checkpoint_every}", "checkpoint.keep_last=2", "logging.progress=false",
        f"output_dir={run_dir}", *args.overrides])
    SoakRun(recipe).fit()
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(rows, indent=1))
    text = report(rows, args, command)
    (out / "soak.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
