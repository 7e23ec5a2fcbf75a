"""Synchronous vs asynchronous rollout, with and without partial rollouts, side by side in one run.

    .venv/bin/python scripts/bench_async.py [key=value ...] [--steps 30] [--arms 0 1 2]
    .venv/bin/python scripts/bench_async.py eval.before=false eval.after=false \\
        --recipe recipes/smollm2-gsm8k.yaml --name async-smollm2 --arms 0 1 1p 2p      # GSM8K in data/gsm8k/

(key=value overrides go before the options: ``--arms`` takes every word after it.)

Each arm runs the recipe (recipes/quickstart.yaml by default, plus overrides) for the same steps, seed and prompts,
with ``rollout.max_staleness`` = k (0 is synchronous; k > 0 samples up to k batches ahead while the trainer
updates; truncated IS with cap 2 corrects the stale batches). An arm ``kp`` adds ``rollout.partial_rollouts=true``
(the engines run k - 1 batches ahead, more prompts are in flight than a step trains, and unfinished generations
continue in the next call). Reports seconds per step (the first, engine-warming step left out), the time spent
waiting for rollouts and training, the staleness (of the oldest token, and the mean over tokens), the logprob
mismatch, reply tokens sampled per second, and held-out greedy accuracy before and after where the recipe evaluates,
with the speed-up against the first arm. Writes docs/benchmarks/<name>.md (+ .json) with the machine described.
Runs go to runs/bench-async/.
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
    ap.add_argument("--arms", "--staleness", nargs="+", default=["0", "1", "2"],
                    help="max_staleness per arm; a trailing p adds partial rollouts")
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--name", default="async", help="writes docs/benchmarks/<name>.md and .json")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench-async"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.chdir(ROOT)

    from rl.config import load_recipe
    from rl.online import OnlineRun
    from rl.metrics import describe_machine, read_metrics

    results = []
    for arm in args.arms:
        k, partial = int(arm.rstrip("p")), arm.endswith("p")
        run_dir = Path(args.runs) / f"{args.name}-{arm}"
        shutil.rmtree(run_dir, ignore_errors=True)
        recipe = load_recipe(args.recipe, [
            f"steps={args.steps}", f"rollout.max_staleness={k}", "algorithm.tis_cap=2.0", "eval.every=0",
            "logging.progress=false", "logging.tensorboard=false", "checkpoint.save_final=false", "checkpoint.every=0",
            f"output_dir={run_dir}", *(["rollout.partial_rollouts=true"] if partial else []), *args.overrides])
        summary = OnlineRun(recipe).fit()
        rows = read_metrics(run_dir, "train")[1:]  # step 1 warms the engine
        reply_tokens = [r["response_length"] * r["rollouts"] for r in rows]
        results.append({
            "arm": arm, "max_staleness": k, "partial_rollouts": partial,
            "seconds_per_step": statistics.mean(r["time_step"] for r in rows),
            "waiting_for_rollout": statistics.mean(r["time_generate"] for r in rows),
            "train": statistics.mean(r["time_train"] for r in rows),
            "weight_sync": statistics.mean(r["time_weight_sync"] for r in rows),
            "staleness_max": statistics.mean(r["rollout_staleness"] for r in rows),
            "staleness_token_mean": statistics.mean(r.get("partial_token_staleness", r["rollout_staleness"]) for r in rows),
            "mixed_versions_frac": statistics.mean(r.get("partial_mixed_versions_frac", 0.0) for r in rows),
            "logprob_mismatch": statistics.mean(r["logprob_mismatch"] for r in rows),
            "response_length": statistics.mean(r["response_length"] for r in rows),
            "reply_tokens_per_second": sum(reply_tokens) / sum(r["time_step"] for r in rows),
            "accuracy_before": summary.get("accuracy_before"), "accuracy_after": summary.get("accuracy_after"),
            "train_seconds": summary["train_seconds"],
        })
        print(json.dumps(results[-1]), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    base = results[0]["seconds_per_step"]
    command = " ".join(["python scripts/bench_async.py", *args.overrides,
                        *(["--recipe", args.recipe] if args.recipe != "recipes/quickstart.yaml" else []),
                        *(["--name", args.name] if args.name != "async" else []), "--steps", str(args.steps), "--arms", *args.arms])
    lines = [
        "# Synchronous vs asynchronous rollout" + (" (p: with partial rollouts)" if any(r["partial_rollouts"] for r in results) else ""),
        "",
        f"`{command}` on {describe_machine()}: {args.recipe}, 1 rollout actor, 1 trainer rank, TIS cap 2. "
        "Seconds are means over steps 2..N; staleness in policy versions (max: the batch's oldest token; mean: over tokens).",
        "",
        "| arm | s/step | speed-up | waiting for rollout | train | weight sync | staleness max | staleness mean | "
        "rollouts spanning two versions | logprob mismatch | mean reply tokens | reply tokens/s | accuracy before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        acc = (f"{r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f}" if r["accuracy_before"] is not None
               and r["accuracy_after"] is not None else "not evaluated")
        lines.append(
            f"| {r['arm']} | {r['seconds_per_step']:.2f} | {base / r['seconds_per_step']:.2f}x | {r['waiting_for_rollout']:.2f} | "
            f"{r['train']:.2f} | {r['weight_sync']:.3f} | {r['staleness_max']:.2f} | {r['staleness_token_mean']:.2f} | "
            f"{r['mixed_versions_frac']:.1%} | {r['logprob_mismatch']:.2e} | {r['response_length']:.0f} | "
            f"{r['reply_tokens_per_second']:.1f} | {acc} |"
        )
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
