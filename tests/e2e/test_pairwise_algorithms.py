"""2-GRPO with tie resampling and online DPO through the real stack (Ray, vLLM, DeepSpeed).

Both sample G=2 completions per prompt and rank them with the same contrastive advantages;
only the loss differs.
"""

from __future__ import annotations

import pytest

from rl.config import load_recipe

pytestmark = pytest.mark.e2e


def _driver(tiny_model_root, run_dir, extra):
    from rl.online import OnlineRun as Trainer

    recipe = load_recipe(None, [
        f"model.path={tiny_model_root / 'model'}",
        f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
        f"data.test={tiny_model_root / 'data' / 'test.jsonl'}",
        "data.prompts_per_step=32", "data.max_test_examples=16",
        "algorithm.group_size=2", "rollout.max_new_tokens=6", "rollout.max_model_len=64",
        "trainer.micro_batch_size=64", f"output_dir={run_dir}", *extra,
    ])
    t = Trainer(recipe)
    t.start_workers()
    return t


def test_two_grpo_resamples_tied_pairs(tiny_model_root, ray_session, tmp_path):
    t = _driver(tiny_model_root, tmp_path, [
        "algorithm.advantage=contrastive_pair", "algorithm.tie_handling=resample", "algorithm.max_resample_rounds=2",
        "trainer.lr=1e-3",
        # Partial credit per digit: the test model rarely gets a whole sum right, so under exact match nearly every
        # pair ties (both wrong) before and after resampling; per digit, a resampled pair can come apart.
        "rewards.functions=[{fn: tests/e2e/plugins/partial_credit.py:digit_match}]",
    ])
    try:
        steps = [t.train_one_step() for _ in range(2)]
    finally:
        t.stop_workers()
    for m in steps:
        # B=32 pairs of a weak model tie often (both wrong); the ties were regenerated.
        assert m["zero_variance_groups_sampled"] > 0
        assert m["resampled_rollouts"] > 0 and m["resampled_rollouts"] % 2 == 0
        assert m["rollouts"] == 64 + m["resampled_rollouts"]
        # Fewer ties remain than were sampled: resampled pairs were written back into the batch.
        assert m["zero_variance_groups"] < m["zero_variance_groups_sampled"]
        assert m["policy_version"] >= 1


def test_online_dpo_raises_chosen_over_rejected(tiny_model_root, ray_session, tmp_path):
    from trainer.types import TrainBatch

    t = _driver(tiny_model_root, tmp_path, [
        "algorithm.name=online_dpo", "algorithm.advantage=contrastive_pair", "algorithm.dpo_beta=0.1",
        # length_penalty makes almost every pair discordant, so there is something to train on.
        "rewards.functions=[{fn: arithmetic_exact}, {fn: length_penalty}]", "trainer.lr=1e-3",
    ])
    try:
        from trainer.algorithms import discordant_pair_rows

        sampled = t.rollouts.sample(t.rollouts.sampler.next_batch(), seed_step=1)
        keep, adv = discordant_pair_rows(t.advantages(sampled.reward_matrix()))
        pairs = [sampled.completions[i] for i in keep]
        assert pairs and len(pairs) % 2 == 0 and adv[0::2] == [1.0] * (len(pairs) // 2)
        batch = TrainBatch([c.prompt_token_ids for c in pairs], [c.token_ids for c in pairs], adv,
                           [c.logprobs for c in pairs], len(pairs), sum(len(c.token_ids) for c in pairs), unit=2)
        before = t.trainer.compute_logprobs(batch)
        stats = t.trainer.train_step(batch, 64)
        after = t.trainer.compute_logprobs(batch)
        delta = [sum(a) - sum(b) for a, b in zip(after, before)]  # per-sequence logprob change
        margin_gain = sum(delta[0::2]) - sum(delta[1::2])
        assert margin_gain > 0, "the DPO step did not move chosen above rejected"
        # The step scored the pairs before its update, with the policy still equal to the reference: every DPO
        # reward is 0, so every pair ties, and a tie counts 1/2. (Exact: one micro-batch, and the policy and its
        # reference copy compute the same float32 logprobs from the same weights.)
        assert stats["dpo_reward_accuracy"] == 0.5, stats
        # And the full step runs through the driver, pushing weights to vLLM.
        m = t.train_one_step()
        assert m["trained_sequences"] % 2 == 0 and m["trained_sequences"] > 0
        assert m["weight_sync_bytes"] > 0
    finally:
        t.stop_workers()
