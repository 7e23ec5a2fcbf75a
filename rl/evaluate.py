"""Evaluation on a held-out prompt set through the vLLM rollout workers.

``rl eval RECIPE [overrides] [--checkpoint CKPT]`` evaluates the recipe's policy on its held-out
set (``data.test``, or the ``test_fraction`` split of ``data.train``) with the recipe's template
and rewards, and reports accuracy (greedy, k=1) or mean@k and pass@k. With ``--checkpoint`` (a
checkpoint directory, or a run directory: its newest checkpoint) it evaluates exactly the policy
that run trained, served as the run served it: a full model's weights, or the base plus the
adapter (LoRA, sparse delta, Arrow routing over the held-out prompts). It builds only what
evaluation needs: no run, no trainer, nothing written into an adapter library.
The training run's before/after evaluations call the same ``evaluate_prompts``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from rl.config import Recipe, RecipeError
from rl.files import write_text_atomic
from rollout.types import SamplingSpec


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


def evaluate_prompts(rollout, prompt_set, scorer, accuracy_reward: str, sampling: SamplingSpec, episodes=None,
                     fallback: float = 0.0) -> dict[str, float]:
    """Sample ``sampling.n`` completions per held-out prompt (episodes, when ``episodes`` is the
    recipe's :class:`rl.episodes.EpisodeRunner`); score; summarize.

    A completion is correct when the accuracy reward is >= 0.5 (the built-in checks return 0/1; for
    a reward model that threshold means little: ``reward_mean`` is its mean score).
    Returns accuracy (= mean@k), pass@k for k = n, reward_mean (the weighted total), each reward's
    own mean (``reward/<key>``), num_examples, seconds.
    """
    t0 = time.perf_counter()
    if episodes is None:
        groups = rollout.generate(prompt_set.prompt_token_ids, sampling)
    else:
        groups = episodes.run(rollout, prompt_set.prompt_token_ids, prompt_set.rows, sampling)
    flat = [c for g in groups for c in g]
    result = prompt_set.score(scorer, [c.prompt_index for c in flat], [c.text for c in flat])
    if episodes is not None:
        from rl.episodes import apply_episode_outcomes, episode_metrics

        apply_episode_outcomes(result, flat, fallback)
    correct = [s >= 0.5 for s in result.per_reward[accuracy_reward]]
    n = sampling.n
    per_prompt = [sum(correct[i * n : (i + 1) * n]) for i in range(len(groups))]
    out = {
        "accuracy": sum(correct) / len(correct),
        "reward_mean": sum(result.total) / len(result.total),
        "num_examples": float(len(groups)),
        "samples_per_prompt": float(n),
        "seconds": time.perf_counter() - t0,
        **{f"reward/{key}": sum(v) / len(v) for key, v in result.per_reward.items()},
        **(episode_metrics(flat) if episodes is not None else {}),
    }
    if n > 1:
        out[f"pass@{n}"] = sum(pass_at_k(n, c, n) for c in per_prompt) / len(per_prompt)
        out[f"mean@{n}"] = out["accuracy"]
    return out


def resolve_checkpoint(path: str, recipe: Recipe) -> Path:
    """A complete checkpoint: ``path`` itself, or the newest complete one of the run directory ``path``."""
    from rl import checkpoint as ckpt

    p = Path(path)
    if not ckpt.is_complete(p):
        found = ckpt.complete_checkpoints(p)
        if not found:
            raise RecipeError(f"--checkpoint {p}: neither a complete checkpoint nor a run directory with one")
        p = found[-1]
    state = json.loads((p / ckpt.STATE_FILE).read_text())
    kind = "full" if recipe.adapter.kind == "none" else recipe.adapter.kind
    if state.get("policy_kind", kind) != kind:
        raise RecipeError(f"--checkpoint {p} holds a {state['policy_kind']} policy but the recipe's adapter.kind "
                          f"makes it {kind}: evaluate it with the recipe it was trained with")
    return p


def serve_policy(policy, rollout, prompts: list[list[int]], dtype: str, trust_remote_code: bool = False):
    """Put an adapter policy into the engines as a training run does: build it on this process's
    CPU over its base and publish it (an Arrow policy routed over ``prompts``). Returns the transport."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.weight_sync import get_transport
    from trainer.engine import DTYPES
    from trainer.policies import build_policy

    tokenizer = AutoTokenizer.from_pretrained(policy.base_model, trust_remote_code=trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model = AutoModelForCausalLM.from_pretrained(policy.base_model, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    transport = get_transport("shared_file")
    built = build_policy(policy, model, pad_id=pad_id)
    rollout.load_weights(built.publish(transport, 1, list(built.model.named_parameters()), prompts, pad_id))
    return transport


def run_eval(recipe: Recipe, k: int = 1, temperature: float | None = None, out_path: str | None = None,
             checkpoint: Optional[str] = None) -> dict:
    """Evaluate the recipe's policy (or the one in ``checkpoint``) on its held-out set (greedy when k == 1)."""
    import tempfile

    from rl.agents import make_episode_runner
    from rl.launch import Workers
    from rl.prepare import load_task, prepare_policy
    from rl.prepare import sampling as training_sampling
    from rl.resources import engine_spec

    task = load_task(recipe)
    start = str(resolve_checkpoint(checkpoint, recipe)) if checkpoint else None
    ro = recipe.rollout
    with tempfile.TemporaryDirectory(prefix="rl-eval-") as scratch:  # a merge-start recipe merges here
        policy = prepare_policy(recipe, task.paths.model, task.train_set, start_from=start, merge_into=Path(scratch) / "merge")
        workers, transport = Workers(recipe, engine=engine_spec(recipe, policy), scorer=task.scorer), None
        try:
            workers.setup()
            if policy.is_adapter:
                transport = serve_policy(policy, workers.rollout, task.test_set.prompt_token_ids, recipe.model.dtype,
                                         recipe.model.trust_remote_code)
            temp = temperature if temperature is not None else (0.0 if k == 1 else ro.temperature)
            if k == 1 and temp == 0:  # the training run's own held-out setting
                sampling = training_sampling(recipe, 0, 1, greedy=True)
            else:
                sampling = SamplingSpec(n=k, max_new_tokens=recipe.eval.max_new_tokens or ro.max_new_tokens, temperature=temp,
                                        top_p=1.0 if temp == 0 else ro.top_p, seed=recipe.seed)
            episodes = make_episode_runner(recipe, task.tokenizer)
            try:
                result = evaluate_prompts(workers.rollout, task.test_set, task.scorer, recipe.accuracy_reward, sampling, episodes,
                                          recipe.rewards.fallback)
            finally:
                if episodes is not None:
                    episodes.close()
        finally:
            workers.cleanup()
            if transport is not None:
                transport.close()
    result = {"model": task.paths.model, "policy": policy.kind, "checkpoint": start,
              "test": task.paths.test or f"{task.paths.train} (held-out split)", "temperature": temp, **result}
    print(json.dumps(result, indent=2))
    if out_path:
        write_text_atomic(out_path, json.dumps(result, indent=2))
    return result
