"""An experiment's arms on the embedded task: one recipe plus overrides each, trained per seed (or read back from
a finished run) into the curve its report and plots use. Shared by ``scripts/experiment_allocation.py`` and
``scripts/experiment_ppo_distill.py``."""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Arm:
    name: str
    recipe: str
    overrides: list[str] = field(default_factory=list)


def run_dir_of(arm: Arm, runs: str, seed: int) -> Path:
    return Path(runs) / f"{arm.name.replace(' ', '_').replace('+', 'p').replace('=', '')}-seed{seed}"


def run_arm(arm: Arm, args, seed: int, extra: dict[str, Callable[[list[dict]], float]] | None = None) -> dict:
    """Train one arm for one seed (or read its finished run; ``args.fresh`` retrains): its evaluations against
    cumulative rollouts and training seconds, a few per-step metrics averaged, and ``extra`` (name -> a function of
    the train rows). ``args``: ``runs``, ``steps``, ``prompts``, ``test_prompts``, ``eval_every``, ``k``, ``fresh``."""
    from rl.config import load_recipe
    from rl.metrics import read_metrics
    from rl.online import OnlineRun

    run_dir = run_dir_of(arm, args.runs, seed)
    summary = run_dir / "summary.json"
    if args.fresh or not (summary.exists() and json.loads(summary.read_text()).get("status") == "finished"):
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = [f"seed={seed}", f"output_dir={run_dir}", "logging.progress=false", f"steps={args.steps}",
                     f"data.max_train_examples={args.prompts}", f"data.max_test_examples={args.test_prompts}",
                     f"eval.every={args.eval_every}", f"eval.samples={args.k}", "checkpoint.save_final=false", *arm.overrides]
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
            "curve": curve, "run_dir": str(run_dir)}
