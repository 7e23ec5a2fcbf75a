"""How many rollouts each prompt of a step gets (``algorithm.allocation``), and which of them train.

    counts = allocation.first_counts(indices, step)       rollouts per prompt of step ``step``'s first request (may be prefetched)
    allocation.complete(batch, step, rollouts, timer)     further rounds, in place: tied groups again, Reinforce-Ada
    rows, advantages = training_rows(batch, ...)          the rows the trainer gets and their advantages
    allocation.observe(batch, step)                       per-prompt history (Knapsack's success rates)

- ``fixed``: G each.
- ``resample_ties``: G each; groups whose rewards all tie are sampled again, up to ``max_resample_rounds``
  (2-GRPO+RS).
- ``reinforce_ada``: rounds of ``ada_round_size`` rollouts for every prompt still without signal
  (``ada_rule``), at most ``ada_max_rounds`` and ``rollout_budget``; each prompt then trains G rollouts of
  its pool (balanced successes and failures) against the pool's mean.
- ``knapsack``: B*G rollouts (or ``rollout_budget``) shared out by each prompt's success rate over its
  recent rollouts (``trainer.algorithms.knapsack_allocation``); the estimates are checkpointed. Asynchronous
  (``rollout.max_staleness`` k): step j's batch is submitted before step j - 1 has trained, so it is shared out
  from the outcomes of steps up to j - 1 - k only, whenever it is submitted: a resumed run allocates as the
  uninterrupted one did.

The math is in ``trainer.algorithms.allocation``; this module samples and keeps state.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from rl.config import Recipe
from rl.metrics import PhaseTimer
from trainer import algorithms

# Knapsack's success rate of a prompt: the mean over its most recent outcomes (at most WINDOW), trusted once it
# has MIN_HISTORY of them (Knapsack RL's released code: 16 and 8). Before that the prompt gets G.
KNAPSACK_WINDOW = 16
KNAPSACK_MIN_HISTORY = 8
# Seeds of extra rounds (tie resampling, Reinforce-Ada) sit above every main rollout's (a step's seed is its step number).
RESAMPLE_SEED_OFFSET = 1_000_000_000


def resample_seed(step: int, round_: int, max_rounds: int) -> int:
    """A distinct seed per (step, round) for ``round_`` in 1..max_rounds, never a main rollout's.

    >>> [resample_seed(s, r, 20) for s, r in ((1, 1), (1, 20), (2, 1))]
    [1000000022, 1000000041, 1000000043]
    """
    return RESAMPLE_SEED_OFFSET + step * (max_rounds + 1) + round_


class Allocation:
    """``fixed``: every prompt gets G rollouts and trains all of them."""

    name = "fixed"

    def __init__(self, recipe: Recipe):
        self.recipe, self.algo = recipe, recipe.algorithm
        self.group_size = recipe.algorithm.group_size

    @property
    def budget(self) -> int:
        """Rollouts one step may spend."""
        return self.algo.rollout_budget or self.recipe.data.prompts_per_step * self.group_size

    def first_counts(self, indices: list[int], step: int) -> list[int]:
        """Rollouts of each prompt at ``indices`` in the first request of step ``step`` (1-based)."""
        return [self.group_size] * len(indices)

    def complete(self, batch, step: int, rollouts, timer: PhaseTimer) -> None:
        """Further rounds of sampling for ``batch`` (a ``rl.rollouts.Sampled``), in place."""

    def observe(self, batch, step: int) -> None:
        """What the rewards of step ``step``'s batch teach about its prompts."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def metrics(self, batch) -> dict[str, float]:
        """What this allocation did in a step, for the step's metrics (fixed G: nothing beyond the run's own)."""
        return {}


class ResampleTies(Allocation):
    """``resample_ties`` (2-GRPO+RS): prompts whose whole group tied are sampled again, G at a time."""

    name = "resample_ties"

    def complete(self, batch, step: int, rollouts, timer: PhaseTimer) -> None:
        rounds = self.algo.max_resample_rounds
        for round_ in range(1, rounds + 1):
            tied = [b for b, g in enumerate(batch.groups) if g.tied]
            if not tied:
                break
            again = rollouts.sample([batch.indices[b] for b in tied], resample_seed(step, round_, rounds), timer)
            batch.absorb(again)
            for j, b in enumerate(tied):
                batch.groups[b] = again.groups[j]


class ReinforceAda(Allocation):
    """``reinforce_ada``: sample in rounds until each prompt has signal, then train a balanced subset of G."""

    name = "reinforce_ada"

    def metrics(self, batch) -> dict[str, float]:
        return allocation_metrics(batch, self.budget)

    @property
    def budget(self) -> int:
        return self.algo.rollout_budget or self.recipe.data.prompts_per_step * self.algo.ada_round_size * self.algo.ada_max_rounds

    def first_counts(self, indices: list[int], step: int) -> list[int]:
        return [self.algo.ada_round_size] * len(indices)

    def _done(self, group) -> bool:
        return algorithms.ada_done(torch.tensor(group.rewards), self.algo.ada_rule, self.group_size, self.algo.success_threshold)

    def complete(self, batch, step: int, rollouts, timer: PhaseTimer) -> None:
        M, rounds = self.algo.ada_round_size, self.algo.ada_max_rounds
        for round_ in range(1, rounds):  # round 0 is the first request
            active = [b for b, g in enumerate(batch.groups) if not self._done(g)]
            active = active[: max(0, self.budget - batch.sampled_rollouts) // M]  # the step's cap: whole rounds only
            if not active:
                break
            more = rollouts.sample([batch.indices[b] for b in active], resample_seed(step, round_, rounds), timer, counts=[M] * len(active))
            batch.absorb(more)
            for j, b in enumerate(active):
                batch.groups[b] = batch.groups[b].extended(more.groups[j])
        batch.trained = [algorithms.ada_training_subset(torch.tensor(g.rewards), self.group_size, self.algo.success_threshold)
                         for g in batch.groups]


class Knapsack(Allocation):
    """``knapsack``: each prompt's rollouts from its success rate over its recent rollouts (Knapsack RL)."""

    name = "knapsack"

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.lag = recipe.rollout.max_staleness  # step j is shared out from the outcomes of steps <= j - 1 - lag
        self.history: dict[int, list[tuple[int, int]]] = {}  # prompt index -> (step, outcome 1 success), oldest first

    def metrics(self, batch) -> dict[str, float]:
        return allocation_metrics(batch, self.budget)

    def estimate(self, index: int, step: int) -> Optional[float]:
        """Prompt ``index``'s success rate as step ``step`` sees it; None before it has enough history."""
        outcomes = [o for s, o in self.history.get(index, []) if s <= step - 1 - self.lag][-KNAPSACK_WINDOW:]
        return sum(outcomes) / len(outcomes) if len(outcomes) >= KNAPSACK_MIN_HISTORY else None

    def first_counts(self, indices: list[int], step: int) -> list[int]:
        a = self.algo
        return algorithms.knapsack_allocation([self.estimate(i, step) for i in indices], self.budget, a.knapsack_min,
                                              a.knapsack_max, default=self.group_size)

    def observe(self, batch, step: int) -> None:
        settled = step - self.lag  # every later step sees all outcomes up to here, and more
        for index, group in zip(batch.indices, batch.groups):
            entries = self.history.get(index, []) + [(step, int(r > self.algo.success_threshold)) for r in group.rewards]
            old = [e for e in entries if e[0] <= settled]
            self.history[index] = old[-KNAPSACK_WINDOW:] + [e for e in entries if e[0] > settled]

    def state_dict(self) -> dict:
        return {"history": {str(i): [list(e) for e in h] for i, h in sorted(self.history.items())}}

    def load_state_dict(self, state: dict) -> None:
        # A checkpoint written before outcomes carried their step holds bare outcomes: all of them settled.
        self.history = {int(i): [tuple(e) if isinstance(e, list) else (0, e) for e in h]
                        for i, h in state.get("history", {}).items()}


ALLOCATIONS: dict[str, type[Allocation]] = {cls.name: cls for cls in (Allocation, ResampleTies, ReinforceAda, Knapsack)}


def make_allocation(recipe: Recipe) -> Allocation:
    return ALLOCATIONS[recipe.algorithm.allocation](recipe)


def training_rows(batch, advantage_fn: Callable[[torch.Tensor], torch.Tensor], recipe: Recipe) -> tuple[list[int], list[float]]:
    """The rows of ``batch.completions`` the trainer gets and their advantages.

    Each group's rewards are first shaped (``algorithm.unlikeliness_beta``). Every rollout of a group trains
    unless the allocation chose a subset (Reinforce-Ada: its advantage is taken against the whole pool's
    mean). A uniform batch goes through the algorithm's own row selection (online DPO's discordant pairs).
    """
    a = recipe.algorithm
    if a.spec.critic:  # PPO: every rollout; its advantage comes per token from the critic (GAE), not from its group
        n = len(batch.completions)
        return list(range(n)), [0.0] * n
    groups = shaped_rewards(batch, a.unlikeliness_beta)
    if batch.trained is not None:
        rows, adv, start = [], [], 0
        for pool, subset in zip(groups, batch.trained):
            adv += algorithms.pool_baseline_advantages(pool[subset], pool, normalize_std=a.normalize_std, std_eps=a.std_eps).tolist()
            rows += [start + i for i in subset]
            start += pool.numel()
        return rows, adv
    sizes = {g.numel() for g in groups}
    if len(sizes) == 1:  # [B, G]: the algorithm picks its rows (every rollout, or online DPO's discordant pairs)
        return a.spec.select_rows(advantage_fn(torch.stack(groups)))
    return algorithms.all_rows(torch.cat(algorithms.grouped_apply(advantage_fn, groups)))


def shaped_rewards(batch, beta: float) -> list[torch.Tensor]:
    """Each group's rewards [m], after Rewarding the Unlikely's rank penalty when ``beta`` > 0 (ranked within the
    group by each rollout's mean token logprob under the policy that sampled it)."""
    groups = [torch.tensor(g.rewards, dtype=torch.float32) for g in batch.groups]
    if beta <= 0:
        return groups
    shape = algorithms.get("reward_shaping", "unlikeliness")
    logprobs = [torch.tensor([mean_logprob(c) for c in g.completions], dtype=torch.float32) for g in batch.groups]
    return [shape(r[None], lp[None], beta=beta)[0] for r, lp in zip(groups, logprobs)]  # ranks are within a group


def mean_logprob(completion) -> float:
    """A rollout's mean token logprob under its sampler (0 for an empty one). Multi-turn: the policy's tokens only."""
    lps = completion.logprobs
    if completion.loss_mask:
        lps = [lp for lp, m in zip(lps, completion.loss_mask) if m]
    return sum(lps) / len(lps) if lps else 0.0


def allocation_metrics(batch, budget: int) -> dict[str, float | list[float]]:
    """Rollouts per prompt (every prompt's count: a histogram in TensorBoard; and min / median / max), the share of
    prompts with signal (rewards not all equal), and the rollouts spent against the step's budget."""
    counts = sorted(len(g.completions) for g in batch.groups)
    signal = [not g.tied for g in batch.groups]
    return {
        "rollouts_per_prompt": [float(c) for c in counts],
        "rollouts_per_prompt_min": float(counts[0]),
        "rollouts_per_prompt_median": float(counts[len(counts) // 2]),
        "rollouts_per_prompt_max": float(counts[-1]),
        "prompts_with_signal": sum(signal) / len(signal),
        "rollout_budget_used": batch.sampled_rollouts / budget,
    }
