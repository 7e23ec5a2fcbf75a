"""What the trainer takes in: a batch of sampled sequences for a policy update, or a batch of
preference pairs for offline DPO. Plain dataclasses of lists, so they pickle cheaply through Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class TrainBatch:
    """N = B*G sequences for one policy update, in group order (sequence i belongs to prompt i // G)."""

    prompt_token_ids: list[list[int]]
    response_token_ids: list[list[int]]
    advantages: list[float]  # [N] one per sequence, broadcast to its tokens
    rollout_logprobs: list[list[float]]  # [N][len(response)] from vLLM
    # Counts over the *whole* batch (all ranks), so the loss does not depend on how it is split.
    num_sequences: int = 0
    num_tokens: int = 0
    unit: int = 1  # rows that must stay together when split (2: online-DPO pairs)
    # [N][len(response)]: 1 for tokens the policy sampled, 0 for tokens it was given (a multi-turn episode's
    # observations): those are context, not trained. Empty: every response token is trained.
    loss_mask: list[list[int]] = field(default_factory=list)
    # [N][len(response)]: a per-token term added to the sequence's advantage (a teacher's reverse KL, PPO's GAE).
    # Empty: each token takes its sequence's advantage.
    token_advantages: list[list[float]] = field(default_factory=list)
    # PPO's critic targets, [N][len(response)] each: the GAE returns, and the values the critic gave when the batch
    # was scored (the centre of the value clip). Empty without a critic.
    returns: list[list[float]] = field(default_factory=list)
    old_values: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt_token_ids)

    def select(self, indices: list[int]) -> "TrainBatch":
        return TrainBatch(
            prompt_token_ids=[self.prompt_token_ids[i] for i in indices],
            response_token_ids=[self.response_token_ids[i] for i in indices],
            advantages=[self.advantages[i] for i in indices],
            rollout_logprobs=[self.rollout_logprobs[i] for i in indices],
            num_sequences=self.num_sequences,
            num_tokens=self.num_tokens,
            unit=self.unit,
            loss_mask=[self.loss_mask[i] for i in indices] if self.loss_mask else [],
            token_advantages=[self.token_advantages[i] for i in indices] if self.token_advantages else [],
            returns=[self.returns[i] for i in indices] if self.returns else [],
            old_values=[self.old_values[i] for i in indices] if self.old_values else [],
        )


@dataclass
class PreferencePairs:
    """P tokenized pairs: plain lists, so they pickle cheaply through Ray.

    ``chosen_ids`` / ``rejected_ids`` are response ids only (ending in ``eos`` unless cut);
    the sequence a model scores is ``prompt_ids[i] + chosen_ids[i]`` (resp. rejected).
    ``batch_pairs`` is the number of pairs in the whole batch across all ranks when this is one
    rank's shard: the loss divides by it, so the update does not depend on the split (0: len).
    """

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    rows: list[int] = field(default_factory=list)  # source row of each pair (for messages)
    batch_pairs: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, indices: Sequence[int]) -> "PreferencePairs":
        return PreferencePairs(
            prompt_ids=[self.prompt_ids[i] for i in indices],
            chosen_ids=[self.chosen_ids[i] for i in indices],
            rejected_ids=[self.rejected_ids[i] for i in indices],
            rows=[self.rows[i] for i in indices] if self.rows else [],
        )

    @property
    def num_tokens(self) -> int:
        """Tokens the model scores for these pairs: both sequences of every pair."""
        return sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids))
