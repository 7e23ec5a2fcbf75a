"""How many rollouts each prompt deserves: fixed G, 2-GRPO+RS, Reinforce-Ada and Knapsack RL, each with and
without the unlikeliness reward, at the same rollouts per step on the embedded task.

    .venv/bin/python scripts/experiment_allocation.py                      # 8 arms x 3 seeds (~35 min on 2 cores)
    .venv/bin/python scripts/experiment_allocation.py --quick --out /tmp/x  # a few steps per arm (the test suite)
    .venv/bin/python scripts/experiment_allocation.py --task smollm2 --arms "fixed G=4" Reinforce-Ada Knapsack "2-GRPO+RS"
                                                    # the real model, 4 arms x 3 seeds (~2 h on 2 cores)
    .venv/bin/python scripts/experiment_allocation.py --task smollm2-revisit --arms "fixed G=4" "fixed G=4 + unlikely" \
        Knapsack "Knapsack + unlikely" Reinforce-Ada "Reinforce-Ada + unlikely" 2-GRPO+RS "2-GRPO+RS + unlikely"
                                                    # the real model on 16 prompts seen 8 times each (8-14 min a run)
    ... --finished-only                             # the report of the runs finished so far, training nothing

Protocol: every arm trains ``--steps`` steps on the same fixed set of ``--prompts`` training prompts with at most
256 rollouts per step (fixed G=8: 32 prompts x 8; 2-GRPO+RS: 128 x 2, plus its resampled ties; Reinforce-Ada:
32 prompts, rounds of 4 up to 256, trains 4 per prompt; Knapsack: 32 prompts sharing 256); lr, warm-up, clip
and temperature as the recipes (recipes/knapsack-arithmetic.yaml, reinforce-ada-arithmetic.yaml,
unlikeliness-arithmetic.yaml). Held-out greedy accuracy, mean@8 and pass@8 (8 samples per prompt at temperature 1)
every ``--eval-every`` steps. Runs go to ``--runs``; a finished run is reused (``--fresh`` retrains). Writes
``<out>/allocation.md``, ``allocation.json`` and ``allocation-curves.png`` (``allocation-<task>.*`` for the
real-model tasks); ``--report-only`` rewrites them from the JSON.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from experiments.arms import METRICS, Arm, add_arm_options, choose_arms, claim_lines, finished_or_run, seeds_line  # noqa: E402
from rl.allocation import KNAPSACK_MIN_HISTORY, KNAPSACK_WINDOW  # noqa: E402
from rl.claims import mean_std  # noqa: E402
from rl.plot import plot_arm_curves  # noqa: E402

BETA = 0.25  # the unlikeliness reward's beta in the authors' release


# The real model at 32 rollouts per step (~25 s a step on 2 cores): SmolLM2-135M-Instruct's arithmetic recipe, 8 prompts
# per step for every arm but 2-GRPO+RS, the other sizes scaled from the embedded protocol (Ada's first round: half the cap).
REAL_RECIPE = "recipes/smollm2-arithmetic.yaml"
REAL_PROMPTS_PER_STEP, REAL_GROUP = 8, 4  # every arm but 2-GRPO+RS; fixed G's and Knapsack's G
REAL_PROTOCOL = ["algorithm.clip_low=0.2", "algorithm.clip_high=0.28", f"data.prompts_per_step={REAL_PROMPTS_PER_STEP}",
                 "eval.temperature=1.0"]
REAL_ARMS = {
    "fixed G=4": [f"algorithm.group_size={REAL_GROUP}"],
    "2-GRPO+RS": ["algorithm.group_size=2", "data.prompts_per_step=16", "algorithm.advantage=contrastive_pair",
                  "algorithm.tie_handling=resample", "algorithm.max_resample_rounds=2"],
    "Reinforce-Ada": ["algorithm.allocation=reinforce_ada", "algorithm.group_size=2", "algorithm.normalize_std=false",
                      "algorithm.ada_rule=balance", "algorithm.ada_round_size=2", "algorithm.ada_max_rounds=4",
                      "algorithm.rollout_budget=32"],
    "Knapsack": ["algorithm.allocation=knapsack", f"algorithm.group_size={REAL_GROUP}", "algorithm.knapsack_min=2",
                 "algorithm.knapsack_max=16", "algorithm.success_threshold=0.5"],
}
# smollm2: one epoch over 128 prompts, so Knapsack never has a prompt's history and trains as fixed G does.
# smollm2-revisit: 16 prompts, each seen every 2 steps: from its third visit (step 5) Knapsack has 8 of its outcomes.
# Both: 100 held-out prompts evaluated before and after (greedy, mean@4, pass@4).
REAL_DEFAULTS = dict(steps=16, prompts=128, test_prompts=100, eval_every=16, k=4)
TASK_DEFAULTS = {"embedded": {},
                 "smollm2": dict(REAL_DEFAULTS, runs=str(ROOT / "runs" / "experiment-allocation-smollm2")),
                 "smollm2-revisit": dict(REAL_DEFAULTS, prompts=16,
                                         runs=str(ROOT / "runs" / "experiment-allocation-smollm2-revisit"))}


def arms(task: str = "embedded") -> list[Arm]:
    if task != "embedded":
        base = [Arm(name, REAL_RECIPE, [*REAL_PROTOCOL, *overrides]) for name, overrides in REAL_ARMS.items()]
    else:
        base = [
            Arm("fixed G=8", "recipes/unlikeliness-arithmetic.yaml"),
            Arm("2-GRPO+RS", "recipes/unlikeliness-arithmetic.yaml",
                ["algorithm.group_size=2", "data.prompts_per_step=128", "algorithm.advantage=contrastive_pair",
                 "algorithm.tie_handling=resample", "algorithm.max_resample_rounds=2"]),
            Arm("Reinforce-Ada", "recipes/reinforce-ada-arithmetic.yaml"),
            Arm("Knapsack", "recipes/knapsack-arithmetic.yaml"),
        ]
    out = []
    for arm in base:
        out.append(Arm(arm.name, arm.recipe, [*arm.overrides, "algorithm.unlikeliness_beta=0"]))
        out.append(Arm(f"{arm.name} + unlikely", arm.recipe, [*arm.overrides, f"algorithm.unlikeliness_beta={BETA}"]))
    return out


def most_rollouts(runs: list[dict]) -> str:
    """The most rollouts one prompt got in one step, over the runs; G for a fixed allocation (not logged)."""
    values = [r["max_rollouts_per_prompt"] for r in runs if r["max_rollouts_per_prompt"]]
    return f"{max(values):.0f}" if values else "G"


def embedded_protocol(args, k: int, start_greedy: float, names: list[str]) -> list[str]:
    return [
        f"- Task: the embedded 2-digit addition model (1M parameters); a fixed set of {args.prompts} training prompts, "
        f"{args.steps} steps for every arm; {args.test_prompts} held-out prompts evaluated every {args.eval_every} steps: greedy "
        f"accuracy, mean@{k} and pass@{k} ({k} samples per prompt at temperature 1).",
        "- At most 256 rollouts per step for every arm: fixed G=8 (32 prompts x 8); 2-GRPO+RS (128 prompts x 2, contrastive "
        "+1/-1 advantages, tied pairs resampled up to 2 rounds: its resampled rollouts come on top and are counted); "
        "Reinforce-Ada (32 prompts, balance rule, rounds of 4 until the cap, each prompt trains 4 of its pool against the "
        "pool's mean, no std); Knapsack (32 prompts sharing 256 by their success rate over their last 16 rollouts, 2 to 32 "
        "each; a prompt without 8 rollouts of history gets 8).",
        f"- `+ unlikely`: the same arm with the unlikeliness reward, beta {BETA} (each reward times 1 - beta x rank / G within "
        "its group, rank = how many rollouts of the group are less likely by mean token logprob; identical rollouts share a "
        "rank). On this task a correct answer is one string, so correct rollouts of a prompt are mostly copies of each other: "
        "the bonus has few distinct correct solutions to tell apart.",
        "- Every arm: Adam, lr 2e-4 after 5 warm-up steps, clip 0.2 / 0.28, temperature 1, one optimizer step per batch, "
        "token-mean loss, no KL. Wall-clock is the sum of the training steps (evaluations excluded); the runs shared the "
        "machine with other work at times, so compare rollouts, not seconds.",
        f"- Scaled from the papers (billion-parameter models, math benchmarks, hundreds of steps): a 1M-parameter model that "
        f"starts at greedy {start_greedy:.3f}."]


def revisits(args) -> str:
    """How often the real-model protocol shows Knapsack each prompt (once per epoch), and from when it has a
    prompt's history (KNAPSACK_MIN_HISTORY outcomes, G per visit)."""
    epoch = max(1, args.prompts // REAL_PROMPTS_PER_STEP)
    visits = -(-KNAPSACK_MIN_HISTORY // REAL_GROUP)  # visits before a prompt's success rate is trusted
    if visits * epoch >= args.steps:
        return (f"An epoch is {epoch} steps and the run {args.steps}: no prompt is seen often enough for Knapsack to have "
                "its history, so it trains as fixed G does.")
    return (f"Each prompt is seen once per epoch of {epoch} steps, {args.steps // epoch} times in all, so from epoch "
            f"{visits + 1} (step {visits * epoch + 1}) Knapsack has {KNAPSACK_MIN_HISTORY} outcomes of every prompt.")


# How the real-model protocol spends its 32 rollouts per step, arm by arm (the report lists the arms run).
REAL_SIZES = {
    "fixed G=4": "fixed G=4 (8 prompts x 4)",
    "2-GRPO+RS": "2-GRPO+RS (16 prompts x 2, contrastive +1/-1 advantages, tied pairs resampled up to 2 rounds, counted)",
    "Reinforce-Ada": "Reinforce-Ada (8 prompts, balance rule, rounds of 2 until the cap of 32, each prompt trains 2 of its "
                     "pool against the pool's mean, no std)",
    "Knapsack": f"Knapsack (8 prompts sharing 32 by their success rate over their last {KNAPSACK_WINDOW} rollouts, 2 to 16 "
                f"each; a prompt with fewer than {KNAPSACK_MIN_HISTORY} rollouts of history gets {REAL_GROUP})",
}


def real_protocol(args, k: int, start_greedy: float, names: list[str]) -> list[str]:
    run = [size for name, size in REAL_SIZES.items() if name in names or f"{name} + unlikely" in names]
    return [
        f"- Task: SmolLM2-135M-Instruct answering 2-digit additions asked in words (builtin:arithmetic-chat, ChatML, 48 new "
        f"tokens, reward math_verify), full-model training; a fixed set of {args.prompts} training prompts, {args.steps} steps "
        f"for every arm; {args.test_prompts} held-out prompts evaluated every {args.eval_every} steps: greedy accuracy, "
        f"mean@{k} and pass@{k} ({k} samples per prompt at temperature 1).",
        f"- At most 32 rollouts per step for every arm: {'; '.join(run)}."
        + (f" {revisits(args)}" if "Knapsack" in names else ""),
        f"- `+ unlikely`: the same arm with the unlikeliness reward, beta {BETA} (each reward times 1 - beta x rank / G within "
        "its group, rank = how many rollouts of the group are less likely by mean token logprob; identical rollouts share a "
        "rank). A reply here is a short working ending in one number, so correct replies of a prompt can differ in their "
        "working.",
        "- Every arm: the recipe's (recipes/smollm2-arithmetic.yaml) Adam at lr 1e-5, no warm-up, clip 0.2 / 0.28, "
        "temperature 1, one optimizer step per batch, token-mean loss, no KL. Wall-clock is the sum of the training steps.",
        f"- Scaled from the papers (billion-parameter models, math benchmarks, hundreds of steps): a 135M-parameter model "
        f"that starts at greedy {start_greedy:.3f}."]


PROTOCOL = {"embedded": embedded_protocol, "smollm2": real_protocol, "smollm2-revisit": real_protocol}


def report(results: list[dict], names: list[str], args, command: str, stem: str = "allocation") -> str:
    from rl.metrics import recorded_machine_of_rows

    k = args.k

    def of(name: str) -> list[dict]:
        return [r for r in results if r["arm"] == name]

    start = {key: statistics.mean(r["curve"][0][key] for r in results) for key, _ in METRICS}
    unlikely = any(n.endswith(" + unlikely") for n in names)
    protocol = [line for line in PROTOCOL[args.task](args, k, start["greedy"], names)
                if unlikely or not line.startswith("- `+ unlikely`")]
    titled = [title for arm, title in (("fixed", "fixed G"), ("2-GRPO+RS", "2-GRPO+RS"), ("Reinforce-Ada", "Reinforce-Ada"),
                                       ("Knapsack", "Knapsack RL")) if any(n.startswith(arm) for n in names)]
    lines = [
        "# Rollout allocation: " + ", ".join(titled)
        + (", with and without the unlikeliness reward" if unlikely else "")
        + (" (SmolLM2-135M-Instruct)" if args.task != "embedded" else ""),
        "", f"Reproduce: `{command}`", "",
        f"Machine: {recorded_machine_of_rows(results)}; one vLLM rollout actor, one DeepSpeed rank (ZeRO-0), Ray.",
        "", "## Protocol", "",
        *protocol,
        "", f"## Results ({seeds_line(results, names)}; mean ± std of the final evaluation)", "",
        f"| arm | final greedy | final mean@{k} | final pass@{k} | rollouts | trained rows | prompts with signal | "
        "most rollouts on one prompt | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        rs = of(name)
        lines.append(f"| {name} | " + " | ".join(mean_std([r["curve"][-1][key] for r in rs]) for key, _ in METRICS)
                     + f" | {statistics.mean(r['rollouts'] for r in rs):,.0f} | {statistics.mean(r['trained_sequences'] for r in rs):,.0f}"
                     f" | {100 * statistics.mean(r['prompts_with_signal'] for r in rs):.0f}% | "
                     f"{most_rollouts(rs)} | {statistics.mean(r['train_seconds'] for r in rs):.0f} |")
    lines += ["", f"Before training: greedy {start['greedy']:.3f}, mean@{k} {start['mean_at_k']:.3f}, pass@{k} {start['pass_at_k']:.3f}. "
              "\"Prompts with signal\": the share of groups whose rewards are not all equal, after any further rounds "
              "(mean over steps).", "", f"![curves]({stem}-curves.png)", "",
              "## The claims at this scale", "",
              "Each verdict comes from the 95% interval over seeds (Welch) of the difference of final values (A - B), "
              "never from the means alone (rl/claims.py): \"holds\" means A is above B with the whole interval above zero.", ""]
    base = names[0].removesuffix(" + unlikely") if names else "fixed G=8"  # the fixed-G arm comes first

    def evals(runs: list[dict]) -> list:
        return [[(p["step"], p["greedy"], p["mean_at_k"], p["pass_at_k"]) for p in r["curve"]] for r in runs]

    for name in ("Reinforce-Ada", "Knapsack"):
        if not of(name):
            continue  # not among the arms run
        lines.append(f"- {name} beats fixed G at the same rollouts per step (A = {name}, B = {base}):")
        if name == "Knapsack" and evals(of(name)) == evals(of(base)):
            lines.append("  - every evaluation equal to fixed G's, seed for seed: Knapsack gives a prompt without 8 outcomes of "
                         "history G rollouts, and no prompt here was drawn often enough to have them (the run is about one "
                         "epoch over its training prompts), so it trained exactly as fixed G")
            continue
        lines += claim_lines(results, name, base, k)
    if any(r["arm"] == "2-GRPO+RS" for r in results):
        ratio = statistics.mean(r["rollouts"] for r in of("2-GRPO+RS")) / statistics.mean(r["rollouts"] for r in of(base))
        lines.append(f"- 2-GRPO+RS vs fixed G (A = 2-GRPO+RS, B = {base}; not at equal rollouts: its resampled ties took it to "
                     f"{ratio:.2f}x the rollouts of fixed G):")
        lines += claim_lines(results, "2-GRPO+RS", base, k)
    for name in (base, "Reinforce-Ada", "Knapsack", "2-GRPO+RS"):
        with_bonus, without = of(f"{name} + unlikely"), of(name)
        if not with_bonus:
            continue  # not among the arms run
        lines.append(f"- The unlikeliness reward raises pass@{k} (A = {name} + unlikely, B = {name}):")
        if with_bonus and evals(with_bonus) == evals(without):
            lines.append("  - every evaluation equal to the arm without it, seed for seed: with contrastive +1/-1 advantages only "
                         "which rollout of a pair is better matters, and the bonus never reorders a pair here (copies of one "
                         "correct answer share a rank)")
            continue
        lines += claim_lines(results, f"{name} + unlikely", name, k)
    lines += ["", *equal_rollout_leaders(results, names, base, k)]
    return "\n".join(lines) + "\n"


def equal_rollout_leaders(results: list[dict], names: list[str], base: str, k: int) -> list[str]:
    """Which arm ends highest on each metric among those at fixed G's rollouts (within 5%), and by how much against
    fixed G: the difference of means and its 95% interval over seeds (rl/claims.py)."""
    from rl.claims import at_least

    def rollouts(name: str) -> float:
        return statistics.mean(r["rollouts"] for r in results if r["arm"] == name)

    equal = [n for n in names if rollouts(n) <= 1.05 * rollouts(base)]
    lines = [f"At equal rollouts ({', '.join(equal)}), the highest final value of each metric:"]
    for key, label in METRICS:
        finals = {n: [r["curve"][-1][key] for r in results if r["arm"] == n] for n in equal}
        best = max(equal, key=lambda n: statistics.mean(finals[n]))
        if best == base:
            lines.append(f"- {label.format(k=k)}: {base} itself ({statistics.mean(finals[base]):.3f})")
            continue
        c = at_least(finals[best], finals[base])
        gap = statistics.mean(finals[best]) - statistics.mean(finals[base])
        interval = f"95% interval [{c.low:+.3f}, {c.high:+.3f}]" if c.low is not None else "no interval from one seed"
        lines.append(f"- {label.format(k=k)}: {best} ({statistics.mean(finals[best]):.3f}), {gap:+.3f} over {base} "
                     f"({interval}: **{c.verdict}**)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arm_options(ap, steps=64, runs=ROOT / "runs" / "experiment-allocation", out=ROOT / "docs" / "experiments",
                    quick_help="two arms (fixed G, Reinforce-Ada), a few steps, one seed: checks the tables are produced")
    ap.add_argument("--task", choices=sorted(PROTOCOL), default="embedded",
                    help="embedded: the 1M-parameter arithmetic model; smollm2: SmolLM2-135M-Instruct on chat arithmetic, one "
                         "epoch over 128 prompts; smollm2-revisit: the same on 16 prompts, each seen 8 times (the report: "
                         "allocation-<task>.*)")
    ap.set_defaults(**TASK_DEFAULTS[ap.parse_known_args()[0].task])
    args = ap.parse_args()
    stem = "allocation" if args.task == "embedded" else f"allocation-{args.task}"
    command = "python scripts/experiment_allocation.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:]
                                                                 if a not in ("--report-only", "--finished-only"))
    if args.quick:
        args.seeds, args.steps, args.prompts, args.test_prompts, args.eval_every, args.k = args.seeds[:1], 2, 128, 16, 2, 2
        args.arms = args.arms or [arms(args.task)[0].name, "Reinforce-Ada"]
    chosen = choose_arms(arms(args.task), args.arms, ap)
    names = [a.name for a in chosen]
    out = Path(args.out)
    if args.report_only:
        results = json.loads((out / f"{stem}.json").read_text())
        names = [n for n in names if any(r["arm"] == n for r in results)]  # the arms the run had
    else:
        results = finished_or_run(chosen, args)  # each with its run's machine
        names = [n for n in names if any(r["arm"] == n for r in results)]
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    budget = 256 if args.task == "embedded" else 32
    plot_arm_curves(results, names, [(key, f"held-out {label.format(k=args.k)}") for key, label in METRICS],
                    out / f"{stem}-curves.png", f"Rollout allocation at <= {budget} rollouts per step (mean over seeds, "
                    "band: min-max)", dashed=lambda arm: "unlikely" in arm)
    text = report(results, names, args, command, stem)
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
