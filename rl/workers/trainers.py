"""The DeepSpeed ranks: ``TrainerGroup`` (``PolicyTrainer``, a TrainBatch sharded across ranks),
``PreferenceTrainerGroup`` (``PreferenceTrainer``, offline DPO's pairs), and ``join_weight_group`` (rank 0
and every engine in one process group for the collective weight transport)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from rl.watchdog import Watchdog
from rl.workers.base import WorkerGroup, describe_asks, free_port
from rl.workers.rollout import RolloutGroup
from rollout.types import WeightHandle
from trainer.batching import split_units
from trainer.policy_trainer import PolicyTrainer
from trainer.preference_trainer import PreferenceTrainer
from trainer.setup import TrainerSetup
from trainer.stats import reduce_stats
from trainer.types import PreferencePairs, TrainBatch


def join_weight_group(trainer: "TrainerGroup", rollout: "RolloutGroup", addr: str, backend: str = "gloo") -> None:
    """Trainer rank 0 and every engine form one process group (the collective transport); all join at once."""
    port, world = free_port(), 1 + len(rollout.workers)
    pending = trainer._submit([(trainer.workers[0], "join_weight_group", (addr, port, world, backend))])
    joining = rollout._submit([(w, "join_weight_group", (addr, port, world, i + 1, backend))
                               for i, w in enumerate(rollout.workers)])
    trainer._collect(pending)
    rollout._collect(joining)


class TrainerGroup(WorkerGroup):
    """DeepSpeed ranks of one worker class, meeting at one rendezvous port."""

    worker_cls: type = PolicyTrainer
    label = "trainer"

    @classmethod
    def create(cls, setup: TrainerSetup, num_ranks: int, use_ray: bool, num_cpus: float = 1.0, num_gpus: float = 0.0,
               watchdog: Optional[Watchdog] = None, resources: Optional[dict] = None, placement: Optional[list[dict]] = None,
               group_nodes: Optional[dict] = None):
        """``placement``: each rank's scheduling options; ``setup.master_addr`` must then be rank 0's node IP."""
        port = setup.master_port or free_port()  # one rendezvous port for the whole group (free here; ranks elsewhere rarely differ)
        setups = [dataclasses.replace(setup, rank=r, world_size=num_ranks, master_port=port) for r in range(num_ranks)]
        if not use_ray:
            if num_ranks != 1:
                raise ValueError("trainer.num_ranks > 1 needs use_ray: true")
            return cls([cls.worker_cls(setups[0])], remote=False)
        import ray

        actor_cls = ray.remote(cls.worker_cls)
        # Not waited on here: the ranks start while the caller starts the engines (``wait_ready``).
        ranks = [actor_cls.options(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None,
                                   **(placement[i] if placement else {})).remote(s) for i, s in enumerate(setups)]
        return cls(ranks, remote=True, watchdog=watchdog, resources=describe_asks(num_cpus, num_gpus, resources), **(group_nodes or {}))

    def _shards(self, n: int, micro_batch_size: int, unit: int = 1) -> tuple[list[list[int]], int]:
        """One contiguous shard per rank (whole units; sizes differ by at most one unit) and the
        micro-batch count every rank runs (ZeRO-2/3 communicate at every backward)."""
        shards = split_units(n, len(self.workers), unit)
        return shards, max(1, math.ceil(max(len(s) for s in shards) / micro_batch_size))

    def train_step(self, batch: TrainBatch, micro_batch_size: int) -> dict[str, float]:
        shards, num_micro = self._shards(len(batch), micro_batch_size, batch.unit)
        return reduce_stats(self.call_each("train_step", [(batch.select(s), num_micro) for s in shards]))

    def publish_weights(self, prompts: Optional[list[list[int]]] = None) -> WeightHandle:
        return self.call_all("publish_weights", prompts)[0]

    def library_sources(self, checkpoint: str) -> dict[str, str]:
        return self.call_each("library_sources", [(checkpoint,)])[0]

    def save_pretrained(self, path: str) -> Optional[str]:
        return self.call_all("save_pretrained", path)[0]

    def save_state(self, path: str) -> None:
        self.call_all("save_state", path)

    def load_state(self, path: str) -> int:
        return self.call_all("load_state", path)[0]

    def compute_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        return self.call_each("compute_logprobs", [(batch,)])[0]

    def compute_values(self, batch: TrainBatch) -> list[list[float]]:
        """PPO's critic values of every response token, each rank scoring one shard (whole units, in order)."""
        shards, _ = self._shards(len(batch), 1, batch.unit)
        parts = self.call_each("compute_values", [(batch.select(s),) for s in shards])
        return [row for part in parts for row in part]

    def close(self) -> None:
        """Release what the ranks published; a rank that does not answer is killed by ``shutdown`` anyway."""
        self.call_all_bounded("close")


class PreferenceTrainerGroup(TrainerGroup):
    """Offline-DPO ranks; pairs are sharded in contiguous chunks (a shard may be empty)."""

    worker_cls = PreferenceTrainer

    def reference_logprobs(self, pairs: PreferencePairs, micro_batch_size: int) -> tuple[list[float], list[float]]:
        shards, num_micro = self._shards(len(pairs), micro_batch_size)
        results = self.call_each("reference_logprobs", [(pairs.select(s), num_micro) for s in shards])
        return [x for c, _ in results for x in c], [x for _, r in results for x in r]

    def evaluate(self, pairs: PreferencePairs, ref_chosen: Sequence[float], ref_rejected: Sequence[float],
                 micro_batch_size: int) -> dict[str, float]:
        shards, num_micro = self._shards(len(pairs), micro_batch_size)
        args = [(pairs.select(s), [ref_chosen[i] for i in s], [ref_rejected[i] for i in s], num_micro) for s in shards]
        return reduce_stats(self.call_each("evaluate", args))

    def train_pairs(self, batch: PreferencePairs, micro_batch_size: int, ref_chosen: Sequence[float],
                    ref_rejected: Sequence[float]) -> dict[str, float]:
        shards, num_micro = self._shards(len(batch), micro_batch_size)
        args = [(dataclasses.replace(batch.select(s), batch_pairs=len(batch)), num_micro,
                 [ref_chosen[i] for i in s], [ref_rejected[i] for i in s]) for s in shards]
        return reduce_stats(self.call_each("train_pairs", args))
