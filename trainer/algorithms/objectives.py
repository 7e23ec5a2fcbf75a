"""The algorithms a recipe names (``algorithm.name``), registered as objects under kind ``"algorithm"``.

An ``Algorithm`` says what the name means to the driver and the trainer: whether it samples its own
rollouts, which rows of a scored batch it trains on, which loss the trainer applies and whether that
loss needs a frozen reference. Nothing outside this module tests an algorithm's name.

- ``grpo``: the policy-gradient family (GRPO, Dr.GRPO, 2-GRPO, RLOO, REINFORCE++, GSPO: the advantage
  and policy-loss registries pick the variant); every rollout is a row.
- ``ppo``: the clipped policy loss on per-token advantages from a learned value model (GAE), any G >= 1;
  every rollout is a row, and its group's other rollouts do not enter its advantage.
- ``online_dpo``: two rollouts per prompt ranked by their rewards; each discordant pair is a
  (chosen, rejected) row pair under the DPO loss against the initial policy.
- ``dpo``: offline, on preference pairs from a file; no rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

from trainer.algorithms.registry import register


def all_rows(advantages: torch.Tensor) -> tuple[list[int], list[float]]:
    """Every rollout, prompt-major. advantages [B, G] -> (row indices [B*G], their advantages [B*G]).

    >>> all_rows(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    ([0, 1, 2, 3], [1.0, -1.0, 0.0, 0.0])
    """
    return list(range(advantages.numel())), advantages.flatten().tolist()


def discordant_pair_rows(advantages: torch.Tensor) -> tuple[list[int], list[float]]:
    """Online DPO's rows: each discordant pair as (chosen, rejected) with advantages (+1, -1); a tie carries no
    preference and is dropped. advantages [B, 2] -> (row indices [2P], [2P]), P discordant pairs.

    >>> discordant_pair_rows(torch.tensor([[-1.0, 1.0], [0.0, 0.0], [1.0, -1.0]]))
    ([1, 0, 4, 5], [1.0, -1.0, 1.0, -1.0])
    """
    rows, adv = [], []
    for b, (a0, a1) in enumerate(advantages.tolist()):
        if a0 == a1:
            continue
        rows += [2 * b, 2 * b + 1] if a0 > a1 else [2 * b + 1, 2 * b]
        adv += [1.0, -1.0]
    return rows, adv


@dataclass(frozen=True)
class Algorithm:
    name: str
    online: bool  # samples its own rollouts (else: preference pairs from a file)
    loss: Literal["policy_gradient", "pairwise_dpo", "preference"]
    select_rows: Optional[Callable[[torch.Tensor], tuple[list[int], list[float]]]] = None  # online: advantages [B, G] -> rows
    rows_per_unit: int = 1  # rows that must stay together in a micro-batch (a chosen/rejected pair: 2)
    reference_always: bool = False  # the loss itself compares with the initial policy (DPO), even at kl_coef 0
    group_size: Optional[int] = None  # the only G it is defined for (None: any G >= min_group_size)
    min_group_size: int = 2  # a group baseline needs two rollouts; a critic's baseline does not
    critic: bool = False  # advantages per token from a value model trained beside the policy (GAE), not from the group

    def needs_reference(self, kl_coef: float) -> bool:
        """Whether the trainer loads a frozen copy of the initial policy."""
        return self.reference_always or kl_coef > 0

    @property
    def policy_gradient(self) -> bool:
        """Trains through the clipped policy loss on advantages (what GSPO's ratio and REINFORCE++'s KL reward shape)."""
        return self.loss == "policy_gradient"


for _algorithm in (
    Algorithm("grpo", online=True, loss="policy_gradient", select_rows=all_rows),
    Algorithm("ppo", online=True, loss="policy_gradient", select_rows=all_rows, min_group_size=1, critic=True),
    Algorithm("online_dpo", online=True, loss="pairwise_dpo", select_rows=discordant_pair_rows, rows_per_unit=2,
              reference_always=True, group_size=2),
    Algorithm("dpo", online=False, loss="preference", reference_always=True),
):
    register("algorithm", _algorithm.name)(_algorithm)
