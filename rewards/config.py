"""The recipe's `rewards` section: which reward functions score a completion, with what weights and limits."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RewardItem(Section):
    fn: str = Field(description="A registered name, `path/to/file.py:fn` or `package.module:fn`.")
    weight: float = 1.0


class RewardsConfig(Section):
    functions: list[RewardItem] = Field(default_factory=lambda: [RewardItem(fn="arithmetic_exact")])
    fallback: float = Field(0.0, description="Reward given to a completion whose reward function fails.")
    timeout_seconds: Optional[float] = Field(
        None, gt=0.0, description="Per-call time limit of a reward function; a call past it costs its samples (fallback)."
    )
    accuracy: Optional[str] = Field(
        None, description="Which reward function is 'accuracy' in metrics and evaluation; default: the first."
    )
