"""Where an online step's scored batch comes from: prompts drawn, their rollouts sampled by the engines
(or episodes run with the environment) and scored, and under asynchronous rollout the next k batches
already in flight. How many rollouts each prompt gets, and any further rounds, is the allocation's
(``rl.allocation``).

    batch = rollouts.next_batch(step, total_steps, timer, publish)      a Sampled: B groups, scored
    again = rollouts.sample(indices, seed_step, timer, counts)          more rollouts of some prompts, now
    rollouts.resume_point(), rollouts.carried_state()                   what a checkpoint keeps

With partial rollouts (``rollout.partial_rollouts``) more prompts are in flight than a step trains: each engine
call stops once B prompts have all their rollouts finished, and the unfinished ones are carried into the next
call, which continues them under the weights loaded by then.
"""

from __future__ import annotations

import collections
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, NamedTuple, Optional

import torch

from rl.allocation import Allocation
from rl.config import Recipe
from rl.data import PromptSampler
from rl.episodes import count_episode_failures
from rl.metrics import PhaseTimer
from rl.prepare import sampling
from rollout.types import Completion
from trainer import algorithms


@dataclass
class Group:
    """One prompt's scored rollouts: ``rewards`` (the total) and ``per_reward`` (each function) per completion."""

    completions: list[Completion]
    rewards: list[float]
    per_reward: dict[str, list[float]]

    @property
    def tied(self) -> bool:
        """All rewards equal: the group carries no group-relative signal (``trainer.algorithms.tied_groups``)."""
        return bool(algorithms.tied_groups(torch.tensor([self.rewards]))[0])

    def extended(self, more: "Group") -> "Group":
        return Group(self.completions + more.completions, self.rewards + more.rewards,
                     {k: v + more.per_reward[k] for k, v in self.per_reward.items()})


@dataclass
class Sampled:
    """One step's scored rollouts: a group per prompt at ``indices`` (B), prompt-major when flattened.

    ``trained``: per group, which of its rollouts train (None: all; Reinforce-Ada trains a subset of its pool).
    ``sampled_rollouts``: every rollout sampled for the step, those a resampling replaced included;
    ``extra_rollouts``: those sampled after the first request (resampled ties, later Reinforce-Ada rounds).
    """

    indices: list[int]
    groups: list[Group]
    failures: dict[str, int] = field(default_factory=dict)
    sampled_rollouts: int = 0
    extra_rollouts: int = 0
    trained: Optional[list[list[int]]] = None
    partial_metrics: dict[str, float] = field(default_factory=dict)  # partial rollouts: carried, restarted, token staleness

    @property
    def completions(self) -> list[Completion]:
        return [c for g in self.groups for c in g.completions]

    @property
    def rewards(self) -> torch.Tensor:
        """Every rollout's reward, flat [N]."""
        return torch.tensor([r for g in self.groups for r in g.rewards], dtype=torch.float32)

    @property
    def per_reward(self) -> dict[str, list[float]]:
        return {k: [v for g in self.groups for v in g.per_reward[k]] for k in self.groups[0].per_reward}

    @property
    def num_rollouts(self) -> int:
        return sum(len(g.completions) for g in self.groups)

    def reward_matrix(self) -> torch.Tensor:
        """Rewards [B, G] of a batch whose groups all have G rollouts."""
        sizes = {len(g.rewards) for g in self.groups}
        if len(sizes) != 1:
            raise ValueError(f"the groups have different sizes {sorted(sizes)}; there is no [B, G] matrix")
        return torch.tensor([g.rewards for g in self.groups], dtype=torch.float32)

    def tied_share(self) -> float:
        return sum(g.tied for g in self.groups) / len(self.groups)

    def absorb(self, more: "Sampled") -> None:
        """Count a further round's rollouts and failures as this step's (its groups are placed by the caller)."""
        self.extra_rollouts += more.num_rollouts
        self.sampled_rollouts += more.num_rollouts
        for kind, count in more.failures.items():
            self.failures[kind] = self.failures.get(kind, 0) + count


@dataclass
class InFlight:
    """A prompt whose rollouts are generated across engine calls (partial rollouts): ``index`` is its row in the
    training set, ``completions`` its G rollouts so far (``finish_reason`` "" while unfinished)."""

    index: int
    seed: Optional[int]  # None: unseeded sampling (rollout.seed_per_prompt: false)
    completions: list[Completion]

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.completions)

    def oldest_version(self) -> Optional[int]:
        versions = [v for c in self.completions for v in c.versions()]
        return min(versions) if versions else None

    def restarted(self) -> "InFlight":
        return InFlight(self.index, self.seed, [_fresh(c.prompt_token_ids) for c in self.completions])

    def to_dict(self) -> dict:
        return {"index": self.index, "seed": self.seed, "completions": [asdict(c) for c in self.completions]}

    @classmethod
    def from_dict(cls, d: dict) -> "InFlight":
        return cls(int(d["index"]), d["seed"], [Completion(**c) for c in d["completions"]])


class _PartialCall(NamedTuple):
    """An engine call of partial rollouts in flight: the sampler state before it drew its new prompts, its prompts,
    the pending call, and its carried prompts as they were when it took them (for a checkpoint)."""

    sampler_state: dict
    entries: list[InFlight]
    pending: Any
    taken: list[dict]


def _fresh(prompt_token_ids: list[int]) -> Completion:
    return Completion(prompt_index=0, prompt_token_ids=list(prompt_token_ids), token_ids=[], text="", logprobs=[], finish_reason="")


class Rollouts:
    """The prompt sampler, the engines and the scorer of an online run, seen as a source of scored batches."""

    def __init__(self, recipe: Recipe, train_set, scorer, episodes, allocation: Allocation, say: Callable[[str], None] = print):
        self.recipe, self.train_set, self.scorer, self.episodes, self.say = recipe, train_set, scorer, episodes, say
        self.allocation = allocation
        self.sampler = PromptSampler(len(train_set), recipe.data.prompts_per_step, recipe.seed, recipe.data.shuffle)
        self.engines = None  # rl.workers.RolloutGroup, while the run's workers run
        self._prefetched: collections.deque = collections.deque()  # (sampler state, indices, pending rollout)
        self._carried: list[InFlight] = []  # partial rollouts: unfinished prompts between engine calls, oldest first
        self._restarted = 0  # partial rollouts restarted since the last batch (they would have grown too stale)

    def next_batch(self, step: int, total_steps: int, timer: PhaseTimer, publish: Optional[Callable] = None,
                   policy_version: int = 0) -> Sampled:
        """Step ``step + 1``'s scored batch: B prompts, each with the rollouts the allocation gives it first.

        Synchronous (``rollout.max_staleness`` 0): sampled now, by the current policy (an Arrow policy is
        first routed over the batch: ``publish(prompts)``). Asynchronous (k > 0): the batches of the next k
        steps are submitted too, so the engines sample them while this step trains; the policy pushed after
        this step reaches only batches submitted later. A batch is thus sampled by a policy at most k
        versions old. ``policy_version``: the version this step trains (partial rollouts bound every token by it).
        """
        k = self.recipe.rollout.max_staleness
        if self.recipe.rollout.partial_rollouts:
            return self._next_partial_batch(step, total_steps, timer, policy_version)
        if k == 0:
            indices = self.sampler.next_batch()
            if publish is not None:
                with timer.phase("weight_sync"):
                    publish([self.train_set.prompt_token_ids[i] for i in indices])
            counts = self.allocation.first_counts(indices, step + 1)
            return self._score(indices, self._generate(indices, step + 1, counts), timer)
        while len(self._prefetched) <= k and step + len(self._prefetched) < total_steps:
            state = self.sampler.state_dict()  # where a checkpoint must resume if this batch is not trained yet
            indices, batch_step = self.sampler.next_batch(), step + len(self._prefetched) + 1
            counts = self.allocation.first_counts(indices, batch_step)
            self._prefetched.append((state, indices, self._submit(indices, batch_step, counts)))
        _, indices, pending = self._prefetched.popleft()
        return self._score(indices, self._collect(pending), timer)

    def sample(self, indices: list[int], seed_step: int, timer: Optional[PhaseTimer] = None,
               counts: Optional[list[int]] = None) -> Sampled:
        """Rollouts of each prompt at ``indices`` (``counts`` each; G by default), sampled now and scored."""
        counts = counts or [self.recipe.algorithm.group_size] * len(indices)
        return self._score(indices, self._generate(indices, seed_step, counts), timer or PhaseTimer())

    def resume_point(self) -> dict:
        """The sampler state a checkpoint keeps: prefetched batches are not trained yet, so resume draws them again."""
        return self._prefetched[0][0] if self._prefetched else self.sampler.state_dict()

    def carried_state(self) -> list[dict]:
        """Partial rollouts a checkpoint keeps: the unfinished prompts as they were when the calls in flight took them
        (what those calls sampled since is lost with them) and those no call has taken yet."""
        taken = [entry for call in self._prefetched if isinstance(call, _PartialCall) for entry in call.taken]
        return taken + [e.to_dict() for e in self._carried]

    def load_carried(self, state: list[dict]) -> None:
        self._carried = [InFlight.from_dict(d) for d in state]

    def forget_prefetched(self) -> None:
        """Batches in flight died with the engines."""
        self._prefetched.clear()

    @property
    def in_flight(self) -> int:
        return len(self._prefetched)

    def _requests(self, indices: list[int], seed_step: int, counts: list[int]):
        """One engine request per distinct count: (positions in the batch, the spec). The prompts of all requests
        take consecutive seeds from the step's (a uniform batch: one request, prompt b seeded step seed + b)."""
        buckets: dict[int, list[int]] = {}
        for b, n in enumerate(counts):
            buckets.setdefault(n, []).append(b)
        offset = 0
        for n, members in buckets.items():
            spec = sampling(self.recipe, seed_step, n)
            yield members, spec if spec.seed is None else replace(spec, seed=spec.seed + offset)
            offset += len(members)

    def _submit(self, indices: list[int], seed_step: int, counts: list[int]):
        pending = []
        for members, spec in self._requests(indices, seed_step, counts):
            pending.append((members, self.engines.submit_generate([self.train_set.prompt_token_ids[indices[b]] for b in members], spec)))
        return len(indices), pending

    def _collect(self, pending) -> list[list[Completion]]:
        size, parts = pending
        groups: list[list[Completion]] = [[] for _ in range(size)]
        for members, request in parts:
            for b, g in zip(members, self.engines.collect(request)):
                groups[b] = g
        return groups

    def _generate(self, indices: list[int], seed_step: int, counts: list[int]) -> list[list[Completion]]:
        """``counts[b]`` rollouts of each prompt at ``indices``, now: single completions, or episodes with the environment."""
        if self.episodes is None:
            return self._collect(self._submit(indices, seed_step, counts))
        groups: list[list[Completion]] = [[] for _ in indices]
        for members, spec in self._requests(indices, seed_step, counts):
            prompts = [self.train_set.prompt_token_ids[indices[b]] for b in members]
            for b, g in zip(members, self.episodes.run(self.engines, prompts, [self.train_set.rows[indices[b]] for b in members], spec)):
                groups[b] = g
        return groups

    def _score(self, indices: list[int], groups: list[list[Completion]], timer: PhaseTimer) -> Sampled:
        for b, g in enumerate(groups):
            for c in g:
                c.prompt_index = b  # its position in this batch, whichever request sampled it
        flat = [c for g in groups for c in g]
        with timer.phase("reward"):
            result = self.train_set.score(self.scorer, [indices[c.prompt_index] for c in flat], [c.text for c in flat])
        failures = dict(result.failures)
        if self.episodes is not None:  # the environment's rewards; failed episodes score the fallback
            count_episode_failures(result, flat, self.recipe.rewards.fallback, failures, self.scorer.total_failures, self.say)
        out, start = [], 0
        for g in groups:
            end = start + len(g)
            out.append(Group(list(g), list(result.total[start:end]), {k: list(v[start:end]) for k, v in result.per_reward.items()}))
            start = end
        return Sampled(indices, out, failures, sampled_rollouts=len(flat))

    # ------------------------------------------------------------------ partial rollouts

    def _next_partial_batch(self, step: int, total_steps: int, timer: PhaseTimer, policy_version: int) -> Sampled:
        """The first B prompts whose rollouts all finished, oldest first; the rest stay in flight. The engines run
        k - 1 calls ahead, so a token is at most k - 1 versions old when its call ends, and a carried one is
        started again before it could be more than k old when it trains."""
        B, k = self.recipe.data.prompts_per_step, self.recipe.rollout.max_staleness
        if not self._prefetched:
            self._prefetched.append(self._submit_partial(step + 1, step, policy_version))
        call = self._prefetched.popleft()
        entries = call.entries
        for entry, groups in zip(entries, self.engines.collect_groups(call.pending)):
            entry.completions = groups
        done = [e for e in entries if e.finished][:B]
        if len(done) < B:
            raise RuntimeError(f"partial rollouts: an engine call returned {len(done)} finished prompts, fewer than {B}")
        self._carried = [e for e in entries if not any(e is d for d in done)] + self._carried
        while len(self._prefetched) < k - 1 and step + 1 + len(self._prefetched) < total_steps:
            self._prefetched.append(self._submit_partial(step + 2 + len(self._prefetched), step, policy_version))
        batch = self._score([e.index for e in done], [e.completions for e in done], timer)
        tokens = [(policy_version - v) for e in done for c in e.completions for v in c.versions()]
        batch.partial_metrics = {
            "partial_mixed_versions_frac": sum(len(set(c.versions())) > 1 for e in done for c in e.completions) / batch.num_rollouts,
            "partial_token_staleness": sum(tokens) / max(len(tokens), 1),
            "partial_restarted": float(self._restarted),
            "partial_in_flight": float(len(self._carried) + sum(len(call.entries) for call in self._prefetched)),
        }
        self._restarted = 0
        return batch

    def _submit_partial(self, train_step: int, step: int, policy_version: int):
        """The engine call for step ``train_step``'s batch (submitted during step ``step + 1``, whose policy is
        ``policy_version``): the carried prompts, restarted where too stale, then new ones up to B x (1 + overdraw)."""
        ro, B = self.recipe.rollout, self.recipe.data.prompts_per_step
        # At most one version per step: the batch of train_step trains with a policy no newer than this.
        trains_with = policy_version + (train_step - step - 1)
        carried, self._carried = self._carried, []
        for i, e in enumerate(carried):
            oldest = e.oldest_version()
            if oldest is not None and trains_with - oldest > ro.max_staleness:
                carried[i] = e.restarted()
                self._restarted += 1
        taken = [e.to_dict() for e in carried]  # as submitted: what a checkpoint taken meanwhile resumes from
        state = self.sampler.state_dict()
        want = B + math.ceil(ro.partial_overdraw * B)
        new = self.sampler.next_batch(max(0, want - len(carried)))
        counts = self.allocation.first_counts(new, train_step) if new else []
        spec = sampling(self.recipe, train_step, 1)
        entries = carried + [InFlight(i, None if spec.seed is None else spec.seed + b,
                                      [_fresh(self.train_set.prompt_token_ids[i]) for _ in range(n)])
                             for b, (i, n) in enumerate(zip(new, counts))]
        pending = self.engines.submit_generate_until([e.completions for e in entries], replace(spec, seeds=[e.seed for e in entries]), B)
        return _PartialCall(state, entries, pending, taken)
