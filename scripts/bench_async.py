"""Synchronous vs asynchronous rollout, side by side in one run, on the embedded task.

    .venv/bin/python scripts/bench_async.py [--steps 30] [--staleness 0 1 2] [key=value ...]

Each arm runs recipes/quickstart.yaml (plus overrides) for the same steps, seed and prompts, with
``rollout.max_staleness`` = k (0 is synchronous; k > 0 samples up to k batches ahead while the
trainer updates; truncated IS with cap 2 corrects the stale batches). Reports seconds per step (the
first, engine-warming step left out), the time spent waiting for rollouts and training, the mean
staleness and logprob mismatch, and held-out greedy accuracy after, with the speed-up against k=0.
Writes docs/benchmarks/async.md (+ .json) with the machine described. Runs go to runs/bench-async/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench-async"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.chdir(ROOT)

    from rl.config import load_recipe
    from rl.online import OnlineRun
    from rl.metrics import describe_machine, read_metrics

    results = []
    for k in args.staleness:
        run_dir = Path(args.runs) / f"staleness-{k}"
        shutil.rmtree(run_dir, ignore_errors=True)
        recipe = load_recipe("recipes/quickstart.yaml", [
            f"steps={args.steps}", f"rollout.max_staleness={k}", "algorithm.tis_cap=2.0", "eval.every=0",
            "logging.progress=false", "logging.tensorboard=false", "checkpoint.save_final=false", f"output_dir={run_dir}",
            *args.overrides])
        summary = OnlineRun(recipe).fit()
        rows = read_metrics(run_dir, "train")[1:]  # step 1 warms the engine
        results.append({
            "max_staleness": k,
            "seconds_per_step": statistics.mean(r["time_step"] for r in rows),
            "waiting_for_rollout": statistics.mean(r["time_generate"] for r in rows),
            "train": statistics.mean(r["time_train"] for r in rows),
            "weight_sync": statistics.mean(r["time_weight_sync"] for r in rows),
            "staleness_mean": statistics.mean(r["rollout_staleness"] for r in rows),
            "logprob_mismatch": statistics.mean(r["logprob_mismatch"] for r in rows),
            "accuracy_before": summary["accuracy_before"], "accuracy_after": summary["accuracy_after"],
            "train_seconds": summary["train_seconds"],
        })
        print(json.dumps(results[-1]), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "async.json").write_text(json.dumps(results, indent=2))
    base = results[0]["seconds_per_step"]
    lines = [
        "# Synchronous vs asynchronous rollout",
        "",
        f"`python scripts/bench_async.py --steps {args.steps} --staleness {' '.join(map(str, args.staleness))}"
        + (f" {' '.join(args.overrides)}" if args.overrides else "")
        + f"` on {describe_machine()}: recipes/quickstart.yaml (64 prompts x 8, "
        "1 rollout actor, 1 trainer rank), TIS cap 2. Seconds are means over steps 2..N.",
        "",
        "| max_staleness | s/step | speed-up vs sync | waiting for rollout | train | weight sync | staleness | logprob mismatch | "
        "accuracy before -> after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['max_staleness']} | {r['seconds_per_step']:.2f} | {base / r['seconds_per_step']:.2f}x | "
            f"{r['waiting_for_rollout']:.2f} | "
            f"{r['train']:.2f} | {r['weight_sync']:.3f} | {r['staleness_mean']:.2f} | {r['logprob_mismatch']:.2e} | "
            f"{r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} |"
        )
    (out / "async.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
