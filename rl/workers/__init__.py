"""Every Ray group lives here, kept thin (one module each): the same worker classes run as Ray actors or, with
``use_ray: false``, as plain objects in this process (easy to debug and step through).

- ``RolloutGroup``: N vLLM rollout actors; a batch of prompts is split across them.
- ``TrainerGroup``: N DeepSpeed ranks (``PolicyTrainer``); a TrainBatch is sharded across them.
- ``PreferenceTrainerGroup``: N offline-DPO ranks (``PreferenceTrainer``); pairs are sharded.
- ``RewardModelGroup``: the actor serving one reward model (``rewards.model_reward.RewardModel``);
  ``start_reward_models`` starts one per reward model of a scorer and hands it to its ``ModelReward``.

Batches are cut by ``trainer.batching.split_units`` and the ranks' stats combined by
``trainer.stats.reduce_stats`` (each stat's declared reduction), here as everywhere.
"""

from rl.workers.base import WorkerGroup, free_port, init_ray
from rl.workers.reward_models import RewardModelGroup, start_reward_models, stop_reward_models
from rl.workers.rollout import RolloutGroup
from rl.workers.trainers import PreferenceTrainerGroup, TrainerGroup, join_weight_group

__all__ = ["PreferenceTrainerGroup", "RewardModelGroup", "RolloutGroup", "TrainerGroup", "WorkerGroup", "free_port", "init_ray",
           "join_weight_group", "start_reward_models", "stop_reward_models"]
