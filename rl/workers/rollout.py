"""The vLLM rollout actors: a batch of prompts split across them; an actor that dies is restarted with the
current policy and its call retried."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

from rl.watchdog import Watchdog
from rl.workers.base import WorkerGroup, describe_asks
from rollout.types import Completion, SamplingSpec, WeightHandle
from rollout.vllm_worker import EngineSpec, RolloutWorker
from rollout.weight_sync import transport_class
from trainer.batching import split_units


class RolloutGroup(WorkerGroup):
    """Rollout actors that survive faults: an actor that dies is restarted by Ray (up to
    ``max_restarts``), given the current policy weights, and the interrupted call is retried.
    ``restarts`` counts them for the metrics."""

    label = "rollout"

    def __init__(self, workers: list, remote: bool, max_restarts: int = 0, **kw):
        super().__init__(workers, remote, **kw)
        self.max_restarts = max_restarts
        self.restarts = 0
        self.current_handle: Optional[WeightHandle] = None

    @classmethod
    def create(cls, spec: EngineSpec, num_actors: int, use_ray: bool, num_cpus: float = 1.0, num_gpus: float = 0.0,
               max_restarts: int = 3, watchdog: Optional[Watchdog] = None, resources: Optional[dict] = None,
               placement: Optional[list[dict]] = None, group_nodes: Optional[dict] = None, log_dir: Optional[str] = None,
               wait: bool = True):
        """``placement``: each actor's scheduling options (its placement-group bundle, ``rl.placement``);
        ``group_nodes``: ``node_ips`` and ``node_loss_wait_s`` for naming a lost node; ``log_dir``: each
        engine's output goes to ``<log_dir>/rollout-<i>.log`` instead of the terminal. ``wait=False``: return
        while the engines start (the caller starts other actors meanwhile, then calls ``wait_ready``)."""
        if not use_ray:
            return cls([RolloutWorker(spec) for _ in range(num_actors)], remote=False)
        import ray

        actor_cls = ray.remote(RolloutWorker)
        workers = []
        for i in range(num_actors):
            options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": resources or None,
                       "max_restarts": max_restarts, "max_task_retries": 0}  # we retry ourselves, after restoring weights
            options |= placement[i] if placement else {}
            options["runtime_env"] = {"env_vars": spec.env() | options.pop("env_vars", {})}
            workers.append(actor_cls.options(**options).remote(
                dataclasses.replace(spec, log_file=os.path.join(log_dir, f"rollout-{i}.log")) if log_dir else spec))
        group = cls(workers, remote=True, max_restarts=max_restarts, watchdog=watchdog,
                    resources=describe_asks(num_cpus, num_gpus, resources), **(group_nodes or {}))
        if wait:
            group.wait_ready()
        return group

    def _collect(self, submitted):
        if not self.remote:
            return super()._collect(submitted)
        from ray.exceptions import ActorUnavailableError, RayActorError

        out = []
        for (w, m, a), ref in submitted:
            for attempt in range(self.max_restarts + 1):
                try:
                    out.append(self.wait_for([ref], m, [self.workers.index(w)])[0])
                    break
                except (RayActorError, ActorUnavailableError):
                    if attempt == self.max_restarts:
                        raise
                    self.restarts += 1
                    self._recover(w)
                    ref = getattr(w, m).remote(*a)
        return out

    def _recover(self, worker, timeout_s: float = 300.0) -> None:
        """Wait for Ray to restart the actor, then give it the current policy weights."""

        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        index = self.workers.index(worker)
        start = time.monotonic()
        while True:
            try:
                ray.get(worker.ready.remote(), timeout=5)
                break
            except (RayActorError, ActorUnavailableError, ray.exceptions.GetTimeoutError):
                waited = time.monotonic() - start
                if waited > self.node_loss_wait_s:
                    # Its node gone and no room elsewhere: say so instead of waiting for resources forever.
                    lost = self._node_lost([index], "restart", 0.0)
                    if lost is not None:
                        raise lost from None
                if waited > timeout_s:
                    raise
                time.sleep(0.5)
        if self.current_handle is not None:
            if transport_class(self.current_handle.transport).joins_a_group:
                raise RuntimeError("a restarted engine cannot rejoin the collective weight group; the run stops with its "
                                   "last checkpoint (cluster.weight_transport=object_store restarts engines)")
            ray.get(worker.load_weights.remote(self.current_handle))

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSpec) -> list[list[Completion]]:
        """Split B prompts across actors; returns B groups in the original order."""
        return self.collect(self.submit_generate(prompt_token_ids, sampling))

    def submit_generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSpec):
        """Start a generation and return at once; ``collect`` waits for it. Each actor runs its calls
        in order, so weights loaded after this call do not affect it."""
        parts = [r for r in split_units(len(prompt_token_ids), len(self.workers)) if r]
        calls = []
        for w, r in zip(self.workers, parts):
            s = SamplingSpec(**{**sampling.__dict__, "seed": None if sampling.seed is None else sampling.seed + r[0],
                                "seeds": [sampling.seeds[i] for i in r] if sampling.seeds else None})
            calls.append((w, "generate", ([prompt_token_ids[i] for i in r], s)))
        return parts, self._submit(calls)

    def collect(self, pending) -> list[list[Completion]]:
        parts, submitted = pending
        out: list[list[Completion]] = []
        for r, groups in zip(parts, self._collect(submitted)):
            for g in groups:
                for c in g:
                    c.prompt_index += r[0]
            out.extend(groups)
        return out

    def submit_generate_until(self, groups: list[list[Completion]], sampling: SamplingSpec, groups_wanted: int):
        """Partial rollouts: start continuing ``groups`` (``RolloutWorker.generate_until``), whole groups split across
        the actors, each asked for its share of ``groups_wanted`` (rounded up); ``collect_groups`` returns them."""
        parts = [r for r in split_units(len(groups), len(self.workers)) if r]
        calls = []
        for w, r in zip(self.workers, parts):
            s = SamplingSpec(**{**sampling.__dict__, "seeds": [sampling.seeds[i] for i in r] if sampling.seeds else None})
            calls.append((w, "generate_until", ([groups[i] for i in r], s, -(-groups_wanted * len(r) // len(groups)))))
        return self._submit(calls)

    def collect_groups(self, submitted) -> list[list[Completion]]:
        """The groups of a ``submit_generate_until``, in the order given."""
        return [group for part in self._collect(submitted) for group in part]

    def load_weights(self, handle: WeightHandle) -> float:
        self.current_handle = handle  # what a restarted actor must load
        return max(self.call_all("load_weights", handle))

    def peak_rss_gib(self) -> Optional[float]:
        answers = self.call_all_bounded("peak_rss_gib", timeout_s=10.0)
        return max(answers) if answers else None

    def score(self, prompt_token_ids, completion_token_ids) -> list[list[float]]:
        """The engines' logprob of every completion token (at temperature 1), the rows split across the actors."""
        parts = [r for r in split_units(len(prompt_token_ids), len(self.workers)) if r]
        answers = self._gather([(w, "score", ([prompt_token_ids[i] for i in r], [completion_token_ids[i] for i in r]))
                                for w, r in zip(self.workers, parts)])
        return [row for part in answers for row in part]
