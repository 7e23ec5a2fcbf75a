"""Group-relative advantage estimators: rewards [B, G] -> advantages [B, G].

Axes: B prompts, G completions per prompt (group size). The trainer broadcasts each sequence's
advantage over its response tokens (outcome reward: every token of a completion shares one value).
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.algorithms.registry import register


def _as_float(rewards: Tensor) -> Tensor:
    """Int/bool rewards (e.g. 0/1 correctness) become float32; float dtypes are kept."""
    return rewards if rewards.is_floating_point() else rewards.float()


def tied_groups(rewards: Tensor, atol: float = 0.0) -> Tensor:
    """Which groups have all rewards equal (within ``atol``): rewards [B, G] -> bool [B].

    A tied group has zero advantage for every member, so it contributes no policy gradient. The
    driver can use this to resample tied pairs for 2-GRPO (an option of ours, not part of the
    2-GRPO paper's method).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got shape {tuple(rewards.shape)}")
    rewards = _as_float(rewards)
    spread = rewards.amax(dim=-1) - rewards.amin(dim=-1)  # [B]
    return spread <= atol


@register("advantage", "grpo")
def grpo_advantages(
    rewards: Tensor,
    *,
    normalize_std: bool = True,
    std_eps: float = 1e-6,
    unbiased_std: bool = True,
) -> Tensor:
    """GRPO outcome advantages: rewards [B, G] -> advantages [B, G].

    GRPO (DeepSeekMath, https://arxiv.org/abs/2402.03300, sec. 4.1.2):
    ``A_i = (r_i - mean(r)) / (std(r) + eps)`` within each prompt's group.
    With ``normalize_std=False`` this is Dr.GRPO (https://arxiv.org/abs/2503.20783), which drops
    the std division because it up-weights prompts that are almost always solved or almost always
    failed.

    Differences from the paper text: the paper does not say which std; ``unbiased_std=True``
    (divide by G-1, as ``torch.std``) is the common implementation choice, ``False`` divides by G.
    A group whose rewards are all equal gets exactly 0 for every G >= 2 (never NaN, even with
    ``std_eps=0``; and never a tiny nonzero from floating-point rounding of the mean).

    Raises ValueError if ``rewards`` is not 2-D or G < 2 (a lone sample has no group baseline).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"GRPO needs a group size G >= 2, got G={rewards.shape[1]}")
    rewards = _as_float(rewards)
    tied = tied_groups(rewards)[:, None]  # [B, 1]
    centered = rewards - rewards.mean(dim=-1, keepdim=True)  # [B, G]
    centered = torch.where(tied, torch.zeros_like(centered), centered)
    if not normalize_std:
        return centered
    std = rewards.std(dim=-1, keepdim=True, unbiased=unbiased_std)  # [B, 1]
    denom = torch.where(tied, torch.ones_like(std), std + std_eps)  # tied: 0 / 1 = 0, not 0 / 0
    return centered / denom


@register("advantage", "contrastive_pair")
def contrastive_pair_advantages(rewards: Tensor) -> Tensor:
    """2-GRPO advantages: rewards [B, 2] -> advantages [B, 2] in {-1, 0, +1}.

    2-GRPO ("It Takes Two: Your GRPO Is Secretly DPO", https://arxiv.org/abs/2510.00977) is GRPO
    with G = 2: each prompt's two rollouts form a contrastive pair, like DPO's chosen/rejected.
    Here the better completion of a discordant pair gets +1, the worse -1, and a tie 0 in both.

    Relation to ``grpo_advantages`` with G = 2: for rewards (a, b), a != b, the centered rewards
    are +-|a - b|/2. The unbiased std is |a - b|/sqrt(2), giving +-1/sqrt(2); the population std
    is |a - b|/2, giving +-1 (both ignoring eps). So the two differ only by a constant scale over
    the whole batch, which the learning rate absorbs. A tie gives 0/0 in GRPO, which must be (and
    here is) exactly 0. Unlike GRPO's eps-shifted denominator, the magnitude never depends on how
    far apart the two rewards are.

    Raises ValueError unless ``rewards.shape[-1] == 2``.
    """
    if rewards.dim() < 1 or rewards.shape[-1] != 2:
        raise ValueError(f"2-GRPO needs rewards [B, 2], got shape {tuple(rewards.shape)}")
    rewards = _as_float(rewards)
    sign = torch.sign(rewards[..., 0] - rewards[..., 1])  # [B]: +1 first better, -1 worse, 0 tie
    return torch.stack([sign, 0.0 - sign], dim=-1)  # [B, 2]; 0.0 - 0.0 avoids a -0.0 tie
