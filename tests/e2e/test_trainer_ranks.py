"""Data-parallel DeepSpeed ranks as Ray actors: two ZeRO-2 ranks take the same update as one rank, PPO's critic
included, and with PPO the two ranks pack their rows into token-budget micro-batches (as many on each rank as the
rank that needs the most); two ZeRO-3 ranks, each holding a shard, publish and save the whole updated model
(gathered one parameter at a time). (That the loss is the same however a batch is split or packed is unit-tested.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import random_train_batch
from trainer.config import AlgorithmConfig, TrainerConfig

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("algorithm, stage", [("grpo", 2), ("ppo", 2), ("grpo", 3)])
def test_two_sharded_ranks_equal_one_rank(tiny_model_root, ray_session, tmp_path, algorithm, stage):
    from transformers import AutoTokenizer

    from rl.workers import TrainerGroup
    from rollout.weight_sync import get_transport
    from trainer.policies import PolicySpec
    from trainer.setup import TrainerSetup

    model = str(tiny_model_root / "model")
    tok = AutoTokenizer.from_pretrained(model)
    batch = random_train_batch(tok)
    alg = AlgorithmConfig(name=algorithm, group_size=4)
    if algorithm == "ppo":  # per-token advantages and critic targets, as the driver's ppo_targets gives them
        import random

        rng = random.Random(1)
        batch.token_advantages = [[rng.uniform(-1, 1) for _ in r] for r in batch.response_token_ids]
        batch.returns = [[rng.uniform(0, 1) for _ in r] for r in batch.response_token_ids]
        batch.old_values = [[0.0] * len(r) for r in batch.response_token_ids]
        batch.advantages = [0.0] * len(batch)
    published = []
    for ranks, zero, micro, budget in ((1, 0, 12, 0), (2, stage, 3, 24 if algorithm == "ppo" else 0)):
        setup = TrainerSetup(
            policy=PolicySpec(kind="full", base_model=model), dtype="float32", algorithm=alg, max_response_len=6, master_port=0,
            trainer=TrainerConfig(num_ranks=ranks, zero_stage=zero, lr=1e-2, micro_batch_size=micro, max_grad_norm=1e6,
                                  max_tokens_per_micro_batch=budget),
            transport=get_transport("shared_file"),
        )
        group = TrainerGroup.create(setup, ranks, use_ray=True, num_cpus=0.5)
        try:
            stats = group.train_step(batch, micro_batch_size=micro)
            handle = group.publish_weights()
            published.append((load_file(handle.location), stats))
            if zero == 3:  # a shard per rank: what is saved is the whole model, as published
                saved = load_file(next(Path(group.save_pretrained(str(tmp_path / "saved"))).glob("*.safetensors")))
        finally:
            group.close()
            group.shutdown()
    (one, s1), (two, s2) = published
    assert abs(s1["loss"] - s2["loss"]) < 1e-5
    # Counts every rank shares are counted once, token means are means over the whole batch.
    assert s1["updates_applied"] == s2["updates_applied"] == 1.0
    assert s1["tokens"] == s2["tokens"] == batch.num_tokens
    assert s1["entropy"] == pytest.approx(s2["entropy"], rel=1e-4)
    # The all-reduced gradient is the full-batch gradient: same norm however the batch was split.
    assert s1["grad_norm"] == pytest.approx(s2["grad_norm"], rel=1e-4)
    if algorithm == "ppo":  # the critic's loss is reduced across ranks like the policy's
        assert s1["value_loss"] == pytest.approx(s2["value_loss"], abs=1e-6) and s1["value_loss"] > 0
        assert s1["value_error"] == pytest.approx(s2["value_error"], rel=1e-5)
    base = load_file(next((tiny_model_root / "model").glob("*.safetensors")))
    moved = max((one[k] - base[k]).abs().max().item() for k in one if k in base)
    assert moved > 1e-4  # the update did something
    # Adam's first step is ~lr*sign(g): where |g| is at float-noise level its sign may differ, so
    # allow a few elements to differ by a fraction of lr; all others must agree closely.
    assert one.keys() == two.keys() and all(one[k].shape == two[k].shape for k in one)
    for k in one:
        diff = (one[k] - two[k]).abs()
        assert diff.max().item() <= 0.05 * 1e-2, k
        assert (diff > 1e-5).float().mean().item() < 1e-3, k
    if stage == 3:
        assert set(saved) == set(base) and all(saved[k].equal(two[k]) for k in saved)
        # Each rank holds its shard: about half of the model (a shard is padded to the ranks' common size).
        assert s2["params_in_memory"] <= 0.55 * s1["params_in_memory"], (s1["params_in_memory"], s2["params_in_memory"])
    else:
        assert s2["params_in_memory"] == s1["params_in_memory"]  # ZeRO-2 splits gradients and optimizer state only


def test_bf16_without_zero_trains_and_reports_its_clipped_norm(tiny_model_root, ray_session):
    """bf16 (or fp16) with ZeRO-0: DeepSpeed wraps the optimizer in its own mixed-precision one, which has
    no step hooks; the trainer then lets DeepSpeed clip and reads the norm from it."""
    from transformers import AutoTokenizer

    from rl.workers import TrainerGroup
    from trainer.policies import PolicySpec
    from trainer.setup import TrainerSetup

    model = str(tiny_model_root / "model")
    batch = random_train_batch(AutoTokenizer.from_pretrained(model))
    setup = TrainerSetup(
        policy=PolicySpec(kind="full", base_model=model), dtype="bfloat16", algorithm=AlgorithmConfig(group_size=4),
        max_response_len=6, master_port=0,
        trainer=TrainerConfig(num_ranks=1, zero_stage=0, lr=1e-2, micro_batch_size=12, max_grad_norm=1e-3),
    )
    group = TrainerGroup.create(setup, 1, use_ray=True, num_cpus=0.5)
    try:
        stats = group.train_step(batch, micro_batch_size=12)
    finally:
        group.close()
    assert stats["updates_applied"] == 1 and stats["grad_norm"] > 1e-3  # measured before clipping to 1e-3
