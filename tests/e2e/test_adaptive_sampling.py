"""Adaptive sampling on the real stack (Ray actors, vLLM, DeepSpeed): Knapsack RL (synchronous and asynchronous)
with the unlikeliness reward and Reinforce-Ada each train, allocate as they promise, and resume exactly, their state included."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

B = 8


def _recipe_for(tiny_model_root, *allocation):
    from rl.config import load_recipe

    def recipe(run_dir, *more):
        return load_recipe(None, [
            f"model.path={tiny_model_root / 'model'}", f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
            f"data.test={tiny_model_root / 'data' / 'test.jsonl'}", "data.max_train_examples=16", f"data.prompts_per_step={B}",
            "steps=4", "rollout.max_new_tokens=6", "rollout.max_model_len=64", "trainer.lr=2e-3", "trainer.micro_batch_size=256",
            "checkpoint.every=2", "eval.before=false", "eval.after=false", "logging.progress=false", f"output_dir={run_dir}",
            # Partial credit: the tiny test model gets ~2% of whole sums right, so exact match would leave every
            # prompt at success rate 0; a rollout succeeds with more than half of the digits right.
            "rewards.functions=[{fn: tests/e2e/plugins/partial_credit.py:digit_match}]", "algorithm.success_threshold=0.5",
            *allocation, *more])
    return recipe


def _assert_resumed_exactly(ref: dict, resumed: dict, keys: tuple[str, ...]) -> None:
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["reward_mean"] == pytest.approx(ref[step]["reward_mean"], abs=1e-6), step
        assert resumed[step]["loss"] == pytest.approx(ref[step]["loss"], abs=1e-5), step
        for key in keys:
            assert resumed[step][key] == ref[step][key], (step, key)


@pytest.mark.parametrize("max_staleness", [0, 1], ids=["sync", "async"])
def test_knapsack_with_unlikeliness_allocates_from_history_and_resumes_exactly(tiny_model_root, ray_session, cut_and_resume,
                                                                               max_staleness):
    # 16 prompts, 8 per step: steps 1-2 see each prompt once (8 rollouts: enough history). Asynchronous (one step
    # ahead): step j is shared out from steps <= j - 2, so step 3 knows the prompts of step 1 and step 4 all of them.
    recipe = _recipe_for(tiny_model_root, "algorithm.allocation=knapsack", "algorithm.group_size=8", "algorithm.knapsack_max=32",
                         "algorithm.unlikeliness_beta=0.25", f"rollout.max_staleness={max_staleness}")
    ref, resumed = cut_and_resume(recipe, cut=2)
    for step in (1, 2):  # no history yet: G each
        assert ref[step]["rollouts_per_prompt_min"] == ref[step]["rollouts_per_prompt_max"] == 8, ref[step]
    for step in (3, 4):
        m = ref[step]
        assert m["rollouts"] == B * 8 and m["rollout_budget_used"] == 1.0 and m["trained_sequences"] == B * 8  # all spent
        if step == 4 or not max_staleness:
            assert m["rollouts_per_prompt_min"] < m["rollouts_per_prompt_max"], m  # shared out by success rate
    if not max_staleness:  # without the restored success estimates step 3 would be uniform again
        _assert_resumed_exactly(ref, resumed, ("rollouts_per_prompt", "rollouts"))
        return
    # The resumed run submits steps 3 and 4 together, right after its restore: without the lag, step 3 would be shared
    # out from step 2's outcomes too. Its batches are sampled by the checkpointed policy, so only the allocation is the
    # same (docs/guide/recipes.md, asynchronous rollout).
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["rollouts_per_prompt"] == ref[step]["rollouts_per_prompt"], step


def test_reinforce_ada_samples_until_prompts_have_signal_and_resumes_exactly(tiny_model_root, ray_session, cut_and_resume):
    recipe = _recipe_for(tiny_model_root, "algorithm.allocation=reinforce_ada", "algorithm.group_size=4",
                         "algorithm.ada_round_size=4", "algorithm.ada_max_rounds=3", "algorithm.normalize_std=false")
    ref, resumed = cut_and_resume(recipe, cut=2)
    for step, m in ref.items():
        assert m["trained_sequences"] == B * 4, m  # a training group of G from every pool
        assert m["rollouts"] == B * 4 + m["resampled_rollouts"] and m["resampled_rollouts"] % 4 == 0
        assert m["rollout_budget_used"] <= 1.0
        # Pools only grow: a prompt with signal keeps it, and the rounds gave some more prompts signal.
        assert m["prompts_with_signal"] >= 1.0 - m["zero_variance_groups_sampled"]
    assert any(m["resampled_rollouts"] > 0 for m in ref.values())
    # Some prompts stopped after the first round, others went on.
    assert any(m["rollouts_per_prompt_min"] < m["rollouts_per_prompt_max"] for m in ref.values())
    assert any(m["prompts_with_signal"] > 1.0 - m["zero_variance_groups_sampled"] for m in ref.values())
    _assert_resumed_exactly(ref, resumed, ("rollouts", "rollouts_per_prompt_max"))
