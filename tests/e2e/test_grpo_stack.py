"""GRPO through the real stack: Ray actors, a vLLM engine, a DeepSpeed engine.

One driver (and so one engine pair) is shared by the tests in this module.
"""

from __future__ import annotations

import pytest

from rl.config import load_recipe
from trainer.types import TrainBatch

pytestmark = pytest.mark.e2e

# vLLM and the trainer both run the model in float32; measured agreement is ~1e-6.
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def driver(tiny_model_root, ray_session, tmp_path_factory):
    from rl.online import OnlineRun as Trainer

    run_dir = tmp_path_factory.mktemp("grpo_stack")
    recipe = load_recipe(
        None,
        [
            f"model.path={tiny_model_root / 'model'}",
            f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
            f"data.test={tiny_model_root / 'data' / 'test.jsonl'}",
            "data.prompts_per_step=16",
            "data.max_test_examples=32",
            "algorithm.group_size=4",
            "algorithm.kl_coef=0.05",
            "rollout.max_new_tokens=6",
            "rollout.max_model_len=64",
            "trainer.lr=3e-3",
            "trainer.micro_batch_size=32",
            # length_penalty gives every group some reward variance, so the policy must move.
            "rewards.functions=[{fn: arithmetic_exact}, {fn: length_penalty, weight: 1.0}, "
            "{fn: tests/fixtures/flaky_reward.py:flaky, weight: 0.0}]",
            f"output_dir={run_dir}",
        ],
    )
    t = Trainer(recipe)
    t.start_workers()
    yield t
    t.stop_workers()


def _fixed_completions(driver, k=4):
    """The correct answer + EOS for the first k held-out prompts."""
    tok = driver.tokenizer
    prompts = driver.test_set.prompt_token_ids[:k]
    answers = [row["answer"] for row in driver.test_set.rows[:k]]
    completions = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers]
    return prompts, completions


def _trainer_logprobs(driver, prompts, completions):
    batch = TrainBatch(prompts, completions, [0.0] * len(prompts), [[] for _ in prompts], len(prompts), 0)
    return driver.trainer.compute_logprobs(batch)


def _max_abs_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_weight_push_changes_vllm_and_matches_trainer(driver):
    prompts, completions = _fixed_completions(driver)
    vllm_before = driver.rollout.score(prompts, completions)
    trainer_before = _trainer_logprobs(driver, prompts, completions)
    assert [len(r) for r in vllm_before] == [len(c) for c in completions]
    assert _max_abs_diff(vllm_before, trainer_before) < LOGPROB_TOL

    metrics = [driver.train_one_step() for _ in range(3)]

    vllm_after = driver.rollout.score(prompts, completions)
    trainer_after = _trainer_logprobs(driver, prompts, completions)
    assert _max_abs_diff(vllm_after, vllm_before) > 1e-3, "the weight push did not reach the engine"
    assert _max_abs_diff(vllm_after, trainer_after) < LOGPROB_TOL

    last = metrics[-1]
    assert last["policy_version"] == 3
    # The whole model travels: every parameter, float32.
    from transformers import AutoModelForCausalLM

    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(driver.paths.model).parameters())
    assert last["weight_sync_bytes"] == 4 * n_params
    # On-policy (one update per batch): the sampler's logprobs are the trainer's, up to float error.
    assert last["logprob_mismatch_max"] < LOGPROB_TOL
    for key in ("reward_mean", "reward_std", "accuracy", "kl", "clip_frac", "entropy", "response_length", "tokens_per_second",
                "time_generate", "time_reward", "time_train", "time_weight_sync", "grad_norm"):
        assert key in last and last[key] is not None, key
    assert last["kl"] > 0  # beta > 0 and the policy moved away from the reference
    assert last["params_in_memory"] == 2 * n_params  # a full-model policy with KL keeps a reference copy


def test_failing_reward_costs_samples_not_the_run(driver):
    m = driver.train_one_step()
    # The flaky plugin raises on prompts with a "7" and returns NaN on those with a "3": each such sample
    # is counted once, the run goes on, and the other rewards are still scored.
    assert m["reward_failures_exception"] + m["reward_failures_nan"] > 0 and m["updates_applied"] == 1
    assert driver.scorer.total_failures["exception"] + driver.scorer.total_failures["nan"] > 0
    # One batch, sample by sample: exactly the samples the plugin fails on are counted (isolated, not the
    # whole batch), and arithmetic_exact is the exact-match score on every sample, failing prompts included.
    indices = driver.rollouts.sampler.next_batch()
    sampled = driver.rollouts.sample(indices, seed_step=99)
    prompts = [driver.train_set.columns([indices[c.prompt_index]])["_prompt_text"][0] for c in sampled.completions]
    answers = [driver.train_set.rows[indices[c.prompt_index]]["answer"] for c in sampled.completions]
    assert sampled.failures.get("exception", 0) == sum("7" in p for p in prompts) > 0
    assert sampled.failures.get("nan", 0) == sum("3" in p and "7" not in p for p in prompts) > 0
    from rewards.builtin import arithmetic_exact

    assert sampled.per_reward["arithmetic_exact"] == arithmetic_exact(prompts, [c.text for c in sampled.completions], answer=answers)
    assert sampled.per_reward["tests/fixtures/flaky_reward.py:flaky"] == [0.0] * len(prompts)  # failures score the fallback


def test_seeded_sampling_of_more_prompt_tokens_than_one_engine_step_holds(driver):
    """64 prompts x G=4 of ~60 tokens are ~15k prefill tokens, over vLLM's 4096-token step budget: a
    prompt split over two steps with a seeded generator crashed the CPU engine (vLLM 0.32)."""
    from rollout.types import SamplingSpec

    held_out = driver.test_set.prompt_token_ids
    prompts = [(held_out[i % len(held_out)] * 20)[:56] for i in range(64)]
    groups = driver.rollout.generate(prompts, SamplingSpec(n=4, max_new_tokens=4, seed=123))
    assert [len(g) for g in groups] == [4] * 64
    again = driver.rollout.generate(prompts, SamplingSpec(n=4, max_new_tokens=4, seed=123))
    assert [[c.token_ids for c in g] for g in groups] == [[c.token_ids for c in g] for g in again]  # seeded: reproducible


def test_evaluate_greedy_is_deterministic(driver):
    a, b = driver.evaluate(), driver.evaluate()
    assert a["accuracy"] == b["accuracy"]
    assert a["num_examples"] == 32


def test_killed_rollout_actor_is_restarted_with_current_weights(driver):
    import ray

    driver.train_one_step()  # the engine now holds a trained policy version, not the initial one
    ray.kill(driver.rollout.workers[0], no_restart=False)  # Ray restarts it from the initial model
    m = driver.train_one_step()  # the interrupted generation is retried on the restarted actor
    assert m["rollout_restarts"] == 1
    prompts, completions = _fixed_completions(driver)
    # The restarted engine was given the current weights, not left on the initial ones.
    assert _max_abs_diff(driver.rollout.score(prompts, completions), _trainer_logprobs(driver, prompts, completions)) < LOGPROB_TOL
