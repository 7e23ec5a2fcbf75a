"""The trainer's micro-batch loss reads every algorithm setting: KL placement (loss or reward) and the
importance-sampling level reach the math. No DeepSpeed: the forward passes are replaced by fixed
logprobs, so only ``PolicyTrainer._micro_batch_loss`` runs."""

from __future__ import annotations

import torch

from trainer import algorithms
from trainer.config import AlgorithmConfig
from trainer.policy_trainer import PolicyTrainer
from trainer.stats import Stats, reduce_stats

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # sequence 1: 2 tokens and padding
LOGPROBS = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
REF = torch.tensor([[-2.0, -1.5, -1.0], [-1.5, -1.0, 0.0]])  # k1 = lp - ref = [1, -0.5, 0.5], [0.5, 0]
ADV = torch.tensor([2.0, -1.0])
COUNTS = dict(num_sequences=2, num_tokens=5, max_response_len=3)


def loss_of(alg: AlgorithmConfig, old=None, rollout=LOGPROBS):
    """(loss, logprobs grad, reduced stats) of one micro-batch under ``alg``; vLLM sampled with ``rollout``."""
    lp = LOGPROBS.clone().requires_grad_(True)
    t = PolicyTrainer.__new__(PolicyTrainer)
    t.alg, t.engine = alg, None
    t._token_logprobs = lambda model, mb, with_entropy=False: (lp, torch.zeros_like(LOGPROBS))
    t._reference_logprobs = lambda mb: REF
    mb = {"response_mask": MASK, "advantages": ADV, "rollout_logprobs": rollout}
    if old is not None:
        mb["old_logprobs"] = old
    stats = Stats()
    loss = t._micro_batch_loss(mb, COUNTS, stats)
    loss.backward()
    return loss, lp.grad, reduce_stats([stats])


def test_default_is_the_plain_clipped_loss():
    loss, grad, stats = loss_of(AlgorithmConfig())
    lp = LOGPROBS.clone().requires_grad_(True)
    direct, _ = algorithms.clipped_policy_loss(lp, LOGPROBS, ADV, MASK, **COUNTS)
    direct.backward()
    assert torch.equal(loss, direct) and torch.equal(grad, lp.grad)
    assert "kl" not in stats


def test_kl_in_reward_shapes_the_advantages_not_the_loss():
    alg = AlgorithmConfig(kl_coef=0.1, kl_penalty="reward", kl_estimator="k1")
    loss, grad, stats = loss_of(alg)
    # on-policy: ratio 1, per-token loss -A_t, A_t = A - 0.1 * reward-to-go of k1
    # row 0: to-go of [1, -0.5, 0.5] = [1, 0, 0.5] -> A_t = [1.9, 2.0, 1.95]
    # row 1: to-go of [0.5, 0] = [0.5, 0] -> A_t = [-1.05, -1.0]
    # token-mean over 5 tokens: (-(1.9 + 2 + 1.95) + 1.05 + 1)/5 = -0.76, no KL term added
    torch.testing.assert_close(loss, torch.tensor(-0.76))
    torch.testing.assert_close(grad, torch.tensor([[-0.38, -0.4, -0.39], [0.21, 0.2, 0.0]]))  # -A_t / 5
    assert abs(stats["kl"] - 0.3) < 1e-6  # mean k1 over tokens: (1 - 0.5 + 0.5 + 0.5 + 0)/5
    assert abs(stats["loss"] - stats["pg_loss"]) < 1e-7


def test_kl_in_reward_uses_the_old_logprobs():
    old = LOGPROBS - 0.25  # k1 = old - ref, not logprobs - ref: every k1 falls by 0.25
    _, _, stats = loss_of(AlgorithmConfig(kl_coef=0.1, kl_penalty="reward", kl_estimator="k1"), old=old)
    assert abs(stats["kl"] - 0.05) < 1e-6  # 0.3 - 0.25


def test_kl_in_loss_is_unchanged():
    loss, _, stats = loss_of(AlgorithmConfig(kl_coef=0.1))
    # pg: (-3 * 2 + 2 * 1)/5 = -0.8; k3 of log-ratios [1, -0.5, 0.5], [0.5, 0]:
    # e^-1 - 1 + 1 = 0.367879, e^0.5 - 1.5 = 0.148721, e^-0.5 - 0.5 = 0.106531 (twice), 0
    # token-mean (0.367879 + 0.148721 + 2 * 0.106531)/5 = 0.145932; loss -0.8 + 0.1 * 0.145932
    torch.testing.assert_close(loss, torch.tensor(-0.8 + 0.0145932))
    assert abs(stats["kl"] - 0.145932) < 1e-5 and abs(stats["pg_loss"] + 0.8) < 1e-6


def test_importance_sampling_level_reaches_the_loss():
    old = LOGPROBS + torch.tensor([[0.1, -0.2, 0.4], [0.3, -0.5, 0.0]])  # off-policy: ratios differ from 1
    seq = AlgorithmConfig(importance_sampling_level="sequence", loss_aggregation="seq-mean-token-mean")
    loss, _, _ = loss_of(seq, old=old)
    direct, _ = algorithms.clipped_policy_loss(LOGPROBS, old, ADV, MASK, aggregation="seq-mean-token-mean",
                                               importance_sampling_level="sequence", **COUNTS)
    token, _, _ = loss_of(AlgorithmConfig(loss_aggregation="seq-mean-token-mean"), old=old)
    assert torch.equal(loss.detach(), direct) and not torch.allclose(loss, token)


def test_token_advantages_add_to_the_sequence_advantage():
    """A teacher's (or PPO's) per-token term reaches the loss: A_t = A + token_advantages_t."""
    lp = LOGPROBS.clone().requires_grad_(True)
    t = PolicyTrainer.__new__(PolicyTrainer)
    t.alg, t.engine = AlgorithmConfig(), None
    t._token_logprobs = lambda model, mb, with_entropy=False: (lp, torch.zeros_like(LOGPROBS))
    per_token = torch.tensor([[0.5, -1.0, 0.0], [1.0, 2.0, 9.0]])  # 9.0 sits on padding: never read
    mb = {"response_mask": MASK, "advantages": ADV, "rollout_logprobs": LOGPROBS, "token_advantages": per_token}
    loss = t._micro_batch_loss(mb, COUNTS, Stats())
    loss.backward()
    # on-policy: per-token loss -A_t; A_t = [2.5, 1, 2], [0, 1]; token-mean over 5: -(5.5 + 1)/5
    torch.testing.assert_close(loss, torch.tensor(-1.3))
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5, -0.2, -0.4], [0.0, -0.2, 0.0]]))


def test_a_sequence_sampled_far_off_policy_leaves_the_policy_loss():
    """vLLM gave row 1's tokens e^2 the trainer's probability (pi_old / pi_rollout = e^-2 = 0.14 < 0.5): the
    geometric-mean mask drops row 1; row 0 (ratio 1) trains as before, normalized by the same 5 tokens."""
    rollout = LOGPROBS + torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 0.0]])
    loss, grad, stats = loss_of(AlgorithmConfig(sequence_mask="geometric_mean"), rollout=rollout)
    torch.testing.assert_close(loss, torch.tensor(-1.2))  # -(3 x 2) / 5
    torch.testing.assert_close(grad, torch.tensor([[-0.4, -0.4, -0.4], [0.0, 0.0, 0.0]]))
    assert stats["sequences_masked_frac"] == 0.5
    kept, _, stats = loss_of(AlgorithmConfig(sequence_mask="geometric_mean", sequence_mask_low=0.1), rollout=rollout)
    torch.testing.assert_close(kept, torch.tensor(-0.8))  # the band holds 0.14: nothing dropped, the plain loss
    assert stats["sequences_masked_frac"] == 0.0
