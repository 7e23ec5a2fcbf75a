"""PPO with a critic and on-policy distillation on the real stack (Ray actors, vLLM, DeepSpeed).

PPO: the critic learns the returns and is checkpointed with the policy, so a resumed run is the uninterrupted
one, value loss included. Distillation: a teacher (another model with the same tokenizer) on its own vLLM actor
scores the student's samples exactly as the teacher model does, and training on its per-token verdict turns
the student into it."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.e2e

B = 8


def _recipe(tiny_model_root, run_dir, *more):
    from rl.config import load_recipe

    return load_recipe(None, [
        f"model.path={tiny_model_root / 'model'}", f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
        f"data.test={tiny_model_root / 'data' / 'test.jsonl'}", "data.max_train_examples=32", f"data.prompts_per_step={B}",
        "steps=4", "rollout.max_new_tokens=6", "rollout.max_model_len=64", "trainer.micro_batch_size=256",
        "eval.before=false", "eval.after=false", "logging.progress=false", f"output_dir={run_dir}",
        "rewards.functions=[{fn: tests/e2e/plugins/partial_credit.py:digit_match}]", *more])


def test_ppo_critic_learns_the_returns_and_resumes_exactly(tiny_model_root, ray_session, cut_and_resume):
    def recipe(run_dir, *more):
        return _recipe(tiny_model_root, run_dir, "algorithm.name=ppo", "algorithm.group_size=2", "trainer.lr=1e-3",
                       "critic.lr=3e-3", "algorithm.gae_lambda=1.0", "checkpoint.every=2", *more)

    ref, resumed = cut_and_resume(recipe, cut=2)
    for step, m in ref.items():
        assert m["trained_sequences"] == B * 2 and m["updates_applied"] == 1, m
        assert m["value_loss"] > 0 and 0 <= m["value_clip_frac"] <= 1, m
    # The critic starts near 0 and the returns are the partial-credit rewards (~0.3): its error must fall.
    assert ref[4]["value_error"] < 0.5 * ref[1]["value_error"], [ref[s]["value_error"] for s in ref]
    assert ref[4]["value_explained_variance"] > ref[1]["value_explained_variance"]
    # Without the critic's weights and optimizer in the checkpoint, steps 3-4 would differ in their values.
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("reward_mean", "value_mean", "value_loss", "loss"):
            assert resumed[step][key] == pytest.approx(ref[step][key], abs=1e-5), (step, key)


def _shifted_teacher(student_dir, out):
    """The student with its digit outputs relabelled: the teacher says d+1 (mod 10) wherever the student says d. The
    student can become it exactly, and its task reward falls as it does."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(student_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    digits = [vocab[str(d)] for d in range(10)]
    head = weights["lm_head.weight"].clone()
    for d in range(10):
        weights["lm_head.weight"][digits[(d + 1) % 10]] = head[digits[d]]
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_distillation_teacher_scores_as_the_teacher_model_and_pulls_the_student_to_it(tiny_model_root, ray_session, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from rl.online import OnlineRun
    from rl.prepare import sampling
    from trainer.algorithms import logprobs_from_logits

    teacher_dir = _shifted_teacher(tiny_model_root / "model", tmp_path / "teacher")
    run = OnlineRun(_recipe(tiny_model_root, tmp_path / "run", f"teacher.model={teacher_dir}", "trainer.lr=1e-3"))
    run.start_workers()
    try:
        # The teacher actor gives the teacher model's own logprobs (not the student's) for sampled tokens.
        prompts = run.test_set.prompt_token_ids[:4]
        responses = [g[0].token_ids for g in run.rollout.generate(prompts, sampling(run.recipe, 0, 1))]
        served = run.workers.teacher.score(prompts, responses)
        train = [run.train_one_step() for _ in range(4)]
    finally:
        run.stop_workers()
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    gap = 0.0
    for p, r, s in zip(prompts, responses, served):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            lp = logprobs_from_logits(model(ids).logits[:, :-1], ids[:, 1:])[0, len(p) - 1:]
        gap = max(gap, max(abs(a - b) for a, b in zip(lp.tolist(), s)))
    assert gap < 1e-3, gap

    kl = [m["teacher_reverse_kl"] for m in train]
    # Pure distillation (reward_coef 0): on its own samples the student becomes the teacher (measured: 1.20 nats per
    # token before the first update, 0.19-0.31 after), and so loses the task reward the teacher does not earn.
    assert max(kl[1:]) < 0.5 * kl[0], kl
    assert train[-1]["reward_mean"] < 0.5 * train[0]["reward_mean"], [m["reward_mean"] for m in train]
    assert all(m["time_token_advantage"] > 0 for m in train)
