"""Multi-turn episodes through the real stack (Ray actors, a vLLM engine, a DeepSpeed engine): a
scripted two-turn environment on the tiny model. Checks the token layout and loss mask of every
episode, that vLLM's sampler logprobs, vLLM's own scoring and the trainer agree on the policy's
tokens, before and after a weight push, and that the trainer never reads an observation token;
then that an episode too long for the engine costs only itself."""

from __future__ import annotations

import math

import pytest

from rl.config import load_recipe
from trainer.types import TrainBatch

pytestmark = pytest.mark.e2e

LOGPROB_TOL = 1e-4  # float32 in vLLM and the trainer; measured agreement is ~1e-6
OBSERVATION = " = "


def _recipe(tiny_model_root, tmp_path, *extra):
    return load_recipe(None, [
        f"model.path={tiny_model_root / 'model'}",
        f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
        f"data.test={tiny_model_root / 'data' / 'test.jsonl'}",
        "data.prompts_per_step=8", "data.max_test_examples=16", "algorithm.group_size=4",
        "rollout.max_new_tokens=6", "rollout.max_model_len=64", "trainer.lr=3e-3", "trainer.micro_batch_size=64",
        "rewards.functions=[{fn: arithmetic_exact}, {fn: length_penalty, weight: 1.0}]",
        f"output_dir={tmp_path}", *extra,
    ])


def _episode_checks(run, sampled):
    """Every episode: turn 1, the observation (mask 0, logprob 0.0), turn 2 (mask 1)."""
    obs = run.tokenizer(OBSERVATION, add_special_tokens=False)["input_ids"]
    for e in sampled.completions:
        assert not e.failure and e.num_turns == 2
        zeros = [j for j, m in enumerate(e.loss_mask) if m == 0]
        assert len(zeros) == len(obs) and zeros == list(range(zeros[0], zeros[0] + len(obs)))
        assert e.token_ids[zeros[0]: zeros[0] + len(obs)] == obs
        assert all(e.logprobs[j] == 0.0 for j in zeros)
        assert len(e.token_ids) == len(e.logprobs) == len(e.loss_mask)


def _policy_token_gaps(run, episodes):
    """Largest gaps on policy tokens: sampler vs vLLM scoring the whole episode, and trainer vs sampler."""
    prompts = [e.prompt_token_ids for e in episodes]
    scored = run.rollout.score(prompts, [e.token_ids for e in episodes])
    batch = TrainBatch(prompts, [e.token_ids for e in episodes], [0.0] * len(episodes), [e.logprobs for e in episodes],
                       len(episodes), 0, loss_mask=[e.loss_mask for e in episodes])
    trainer = run.trainer.compute_logprobs(batch)  # policy tokens only, in order
    engine_gap = trainer_gap = 0.0
    for e, vllm_row, trainer_row in zip(episodes, scored, trainer):
        sampled = [lp for lp, m in zip(e.logprobs, e.loss_mask) if m]
        engine = [lp for lp, m in zip(vllm_row, e.loss_mask) if m]
        assert len(trainer_row) == len(sampled)
        engine_gap = max([engine_gap, *(abs(a - b) for a, b in zip(sampled, engine))])
        trainer_gap = max([trainer_gap, *(abs(a - b) for a, b in zip(sampled, trainer_row))])
    return engine_gap, trainer_gap


def test_two_turn_episodes_train_on_policy_tokens_only(tiny_model_root, ray_session, tmp_path):
    from rl.online import OnlineRun

    recipe = _recipe(tiny_model_root, tmp_path, "environment.name=scripted", "environment.max_turns=2",
                     f"environment.options={{observation: '{OBSERVATION}', turns: 2}}")
    run = OnlineRun(recipe)
    run.start_workers()
    try:
        before = run.rollouts.sample(run.rollouts.sampler.next_batch(), seed_step=1)
        _episode_checks(run, before)
        engine_gap, trainer_gap = _policy_token_gaps(run, before.completions)
        assert engine_gap < LOGPROB_TOL and trainer_gap < LOGPROB_TOL

        steps = [run.train_one_step() for _ in range(2)]
        after = run.rollouts.sample(run.rollouts.sampler.next_batch(), seed_step=99)  # sampled by the pushed policy
        _episode_checks(run, after)
        engine_gap, trainer_gap = _policy_token_gaps(run, after.completions)
        ev, again = run.evaluate(), run.evaluate()
    finally:
        run.stop_workers()

    assert engine_gap < LOGPROB_TOL and trainer_gap < LOGPROB_TOL
    assert {c.policy_version for c in after.completions} == {2}
    for i, m in enumerate(steps, 1):
        assert m["turns_mean"] == 2.0 and m["observation_token_fraction"] > 0 and m["episode_failures"] == 0
        assert m["updates_applied"] >= 1 and math.isfinite(m["loss"]) and m["policy_version"] == i
        # Each step trains the policy it sampled with: were an observation token (rollout logprob
        # 0.0) read, this mismatch would be of the order of its logprob, not float noise.
        assert m["logprob_mismatch_max"] < LOGPROB_TOL
    # Greedy two-turn episodes of one policy: every held-out prompt counted once, the same answers twice.
    n = len(run.test_set)
    assert ev["turns_mean"] == 2.0 and ev["num_examples"] == n and abs(ev["accuracy"] * n - round(ev["accuracy"] * n)) < 1e-9
    assert again["accuracy"] == ev["accuracy"] and again["reward_mean"] == ev["reward_mean"]


def test_episode_past_max_model_len_scores_fallback_and_run_goes_on(tiny_model_root, ray_session, tmp_path):
    """An episode whose next turn cannot fit rollout.max_model_len is cut, scores the fallback and is counted."""
    from rl.online import OnlineRun

    recipe = _recipe(tiny_model_root, tmp_path, "environment.name=scripted", "environment.max_turns=3",
                     "environment.options={observation: '                                          ', turns: 3}",
                     "rewards.fallback=-1.0")
    run = OnlineRun(recipe)
    run.start_workers()
    try:
        m = run.train_one_step()
    finally:
        run.stop_workers()
    # 42 observation tokens: a second turn fits in 64 tokens of context, a third does not.
    assert m["episode_failures"] == recipe.rollouts_per_step and m["reward_failures_episode_too_long"] == recipe.rollouts_per_step
    assert m["reward_mean"] == -1.0 and run.scorer.total_failures["episode_too_long"] == recipe.rollouts_per_step
