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


def _check_groups(rewards: Tensor, estimator: str = "", min_group: int = 1, why: str = "a lone sample has no group baseline") -> None:
    """rewards must be [B, G] with G >= ``min_group``; else a ValueError naming ``estimator``."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < min_group:
        raise ValueError(f"{estimator} needs a group size G >= {min_group} ({why}), got G={rewards.shape[1]}")


def tied_groups(rewards: Tensor, atol: float = 0.0) -> Tensor:
    """Which groups have all rewards equal (within ``atol``): rewards [B, G] -> bool [B].

    A tied group has zero advantage for every member, so it contributes no policy gradient. The
    driver can use this to resample tied pairs for 2-GRPO (an option of ours, not part of the
    2-GRPO paper's method).
    """
    _check_groups(rewards)
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
    _check_groups(rewards, "GRPO", 2)
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


@register("advantage", "rloo")
def rloo_advantages(rewards: Tensor) -> Tensor:
    """RLOO leave-one-out advantages: rewards [B, G] -> advantages [B, G].

    RLOO ("Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs", Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740): each
    completion's baseline is the mean reward of the *other* G - 1 completions of its prompt,
    ``A_i = r_i - mean_{j != i} r_j``, which equals ``G / (G - 1) * (r_i - mean(r))``: Dr.GRPO's
    centered rewards scaled by G / (G - 1), so the baseline does not depend on the sample it scores.
    No std division (``normalize_std`` and ``std_eps`` are not read, as for ``contrastive_pair``).
    The paper uses the REINFORCE estimator on whole sequences; here the advantage goes to whichever
    ``policy_loss`` the recipe names (the clipped surrogate is plain REINFORCE while every update is
    on-policy, ``trainer.mini_batches: 1``, where the ratio is 1 and never clipped). The paper's
    reward also carries a sequence-level KL penalty, the whole sequence's log-ratio for every
    token; here the KL is ``kl_penalty: loss`` or, per token, ``kl_penalty: reward`` (each token
    charged its reward-to-go only), both separate from this function.

    A group whose rewards are all equal gets exactly 0. Raises ValueError if ``rewards`` is not
    2-D or G < 2 (one sample has no other samples to be its baseline).
    """
    _check_groups(rewards, "RLOO", 2, "a leave-one-out baseline")
    G = rewards.shape[1]
    rewards = _as_float(rewards)
    others = (rewards.sum(dim=-1, keepdim=True) - rewards) / (G - 1)  # [B, G]: mean of the other G-1
    advantages = rewards - others
    return torch.where(tied_groups(rewards)[:, None], torch.zeros_like(advantages), advantages)


def _batch_normalized(values: Tensor, subtract_mean: bool, normalize_std: bool, std_eps: float,
                      unbiased_std: bool) -> Tensor:
    """(values - mean) / (std + eps) over every entry of ``values`` [B, G] together; exactly 0 when
    all entries are equal (0 / 0 is never computed)."""
    flat = values.flatten()  # [B*G]
    if flat.numel() == 0 or bool(flat.amax() == flat.amin()):
        return torch.zeros_like(values)
    centered = values - flat.mean() if subtract_mean else values
    if not normalize_std:
        return centered
    std = flat.std(unbiased=unbiased_std) if flat.numel() > 1 else flat.new_zeros(())
    return centered / (std + std_eps)


@register("advantage", "reinforce_pp")
def reinforce_pp_advantages(
    rewards: Tensor,
    *,
    normalize_std: bool = True,
    std_eps: float = 1e-6,
    unbiased_std: bool = True,
) -> Tensor:
    """REINFORCE++ advantages: rewards [B, G] -> advantages [B, G], normalized over the whole batch.

    REINFORCE++ (Hu et al., https://arxiv.org/abs/2501.03262): no per-prompt baseline; the
    advantages are normalized with the mean and std of the whole batch (all B*G samples),
    ``A = (r - mean_batch(r)) / (std_batch(r) + eps)``, rather than of each prompt's group as in
    GRPO, which the paper argues over-fits to easy prompts. Any G >= 1 works (the paper uses one
    completion per prompt). ``normalize_std=False`` keeps only the batch-mean subtraction.

    Differences from the paper: (1) the paper normalizes per-token returns over all tokens of the
    batch; here the outcome reward is normalized over sequences, before it is broadcast to tokens.
    (2) The paper puts the KL penalty in the reward before normalizing; with
    ``algorithm.kl_penalty: reward`` the trainer subtracts ``kl_coef * kl_reward_to_go`` from the
    already normalized advantage, so the KL part is not re-normalized. (3) The std convention is
    not stated in the paper: unbiased by default, as ``torch.std``.

    A batch whose rewards are all equal gets exactly 0 (never NaN). Raises ValueError if
    ``rewards`` is not 2-D.
    """
    _check_groups(rewards)
    return _batch_normalized(_as_float(rewards), True, normalize_std, std_eps, unbiased_std)


@register("advantage", "reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(
    rewards: Tensor,
    *,
    normalize_std: bool = True,
    std_eps: float = 1e-6,
    unbiased_std: bool = True,
) -> Tensor:
    """REINFORCE++-baseline advantages: rewards [B, G] -> advantages [B, G].

    The same paper's variant for G > 1 samples per prompt (https://arxiv.org/abs/2501.03262):
    subtract each group's mean reward first (the baseline), then divide by the std of those
    centered values over the whole batch, ``A_i = (r_i - mean_group(r)) / (std_batch + eps)``.
    Unlike GRPO the scale is one number for the batch, so a prompt whose rewards barely differ is
    not blown up to unit variance. The batch mean of group-centered values is 0 by construction,
    so it is not subtracted again (that would only add rounding noise to tied groups).

    Differences from the paper: normalization over sequences, not tokens; the std convention
    (unbiased by default) is ours. The paper pairs this variant with a k2 KL term in the loss
    (``kl_penalty: loss, kl_estimator: k2``); with ``kl_penalty: reward`` the trainer subtracts the
    per-token KL from the normalized advantage (not re-normalized), REINFORCE++'s own placement.

    A tied group gets exactly 0; so does a batch whose groups all tie. Raises ValueError if
    ``rewards`` is not 2-D or G < 2 (a lone sample has no group baseline).
    """
    _check_groups(rewards, "REINFORCE++-baseline", 2)
    centered = grpo_advantages(rewards, normalize_std=False)  # [B, G]; tied groups exactly 0
    return _batch_normalized(centered, False, normalize_std, std_eps, unbiased_std)
