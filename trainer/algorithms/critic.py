"""PPO's critic math: the outcome reward as per-token rewards, GAE, whitening and the clipped value loss.

Axes: N sequences, L response tokens (padded). ``mask`` [N, L] is 1 on the tokens the policy sampled
(a multi-turn episode's observation tokens are 0: the recursion steps over them, as if they were not
there). Positions where the mask is 0 come out as exactly 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.algorithms.losses import _check_same_shape, _divide, _masked, aggregate_loss, float_dtype, masked_mean
from trainer.algorithms.registry import register


def outcome_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """Each sequence's reward on its last sampled token: rewards [N], mask [N, L] -> [N, L].

    A sequence without sampled tokens gets nothing (its reward has no token to go to).

    >>> outcome_token_rewards(torch.tensor([1.0, 2.0]), torch.tensor([[1, 1, 0], [1, 0, 1]]))
    tensor([[0., 1., 0.],
            [0., 0., 2.]])
    """
    keep = mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(keep)
    last = torch.where(keep, positions, -1).amax(dim=-1)  # [N], -1 when empty
    out = torch.zeros(mask.shape, dtype=float_dtype(rewards), device=rewards.device)
    rows = torch.nonzero(last >= 0).flatten()
    out[rows, last[rows]] = rewards[rows].to(out.dtype)
    return out


def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation: rewards, values, mask [N, L] -> (advantages [N, L], returns [N, L]).

    GAE (Schulman et al. 2016, https://arxiv.org/abs/1506.02438, eq. 16), over the sampled tokens of
    each sequence in order, the value after the last one 0 (the episode ends):
    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``, and the
    critic's target ``R_t = A_t + V_t``. Tokens with mask 0 are skipped: the token after them is
    "next". ``gamma = 1, lam = 1`` gives the Monte-Carlo return minus V_t; ``lam = 0`` the one-step TD
    error. ``values`` are detached.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"need 0 <= gamma, lam <= 1, got gamma={gamma}, lam={lam}")
    keep = mask.bool()
    dtype = torch.promote_types(float_dtype(rewards), float_dtype(values))
    r, v = _masked(rewards, keep).to(dtype), _masked(values.detach(), keep).to(dtype)
    advantages = torch.zeros_like(v)
    next_value = torch.zeros_like(v[:, 0])  # [N]: V of the next sampled token (0 after the last)
    next_adv = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * lam * next_adv
        m = keep[:, t]
        advantages[:, t] = torch.where(m, adv_t, 0.0)
        next_value = torch.where(m, v[:, t], next_value)
        next_adv = torch.where(m, adv_t, next_adv)
    returns = torch.where(keep, advantages + v, 0.0)
    return advantages, returns


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(values - mean) / (std + eps) over the masked entries of the whole batch: [N, L] -> [N, L], 0 off the mask.

    PPO whitens its advantages per batch (the population std, as OpenRLHF and TRL do). All-equal
    entries give exactly 0.
    """
    _check_same_shape(values=values, mask=mask)
    keep = mask.bool()
    x = _masked(values, keep)
    count = keep.sum().to(x.dtype)
    mean = _divide(x.sum(), count)
    centered = torch.where(keep, x - mean, 0.0)
    var = _divide((centered ** 2).sum(), count)
    if bool(var == 0):
        return torch.zeros_like(x)
    return centered / (var.sqrt() + eps)


@register("value_loss", "clipped")
def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float | None = 0.2,
    aggregation: str = "token-mean",
    num_sequences: float | Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    max_response_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's value loss: values (with grad), old_values, returns, mask [N, L] -> (scalar, metrics).

    Per token ``0.5 * max((V - R)^2, (V_clip - R)^2)`` with ``V_clip = V_old + clip(V - V_old, -c, c)``
    (the value clipping of OpenAI's PPO2 baselines, which OpenRLHF and TRL keep), so one batch cannot
    move a value far from where the batch found it. ``clip=None``: plain ``0.5 * (V - R)^2``.
    Aggregated like the policy loss, with the whole batch's counts.

    Metrics (detached): "value_clip_frac", the share of tokens whose clipped term binds (their
    gradient is 0), and "value_error", the mean squared error (V - R)^2.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 (or None), got {clip}")
    keep = mask.bool()
    dtype = float_dtype(values)
    v, old, ret = values.to(dtype), old_values.detach().to(dtype), returns.detach().to(dtype)
    unclipped = (v - ret) ** 2
    if clip is None:
        per_token, held = 0.5 * unclipped, torch.zeros_like(keep)
    else:
        clipped = (old + (v - old).clamp(-clip, clip) - ret) ** 2
        per_token, held = 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped
    loss = aggregate_loss(per_token, keep, aggregation, num_sequences=num_sequences, num_tokens=num_tokens,
                          max_response_len=max_response_len)
    with torch.no_grad():
        metrics = {"value_clip_frac": masked_mean(held.to(dtype), keep), "value_error": masked_mean(unclipped, keep)}
    return loss, {k: m.detach() for k, m in metrics.items()}
