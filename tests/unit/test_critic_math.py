"""PPO's critic math and on-policy distillation's advantage, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from rl.config import RecipeError, load_recipe
from rl.token_advantages import ppo_targets
from rollout.types import Completion
from trainer import algorithms


def test_gae_hand_values_and_returns():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.8]])
    mask = torch.ones(1, 3)
    # gamma 1, lam 0.5: deltas [0.1, 0.2, 0.2]; A2 = 0.2, A1 = 0.2 + 0.5 * 0.2, A0 = 0.1 + 0.5 * 0.3
    adv, ret = algorithms.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.25, 0.3, 0.2]]))
    torch.testing.assert_close(ret, torch.tensor([[0.75, 0.9, 1.0]]))
    # gamma 0.9, lam 1: A_t = discounted return - V_t = [0.81, 0.9, 1.0] - values
    adv, ret = algorithms.gae_advantages(rewards, values, mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.31, 0.3, 0.2]]))
    torch.testing.assert_close(ret, torch.tensor([[0.81, 0.9, 1.0]]))
    # lam 0: the one-step TD error
    adv, _ = algorithms.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.1, 0.2, 0.2]]))


def test_gae_steps_over_masked_tokens_as_if_absent():
    """An observation token (mask 0) in the middle, holding junk, changes nothing of the sampled tokens' numbers."""
    rewards = torch.tensor([[0.0, 5.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 100.0, 0.6, 0.8]])
    mask = torch.tensor([[1, 0, 1, 1]])
    adv, ret = algorithms.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.25, 0.0, 0.3, 0.2]]))
    torch.testing.assert_close(ret, torch.tensor([[0.75, 0.0, 0.9, 1.0]]))


def test_outcome_reward_lands_on_the_last_sampled_token():
    out = algorithms.outcome_token_rewards(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))


def test_whiten_over_the_masked_entries_only():
    out = algorithms.whiten(torch.tensor([[1.0, 2.0], [3.0, 100.0]]), torch.tensor([[1, 1], [1, 0]]))
    s = (2.0 / 3.0) ** 0.5  # population std of 1, 2, 3
    torch.testing.assert_close(out, torch.tensor([[-1 / s, 0.0], [1 / s, 0.0]]), atol=1e-6, rtol=1e-6)
    assert torch.equal(algorithms.whiten(torch.ones(2, 2), torch.ones(2, 2)), torch.zeros(2, 2))


def test_clipped_value_loss_hand_values_and_gradient():
    values = torch.tensor([[1.0, 0.0, 0.6]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.0, 2.0]])
    loss, m = algorithms.clipped_value_loss(values, old, returns, torch.ones(1, 3), clip=0.2)
    # t0: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped binds); t1: max(0, (0.3-0)^2) = 0.09 (clipped binds);
    # t2: V - V_old = 0.1 is inside the clip: (0.6 - 2)^2 = 1.96 either way. 0.5 * token-mean:
    torch.testing.assert_close(loss, torch.tensor(0.5 * (1.69 + 0.09 + 1.96) / 3))
    loss.backward()
    # a binding clip has no gradient; t2: d/dV 0.5 (V - R)^2 / 3 = (0.6 - 2) / 3
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.0, -1.4 / 3]]))
    torch.testing.assert_close(m["value_clip_frac"], torch.tensor(2 / 3))
    plain, _ = algorithms.clipped_value_loss(values, old, returns, torch.ones(1, 3), clip=None)
    torch.testing.assert_close(plain, torch.tensor(0.5 * (1.0 + 0.0 + 1.96) / 3))


def test_reverse_kl_advantage_is_teacher_minus_student():
    student = torch.tensor([[-1.0, -2.0, -0.1], [-3.0, 0.0, 0.0]])
    teacher = torch.tensor([[-0.5, -3.0, -0.1], [-1.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = algorithms.get("token_advantage", "reverse_kl")(student, teacher, mask)
    torch.testing.assert_close(out, torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.0, 0.0]]))


def test_ppo_targets_whiten_gae_over_the_batch():
    rows = [Completion(prompt_index=0, prompt_token_ids=[1], token_ids=[5, 6], text="", logprobs=[-1.0, -1.0], finish_reason="stop"),
            Completion(prompt_index=1, prompt_token_ids=[1], token_ids=[7], text="", logprobs=[-1.0], finish_reason="stop")]
    adv, ret, metrics = ppo_targets([[0.0, 0.0], [0.5]], rows, [1.0, 0.0], gamma=1.0, lam=1.0)
    # GAE with lam 1: returns = rewards-to-go [1, 1], [0]; raw advantages [1, 1], [-0.5]; whitened over 3 tokens
    assert ret == [[1.0, 1.0], [0.0]]
    raw = torch.tensor([1.0, 1.0, -0.5])
    expect = ((raw - raw.mean()) / (raw.var(unbiased=False).sqrt() + 1e-8)).tolist()
    assert adv[0] == pytest.approx(expect[:2]) and adv[1] == pytest.approx(expect[2:])
    assert metrics["value_mean"] == pytest.approx(0.5 / 3) and metrics["return_mean"] == pytest.approx(2 / 3)


def test_ppo_and_teacher_config_errors():
    ok = load_recipe(None, ["algorithm.name=ppo", "algorithm.group_size=1", "critic.lr=1e-4"], check_paths=False)
    assert ok.algorithm.spec.critic and ok.critic.lr == 1e-4
    for overrides, words in [
        (["algorithm.name=grpo", "algorithm.group_size=1"], "group_size must be >= 2"),
        (["algorithm.name=ppo", "algorithm.group_size=0"], "group_size must be >= 1"),
        (["critic.lr=1e-4"], "critic section is read by algorithm.name=ppo"),
        (["algorithm.name=ppo", "trainer.zero_stage=3"], "zero_stage <= 2"),
        (["algorithm.name=ppo", "algorithm.tie_handling=resample"], "takes its baseline from the critic"),
        (["algorithm.name=ppo", "algorithm.kl_coef=0.1", "algorithm.kl_penalty=reward", "algorithm.kl_estimator=k1"],
         "kl_penalty=loss"),
        (["teacher.model=/x", "algorithm.name=ppo"], "teacher.model adds a per-token advantage"),
        (["teacher.model=/x", "algorithm.name=online_dpo", "algorithm.group_size=2"], "teacher.model adds"),
        (["teacher.kl_coef=0"], "teacher.kl_coef"),
    ]:
        with pytest.raises(RecipeError, match=words):
            load_recipe(None, overrides, check_paths=False)


def test_a_teacher_with_another_tokenizer_is_refused_naming_a_token(tmp_path):
    import json
    import shutil

    from rl.models import check_same_tokenizer
    from rl.tasks.shipped_model import shipped_build
    from rl.tasks.tiny_model import TinyModelSpec

    spec = TinyModelSpec()
    shipped = shipped_build("tiny", f"{spec.name}-{spec.hash12}") / "model"

    mine, theirs = tmp_path / "policy", tmp_path / "teacher"
    for d in (mine, theirs):
        d.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(shipped / name, d / name)
    check_same_tokenizer(str(theirs), str(mine), "teacher.model")  # same files: accepted
    tok = json.loads((theirs / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]
    (theirs / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(RecipeError, match=r"teacher.model.*another tokenizer.*2 tokens differ, e.g. '0'"):
        check_same_tokenizer(str(theirs), str(mine), "teacher.model")
