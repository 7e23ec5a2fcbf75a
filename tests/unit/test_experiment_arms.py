"""Every arm of the allocation experiment is a valid recipe, and on each task the arms spend the same rollout
budget per step (the comparison is at equal rollouts, bar 2-GRPO+RS's resampled ties, which the report counts)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from rl.config import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task, budget", [("embedded", 256), ("smollm2", 32)])
def test_allocation_arms_load_and_share_one_budget(task, budget):
    allocation = _script("experiment_allocation")
    arms = allocation.arms(task)
    assert len(arms) == 8 and len({a.name for a in arms}) == 8
    for arm in arms:
        r = load_recipe(str(ROOT / arm.recipe), arm.overrides, check_paths=False)
        a, b = r.algorithm, r.data.prompts_per_step
        spent = a.rollout_budget if a.allocation == "reinforce_ada" else b * a.group_size  # before resampled ties
        assert spent == budget, arm.name
        assert (a.unlikeliness_beta > 0) == arm.name.endswith("+ unlikely")
        if task == "smollm2":
            assert r.model.path == "builtin:smollm2-135m-instruct" and (a.clip_low, a.clip_high) == (0.2, 0.28)
