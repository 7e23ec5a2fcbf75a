"""Where an online step's scored batch comes from: prompts drawn, G completions of each sampled by the
engines (or episodes run with the environment), scored, tied groups resampled (2-GRPO+RS), and under
asynchronous rollout the next k batches already in flight.

    batch = rollouts.next_batch(step, total_steps, timer, publish)      a Sampled: B x G, scored
    rollouts.resample_ties(batch, step, timer)                          in place, bounded rounds
    rollouts.resume_point()                                             the sampler state a checkpoint keeps
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from rl.config import Recipe
from rl.data import PromptSampler
from rl.episodes import count_episode_failures
from rl.metrics import PhaseTimer
from rl.prepare import sampling
from rollout.types import Completion
from trainer import algorithms

# Tie resampling's seeds sit above every main rollout's (a step's seed is its step number).
RESAMPLE_SEED_OFFSET = 1_000_000_000


@dataclass
class Sampled:
    """One step's scored rollouts: ``completions`` N = B*G, prompt-major; ``rewards`` [B, G]."""

    indices: list[int]
    completions: list[Completion]
    rewards: torch.Tensor
    per_reward: dict[str, list[float]]
    failures: dict[str, int] = field(default_factory=dict)
    extra_rollouts: int = 0


def resample_seed(step: int, round_: int, max_rounds: int) -> int:
    """A distinct seed per (step, round) for ``round_`` in 1..max_rounds, never a main rollout's.

    >>> [resample_seed(s, r, 20) for s, r in ((1, 1), (1, 20), (2, 1))]
    [1000000022, 1000000041, 1000000043]
    """
    return RESAMPLE_SEED_OFFSET + step * (max_rounds + 1) + round_


class Rollouts:
    """The prompt sampler, the engines and the scorer of an online run, seen as a source of scored batches."""

    def __init__(self, recipe: Recipe, train_set, scorer, episodes, say: Callable[[str], None] = print):
        self.recipe, self.train_set, self.scorer, self.episodes, self.say = recipe, train_set, scorer, episodes, say
        self.sampler = PromptSampler(len(train_set), recipe.data.prompts_per_step, recipe.seed, recipe.data.shuffle)
        self.engines = None  # rl.workers.RolloutGroup, while the run's workers run
        self._prefetched: collections.deque = collections.deque()  # (sampler state, indices, pending rollout)

    def next_batch(self, step: int, total_steps: int, timer: PhaseTimer, publish: Optional[Callable] = None) -> Sampled:
        """Step ``step + 1``'s scored batch (B groups of G).

        Synchronous (``rollout.max_staleness`` 0): sampled now, by the current policy (an Arrow policy is
        first routed over the batch: ``publish(prompts)``). Asynchronous (k > 0): the batches of the next k
        steps are submitted too, so the engines sample them while this step trains; the policy pushed after
        this step reaches only batches submitted later. A batch is thus sampled by a policy at most k
        versions old.
        """
        k = self.recipe.rollout.max_staleness
        if k == 0:
            indices = self.sampler.next_batch()
            if publish is not None:
                with timer.phase("weight_sync"):
                    publish([self.train_set.prompt_token_ids[i] for i in indices])
            return self._score(indices, self._generate(indices, step + 1), timer)
        while len(self._prefetched) <= k and step + len(self._prefetched) < total_steps:
            state = self.sampler.state_dict()  # where a checkpoint must resume if this batch is not trained yet
            indices = self.sampler.next_batch()
            self._prefetched.append((state, indices, self._submit(indices, step + len(self._prefetched) + 1)))
        _, indices, pending = self._prefetched.popleft()
        return self._score(indices, self.engines.collect(pending), timer)

    def sample(self, indices: list[int], seed_step: int, timer: Optional[PhaseTimer] = None) -> Sampled:
        """G completions of each prompt at ``indices``, sampled now and scored."""
        return self._score(indices, self._generate(indices, seed_step), timer or PhaseTimer())

    def resample_ties(self, batch: Sampled, step: int, timer: PhaseTimer) -> None:
        """2-GRPO+RS: regenerate prompts whose whole group tied, for a bounded number of rounds (in place)."""
        G, rounds = self.recipe.algorithm.group_size, self.recipe.algorithm.max_resample_rounds
        for round_ in range(1, rounds + 1):
            tied = algorithms.tied_groups(batch.rewards).nonzero().flatten().tolist()
            if not tied:
                break
            again = self.sample([batch.indices[b] for b in tied], resample_seed(step, round_, rounds), timer)
            batch.extra_rollouts += len(again.completions)
            for kind, count in again.failures.items():  # the resampling rounds' failures count too
                batch.failures[kind] = batch.failures.get(kind, 0) + count
            for j, b in enumerate(tied):
                for g in range(G):
                    c = again.completions[j * G + g]
                    c.prompt_index = b
                    batch.completions[b * G + g] = c
                    for k in batch.per_reward:
                        batch.per_reward[k][b * G + g] = again.per_reward[k][j * G + g]
                batch.rewards[b] = again.rewards[j]

    def resume_point(self) -> dict:
        """The sampler state a checkpoint keeps: prefetched batches are not trained yet, so resume draws them again."""
        return self._prefetched[0][0] if self._prefetched else self.sampler.state_dict()

    def forget_prefetched(self) -> None:
        """Batches in flight died with the engines."""
        self._prefetched.clear()

    @property
    def in_flight(self) -> int:
        return len(self._prefetched)

    def _submit(self, indices: list[int], seed_step: int):
        prompts = [self.train_set.prompt_token_ids[i] for i in indices]
        return self.engines.submit_generate(prompts, sampling(self.recipe, seed_step, self.recipe.algorithm.group_size))

    def _generate(self, indices: list[int], seed_step: int) -> list[list[Completion]]:
        """G rollouts of each prompt at ``indices``, now: single completions, or episodes with the environment."""
        if self.episodes is None:
            return self.engines.collect(self._submit(indices, seed_step))
        prompts = [self.train_set.prompt_token_ids[i] for i in indices]
        spec = sampling(self.recipe, seed_step, self.recipe.algorithm.group_size)
        return self.episodes.run(self.engines, prompts, [self.train_set.rows[i] for i in indices], spec)

    def _score(self, indices: list[int], groups: list, timer: PhaseTimer) -> Sampled:
        flat = [c for g in groups for c in g]
        with timer.phase("reward"):
            result = self.train_set.score(self.scorer, [indices[c.prompt_index] for c in flat], [c.text for c in flat])
        failures = dict(result.failures)
        if self.episodes is not None:  # the environment's rewards; failed episodes score the fallback
            count_episode_failures(result, flat, self.recipe.rewards.fallback, failures, self.scorer.total_failures, self.say)
        rewards = torch.tensor(result.total, dtype=torch.float32).view(len(indices), self.recipe.algorithm.group_size)
        return Sampled(indices, flat, rewards, {k: list(v) for k, v in result.per_reward.items()}, failures)
