"""An experiment's arms on the embedded task: one recipe plus overrides each, trained per seed (or read back from
a finished run) into the curve its report and plots use, the command-line options every such experiment takes,
and the verdict lines of its report. Shared by ``scripts/experiment_allocation.py`` and
``scripts/experiment_ppo_distill.py``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]  # the repository root: results files record run directories under it relative to it
_ROOTS = (ROOT, Path(os.path.abspath(__file__)).parents[1])  # the same root, also as reached through a symbolic link

# The held-out metrics every arm is evaluated on: (curve key, report label with k).
METRICS = (("greedy", "greedy"), ("mean_at_k", "mean@{k}"), ("pass_at_k", "pass@{k}"))


@dataclass
class Arm:
    name: str
    recipe: str
    overrides: list[str] = field(default_factory=list)


def recorded_path(path: str | Path) -> str:
    """``path`` as a results file records it: relative to the repository root when it lies under it (the same string
    from any checkout, and no machine's folder layout in a committed file), else absolute. Symbolic links are not
    followed: ``runs/`` may be a link to another checkout's runs, and a run under it is still ``runs/...``."""
    path = Path(os.path.abspath(path))
    for root in _ROOTS:
        if path.is_relative_to(root):
            return str(path.relative_to(root))
    return str(path)


def resolved_path(recorded: str | Path) -> Path:
    """A path a results file records (``recorded_path``), as a path here: a relative one is under the repository root."""
    path = Path(recorded)
    return path if path.is_absolute() else ROOT / path


def run_dir_of(arm: Arm, runs: str, seed: int) -> Path:
    return Path(runs) / f"{arm.name.replace(' ', '_').replace('+', 'p').replace('=', '')}-seed{seed}"


def is_finished(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "finished"


def run_arm(arm: Arm, args, seed: int, extra: dict[str, Callable[[list[dict]], float]] | None = None) -> dict:
    """Train one arm for one seed (or read its finished run; ``args.fresh`` retrains): its evaluations against
    cumulative rollouts and training seconds, a few per-step metrics averaged, ``extra`` (name -> a function of
    the train rows) and the machine the run recorded. ``args``: ``runs``, ``steps``, ``prompts``, ``test_prompts``,
    ``eval_every``, ``k``, ``fresh``, ``overrides`` (for every arm, after the arm's own)."""
    from rl.config import load_recipe
    from rl.metrics import machine_of_run, read_metrics
    from rl.online import OnlineRun

    run_dir = run_dir_of(arm, args.runs, seed)
    if args.fresh or not is_finished(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = [f"seed={seed}", f"output_dir={run_dir}", "logging.progress=false", f"steps={args.steps}",
                     f"data.max_train_examples={args.prompts}", f"data.max_test_examples={args.test_prompts}",
                     f"eval.every={args.eval_every}", f"eval.samples={args.k}", "checkpoint.save_final=false", *arm.overrides,
                     *args.overrides]
        OnlineRun(load_recipe(arm.recipe, overrides)).fit()
    train, evals = read_metrics(run_dir, "train"), read_metrics(run_dir, "eval")
    cum, rollouts, seconds = {0: (0.0, 0.0)}, 0.0, 0.0
    for row in train:
        rollouts, seconds = rollouts + row["rollouts"], seconds + row["time_step"]
        cum[row["step"]] = (rollouts, seconds)
    curve = [{"step": e["step"], "rollouts": cum[e["step"]][0], "seconds": cum[e["step"]][1], "greedy": e["accuracy"],
              "mean_at_k": e[f"mean@{args.k}"], "pass_at_k": e[f"pass@{args.k}"]} for e in evals]
    signal = [1.0 - row["zero_variance_groups"] for row in train]
    return {"arm": arm.name, "seed": seed, "steps": len(train), "rollouts": rollouts, "train_seconds": seconds,
            "trained_sequences": sum(row["trained_sequences"] for row in train), "prompts_with_signal": statistics.mean(signal),
            "max_rollouts_per_prompt": max((row.get("rollouts_per_prompt_max", 0.0) for row in train), default=0.0) or None,
            **{name: fn(train) for name, fn in (extra or {}).items()},
            "curve": curve, "run_dir": recorded_path(run_dir), "machine": machine_of_run(run_dir)}


def add_arm_options(ap: argparse.ArgumentParser, steps: int, runs: Path, out: Path, quick_help: str) -> None:
    """The options of an arm experiment: seeds, protocol sizes, a subset of arms, --quick, --fresh, --report-only,
    where runs and the report go."""
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--prompts", type=int, default=512, help="the fixed set of training prompts every arm draws from")
    ap.add_argument("--test-prompts", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--arms", nargs="+", default=None, help="a subset of the arms (by name)")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--finished-only", action="store_true",
                    help="train nothing: report the (arm, seed) runs already finished in --runs, each arm with its own seeds")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--runs", default=str(runs))
    ap.add_argument("--out", default=str(out))
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides for every arm (use_ray=false: every arm in this process)")


def finished_or_run(chosen: Sequence[Arm], args, extra: dict | None = None) -> list[dict]:
    """Every chosen arm for every seed in ``args.seeds``, seed by seed (``run_arm``); with ``args.finished_only``
    only the runs already finished, none trained."""
    pairs = [(arm, seed) for seed in args.seeds for arm in chosen]
    if args.finished_only:
        pairs = [(arm, seed) for arm, seed in pairs if is_finished(run_dir_of(arm, args.runs, seed))]
    return [run_arm(arm, args, seed, extra) for arm, seed in pairs]


def seeds_line(results: list[dict], names: Sequence[str]) -> str:
    """The seeds a report's table is over: "3 seeds: 0, 1, 2", or each arm's own where they differ."""
    seeds = {name: sorted({r["seed"] for r in results if r["arm"] == name}) for name in names}
    if len({tuple(s) for s in seeds.values()}) == 1:
        (same,) = {tuple(s) for s in seeds.values()}
        return f"{len(same)} seeds: {', '.join(map(str, same))}"
    return "seeds per arm: " + "; ".join(f"{name} {', '.join(map(str, s))}" for name, s in seeds.items())


def choose_arms(arms: Sequence[Arm], names: Sequence[str] | None, ap: argparse.ArgumentParser) -> list[Arm]:
    """The arms ``--arms`` names (all when None), in their own order; an unknown name is a usage error."""
    chosen = [a for a in arms if names is None or a.name in names]
    if names and len(chosen) != len(names):
        ap.error(f"--arms: unknown arm in {list(names)}; the arms are {[a.name for a in arms]}")
    return chosen


def claim_lines(results: list[dict], a: str, b: str, k: int, keys=("greedy", "mean_at_k", "pass_at_k")) -> list[str]:
    """A report's verdict lines on "arm A reaches arm B", one per metric in ``keys`` (rl/claims.py: from the interval
    over seeds of the final values, with the share of B's gain over the start)."""
    from rl.claims import at_least, describe

    if not any(r["arm"] == a for r in results) or not any(r["arm"] == b for r in results):
        return ["  - not run"]
    lines = []
    for key, label in METRICS:
        if key not in keys:
            continue
        finals = {name: [r["curve"][-1][key] for r in results if r["arm"] == name] for name in (a, b)}
        start = statistics.mean(r["curve"][0][key] for r in results if r["arm"] in (a, b))  # their own start
        lines.append(f"  - {label.format(k=k)}: {describe(at_least(finals[a], finals[b], start=start))}")
    return lines
