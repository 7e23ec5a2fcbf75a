"""Asynchronous rollout with a staleness bound: the engines sample the next batch while the
trainer updates, through real Ray actors, vLLM and DeepSpeed."""

from __future__ import annotations

import json

import pytest

from rl.config import load_recipe

pytestmark = pytest.mark.e2e


def _recipe(tiny_model_root, run_dir, *extra):
    return load_recipe(None, [
        f"model.path={tiny_model_root / 'model'}", f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
        f"data.test={tiny_model_root / 'data' / 'test.jsonl'}", "data.prompts_per_step=16", "algorithm.group_size=4",
        "data.max_test_examples=16", "rollout.max_new_tokens=6", "rollout.max_model_len=64", "trainer.lr=5e-3",
        "trainer.micro_batch_size=64", "logging.progress=false", "eval.before=false", "eval.after=false",
        f"output_dir={run_dir}", *extra,
    ])


def test_async_rollout_is_at_most_k_versions_stale_and_resumes_at_the_untrained_batch(tiny_model_root, ray_session, tmp_path):
    from rl.online import OnlineRun as Trainer

    t = Trainer(_recipe(tiny_model_root, tmp_path / "run", "steps=5", "rollout.max_staleness=1", "algorithm.tis_cap=2.0"))
    t.start_workers()
    try:
        metrics = [t.train_one_step() for _ in range(3)]
        # Step 1's batch comes from the initial policy (on-policy); each later one was sampled while the
        # previous step trained, by the policy one version older than the one it trains.
        assert [m["rollout_staleness"] for m in metrics] == [0.0, 1.0, 1.0]
        assert metrics[0]["logprob_mismatch"] < 1e-4  # same weights in vLLM and the trainer
        assert all(m["logprob_mismatch"] > 1e-4 for m in metrics[1:])  # stale by one update: measured, IS-corrected
        assert t.rollouts.in_flight == 1  # step 4's batch is in flight
        path = t.save_checkpoint()
    finally:
        t.stop_workers()
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_000003" / "driver_state.json").read_text())
    # The in-flight batch was drawn but never trained: the checkpoint resumes where it began.
    assert state["sampler"] == {"epoch": 0, "position": 3 * 16}
    summary = Trainer(_recipe(tiny_model_root, tmp_path / "run", "steps=5", "rollout.max_staleness=1", "algorithm.tis_cap=2.0",
                              f"resume={path}")).fit()
    assert summary["steps"] == 5
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [4, 5]


def test_async_rollout_with_a_lora_policy(tiny_model_root, ray_session, tmp_path):
    """vLLM reads a LoRA at its first use: versions a queued batch may still use stay on disk. With a tight
    sequence mask, the on-policy first batch keeps every sequence and the stale ones lose some."""
    from rl.online import OnlineRun as Trainer

    t = Trainer(_recipe(tiny_model_root, tmp_path / "lora", "steps=4", "rollout.max_staleness=1", "algorithm.tis_cap=2.0",
                        "adapter.kind=lora", "algorithm.sequence_mask=token_extremes", "algorithm.sequence_mask_low=0.999",
                        "algorithm.sequence_mask_high=1.001"))
    t.start_workers()
    try:
        metrics = [t.train_one_step() for _ in range(4)]
    finally:
        t.stop_workers()
    assert [m["rollout_staleness"] for m in metrics] == [0.0, 1.0, 1.0, 1.0]
    assert all(m["updates_applied"] == 1 for m in metrics)
    assert metrics[0]["sequences_masked_frac"] == 0.0  # vLLM served the trainer's weights: every ratio within 1e-3
    assert max(m["sequences_masked_frac"] for m in metrics[1:]) > 0.0  # one update stale: some sequences leave the loss


def test_arrow_policies_are_refused_with_async_rollout(tmp_path):
    from rl.config import RecipeError

    with pytest.raises(RecipeError, match="max_staleness"):
        load_recipe(None, ["rollout.max_staleness=1", "adapter.kind=arrow", "adapter.library=x", "adapter.experts=[a, b]"],
                    check_paths=False)
