"""Every adapter policy mode on the embedded task, side by side, with what each costs and sends.

    .venv/bin/python scripts/adapter_policies.py [--steps 30] [--expert-steps 20]

1. Builds a library of three LoRA experts, each trained with GRPO on one sub-task of 2-digit
   addition: first operand < 50 (adder-low), >= 50 (adder-high), sums whose units carry (adder-carry).
2. Trains, from the same base, one policy per mode: a new LoRA, a merge of the experts, an
   Arrow-routed mixture (new LoRA beside the experts; with and without truncated IS), and a sparse
   adapter (5% of the entries); plus full fine-tuning as the reference point.
3. Writes docs/experiments/adapter-policies.md (+ .json): held-out greedy accuracy before/after,
   bytes per weight sync, vLLM-vs-trainer logprob mismatch, parameters a trainer rank holds,
   seconds per step, with the machine described. Runs go to runs/adapter-policies/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # experiments/ is a folder of the repository, not an installed package

from experiments.arms import recorded_path  # noqa: E402

SUBTASKS = {
    "adder-low": lambda a, b: a < 50,
    "adder-high": lambda a, b: a >= 50,
    "adder-carry": lambda a, b: a % 10 + b % 10 >= 10,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--expert-steps", type=int, default=20)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "adapter-policies"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "experiments"))
    ap.add_argument("--arms", nargs="*", help="re-run only the policies whose label starts with one of these; the "
                    "others keep their rows from the existing report")
    args = ap.parse_args()
    os.chdir(ROOT)

    from rl.config import load_recipe
    from rl.online import OnlineRun
    from rl.metrics import describe_machine, read_metrics
    from rl.tasks.tiny_model import TinyModelSpec, build_tiny_model

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    lib = runs / "library"
    model_root = Path(build_tiny_model(TinyModelSpec()))
    common = [f"model.path={model_root / 'model'}", f"data.test={model_root / 'data' / 'test.jsonl'}",
              "logging.progress=false", "logging.tensorboard=false", "eval.every=0"]

    # 1. the library
    rows = [json.loads(line) for line in (model_root / "data" / "train.jsonl").read_text().splitlines()]
    for name, keep in SUBTASKS.items():
        if (lib / name).is_dir():
            continue
        data = runs / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows if keep(*map(int, r["prompt"].rstrip("=").split("+")))))
        OnlineRun(load_recipe("recipes/lora-arithmetic.yaml", [
            *common, f"data.train={data}", f"steps={args.expert_steps}", f"adapter.library={lib}",
            f"adapter.save_as={name}", "eval.before=false", "eval.after=false", f"output_dir={runs / name}"])).fit()

    # 2. one policy per mode, same base, same prompts
    train = [f"data.train={model_root / 'data' / 'train.jsonl'}", f"steps={args.steps}"]
    experts = "adapter.experts=[" + ",".join(SUBTASKS) + "]"
    arms = [
        ("full fine-tuning", "recipes/quickstart.yaml", ["trainer.warmup_steps=5"]),
        ("lora (new, r=8)", "recipes/lora-arithmetic.yaml", ["adapter.save_as=null", "adapter.library=null"]),
        ("merge of 3 experts (r=8)", "recipes/lora-merge-arithmetic.yaml", [experts, f"adapter.library={lib}", "adapter.save_as=null"]),
        ("arrow top-2 + new LoRA, TIS 2", "recipes/arrow-arithmetic.yaml", [experts, f"adapter.library={lib}", "adapter.save_as=null"]),
        ("arrow top-2 + new LoRA, no IS", "recipes/arrow-arithmetic.yaml", [experts, f"adapter.library={lib}", "adapter.save_as=null",
                                                                          "algorithm.tis_cap=null"]),
        ("arrow top-2 + new LoRA, TIS 2, per-prompt serving", "recipes/arrow-arithmetic.yaml",
         [experts, f"adapter.library={lib}", "adapter.save_as=null", "adapter.arrow_serving=prompt"]),
        ("sparse 5% (SNIP)", "recipes/sparse-arithmetic.yaml", ["adapter.save_as=null", "adapter.library=null"]),
    ]
    out = Path(args.out)
    previous = {r["policy"]: r for r in json.loads((out / "adapter-policies.json").read_text())} \
        if args.arms and (out / "adapter-policies.json").is_file() else {}
    results = []
    for label, recipe_path, extra in arms:
        if args.arms and not any(label.startswith(a) for a in args.arms):
            if label in previous:
                results.append(previous[label])
            continue
        run_dir = runs / label.split(" (")[0].replace(" ", "-").replace(",", "").replace("%", "pct")
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never appended to an older one
        recipe = load_recipe(recipe_path, [*common, *train, *extra, f"output_dir={run_dir}", "algorithm.kl_coef=0.01"])
        summary = OnlineRun(recipe).fit()
        rows_ = read_metrics(run_dir, "train")
        results.append({
            "policy": label, "recipe": recipe_path,
            "accuracy_before": summary["accuracy_before"], "accuracy_after": summary["accuracy_after"],
            "weight_sync_bytes": rows_[-1]["weight_sync_bytes"],
            "logprob_mismatch_mean": statistics.mean(r["logprob_mismatch"] for r in rows_),
            "logprob_mismatch_max": max(r["logprob_mismatch_max"] for r in rows_),
            "params_in_memory": rows_[-1]["params_in_memory"],
            "seconds_per_step": statistics.mean(r["time_step"] for r in rows_),
            "sync_seconds_per_step": statistics.mean(r["time_weight_sync"] for r in rows_),
            "run_dir": recorded_path(run_dir),
        })
        print(json.dumps(results[-1]), flush=True)

    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter-policies.json").write_text(json.dumps(results, indent=2))
    machine = describe_machine()
    lines = [
        "# Adapter policies side by side",
        "",
        f"`python scripts/adapter_policies.py --steps {args.steps} --expert-steps {args.expert_steps}` on {machine}"
        + (f" (rows starting with {', '.join(args.arms)} re-run with `--arms {' '.join(args.arms)}`; the others from the "
           "previous full run)." if args.arms else "."),
        f"Embedded model ({model_root.name}), GRPO G=8, 64 prompts/step, {args.steps} steps per policy, KL 0.01 "
        "(reference = base with adapters off; full fine-tuning holds a reference copy). Library: three rank-8 LoRA "
        f"experts trained {args.expert_steps} steps each on one sub-task (first operand < 50, >= 50, carrying sums). "
        "Accuracy: held-out greedy, 512 prompts.",
        "",
        "| policy | accuracy before -> after | bytes per sync | logprob mismatch mean / max | params held | s/step | sync s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['policy']} | {r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} | {int(r['weight_sync_bytes']):,} | "
            f"{r['logprob_mismatch_mean']:.2e} / {r['logprob_mismatch_max']:.2e} | {int(r['params_in_memory']):,} | "
            f"{r['seconds_per_step']:.2f} | {r['sync_seconds_per_step']:.3f} |"
        )
    (out / "adapter-policies.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
