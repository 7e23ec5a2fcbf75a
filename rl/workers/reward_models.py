"""The actor serving one reward model (``rewards.model_reward.RewardModel``), and starting one per reward model
of a scorer."""

from __future__ import annotations

from typing import Optional, Sequence

from rewards.model_reward import ModelReward, RewardModel, RewardModelSpec
from rl.watchdog import Watchdog
from rl.workers.base import WorkerGroup, describe_asks, require_free


class RewardModelGroup(WorkerGroup):
    """The actor serving one reward model. It is what a ``ModelReward`` calls, from the scorer's
    threads: the scorer's time limit abandons a late call, and the actor answers its calls in order.
    A dead actor is restarted by Ray (``max_restarts``); the calls made meanwhile fail, and their
    samples get the fallback."""

    label = "reward model"

    @classmethod
    def create(cls, spec: RewardModelSpec, use_ray: bool, num_cpus: float = 1.0, num_gpus: float = 0.0,
               max_restarts: int = 1, watchdog: Optional[Watchdog] = None) -> "RewardModelGroup":
        if not use_ray:
            return cls([RewardModel(spec)], remote=False)
        import ray

        require_free(spec.label, {"GPU": (num_gpus, "num_gpus")})
        actor = ray.remote(RewardModel).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                                max_task_retries=0).remote(spec)
        group = cls([actor], remote=True, watchdog=watchdog, resources=describe_asks(num_cpus, num_gpus, None))
        try:
            group.call_all("ready")  # a model that does not load fails here, not at the first reward
        except BaseException:
            group.shutdown()
            raise
        return group

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        return self.call_all("score", prompts, completions)[0]


def start_reward_models(reward_fns: Sequence, use_ray: bool, watchdog: Optional[Watchdog] = None) -> list[RewardModelGroup]:
    """An actor for every ``ModelReward`` among ``reward_fns`` (a scorer's ``fns.values()``), each handed
    to its reward to call; none when the recipe has no reward model. Stop them with ``stop_reward_models``."""
    groups: list[RewardModelGroup] = []
    try:
        for fn in reward_fns:
            if isinstance(fn, ModelReward):
                groups.append(RewardModelGroup.create(fn.spec, use_ray, fn.num_cpus, fn.num_gpus, watchdog=watchdog))
                fn.serve(groups[-1])
    except BaseException:
        stop_reward_models(reward_fns, groups)
        raise
    return groups


def stop_reward_models(reward_fns: Sequence, groups: Sequence[RewardModelGroup]) -> None:
    for fn in reward_fns:
        if isinstance(fn, ModelReward):
            fn.serve(None)
    for group in groups:
        group.shutdown()
