"""2-GRPO vs 16-GRPO with the protocol of "It Takes Two: Your GRPO Is Secretly DPO" (arXiv:2510.00977),
scaled to the embedded task or to SmolLM2-135M-Instruct.

    .venv/bin/python scripts/experiment_2grpo.py                 # the full protocol, 3 seeds (~1.5 h on 2 cores)
    .venv/bin/python scripts/experiment_2grpo.py --task smollm2  # the real model, 3 seeds (~1.5 h on 2 cores)
    .venv/bin/python scripts/experiment_2grpo.py --quick --out /tmp/x   # a few steps per arm (the test suite)

Protocol (paper Sec. 6 and Appendix C.1; what differs is said in the report):
- every arm trains ``--epochs`` epochs over the same fixed set of ``--prompts`` training prompts;
- the same rollouts per optimizer step: 16-GRPO takes B prompts x 16, 2-GRPO 8B prompts x 2, so over the
  same epochs 2-GRPO takes 1/8 of the rollouts and 1/8 of the optimizer steps;
- 2-GRPO's learning rate is swept at 1x, 2x, 4x and 8x that of 16-GRPO (the paper's ratio is 8x);
- 2-GRPO+RS (tied pairs resampled) and online DPO (the same pairs, the DPO loss) at ``--pair-lr-ratio``;
- Adam, constant learning rate after 10 warm-up steps, clip epsilon 0.2 / 0.28, temperature 1 in training;
- held-out evaluation at every epoch: greedy accuracy and mean@k (k samples per prompt at temperature 1).
Runs go to ``--runs``; a run whose summary says finished is reused, not trained again (``--fresh`` retrains).
Writes ``<out>/2-grpo.md`` (tables and verdicts), ``2-grpo.json`` (every evaluation) and ``2-grpo-curves.png``
(``2-grpo-smollm2.*`` for ``--task smollm2``); ``--report-only`` writes them again from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # experiments/ is a folder of the repository, not an installed package

from experiments.arms import is_finished, recorded_path  # noqa: E402
from rl.claims import mean_std  # noqa: E402
from rl.plot import plot_arm_curves  # noqa: E402

GROUP_RATIO = 8  # 16-GRPO's G over 2-GRPO's: 2-GRPO takes 8x the prompts per step


@dataclass
class Arm:
    name: str
    recipe: str
    prompts_per_step: int
    lr: float
    overrides: list[str] = field(default_factory=list)


# The real-model arms: SmolLM2-135M-Instruct's recipe with the group size and advantage of each arm.
REAL_RECIPE = "recipes/smollm2-arithmetic.yaml"
REAL_GRPO16 = ["algorithm.group_size=16"]
REAL_GRPO2 = ["algorithm.group_size=2", "algorithm.advantage=contrastive_pair", "algorithm.tie_handling=keep"]
REAL_GRPO2_RS = ["algorithm.group_size=2", "algorithm.advantage=contrastive_pair", "algorithm.tie_handling=resample",
                 "algorithm.max_resample_rounds=2"]


def arms(args) -> list[Arm]:
    b, lr = args.prompts_per_step, args.lr
    pair_lr = args.pair_lr_ratio * lr
    if args.task == "smollm2":
        out = [Arm("16-GRPO", REAL_RECIPE, b, lr, REAL_GRPO16)]
        out += [Arm(f"2-GRPO lr {r:g}x", REAL_RECIPE, GROUP_RATIO * b, r * lr, REAL_GRPO2) for r in args.lr_ratios]
        out.append(Arm(f"2-GRPO+RS lr {args.pair_lr_ratio:g}x", REAL_RECIPE, GROUP_RATIO * b, pair_lr, REAL_GRPO2_RS))
        return out
    out = [Arm("16-GRPO", "recipes/grpo16-arithmetic.yaml", b, lr)]
    out += [Arm(f"2-GRPO lr {r:g}x", "recipes/grpo2-arithmetic.yaml", GROUP_RATIO * b, r * lr) for r in args.lr_ratios]
    out.append(Arm(f"2-GRPO+RS lr {args.pair_lr_ratio:g}x", "recipes/grpo2-rs-arithmetic.yaml", GROUP_RATIO * b, pair_lr))
    if args.quick:  # the report's arms; online DPO's own path runs in tests/e2e/test_pairwise_algorithms.py
        return out
    # Online DPO on exactly 2-GRPO's pairs: ties dropped, not resampled.
    out.append(Arm(f"online DPO lr {args.pair_lr_ratio:g}x", "recipes/online-dpo-arithmetic.yaml", GROUP_RATIO * b, pair_lr,
                   ["algorithm.tie_handling=keep", f"trainer.micro_batch_size={2 * GROUP_RATIO * b}"]))
    return out


def protocol_overrides(arm: Arm, args, seed: int, run_dir: Path) -> list[str]:
    steps_per_epoch = args.prompts // arm.prompts_per_step
    eval_every = max(1, steps_per_epoch // args.evals_per_epoch)
    return [
        f"seed={seed}", f"output_dir={run_dir}", "logging.progress=false",
        f"steps={args.epochs * steps_per_epoch}", f"data.max_train_examples={args.prompts}",
        f"data.prompts_per_step={arm.prompts_per_step}", f"data.max_test_examples={args.test_prompts}",
        f"trainer.lr={arm.lr}", f"trainer.warmup_steps={args.warmup_steps}",
        "algorithm.clip_low=0.2", "algorithm.clip_high=0.28", "rollout.temperature=1.0",
        f"eval.every={eval_every}", f"eval.samples={args.k}", "eval.temperature=1.0",
        "checkpoint.save_final=false", *arm.overrides, *args.overrides,
    ]


# The real model's scale on 2 cores (~25 s per 32-rollout step, ~100 s per evaluation): one epoch over 64
# prompts, 16-GRPO at the recipe's working rate (1e-5) with 2 x 16 rollouts per step, 100 held-out prompts
# evaluated before and after.
REAL_DEFAULTS = dict(epochs=1, prompts=64, prompts_per_step=2, test_prompts=100, k=4, lr=1e-5, lr_ratios=[1, 8],
                     pair_lr_ratio=8, warmup_steps=0, evals_per_epoch=1, shared_start_eval=True,
                     runs=str(ROOT / "runs" / "experiment-2grpo-smollm2"))


def run_arm(arm: Arm, args, seed: int, start: dict | None = None) -> dict:
    """Train one arm for one seed (or read the finished run); returns its curve and totals. ``start``: the
    seed's evaluation before training, measured by its first arm; later arms skip their own (every arm of a
    seed starts from the same model and evaluates with the same sampling seed, so it would be the same)."""
    from rl.config import load_recipe
    from rl.metrics import machine_of_run, read_metrics
    from rl.online import OnlineRun

    run_dir = Path(args.runs) / f"{arm.name.replace(' ', '_')}-seed{seed}"
    if args.fresh or not is_finished(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts over, its old metrics gone
        skip = ["eval.before=false"] if start is not None and args.shared_start_eval else []
        OnlineRun(load_recipe(arm.recipe, protocol_overrides(arm, args, seed, run_dir) + skip)).fit()
    train, evals = read_metrics(run_dir, "train"), read_metrics(run_dir, "eval")
    if evals and evals[0]["step"] != 0:
        evals = [start, *evals]
    cum_rollouts, cum_seconds, rollouts, seconds = {0: 0.0}, {0: 0.0}, 0.0, 0.0
    for row in train:
        rollouts += row["rollouts"]
        seconds += row["time_step"]  # training time only: evaluations are not counted
        cum_rollouts[row["step"]], cum_seconds[row["step"]] = rollouts, seconds
    mean_key = f"mean@{args.k}"
    curve = [{"step": e["step"], "rollouts": cum_rollouts[e["step"]], "seconds": cum_seconds[e["step"]],
              "greedy": e["accuracy"], "mean_at_k": e[mean_key]} for e in evals]
    return {"start_eval": evals[0], "arm": arm.name, "seed": seed, "lr": arm.lr, "prompts_per_step": arm.prompts_per_step,
            "steps": len(train),
            "rollouts": rollouts, "train_seconds": seconds, "curve": curve, "run_dir": recorded_path(run_dir),
            "machine": machine_of_run(run_dir)}


TASKS = {
    "embedded": dict(
        title="on the embedded task",
        task="the embedded 2-digit addition model (1M parameters, greedy start {start_greedy:.3f})",
        scale="a 1M-parameter model, {rollouts} rollouts per step, lr {lr:g} for 16-GRPO (the embedded model's working rate)"),
    "smollm2": dict(
        title="on SmolLM2-135M-Instruct (chat arithmetic)",
        task="SmolLM2-135M-Instruct answering 2-digit additions asked in words (builtin:arithmetic-chat, ChatML, "
             "48 new tokens, reward math_verify; greedy start {start_greedy:.3f}); full-model training (on 2 CPU cores a "
             "full step is faster than a LoRA step, whose vLLM sampling is ~4x slower)",
        scale="a 135M-parameter model, {rollouts} rollouts per step, lr {lr:g} for 16-GRPO (the recipe's working rate)"),
}
METRICS = (("mean_at_k", "mean@{k}"), ("greedy", "greedy"))


def claim_lines(results: list[dict], base: str, arm: str, fraction: float, k: int) -> list[str]:
    """The verdict on "``arm`` reaches ``fraction`` of ``base``'s final accuracy", once per metric."""
    from rl.claims import at_least, describe

    lines = []
    for key, label in METRICS:
        finals = {name: [r["curve"][-1][key] for r in results if r["arm"] == name] for name in (arm, base)}
        start = statistics.mean(r["curve"][0][key] for r in results)
        c = at_least(finals[arm], finals[base], fraction=fraction, start=start)
        lines.append(f"  - {label.format(k=k)}: {describe(c, fraction)}")
    return lines


def report(results: list[dict], arm_list: list[Arm], args, command: str) -> str:
    from rl.metrics import recorded_machine_of_rows

    def final(name: str, key: str) -> list[float]:
        return [r["curve"][-1][key] for r in results if r["arm"] == name]

    def totals(name: str, key: str) -> float:
        return statistics.mean(r[key] for r in results if r["arm"] == name)

    base = arm_list[0].name
    k, text = args.k, TASKS[args.task]
    start = {key: statistics.mean(r["curve"][0][key] for r in results) for key, _ in METRICS}
    evals = (f"{args.evals_per_epoch} times per epoch" if args.evals_per_epoch > 1 else "at every epoch")
    if args.shared_start_eval:
        evals += " (the start once per seed: every arm of a seed starts from the same model and sampling seed)"
    has_dpo = any(a.name.startswith("online DPO") for a in arm_list)
    lines = [
        f"# 2-GRPO vs 16-GRPO with the paper's protocol, {text['title']}",
        "",
        f"Reproduce: `{command}`",
        "",
        f"Machine: {recorded_machine_of_rows(results)}; one vLLM rollout actor, one DeepSpeed rank (ZeRO-0), Ray.",
        "",
        "## Protocol",
        "",
        f"- Task: {text['task'].format(start_greedy=start['greedy'])}; a fixed set of {args.prompts} training prompts, "
        f"{args.epochs} epoch(s) for every arm;",
        f"  {args.test_prompts} held-out prompts evaluated {evals}: greedy accuracy and mean@{k} ({k} samples per prompt, temperature 1).",
        f"- 16-GRPO: {args.prompts_per_step} prompts x 16 rollouts per step, lr {args.lr:g}. 2-GRPO: {GROUP_RATIO * args.prompts_per_step} "
        f"prompts x 2 (the same {16 * args.prompts_per_step} rollouts per step), contrastive +1/-1 advantages, lr "
        + ", ".join(f"{r:g}x" for r in args.lr_ratios) + " that of 16-GRPO.",
        "- 2-GRPO+RS (tied pairs resampled, up to 2 rounds; the extra rollouts are counted)"
        + (" and online DPO (2-GRPO's pairs, ties dropped, the DPO loss with beta 0.1 against the initial policy)" if has_dpo else "")
        + f" at {args.pair_lr_ratio:g}x.",
        f"- Every arm: Adam, constant lr after {args.warmup_steps} warm-up steps, clip epsilon 0.2 / 0.28, temperature 1 in training,",
        "  one optimizer step per batch, token-mean loss, no KL. Wall-clock is the sum of the training steps (evaluations excluded).",
        "- Scaled from the paper (32 x 16 vs 256 x 2 per step, lr 1e-6 vs 8e-6, 10 epochs, Mean@32, billion-parameter models):",
        f"  {text['scale'].format(rollouts=16 * args.prompts_per_step, lr=args.lr)}.",
        "- The abstract and introduction of arXiv:2510.00977 do not state the sampling temperature of its Mean@32; "
        f"mean@{k} here samples at temperature 1, the training temperature.",
        "",
        f"## Results ({len(args.seeds)} seeds: {', '.join(map(str, args.seeds))}; mean ± std)",
        "",
        f"| arm | lr | steps | final mean@{k} | final greedy | best mean@{k} | rollouts | train s | rollouts vs 16-GRPO | "
        "wall-clock vs 16-GRPO |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_ro, base_s = totals(base, "rollouts"), totals(base, "train_seconds")
    for arm in arm_list:
        best = [max(p["mean_at_k"] for p in r["curve"]) for r in results if r["arm"] == arm.name]
        ro, sec = totals(arm.name, "rollouts"), totals(arm.name, "train_seconds")
        lines.append(f"| {arm.name} | {arm.lr:g} | {totals(arm.name, 'steps'):.0f} | {mean_std(final(arm.name, 'mean_at_k'))} | "
                     f"{mean_std(final(arm.name, 'greedy'))} | {mean_std(best)} | {ro:,.0f} | {sec:.0f} | {100 * ro / base_ro:.1f}% | "
                     f"{100 * sec / base_s:.1f}% |")
    lines += ["", f"Training seconds over all {len(results)} runs: {sum(r['train_seconds'] for r in results):.0f} s (every run's "
              "training steps summed, the measure of the table's train s; the evaluations and engine start-ups are not in the "
              "results, so the experiment took longer end to end).",
              "", f"Before training (every arm starts from the same model): mean@{k} {start['mean_at_k']:.3f}, "
              f"greedy {start['greedy']:.3f}.", "",
              "Per seed (final mean@k / greedy):", "", "| arm | " + " | ".join(f"seed {s}" for s in args.seeds) + " |",
              "|---|" + "---|" * len(args.seeds)]
    for arm in arm_list:
        cells = []
        for s in args.seeds:
            r = next(r for r in results if r["arm"] == arm.name and r["seed"] == s)
            cells.append(f"{r['curve'][-1]['mean_at_k']:.3f} / {r['curve'][-1]['greedy']:.3f}")
        lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    lines += ["", "![curves](2-grpo-curves.png)", "", "## The paper's claims at this scale", "",
              f"The paper's metric is Mean@32 (accuracy averaged over 32 samples per problem); its counterpart here is mean@{k} "
              f"at temperature 1, so mean@{k} decides. Greedy accuracy is given beside it: the two can disagree, because mean@{k} "
              "also rewards sharpening the sampling distribution, which the arm with more optimizer steps gets more of. Each "
              "verdict comes from the 95% interval over seeds (Welch) of the difference, never from the means alone "
              "(rl/claims.py).", ""]
    two = [a.name for a in arm_list if a.name.startswith("2-GRPO lr")]
    best_two = max(two, key=lambda n: statistics.mean(final(n, "mean_at_k")))
    ro, sec = totals(best_two, "rollouts") / base_ro, totals(best_two, "train_seconds") / base_s
    lines.append(f"- 2-GRPO reaches >= 95% of 16-GRPO's final accuracy with 12.5% of the rollouts and <= 30% of the wall-clock. "
                 f"Best 2-GRPO arm ({best_two}): {100 * ro:.1f}% of the rollouts, {100 * sec:.1f}% of the wall-clock "
                 f"({'within' if sec <= 0.30 else 'over'} the 30%); its accuracy (A = {best_two}, B = 16-GRPO):")
    lines += claim_lines(results, base, best_two, 0.95, k)
    rs = next(a.name for a in arm_list if a.name.startswith("2-GRPO+RS"))
    lines.append(f"- 2-GRPO+RS >= 16-GRPO, with {100 * totals(rs, 'rollouts') / base_ro:.1f}% of its rollouts (A = {rs}, B = 16-GRPO):")
    lines += claim_lines(results, base, rs, 1.0, k)
    if has_dpo:
        dpo = next(a.name for a in arm_list if a.name.startswith("online DPO"))
        lines.append(f"- Online DPO on the same pairs vs 16-GRPO (A = {dpo}, B = 16-GRPO; no claim, for comparison):")
        lines += claim_lines(results, base, dpo, 1.0, k)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("embedded", "smollm2"), default="embedded",
                    help="embedded: the 1M-parameter arithmetic model; smollm2: SmolLM2-135M-Instruct on chat arithmetic "
                         "(defaults below change to its scale: see REAL_DEFAULTS)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=1024, help="the fixed training prompt set")
    ap.add_argument("--prompts-per-step", type=int, default=8, help="16-GRPO's B; 2-GRPO takes 8x")
    ap.add_argument("--test-prompts", type=int, default=512)
    ap.add_argument("--k", type=int, default=8, help="samples per held-out prompt for mean@k")
    ap.add_argument("--lr", type=float, default=1e-4, help="16-GRPO's learning rate")
    ap.add_argument("--lr-ratios", type=float, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--pair-lr-ratio", type=float, default=8, help="2-GRPO+RS's and online DPO's lr over 16-GRPO's")
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--evals-per-epoch", type=int, default=1)
    ap.add_argument("--shared-start-eval", action="store_true",
                    help="evaluate each seed's start once (its first arm) instead of once per arm: the same model and seed")
    ap.add_argument("--quick", action="store_true", help="a few steps per arm, one seed: checks that the tables are produced")
    ap.add_argument("--fresh", action="store_true", help="train again even where a finished run exists")
    ap.add_argument("--report-only", action="store_true",
                    help="write the report again from <out>/<name>.json (the same other arguments as the run), training nothing")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "experiment-2grpo"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "experiments"))
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides for every arm (use_ray=false: every arm in this process)")
    if ap.parse_known_args()[0].task == "smollm2":
        ap.set_defaults(**REAL_DEFAULTS)
    args = ap.parse_args()
    argv = [a for a in os.sys.argv[1:] if a != "--report-only"]
    command = "python scripts/experiment_2grpo.py" + (" " + " ".join(argv) if argv else "")
    if args.quick:
        args.seeds, args.epochs, args.prompts, args.test_prompts, args.k = args.seeds[:1], 1, 64, 16, 2
        args.lr_ratios, args.warmup_steps, args.shared_start_eval = args.lr_ratios[:1], 0, True
    os.chdir(ROOT)

    arm_list = arms(args)
    out, stem = Path(args.out), "2-grpo" if args.task == "embedded" else f"2-grpo-{args.task}"
    if args.report_only:
        results = json.loads((out / f"{stem}.json").read_text())
    else:
        results = []  # each with the machine its run recorded: a re-render states it
        for seed in args.seeds:
            start = None
            for arm in arm_list:
                results.append(run_arm(arm, args, seed, start))
                start = start or results[-1]["start_eval"]
                r = results[-1]
                print(json.dumps({k: r[k] for k in ("arm", "seed", "rollouts", "train_seconds")} | {"final": r["curve"][-1]}),
                      flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot_arm_curves(results, [a.name for a in arm_list], [("mean_at_k", f"held-out mean@{args.k}"), ("greedy", "held-out greedy accuracy")],
                    out / f"{stem}-curves.png", "2-GRPO vs 16-GRPO (mean over seeds, band: min-max)")
    text = report(results, arm_list, args, command).replace("2-grpo-curves.png", f"{stem}-curves.png")
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
