"""Advantages per token, beside the group's per-sequence one: a distillation teacher's verdict on each
sampled token, and PPO's GAE from the critic's values. The driver calls these between sampling and the
update; the math is ``trainer.algorithms`` (``distillation``, ``critic``).

    teacher_token_advantages(teacher, rows, coef)     -> kl_coef * (log p_teacher - log p_policy) per token
    ppo_targets(values, rows, rewards, gamma, lam)    -> whitened GAE advantages and the critic's returns
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from rollout.types import Completion
from trainer import algorithms


def padded(rows: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows -> (values [N, L] right-padded with 0, mask [N, L])."""
    if not rows:
        return torch.zeros((0, 0), dtype=torch.float32), torch.zeros((0, 0), dtype=torch.bool)
    values = pad_sequence([torch.tensor(list(r), dtype=torch.float32) for r in rows], batch_first=True)  # [N, L]
    lengths = torch.tensor([len(r) for r in rows])  # [N]
    return values, torch.arange(values.shape[1]) < lengths[:, None]


def unpadded(values: torch.Tensor, rows: Sequence[Sequence]) -> list[list[float]]:
    """[N, L] -> each row's first len(rows[i]) entries."""
    return [values[i, : len(r)].tolist() for i, r in enumerate(rows)]


def trained_mask(rows: Sequence[Completion]) -> torch.Tensor:
    """[N, L] 1 on the tokens the policy sampled (a multi-turn episode's observations are 0)."""
    return padded([c.loss_mask or [1] * len(c.token_ids) for c in rows])[0].bool()


def teacher_token_advantages(teacher, rows: Sequence[Completion], kl_coef: float) -> tuple[list[list[float]], dict[str, float]]:
    """Each sampled token's ``kl_coef * (log p_teacher - log p_policy)``, per row, and the metrics.

    ``teacher`` scores the rows' exact token ids (its engines: ``RolloutGroup.score``); the policy's
    logprobs are those the rollout engine sampled with. ``teacher_reverse_kl`` is the mean per-token
    estimate of KL(policy || teacher) on the trained tokens: what distillation drives down.
    """
    teacher_lp = teacher.score([c.prompt_token_ids for c in rows], [c.token_ids for c in rows])
    for c, t in zip(rows, teacher_lp):
        if len(t) != len(c.token_ids):
            raise RuntimeError(f"the teacher scored {len(t)} tokens of a {len(c.token_ids)}-token response")
    student, _ = padded([c.logprobs for c in rows])
    teacher_t, _ = padded(teacher_lp)
    mask = trained_mask(rows)
    advantages = algorithms.get("token_advantage", "reverse_kl")(student, teacher_t, mask)  # [N, L]
    ntok = max(int(mask.sum()), 1)
    metrics = {"teacher_reverse_kl": float(-advantages.sum()) / ntok,
               "teacher_logprob": float(torch.where(mask, teacher_t, 0.0).sum()) / ntok}
    return unpadded(kl_coef * advantages, [c.token_ids for c in rows]), metrics


def ppo_targets(values: Sequence[Sequence[float]], rows: Sequence[Completion], rewards: Sequence[float], gamma: float,
                lam: float) -> tuple[list[list[float]], list[list[float]], dict[str, float]]:
    """PPO's per-token advantages (GAE, whitened over the whole batch's sampled tokens) and the critic's returns.

    ``values``: the critic's value of every response token, per row; ``rewards``: each row's reward, given on its
    last sampled token. Whitening here, over the whole batch, keeps it the same however the ranks split it.
    """
    v, _ = padded(values)
    mask = trained_mask(rows)
    token_rewards = algorithms.outcome_token_rewards(torch.tensor(list(rewards), dtype=torch.float32), mask)
    advantages, returns = algorithms.gae_advantages(token_rewards, v, mask, gamma=gamma, lam=lam)
    whitened = algorithms.whiten(advantages, mask)
    values_t, returns_t = v[mask], returns[mask]  # the sampled tokens, flat
    return_var = float(returns_t.var(unbiased=False)) if returns_t.numel() else 0.0
    metrics = {
        "value_mean": float(values_t.mean()) if values_t.numel() else 0.0,
        "return_mean": float(returns_t.mean()) if returns_t.numel() else 0.0,
        # 1 - Var(R - V) / Var(R): how much of the returns' spread the critic already explains (1 perfect, <= 0 none).
        "value_explained_variance": 1.0 - float((returns_t - values_t).var(unbiased=False)) / return_var if return_var > 0 else 0.0,
    }
    ids = [c.token_ids for c in rows]
    return unpadded(whitened, ids), unpadded(returns, ids), metrics
