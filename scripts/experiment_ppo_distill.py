"""PPO with a critic and on-policy distillation beside GRPO, at the same rollouts per step on the embedded task.

    .venv/bin/python scripts/experiment_ppo_distill.py                      # 7 arms x 3 seeds + a teacher (~55 min, 2 cores)
    .venv/bin/python scripts/experiment_ppo_distill.py --quick --out /tmp/x  # a few steps per arm (the test suite)

Protocol: every arm trains ``--steps`` steps on the same fixed ``--prompts`` training prompts, 32 prompts x 8
rollouts per step (PPO G=1: 256 prompts x 1), lr 2e-4 after 5 warm-up steps, clip 0.2, temperature 1, no KL
(recipes/ppo-arithmetic.yaml, recipes/distill-arithmetic.yaml). The distillation teacher is the embedded model
after the quickstart's GRPO (``--teacher-steps`` steps of recipes/quickstart.yaml, trained once and reused).
Held-out greedy accuracy, mean@k and pass@k every ``--eval-every`` steps. Runs go to ``--runs`` (a finished run is
reused; ``--fresh`` retrains). Writes ``<out>/ppo-distill.md``, ``ppo-distill.json`` and ``ppo-distill-curves.png``;
``--report-only`` rewrites them from the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from experiments.arms import (METRICS, Arm, add_arm_options, choose_arms, claim_lines, finished_or_run,  # noqa: E402
                              is_finished, seeds_line)
from rl.claims import mean_std  # noqa: E402
from rl.metrics import describe_machine, recorded_machine  # noqa: E402
from rl.plot import plot_arm_curves  # noqa: E402

GRPO = "GRPO G=8"
SMALL = " (small student)"  # the suffix of the arms whose student is SMALL_STUDENT, not the embedded model
# Half the embedded model's width and depth (0.08M parameters, the same character tokenizer),
# SFT-ed to the same 30% train-split accuracy: a student smaller than its teacher, as distillation is used.
SMALL_STUDENT = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)


def arms(teacher: str) -> list[Arm]:
    distill = "recipes/distill-arithmetic.yaml"
    return [
        Arm(GRPO, distill, ["teacher.model=null"]),
        Arm("PPO G=8", "recipes/ppo-arithmetic.yaml"),
        Arm("PPO G=1", "recipes/ppo-arithmetic.yaml", ["algorithm.group_size=1", "data.prompts_per_step=256"]),
        Arm("distill", distill, [f"teacher.model={teacher}", "teacher.reward_coef=0"]),
        Arm("distill + reward", distill, [f"teacher.model={teacher}", "teacher.reward_coef=1"]),
        Arm(GRPO + SMALL, distill, ["teacher.model=null"]),
        Arm("distill" + SMALL, distill, [f"teacher.model={teacher}", "teacher.reward_coef=0"]),
    ]


def small_student() -> tuple[str, int]:
    """The small student's model directory (built once, then cached) and its parameter count."""
    from rl.tasks.tiny_model import TinyModelSpec, build_tiny_model, load_build_info

    root = build_tiny_model(TinyModelSpec(**SMALL_STUDENT))
    return str(Path(root) / "model"), int(load_build_info(root)["num_parameters"])


def train_teacher(args) -> tuple[str, float]:
    """The teacher: the embedded model after the quickstart's GRPO (trained once, then reused); its checkpoint and
    held-out greedy accuracy."""
    from rl.config import load_recipe
    from rl.online import OnlineRun

    run_dir = Path(args.runs) / f"teacher-{args.teacher_steps}"
    summary = run_dir / "summary.json"
    if args.fresh or not is_finished(run_dir):
        OnlineRun(load_recipe("recipes/quickstart.yaml", [f"output_dir={run_dir}", "logging.progress=false",
                                                          f"steps={args.teacher_steps}", "eval.every=0"])).fit()
    state = json.loads(summary.read_text())
    return str(run_dir / "checkpoints" / f"step_{args.teacher_steps:06d}"), float(state["accuracy_after"])


def last_mean(key: str):
    """The mean of a train metric over the last quarter of the steps (None when the arm does not log it)."""
    def fn(rows: list[dict]) -> float | None:
        values = [r[key] for r in rows[-max(1, len(rows) // 4):] if key in r]
        return statistics.mean(values) if values else None
    return fn


def first_value(key: str):
    def fn(rows: list[dict]) -> float | None:
        return rows[0].get(key) if rows else None
    return fn


EXTRA = {"reverse_kl_first": first_value("teacher_reverse_kl"), "reverse_kl_last": last_mean("teacher_reverse_kl"),
         "value_explained_variance_last": last_mean("value_explained_variance")}


def report(results: list[dict], names: list[str], args, command: str, machine: str, teacher_accuracy: float,
           small_parameters: int | None = None) -> str:
    """``machine``: the one the results were measured on (recorded with them)."""
    k = args.k

    def of(name: str) -> list[dict]:
        return [r for r in results if r["arm"] == name]

    def start(small: bool) -> str:
        rs = [r for r in results if r["arm"].endswith(SMALL) == small]
        return ", ".join(f"{label.format(k=k)} {statistics.mean(r['curve'][0][key] for r in rs):.3f}" for key, label in METRICS)
    lines = [
        "# PPO with a critic and on-policy distillation, beside GRPO", "", f"Reproduce: `{command}`", "",
        f"Machine: {machine}; one vLLM rollout actor (and one teacher actor for distillation), one DeepSpeed "
        "rank (ZeRO-0), Ray.", "", "## Protocol", "",
        f"- Task: the embedded 2-digit addition model (1M parameters); a fixed set of {args.prompts} training prompts, "
        f"{args.steps} steps per arm; {args.test_prompts} held-out prompts evaluated every {args.eval_every} steps: greedy "
        f"accuracy, mean@{k} and pass@{k} ({k} samples per prompt at temperature 1).",
        "- 256 rollouts per step for every arm. GRPO G=8: 32 prompts x 8, group-normalized advantages. PPO G=8: the same "
        "32 x 8, advantages from the critic (GAE gamma 1, lambda 0.95, whitened per batch), critic lr 1e-3, value clip "
        "0.2. PPO G=1: 256 prompts x 1 (no group at all). distill: 32 x 8, each token's advantage log p_teacher - "
        "log p_student (reverse KL, reward not used); distill + reward: the same plus the GRPO advantage.",
        f"- The teacher: the embedded model after {args.teacher_steps} quickstart GRPO steps (recipes/quickstart.yaml), "
        f"held-out greedy accuracy {teacher_accuracy:.3f}. The student starts from the same embedded model, so "
        "distillation here recovers what RL taught the teacher; it costs one teacher forward per rollout.",
        "- Every arm: Adam, lr 2e-4 after 5 warm-up steps, clip 0.2, temperature 1, one optimizer step per batch, "
        "token-mean loss, no KL. Wall-clock: the sum of the training steps (evaluations excluded).",
        *([f"- *{SMALL.strip(' ()')}* arms: a student smaller than the teacher ({small_parameters / 1e6:.2f}M parameters: "
           "hidden 64, 2 layers, MLP 128, where the embedded model has 128, 4 and 512; the same tokenizer), SFT-ed to the "
           "same 30% on its training split, distilled from the same teacher or trained with GRPO G=8."]
          if small_parameters else []),
        "", f"## Results ({seeds_line(results, names)}; mean ± std of the final evaluation)", "",
        f"| arm | final greedy | final mean@{k} | final pass@{k} | rollouts | train s | reverse KL to the teacher, first -> last steps |",
        "|---|---|---|---|---|---|---|"]
    for name in names:
        rs = of(name)
        kl = [r for r in rs if r.get("reverse_kl_first") is not None]
        kl_cell = (f"{statistics.mean(r['reverse_kl_first'] for r in kl):.3f} -> {statistics.mean(r['reverse_kl_last'] for r in kl):.3f}"
                   if kl else "–")
        lines.append(f"| {name} | " + " | ".join(mean_std([r["curve"][-1][key] for r in rs]) for key, _ in METRICS)
                     + f" | {statistics.mean(r['rollouts'] for r in rs):,.0f} | {statistics.mean(r['train_seconds'] for r in rs):.0f}"
                     f" | {kl_cell} |")
    ppo = [r for r in results if r.get("value_explained_variance_last") is not None]
    lines += ["", f"Before training: {start(False)}." + (f" Small student: {start(True)}."
                                                           if any(n.endswith(SMALL) for n in names) else ""), ""]
    if ppo:
        lines.append("The critic's explained variance of the returns over the last quarter of the steps: " + ", ".join(
            f"{name} {statistics.mean(r['value_explained_variance_last'] for r in ppo if r['arm'] == name):.2f}"
            for name in names if any(r["arm"] == name for r in ppo)) + " (1: it predicts every return, 0: no better than the mean).")
        lines.append("")
    lines += ["![curves](ppo-distill-curves.png)", "", "## Verdicts at this scale", "",
              "From the 95% interval over seeds (Welch) of the difference of final values (A - B), never from the means "
              "alone (rl/claims.py).", ""]
    for a, b in (("PPO G=8", GRPO), ("PPO G=1", GRPO), ("distill", GRPO), ("distill + reward", GRPO),
                 ("distill" + SMALL, GRPO + SMALL)):
        if a in names and b in names:
            lines.append(f"- {a} reaches {b.replace(' G=8', '')} at the same rollouts (A = {a}, B = {b}):")
            lines += claim_lines(results, a, b, k)
    return "\n".join(lines) + "\n"


def protocol(args) -> dict:
    return {k: getattr(args, k) for k in ("seeds", "steps", "prompts", "test_prompts", "eval_every", "k", "teacher_steps")}


def kept_results(saved_path: Path, args, teacher_accuracy: float, chosen: list[Arm], small_parameters) -> tuple[list[dict], int | None]:
    """With ``--arms`` naming some arms, the other arms' results of the saved report, when it was made with the same
    protocol and teacher on this machine (so one report gathers arms run at different times); none otherwise."""
    if not args.arms or not saved_path.exists():
        return [], small_parameters
    saved = json.loads(saved_path.read_text())
    if (saved.get("protocol") != protocol(args) or saved["teacher_accuracy"] != teacher_accuracy
            or saved.get("machine") != describe_machine()):
        print(f"[ppo-distill] {saved_path}: another protocol, teacher or machine; its other arms are not kept", flush=True)
        return [], small_parameters
    ran = {a.name for a in chosen}
    return [r for r in saved["results"] if r["arm"] not in ran], small_parameters or saved.get("small_parameters")


def command_args(argv: list[str]) -> list[str]:
    """The command line that reproduces the report: without ``--report-only`` or ``--finished-only``, and without
    ``--arms`` (running every arm reproduces a report gathered from several runs; finished runs are reused)."""
    out, skipping = [], False
    for a in argv:
        if a.startswith("--"):
            skipping = a == "--arms"
        if not skipping and a not in ("--report-only", "--finished-only"):
            out.append(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arm_options(ap, steps=48, runs=ROOT / "runs" / "experiment-ppo-distill", out=ROOT / "docs" / "experiments",
                    quick_help="three arms, a few steps, one seed: checks the tables are produced")
    ap.add_argument("--teacher-steps", type=int, default=150)
    args = ap.parse_args()
    command = "python scripts/experiment_ppo_distill.py" + "".join(f" {a}" for a in command_args(sys.argv[1:]))
    if args.quick:
        args.seeds, args.steps, args.prompts, args.test_prompts, args.eval_every, args.k = args.seeds[:1], 2, 64, 16, 2, 2
        args.teacher_steps = 2
        args.arms = args.arms or [GRPO, "PPO G=8", "distill"]
    out = Path(args.out)
    if args.report_only:
        saved = json.loads((out / "ppo-distill.json").read_text())
        results, teacher_accuracy, small_parameters = saved["results"], saved["teacher_accuracy"], saved.get("small_parameters")
        machine = recorded_machine(saved)
        names = [n for n in (a.name for a in arms("")) if any(r["arm"] == n for r in results)]
    else:
        machine = describe_machine()  # recorded with the results: a re-render states it
        teacher, teacher_accuracy = train_teacher(args)
        chosen = choose_arms(arms(teacher), args.arms, ap)
        small_parameters = None
        if any(a.name.endswith(SMALL) for a in chosen):
            student, small_parameters = small_student()
            for a in chosen:
                if a.name.endswith(SMALL):
                    a.overrides.append(f"model.path={student}")
        results = finished_or_run(chosen, args, EXTRA)
        kept, small_parameters = kept_results(out / "ppo-distill.json", args, teacher_accuracy, chosen, small_parameters)
        results = kept + results
        names = [n for n in (a.name for a in arms("")) if any(r["arm"] == n for r in results)]
        out.mkdir(parents=True, exist_ok=True)
        (out / "ppo-distill.json").write_text(json.dumps({"teacher_accuracy": teacher_accuracy, "small_parameters": small_parameters,
                                                          "protocol": protocol(args), "machine": machine, "results": results},
                                                         indent=1))
    plot_arm_curves(results, names, [(key, f"held-out {label.format(k=args.k)}") for key, label in METRICS],
                    out / "ppo-distill-curves.png", "PPO and distillation beside GRPO at 256 rollouts per step (mean over seeds, "
                    "band: min-max)", dashed=lambda arm: arm.startswith("distill"))
    text = report(results, names, args, command, machine, teacher_accuracy, small_parameters)
    (out / "ppo-distill.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
