"""How many rollouts each prompt gets, and what a group's rewards become before the advantage: the pure math
of adaptive sampling. The driver that samples rounds and keeps per-prompt history is ``rl.allocation``.

Axes: B prompts; a prompt's *pool* holds every rollout collected for it this step (m of them), its
*training group* the n rows that are trained (Reinforce-Ada trains a subset of its pool; every other
allocation trains the whole pool). Rewards of a group are a 1-D tensor; a batch of groups is a list.

- Reinforce-Ada (Xiong et al. 2025, https://arxiv.org/abs/2510.04996): ``ada_done`` (when a prompt stops
  being sampled), ``ada_training_subset`` (which n of its pool are trained), ``pool_baseline_advantages``
  (the baseline is the mean over the whole pool, not the trained subset).
- Knapsack RL (Li et al. 2025, https://arxiv.org/abs/2509.25849): ``knapsack_value`` and
  ``knapsack_allocation`` (rollouts per prompt from estimated success rates, under a total budget).
- Rewarding the Unlikely (He, Fried, Welleck 2025, https://arxiv.org/abs/2506.02355):
  ``unlikeliness_rewards``, registered as the ``reward_shaping`` ``unlikeliness``.
"""

from __future__ import annotations

import heapq
from typing import Callable, Optional

import torch
from torch import Tensor

from trainer.algorithms.registry import register


def grouped_apply(fn: Callable[[Tensor], Tensor], groups: list[Tensor]) -> list[Tensor]:
    """Apply a [B, G] -> [B, G] group function to groups of different sizes: groups of one size are stacked
    and computed together, so a group-relative estimator gives exactly what it gives a uniform batch.

    >>> [g.tolist() for g in grouped_apply(lambda r: r - r.mean(-1, keepdim=True), [torch.tensor([1., 0.]), torch.tensor([1., 1., 4.])])]
    [[0.5, -0.5], [-1.0, -1.0, 2.0]]
    """
    out: list[Optional[Tensor]] = [None] * len(groups)
    by_size: dict[int, list[int]] = {}
    for b, g in enumerate(groups):
        by_size.setdefault(g.numel(), []).append(b)
    for members in by_size.values():
        result = fn(torch.stack([groups[b] for b in members]))  # [B_n, n]
        for row, b in zip(result, members):
            out[b] = row
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- Reinforce-Ada


def ada_done(rewards: Tensor, rule: str, group_size: int, threshold: float) -> bool:
    """Whether a prompt has the signal Reinforce-Ada samples for. rewards [m] (its pool so far).

    ``positive``: at least one success (reward > ``threshold``). ``balance``: at least n//2 successes and
    n - n//2 failures, n = ``group_size``, so a balanced training group of n can be formed.

    >>> ada_done(torch.tensor([0., 0., 1.]), "positive", 4, 0.5), ada_done(torch.tensor([0., 0., 1.]), "balance", 4, 0.5)
    (True, False)
    """
    successes = int((rewards > threshold).sum())
    if rule == "positive":
        return successes >= 1
    if rule == "balance":
        return successes >= group_size // 2 and rewards.numel() - successes >= group_size - group_size // 2
    raise ValueError(f"unknown Reinforce-Ada rule {rule!r} (positive, balance)")


def ada_training_subset(rewards: Tensor, group_size: int, threshold: float) -> list[int]:
    """Which of a pool's rollouts form its training group: rewards [m] -> up to n indices, in pool order.

    Half successes and half failures where the pool has them (n//2 successes, the rest failures), the
    other side filling in where one falls short; the earliest collected of each side (Reinforce-Ada's
    released code). A pool smaller than n is trained whole.

    >>> ada_training_subset(torch.tensor([0., 1., 0., 0., 1., 1.]), 4, 0.5)
    [0, 1, 2, 4]
    >>> ada_training_subset(torch.tensor([0., 0., 0., 1.]), 4, 0.5)
    [0, 1, 2, 3]
    """
    success = (rewards > threshold).tolist()
    pos = [i for i, s in enumerate(success) if s]
    neg = [i for i, s in enumerate(success) if not s]
    n = min(group_size, rewards.numel())
    take_pos = min(n // 2, len(pos))
    take_neg = min(n - take_pos, len(neg))
    take_pos = min(n - take_neg, len(pos))  # successes fill in where failures fall short
    return sorted(pos[:take_pos] + neg[:take_neg])


def pool_baseline_advantages(train: Tensor, pool: Tensor, *, normalize_std: bool = False, std_eps: float = 1e-6) -> Tensor:
    """Reinforce-Ada advantages: the trained rewards train [n] against the statistics of the whole pool [m].

    ``A_i = r_i - mean(pool)`` (the paper: no std division, since 1/(std + eps) explodes on nearly tied
    pools); with ``normalize_std`` divided by the pool's unbiased std + eps. A pool whose rewards all tie
    gives exactly 0 (as GRPO on a tied group).

    >>> pool_baseline_advantages(torch.tensor([1., 0.]), torch.tensor([1., 0., 0., 0.])).tolist()
    [0.75, -0.25]
    """
    train, pool = train.float(), pool.float()
    if pool.numel() == 0 or bool(pool.amax() == pool.amin()):
        return torch.zeros_like(train)
    centered = train - pool.mean()
    if not normalize_std or pool.numel() < 2:
        return centered
    return centered / (pool.std() + std_eps)


# ---------------------------------------------------------------------------------------------- Knapsack RL


def knapsack_value(n: Tensor, p: Tensor) -> Tensor:
    """Knapsack RL's value of giving a prompt of success rate p n rollouts (elementwise; n, p broadcast):
    the chance that the group is not all-equal (a nonzero GRPO gradient), 1 - p^n - (1-p)^n, times the
    paper's information gain of a prompt at success rate p, p (1-p)^2.

    >>> [round(v, 4) for v in knapsack_value(torch.tensor([2., 8.]), torch.tensor([0.5, 0.5])).tolist()]
    [0.0625, 0.124]
    """
    p = p.double()
    return ((1 - p.pow(n) - (1 - p).pow(n)) * p * (1 - p).pow(2)).to(torch.float64)


def knapsack_allocation(success: list[Optional[float]], budget: int, low: int, high: int, default: int) -> list[int]:
    """Rollouts per prompt: success [B] (estimated success rate, None for a prompt without history) -> counts [B].

    A prompt without history gets ``default``; a prompt always solved or never solved (p in {0, 1}) gets
    ``low`` (its group would tie; Knapsack RL's fixed small budget). The rest of ``budget`` goes to the
    prompts with 0 < p < 1, each between ``low`` and ``high``, maximizing the sum of ``knapsack_value``.
    The value is concave in n (its increment p^n (1-p) + (1-p)^n p shrinks as n grows), so giving each
    next rollout to the prompt whose value it raises most is the exact optimum of this knapsack (ties go
    to the earlier prompt). Budget those prompts cannot take (all at ``high``) goes to the never-solved
    prompts, then to the rest, round robin up to ``high`` (the paper's fallback gives the surplus to hard
    prompts too); budget beyond every prompt at ``high`` is left unused.

    Raises ValueError when the budget cannot give every prompt its minimum.

    >>> knapsack_allocation([0.5, 0.9, 1.0, None], budget=16, low=2, high=8, default=4)
    [8, 2, 2, 4]
    """
    counts = [default if p is None else low for p in success]
    if sum(counts) > budget:
        raise ValueError(f"a rollout budget of {budget} cannot give {len(success)} prompts their minimum "
                         f"({sum(counts)}: {low} each, {default} without history)")
    left = budget - sum(counts)
    learning = [b for b, p in enumerate(success) if p is not None and 0.0 < p < 1.0]

    def gain(b: int) -> float:  # what one more rollout adds to prompt b's value
        n, p = counts[b], torch.tensor(success[b])
        return float(knapsack_value(torch.tensor(n + 1.0), p) - knapsack_value(torch.tensor(float(n)), p))

    heap = [(-gain(b), b) for b in learning if counts[b] < high]
    heapq.heapify(heap)
    while left > 0 and heap:
        _, b = heapq.heappop(heap)
        counts[b] += 1
        left -= 1
        if counts[b] < high:
            heapq.heappush(heap, (-gain(b), b))
    for group in ([b for b, p in enumerate(success) if p == 0.0], list(range(len(success)))):
        while left > 0 and any(counts[b] < high for b in group):
            for b in group:
                if left > 0 and counts[b] < high:
                    counts[b] += 1
                    left -= 1
    return counts


# ---------------------------------------------------------------------------------------------- reward shaping


@register("reward_shaping", "unlikeliness")
def unlikeliness_rewards(rewards: Tensor, logprobs: Tensor, *, beta: float) -> Tensor:
    """Rewarding the Unlikely's rank penalty: rewards [B, G], logprobs [B, G] -> rewards [B, G].

    Within each group the rollouts are ranked by their likelihood under the sampling policy (``logprobs``:
    each rollout's mean token logprob), rank = how many rollouts of the group are less likely (0 = least
    likely), and each reward is scaled by ``1 - beta * rank / G``: a correct but unlikely rollout keeps its
    reward, the most likely loses the most, so GRPO no longer reinforces mostly what the policy already
    prefers. Applied before the advantage, so the group's mean and std are those of the shaped rewards (the
    authors' released code; beta 0.25 there). Incorrect rollouts (reward 0) stay 0 but hold their rank.

    Difference from the released code: equally likely rollouts (identical completions, in practice) share a
    rank here; the released code orders them arbitrarily, so copies of one answer got different rewards and
    their updates partly cancelled.

    >>> unlikeliness_rewards(torch.tensor([[1., 1., 0., 1.]]), torch.tensor([[-0.1, -2.0, -0.5, -1.0]]), beta=0.5).tolist()
    [[0.625, 1.0, 0.0, 0.875]]
    """
    if rewards.shape != logprobs.shape or rewards.dim() != 2:
        raise ValueError(f"rewards and logprobs must both be [B, G], got {tuple(rewards.shape)} and {tuple(logprobs.shape)}")
    G = rewards.shape[1]
    rank = (logprobs.unsqueeze(-2) < logprobs.unsqueeze(-1)).sum(dim=-1).to(torch.float32)  # [B, G]: rollouts less likely
    return rewards.float() * (1.0 - beta * rank / G)
