"""What one trainer rank is built from: the policy, the configs, where it sits among the ranks and where it
publishes weights. ``rl`` builds one ``TrainerSetup`` per run; the group gives each rank its ``rank``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from trainer.config import AlgorithmConfig, CriticConfig, TrainerConfig
from trainer.policies.base import PolicySpec


@dataclass
class TrainerSetup:
    """Everything one rank needs; ``rl`` builds it once and the group gives each rank its ``rank``.

    ``transport`` is where rank 0 publishes policy versions for the engines (an object with
    ``publish``, ``publish_lora``, ``publish_prompt_loras``, ``release``; the rollout side's
    ``rollout.weight_sync`` provides them): the trainer never learns how they travel.
    """

    policy: PolicySpec
    dtype: str
    trainer: TrainerConfig
    algorithm: AlgorithmConfig
    max_response_len: int
    temperature: float = 1.0  # the rollout's sampling temperature: every logprob is of softmax(logits / temperature), as sampled
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    trust_remote_code: bool = False
    transport: Any = None
    max_staleness: int = 0  # asynchronous rollout: batches may still use the k previous versions
    log_dir: Optional[str] = None  # each rank's stdout/stderr go to <log_dir>/trainer-rank<r>.log instead of the terminal
    critic: Optional[CriticConfig] = None  # PPO's value model (read when the algorithm has a critic)
    critic_model_path: Optional[str] = None  # where the critic's decoder starts (None: the policy's base model)
