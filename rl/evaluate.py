"""Evaluation on a held-out prompt set through the vLLM rollout workers.

``rl eval RECIPE [overrides]`` evaluates ``model.path`` (a checkpoint or the base model) on the
recipe's held-out set (``data.test``, or the ``test_fraction`` split of ``data.train``) with the
recipe's template and rewards, and reports accuracy (greedy, k=1) or mean@k and pass@k.
The training driver's before/after evaluations call the same ``evaluate_prompts``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rl.config import Recipe
from rl.types import SamplingSpec


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv:2107.03374.)
    >>> pass_at_k(4, 0, 2), pass_at_k(4, 4, 1), round(pass_at_k(4, 1, 2), 4)
    (0.0, 1.0, 0.5)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_prompts(rollout, prompt_set, scorer, accuracy_reward: str, sampling: SamplingSpec) -> dict[str, float]:
    """Sample ``sampling.n`` completions per held-out prompt; score; summarize.

    A completion is correct when the accuracy reward is >= 0.5 (the built-in checks return 0/1).
    Returns accuracy (= mean@k), pass@k for k = n, reward_mean, num_examples, seconds.
    """
    t0 = time.perf_counter()
    groups = rollout.generate(prompt_set.prompt_token_ids, sampling)
    flat = [c for g in groups for c in g]
    result = prompt_set.score(scorer, [c.prompt_index for c in flat], [c.text for c in flat])
    correct = [s >= 0.5 for s in result.per_reward[accuracy_reward]]
    n = sampling.n
    per_prompt = [sum(correct[i * n : (i + 1) * n]) for i in range(len(groups))]
    out = {
        "accuracy": sum(correct) / len(correct),
        "reward_mean": sum(result.total) / len(result.total),
        "num_examples": float(len(groups)),
        "samples_per_prompt": float(n),
        "seconds": time.perf_counter() - t0,
    }
    if n > 1:
        out[f"pass@{n}"] = sum(pass_at_k(n, c, n) for c in per_prompt) / len(per_prompt)
        out[f"mean@{n}"] = out["accuracy"]
    return out


def run_eval(recipe: Recipe, k: int = 1, temperature: float | None = None, out_path: str | None = None) -> dict:
    """Evaluate ``recipe.model.path`` on the recipe's held-out set (greedy when k == 1)."""
    from rl.driver import Trainer
    from rl.workers import RolloutGroup, init_ray

    run = Trainer(recipe)  # reuses the recipe checks, data and reward set-up
    ro = recipe.rollout
    if recipe.use_ray:
        init_ray(ro.num_actors * ro.num_cpus_per_actor)
    rollout = RolloutGroup.create(run.engine_spec(), ro.num_actors, recipe.use_ray, ro.num_cpus_per_actor, ro.num_gpus_per_actor)
    try:
        temp = temperature if temperature is not None else (0.0 if k == 1 else ro.temperature)
        sampling = SamplingSpec(n=k, max_new_tokens=recipe.eval.max_new_tokens or ro.max_new_tokens, temperature=temp,
                                top_p=1.0 if temp == 0 else ro.top_p, seed=recipe.seed)
        result = evaluate_prompts(rollout, run.test_set, run.scorer, recipe.accuracy_reward, sampling)
    finally:
        rollout.shutdown()
    result = {"model": run.paths.model, "test": run.paths.test or f"{run.paths.train} (held-out split)", "temperature": temp, **result}
    print(json.dumps(result, indent=2))
    if out_path:
        Path(out_path).write_text(json.dumps(result, indent=2))
    return result
