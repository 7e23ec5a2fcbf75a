"""Does rewarding a tool call keep GRPO on the tool, and does it matter what the reward pays for? SmolLM2-135M-Instruct
as an OpenAI-tools agent with a calculator (recipes/smollm2-agent-tools.yaml), its first call forced: without a call
reward, with a reward for any call the calculator evaluates, and with a reward for a call that computes the answer.

    .venv/bin/python scripts/experiment_tool_reward.py                # 3 arms x 5 seeds (~16 min a run on 2 cores)
    .venv/bin/python scripts/experiment_tool_reward.py --report-only  # rewrite the report from its JSON

Protocol: both arms run the recipe for ``--steps`` steps (8 prompts x 4 episodes, temperature 1, lr 1e-5, full
model), evaluating greedily on 100 held-out 2-digit additions every ``--steps // 2`` steps. The agent is
docs/guide/examples/chat_tools_agent.py: ``run_episode_calling_first`` (every episode's first reply is forced to
open a calculator call; the reward is the final answer's ``math_verify``) and ``run_episode_rewarding_calls`` (the
same, plus ``VALID_CALL_BONUS`` when the calculator evaluated one of the episode's calls) and
``run_episode_rewarding_useful_calls`` (the same bonus, only when a call's result is the gold answer). Held-out
accuracy is the final answer's ``math_verify`` in all three. Runs go to ``--runs``; a finished run is reused. Writes
``<out>/tool-reward.md`` and ``tool-reward.json``.
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

from experiments.arms import Arm, is_finished, recorded_path, run_dir_of  # noqa: E402
from rl.claims import at_least, describe, mean_std  # noqa: E402
from rl.metrics import machine_of_run, read_metrics, recorded_machine_of_rows  # noqa: E402

RECIPE = "recipes/smollm2-agent-tools.yaml"
AGENT = "docs/guide/examples/chat_tools_agent.py"
FORCED, REWARDED, USEFUL = "forced call", "forced call + call reward", "forced call + useful-call reward"
ARMS = [Arm(FORCED, RECIPE, [f"agent.fn={AGENT}:run_episode_calling_first"]),
        Arm(REWARDED, RECIPE, [f"agent.fn={AGENT}:run_episode_rewarding_calls"]),
        Arm(USEFUL, RECIPE, [f"agent.fn={AGENT}:run_episode_rewarding_useful_calls"])]


def run(arm: Arm, seed: int, args) -> dict:
    """Train one arm for one seed (or read its finished run): its evaluations and per-step call shares."""
    from rl.config import load_recipe
    from rl.online import OnlineRun

    run_dir = run_dir_of(arm, args.runs, seed)
    if not is_finished(run_dir):
        OnlineRun(load_recipe(arm.recipe, [*arm.overrides, f"seed={seed}", f"steps={args.steps}", f"eval.every={args.steps // 2}",
                                           f"output_dir={run_dir}", "logging.progress=false"])).fit()
    bonus = bonus_of(arm)

    def rewarded(row: dict) -> float | None:  # the agent's reward is the bonus or 0, so its mean is the bonus's share
        return row.get("env_reward_mean", 0.0) / bonus if bonus else None

    train = read_metrics(run_dir, "train")
    return {"arm": arm.name, "seed": seed, "run_dir": recorded_path(run_dir), "machine": machine_of_run(run_dir),
            "evals": [{"step": e["step"], "accuracy": e["accuracy"], "called": e["multi_turn_fraction"], "rewarded": rewarded(e)}
                      for e in read_metrics(run_dir, "eval")],
            "train": [{"step": t["step"], "called": t["multi_turn_fraction"], "rewarded": rewarded(t)} for t in train],
            "seconds_per_step": statistics.mean(t["time_step"] for t in train)}


def bonus_of(arm: Arm) -> float:
    if arm.name not in (REWARDED, USEFUL):
        return 0.0
    from rewards.registry import load_plugin

    return float(load_plugin(f"{ROOT / AGENT}:VALID_CALL_BONUS", "bonus"))


def report(results: list[dict], command: str) -> str:
    arms = [a.name for a in ARMS]
    seeds = sorted({r["seed"] for r in results})
    steps = sorted({e["step"] for r in results for e in r["evals"]})
    by_arm = {a: [r for r in results if r["arm"] == a] for a in arms}

    def at(rows, step, key, kind="evals"):
        return [e[key] for r in rows for e in r[kind] if e["step"] == step and e[key] is not None]

    lines = ["# A reward for a tool call: for any call the calculator evaluates, or for a call that computes the answer", "",
             f"Reproduce: `{command}`", "",
             f"Machine: {recorded_machine_of_rows(results)}. Seeds: {', '.join(map(str, seeds))}; mean ± std over seeds.", "",
             "Question: SmolLM2-135M-Instruct does not call tools on its own. With its first call forced and only the answer "
             "rewarded, does GRPO keep it on the tool? Does a reward for a call the calculator evaluates change that, and does "
             "paying only for a call that computes the answer turn calling into answering right?", "",
             "## Held-out greedy evaluation (100 prompts)", "",
             "| arm | " + " | ".join([*(f"accuracy, step {s}" for s in steps), *(f"episodes with a call (%), step {s}" for s in steps),
                                     *(f"calls rewarded (%), step {s}" for s in steps)]) + " | s/step |",
             "|---|" + "---|" * (3 * len(steps) + 1)]
    for a in arms:
        rows = by_arm[a]
        cells = [mean_std(at(rows, s, "accuracy")) for s in steps] + [mean_std(at(rows, s, "called"), percent=True) for s in steps]
        cells += [mean_std(at(rows, s, "rewarded"), percent=True) if at(rows, s, "rewarded") else "not measured" for s in steps]
        lines.append(f"| {a} | " + " | ".join(cells) + f" | {statistics.mean(r['seconds_per_step'] for r in rows):.0f} |")
    last, first_train = steps[-1], min(t["step"] for r in results for t in r["train"])
    last_train = max(t["step"] for r in results for t in r["train"])
    lines += ["", "\"Episodes with a call\": the parser read a call (2 or more turns); \"calls rewarded\": episodes whose agent "
              f"paid the bonus (its reward divided by the bonus): {REWARDED}, a call the calculator evaluated; {USEFUL}, a call "
              f"whose result is the gold answer. The {FORCED} arm's agent reports neither.", "",
              f"## Sampled training episodes (temperature 1): with a call, step {first_train} -> step {last_train}", ""]
    for a in arms:
        rows = by_arm[a]
        lines.append(f"- {a}: {mean_std(at(rows, first_train, 'called', 'train'), percent=True)}% -> "
                     f"{mean_std(at(rows, last_train, 'called', 'train'), percent=True)}%")
    lines += ["", f"## Final accuracy (step {last}), seed by seed", ""]
    for a in arms:
        finals = [(r["seed"], e["accuracy"]) for r in by_arm[a] for e in r["evals"] if e["step"] == last]
        lines.append(f"- {a}: " + ", ".join(f"seed {seed} {accuracy:.2f}" for seed, accuracy in finals))
    start = statistics.mean(at(results, 0, "accuracy"))
    def above(a: str, b: str, key: str):
        return at_least(at(by_arm[a], last, key), at(by_arm[b], last, key), start=start if key == "accuracy" else None)

    lines += ["", "## Verdict (95% Welch interval over seeds, `rl/claims.py`)", ""]
    for a, b in ((REWARDED, FORCED), (USEFUL, FORCED), (USEFUL, REWARDED)):
        lines += [f"- {a} ends above {b} in held-out accuracy: {describe(above(a, b, 'accuracy'))}",
                  f"- ... in the share of greedy episodes that make a call: {describe(above(a, b, 'called'))}"]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "experiment-tool-reward"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "experiments"))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    command = "python scripts/experiment_tool_reward.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:] if a != "--report-only")
    if args.report_only:
        results = json.loads((out / "tool-reward.json").read_text())
    else:
        results = [run(arm, seed, args) for seed in args.seeds for arm in ARMS]
        out.mkdir(parents=True, exist_ok=True)
        (out / "tool-reward.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "tool-reward.md").write_text(report(results, command))
    print(out / "tool-reward.md")


if __name__ == "__main__":
    main()
