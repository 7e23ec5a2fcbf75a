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


def test_partial_rollouts_continue_under_the_new_policy_and_resume(tiny_model_root, ray_session, tmp_path):
    """Each engine call stops once B prompts are done; the unfinished generations are carried into the next call,
    after the weight push, so one rollout can hold tokens of two versions, each with the logprob of the version that
    sampled it. A checkpoint keeps the carried generations; resume continues them."""
    from rl.metrics import PhaseTimer
    from rl.online import OnlineRun as Trainer

    extra = ("steps=5", "rollout.max_staleness=1", "rollout.partial_rollouts=true", "rollout.partial_overdraw=1.0",
             "rollout.max_new_tokens=8", "algorithm.tis_cap=2.0")
    t = Trainer(_recipe(tiny_model_root, tmp_path / "run", *extra))
    t.start_workers()
    try:
        metrics = [t.train_one_step() for _ in range(3)]
        # k = 1: the engines do not run ahead, so fresh tokens are on-policy and carried ones one version old.
        assert all(m["rollout_staleness"] <= 1.0 and 0.0 <= m["partial_token_staleness"] <= 1.0 for m in metrics)
        assert metrics[0]["partial_mixed_versions_frac"] == 0.0  # nothing was carried into step 1
        assert max(m["partial_mixed_versions_frac"] for m in metrics[1:]) > 0.0
        assert all(m["partial_in_flight"] == 16 for m in metrics)  # 32 in flight per call, 16 trained
        path = t.save_checkpoint()
        carried = json.loads((tmp_path / "run" / "checkpoints" / "step_000003" / "driver_state.json").read_text())["partial_rollouts"]
        assert len(carried) == 16 and any(c["finish_reason"] == "" for e in carried for c in e["completions"])

        # One more batch, not trained: its tokens of the version the engines hold now score the same in the engine,
        # its carried tokens (sampled before the last push) do not.
        version = t._handle.version
        batch = t.rollouts.next_batch(t.step, t.total_steps, PhaseTimer(), policy_version=version)
        mixed = [c for c in batch.completions if len(set(c.versions())) > 1]
        assert mixed, "no rollout of this batch was continued across the push"
        scored = t.rollout.score([c.prompt_token_ids for c in mixed], [c.token_ids for c in mixed])
        now = [abs(a - b) for c, s in zip(mixed, scored) for a, b, v in zip(c.logprobs, s, c.versions()) if v == version]
        before = [abs(a - b) for c, s in zip(mixed, scored) for a, b, v in zip(c.logprobs, s, c.versions()) if v < version]
        assert now and max(now) < 1e-4
        assert before and max(before) > 1e-4
    finally:
        t.stop_workers()
    resumed = Trainer(_recipe(tiny_model_root, tmp_path / "run", *extra, f"resume={path}"))
    summary = resumed.fit()
    assert summary["steps"] == 5
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [4, 5]
    assert train[0]["partial_mixed_versions_frac"] > 0.0  # step 4 continued generations the checkpoint carried


def test_partial_rollouts_need_asynchronous_rollout():
    from rl.config import RecipeError

    with pytest.raises(RecipeError, match="max_staleness >= 1"):
        load_recipe(None, ["rollout.partial_rollouts=true"], check_paths=False)
    with pytest.raises(RecipeError, match="partial_overdraw is read only"):
        load_recipe(None, ["rollout.partial_overdraw=1.0"], check_paths=False)
