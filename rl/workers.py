"""Every Ray group lives here, kept thin: the same worker classes run as Ray actors or, with
``use_ray: false``, as plain objects in this process (easy to debug and step through).

- ``RolloutGroup``: N vLLM rollout actors; a batch of prompts is split across them.
- ``TrainerGroup``: N DeepSpeed ranks (``PolicyTrainer``); a TrainBatch is sharded across them.
- ``PreferenceTrainerGroup``: N offline-DPO ranks (``PreferenceTrainer``); pairs are sharded.
- ``RewardModelGroup``: the actor serving one reward model (``rewards.model_reward.RewardModel``);
  ``start_reward_models`` starts one per reward model of a scorer and hands it to its ``ModelReward``.

Batches are cut by ``trainer.batching.split_units`` and the ranks' stats combined by
``trainer.stats.reduce_stats`` (each stat's declared reduction), here as everywhere.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
import time
from typing import Any, Optional, Sequence

from rewards.model_reward import ModelReward, RewardModel, RewardModelSpec
from rl.watchdog import HINTS, NodeLost, Watchdog, WorkerStalled, lost_nodes
from rollout.types import Completion, SamplingSpec, WeightHandle
from rollout.vllm_worker import EngineSpec, RolloutWorker
from trainer.batching import split_units
from trainer.policy_trainer import PolicyTrainer, TrainerSetup
from trainer.preference_trainer import PreferenceTrainer
from trainer.stats import reduce_stats
from trainer.types import PreferencePairs, TrainBatch


def init_ray(num_cpus_needed: float, verbose: bool = True) -> None:
    """``verbose=False``: the actors' output is not forwarded to this terminal (each actor writes its own log file)."""
    import ray

    if ray.is_initialized():
        return
    if not verbose:  # a notice at every start, not a fault: the private cluster keeps Ray's token
        import logging

        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Inside a Ray job (RAY_ADDRESS set) join that cluster; otherwise always start a private local
    # one, never attach to another run's leftovers.
    joining = "RAY_ADDRESS" in os.environ
    if not joining:
        # Ray starts its workers at nice 15, so on a machine doing anything else the run's own actors get the
        # leftovers (measured: 0.35 -> 2.4 s per step beside one busy process). Here they are the job.
        os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        address=None if joining else "local",
        num_cpus=None if joining else max(int(math.ceil(num_cpus_needed)), os.cpu_count() or 1),
        include_dashboard=False,
        log_to_driver=verbose,
        configure_logging=False,
        # A job brings its own runtime env (rl submit sets it); a local cluster gets ours.
        runtime_env=None if joining else {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "1"}},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _asks(num_cpus: float, num_gpus: float, resources: Optional[dict]) -> str:
    extra = "".join(f", {v:g} {k}" for k, v in (resources or {}).items())
    return f"{num_cpus:g} CPU, {num_gpus:g} GPU{extra}"


class _Group:
    """A list of workers called alike, remote (Ray actors) or local. Every wait on a remote call
    goes through the watchdog (``wait_for``), so a stalled actor is named, never silently waited on."""

    label = "worker"
    max_restarts = 0  # times Ray restarts a dead actor of this group

    def __init__(self, workers: list, remote: bool, watchdog: Optional[Watchdog] = None, resources: str = "",
                 node_ips: Sequence[str] = (), node_loss_wait_s: float = 30.0):
        self.workers, self.remote = workers, remote
        self.watchdog = watchdog or Watchdog()
        self.resources = resources  # what each actor asks Ray for, for the messages
        self.node_ips = list(node_ips)  # the node each actor was placed on (rl.placement), when known
        self.node_loss_wait_s = node_loss_wait_s
        self._called: set[str] = set()

    def _node_lost(self, indices: Sequence[int], method: str, wait_s: float) -> Optional[NodeLost]:
        """A NodeLost naming the dead node(s) of these actors, or None if their nodes are alive."""
        ips = [self.node_ips[i] for i in indices if 0 <= i < len(self.node_ips)]
        lost = lost_nodes(ips, wait_s) if ips else []
        if not lost:
            return None
        who = [i for i in indices if 0 <= i < len(self.node_ips) and self.node_ips[i] in lost]
        return NodeLost(f"node {', '.join(lost)} was lost: {self.label} actor(s) {who} died there in {method!r} and could "
                        "not be placed again (no node has the resources left); the run stops with its last checkpoint. "
                        "Continue with resume=auto once the cluster has the resources again")

    def wait_for(self, refs: list, method: str, indices: Sequence[int]) -> list:
        """``ray.get(refs)``, saying on the terminal what is still pending while it takes long."""
        import ray

        dog, first = self.watchdog, method not in self._called
        factor = dog.first_call_factor if first else 1.0
        warn, stop = dog.warn_seconds * factor, dog.stop_seconds * factor
        start, next_warn, pending = time.monotonic(), warn, list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(max(warn / 4, 0.05), 5.0))
            waited = time.monotonic() - start
            if not pending:
                break
            stuck = [indices[i] for i, r in enumerate(refs) if r in pending]
            where = f"{self.label} actor(s) {stuck} in {method!r}{' (first call)' if first else ''}"
            hint = HINTS.get(method, "the actor's log (`ray logs`)")
            if waited >= stop:
                raise WorkerStalled(f"no progress from {where} for {waited:.0f} s (hard limit {stop:.0f} s, "
                                    f"watchdog.stop_seconds); check {hint}")
            if waited >= next_warn:
                free = ray.available_resources()
                print(f"[rl] waiting on {where} for {waited:.0f} s; check {hint}. Ray has {free.get('CPU', 0):g} CPU / "
                      f"{free.get('GPU', 0):g} GPU free; each actor asks for {self.resources or 'its defaults'}; "
                      f"the run stops at {stop:.0f} s", file=sys.stderr, flush=True)
                next_warn += warn
        self._called.add(method)
        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError:
            if self.max_restarts:
                raise  # the group restarts its actors, and names a lost node only if that fails
            lost = self._node_lost(indices, method, self.node_loss_wait_s)
            if lost is not None:
                raise lost from None
            raise

    def _gather(self, calls: list[tuple[Any, str, tuple]]) -> list:
        return self._collect(self._submit(calls))

    def _submit(self, calls: list[tuple[Any, str, tuple]]) -> list:
        """Start the calls; returns what ``_collect`` turns into results (local workers run them now)."""
        if not self.remote:
            return [(call, getattr(call[0], call[1])(*call[2])) for call in calls]
        return [(call, getattr(call[0], call[1]).remote(*call[2])) for call in calls]

    def _collect(self, submitted: list) -> list:
        if not self.remote:
            return [result for _, result in submitted]
        method = submitted[0][0][1] if submitted else ""
        index = {id(w): i for i, w in enumerate(self.workers)}
        return self.wait_for([ref for _, ref in submitted], method, [index.get(id(call[0]), -1) for call, _ in submitted])

    def call_all(self, method: str, *args) -> list:
        return self._gather([(w, method, args) for w in self.workers])

    def call_each(self, method: str, args_per_worker: list[tuple]) -> list:
        return self._gather([(w, method, a) for w, a in zip(self.workers, args_per_worker)])

    def call_all_bounded(self, method: str, timeout_s: float = 30.0) -> Optional[list]:
        """For stopping: each actor's answer within ``timeout_s``, or None (a stalled actor is not waited on)."""
        if not self.remote:
            return self.call_all(method)
        import ray

        try:
            return ray.get([getattr(w, method).remote() for w in self.workers], timeout=timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return None

    def shutdown(self) -> None:
        if self.remote:
            import ray

            for w in self.workers:
                ray.kill(w)
        self.workers = []


def join_weight_group(trainer: "TrainerGroup", rollout: "RolloutGroup", addr: str) -> None:
    """Trainer rank 0 and every engine form one process group (the collective transport); all join at once."""
    port, world = free_port(), 1 + len(rollout.workers)
    pending = trainer._submit([(trainer.workers[0], "join_weight_group", (addr, port, world))])
    joining = rollout._submit([(w, "join_weight_group", (addr, port, world, i + 1)) for i, w in enumerate(rollout.workers)])
    trainer._collect(pending)
    rollout._collect(joining)


class RolloutGroup(_Group):
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
               placement: Optional[list[dict]] = None, group_nodes: Optional[dict] = None, log_dir: Optional[str] = None):
        """``placement``: each actor's scheduling options (its placement-group bundle, ``rl.placement``);
        ``group_nodes``: ``node_ips`` and ``node_loss_wait_s`` for naming a lost node; ``log_dir``: each
        engine's output goes to ``<log_dir>/rollout-<i>.log`` instead of the terminal."""
        if not use_ray:
            return cls([RolloutWorker(spec) for _ in range(num_actors)], remote=False)
        import ray

        actor_cls = ray.remote(RolloutWorker)
        workers = [
            actor_cls.options(
                num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None, runtime_env={"env_vars": spec.env()},
                max_restarts=max_restarts, max_task_retries=0,  # we retry ourselves, after restoring weights
                **(placement[i] if placement else {}),
            ).remote(dataclasses.replace(spec, log_file=os.path.join(log_dir, f"rollout-{i}.log")) if log_dir else spec)
            for i in range(num_actors)
        ]
        group = cls(workers, remote=True, max_restarts=max_restarts, watchdog=watchdog,
                    resources=_asks(num_cpus, num_gpus, resources), **(group_nodes or {}))
        try:
            group.call_all("ready")  # surface start-up errors here, not at the first step
        except BaseException:
            group.shutdown()  # an actor that never started (or is waiting for resources) must not linger
            raise
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
        import time

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
            if self.current_handle.transport == "collective":
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
            s = SamplingSpec(**{**sampling.__dict__, "seed": None if sampling.seed is None else sampling.seed + r[0]})
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

    def load_weights(self, handle: WeightHandle) -> float:
        self.current_handle = handle  # what a restarted actor must load
        return max(self.call_all("load_weights", handle))

    def peak_rss_gib(self) -> Optional[float]:
        answers = self.call_all_bounded("peak_rss_gib", timeout_s=10.0)
        return max(answers) if answers else None

    def score(self, prompt_token_ids, completion_token_ids) -> list[list[float]]:
        return self.call_each("score", [(prompt_token_ids, completion_token_ids)])[0]


class TrainerGroup(_Group):
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
        return cls(ranks, remote=True, watchdog=watchdog, resources=_asks(num_cpus, num_gpus, resources), **(group_nodes or {}))

    def wait_ready(self) -> None:
        """Returns once every rank is up; surfaces start-up errors here, not at the first step."""
        self.call_all("ready")

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
        return reduce_stats(self.call_each("train_step", args))


class RewardModelGroup(_Group):
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

        actor = ray.remote(RewardModel).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                                max_task_retries=0).remote(spec)
        group = cls([actor], remote=True, watchdog=watchdog, resources=_asks(num_cpus, num_gpus, None))
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
                groups.append(RewardModelGroup.create(fn.spec, use_ray, fn.num_cpus, watchdog=watchdog))
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
