"""Where the actors run: the GPU counts a recipe leaves unset (``machine_defaults``) and what a GPU layout must
allow (``check_gpu_layout``), then one Ray placement group with a bundle per trainer rank and per rollout
actor, reserved before any actor starts, so a cluster that cannot hold the run fails at once with
what is missing instead of leaving actors waiting for resources.

An engine with tensor parallelism gets one bundle per tensor-parallel rank: vLLM's Ray executor
starts one GPU worker per bundle (the indices it is given in ``VLLM_RAY_BUNDLE_INDICES``) and does not
accept a bundle holding several GPUs. The engine actor itself sits in the first, holding the CPUs.

Once the group is placed, every bundle's node is known, which decides two things: the trainer's
rendezvous address (trainer rank 0's node IP) and the weight transport (``shared_file`` when every
engine shares trainer rank 0's node, else ``object_store``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from rl.overrides import RecipeError


def cuda_devices() -> int:
    """CUDA devices this process can use (0 on a CPU machine)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def machine_defaults(recipe, cuda_devices: int):
    """Settings the recipe leaves unset follow the machine. On one with a GPU: each engine reserves
    ``rollout.tensor_parallel_size`` GPUs and each trainer rank one, so Ray places them on GPUs it has
    reserved (it no longer hides devices from zero-GPU actors: they would all land on cuda:0 unreserved);
    the engines capture CUDA graphs (``rollout.enforce_eager: false``; eager decoding is the CPU's only
    mode, and several times slower on a GPU) and sample training prompts unseeded (``rollout.seed_per_prompt:
    false``: vLLM's batched sampler); the model runs in bfloat16 (``model.dtype``), which GPUs
    compute natively. On a CPU machine all stay as they are. A value set in the recipe is kept.

    >>> from rl.config import Recipe
    >>> r = machine_defaults(Recipe(), 1)
    >>> r.rollout.num_gpus_per_actor, r.trainer.num_gpus_per_rank, r.rollout.enforce_eager, r.model.dtype
    (1.0, 1.0, False, 'bfloat16')
    >>> r = machine_defaults(Recipe(), 0)
    >>> r.trainer.num_gpus_per_rank, r.rollout.enforce_eager, r.model.dtype
    (0.0, True, 'float32')
    """
    if cuda_devices:
        if "dtype" not in recipe.model.model_fields_set:
            recipe.model.dtype = "bfloat16"
        if "enforce_eager" not in recipe.rollout.model_fields_set:
            recipe.rollout.enforce_eager = False
        if "seed_per_prompt" not in recipe.rollout.model_fields_set:
            recipe.rollout.seed_per_prompt = False
        share = 0.5 if recipe.rollout.colocate else 1.0  # a colocated engine and trainer rank split one GPU
        if "num_gpus_per_actor" not in recipe.rollout.model_fields_set:
            recipe.rollout.num_gpus_per_actor = share * recipe.rollout.tensor_parallel_size
        if "num_gpus_per_rank" not in recipe.trainer.model_fields_set:
            recipe.trainer.num_gpus_per_rank = share
        if recipe.teacher.model is not None and "num_gpus_per_actor" not in recipe.teacher.model_fields_set:
            recipe.teacher.num_gpus_per_actor = 1.0
    return recipe


def check_gpu_layout(recipe) -> None:
    """What the GPU counts (after ``machine_defaults``) must allow.

    Under Ray a tensor-parallel engine runs vLLM's Ray executor: one GPU worker per rank, each in its own bundle
    (``rl.placement.engine_bundle_specs``). That executor runs on GPUs only, and the collective weight transport joins
    the engine's own process, which then holds no weights. A colocated engine and trainer rank share one GPU's
    bundle (``rl.placement.place``) and vLLM's sleep mode, which needs CUDA.

    >>> from rl.config import Recipe
    >>> check_gpu_layout(machine_defaults(Recipe(rollout={"tensor_parallel_size": 2}), 2))
    >>> check_gpu_layout(Recipe(rollout={"tensor_parallel_size": 2}))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    rl.overrides.RecipeError: rollout.tensor_parallel_size=2 under Ray needs GPUs ...: set it to 2 on a GPU cluster, ...
    """
    ro, t = recipe.rollout, recipe.trainer
    if ro.tensor_parallel_size > 1 and recipe.use_ray and ro.num_gpus_per_actor == 0:
        raise RecipeError(f"rollout.tensor_parallel_size={ro.tensor_parallel_size} under Ray needs GPUs (vLLM's Ray executor "
                          "starts one GPU worker per rank), but rollout.num_gpus_per_actor is 0 (this machine has no GPU): "
                          f"set it to {ro.tensor_parallel_size} on a GPU cluster, or use_ray: false for a CPU engine")
    if recipe.cluster.weight_transport == "collective" and (ro.tensor_parallel_size > 1 or ro.colocate):
        raise RecipeError("cluster.weight_transport=collective needs rollout.tensor_parallel_size=1 (the group is joined by "
                          "the engine actor's process, which holds no weights when the engine's ranks are Ray workers) and "
                          "rollout.colocate=false (NCCL cannot join two ranks on one GPU); use shared_file or object_store")
    if recipe.cluster.weight_transport == "ipc" and recipe.use_ray and t.num_gpus_per_rank and not (ro.colocate and ro.num_actors == 1):
        raise RecipeError("cluster.weight_transport=ipc on GPUs needs rollout.colocate=true with one engine: under Ray each actor "
                          "sees only its own GPUs, so only the engine on trainer rank 0's GPU can open its memory; use shared_file "
                          "(one node) or collective")
    if not ro.colocate:
        return
    pair = "rollout.colocate=true pairs each engine with a trainer rank on one GPU"
    if ro.num_actors != t.num_ranks or ro.tensor_parallel_size > 1 or recipe.teacher.model is not None:
        raise RecipeError(f"{pair}: it needs rollout.num_actors = trainer.num_ranks (are {ro.num_actors}, {t.num_ranks}), "
                          "rollout.tensor_parallel_size=1 and no teacher.model")
    if ro.max_staleness > 0:
        raise RecipeError(f"{pair}: it needs rollout.max_staleness=0 (the engine sleeps while the trainer trains)")
    if not recipe.use_ray or ro.num_gpus_per_actor == 0 or t.num_gpus_per_rank == 0 or ro.num_gpus_per_actor + t.num_gpus_per_rank > 1:
        raise RecipeError(f"{pair} (vLLM's sleep mode is CUDA-only): it needs use_ray, and rollout.num_gpus_per_actor and "
                          f"trainer.num_gpus_per_rank each above 0 and together at most 1 (are {ro.num_gpus_per_actor:g}, "
                          f"{t.num_gpus_per_rank:g}; unset on a GPU machine: 0.5 each)")


class PlacementError(RuntimeError):
    """The cluster cannot hold the run as the recipe places it; the message says what is missing."""


def bundle(num_cpus: float, num_gpus: float, resources: dict[str, float]) -> dict[str, float]:
    """The Ray resources one actor reserves. A bundle may not be empty: a zero-CPU actor keeps a sliver."""
    b = {"CPU": float(num_cpus), "GPU": float(num_gpus), **{k: float(v) for k, v in resources.items()}}
    b = {k: v for k, v in b.items() if v > 0}
    return b or {"CPU": 0.01}


def engine_bundle_specs(tensor_parallel_size: int, num_cpus: float, num_gpus: float,
                        resources: dict[str, float]) -> list[dict[str, float]]:
    """One rollout engine's bundles: one, or with tensor parallelism one per rank, each with its share of the GPUs.

    >>> engine_bundle_specs(1, 1, 1, {})
    [{'CPU': 1.0, 'GPU': 1.0}]
    >>> engine_bundle_specs(2, 1, 2, {"a100": 1})
    [{'CPU': 1.0, 'GPU': 1.0, 'a100': 1.0}, {'GPU': 1.0}]
    """
    if tensor_parallel_size == 1:
        return [bundle(num_cpus, num_gpus, resources)]
    share = num_gpus / tensor_parallel_size
    return [bundle(num_cpus, share, resources)] + [bundle(0, share, {}) for _ in range(tensor_parallel_size - 1)]


def _describe(b: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in b.items())


def _fits(b: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(k, 0.0) >= v for k, v in b.items())


def check_fits(bundles: list[tuple[str, dict[str, float]]], nodes: list[dict]) -> None:
    """Every bundle must fit on some alive node; raises PlacementError naming the first that fits nowhere.

    >>> nodes = [{"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 2.0}}]
    >>> check_fits([("rollout actor 0", {"CPU": 1.0})], nodes)
    >>> check_fits([("rollout actor 0", {"CPU": 1.0, "GPU": 1.0})], nodes)  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    rl.placement.PlacementError: rollout actor 0 asks for 1 CPU, 1 GPU, which no node of the cluster has (10.0.0.1: 2 CPU);
        lower rollout.num_gpus_per_actor or add such a node
    """
    alive = [n for n in nodes if n.get("Alive")]
    for who, b in bundles:
        if not any(_fits(b, n["Resources"]) for n in alive):
            have = "; ".join(f"{n['NodeManagerAddress']}: " + _describe({k: v for k, v in n["Resources"].items()
                                                                         if k in ("CPU", "GPU") or k in b})
                             for n in alive)
            section = "rollout" if who.startswith("rollout") else "trainer"
            per = "_per_actor" if section == "rollout" else "_per_rank"
            fields = {"CPU": f"{section}.num_cpus{per}", "GPU": f"{section}.num_gpus{per}"}
            # The resource no node has at all, else (no node has them together) every one asked for.
            missing = [k for k in b if not any(n["Resources"].get(k, 0.0) >= b[k] for n in alive)] or list(b)
            names = list(dict.fromkeys(fields.get(k, f"{section}.resources") for k in missing))
            raise PlacementError(f"{who} asks for {_describe(b)}, which no node of the cluster has ({have}); "
                                 f"lower {' or '.join(names)} or add such a node")


@dataclass
class Placement:
    """A reserved placement group: ``trainer_bundles[i]`` is trainer rank i's bundle, ``engine_bundles[i]``
    rollout actor i's (one per tensor-parallel rank, the actor in the first)."""

    group: Any
    trainer_bundles: list[int]
    engine_bundles: list[list[int]]
    bundle_node_ips: list[str] = field(default_factory=list)
    bundle_gpus: list[float] = field(default_factory=list)  # GPUs each bundle holds

    @property
    def rollout_bundles(self) -> list[int]:
        """The bundle each rollout actor runs in."""
        return [each[0] for each in self.engine_bundles]

    def options(self, bundle_index: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=bundle_index, placement_group_capture_child_tasks=False)}

    def trainer_options(self) -> list[dict]:
        return [self.options(b) for b in self.trainer_bundles]

    def rollout_options(self) -> list[dict]:
        """Each rollout actor's Ray options; ``env_vars`` go into its runtime environment.

        A tensor-parallel engine's actor reserves no GPU: vLLM's Ray executor starts a worker with
        ``VLLM_RAY_PER_WORKER_GPUS`` GPUs in each of the bundles named by ``VLLM_RAY_BUNDLE_INDICES``
        (it finds the group as the actor's own placement group)."""
        out = []
        for each in self.engine_bundles:
            options = self.options(each[0])
            if len(each) > 1:
                options |= {"num_gpus": 0, "env_vars": {
                    "VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, each)),
                    "VLLM_RAY_PER_WORKER_GPUS": f"{self.bundle_gpus[each[0]]:g}"}}
            out.append(options)
        return out

    def check_engines_within_nodes(self) -> None:
        """A tensor-parallel engine's ranks must share a node (its workers exchange activations every layer)."""
        for i, each in enumerate(self.engine_bundles):
            ips = sorted({self.bundle_node_ips[b] for b in each})
            if len(ips) > 1:
                raise PlacementError(f"rollout actor {i}'s {len(each)} tensor-parallel ranks were placed on several nodes "
                                     f"({', '.join(ips)}); use cluster.placement=strict_pack, or a smaller "
                                     "rollout.tensor_parallel_size that one node's GPUs can hold")

    @property
    def master_addr(self) -> str:
        """Where the trainer ranks meet: trainer rank 0's node."""
        return self.bundle_node_ips[self.trainer_bundles[0]] if self.trainer_bundles else "127.0.0.1"

    @property
    def nodes(self) -> int:
        return len(set(self.bundle_node_ips))

    def group_nodes(self, role: str, node_loss_wait_s: float) -> Optional[dict]:
        """What a worker group needs to name a lost node: each actor's node IP (only when the run spans
        several nodes; on one node, the driver's own, a node cannot be lost while the run goes on)."""
        if self.nodes < 2:
            return None
        bundles = self.trainer_bundles if role == "trainer" else self.rollout_bundles
        return {"node_ips": [self.bundle_node_ips[b] for b in bundles], "node_loss_wait_s": node_loss_wait_s}

    def engines_share_trainer_node(self) -> bool:
        return all(self.bundle_node_ips[b] == self.master_addr for b in self.rollout_bundles)

    def remove(self) -> None:
        from ray.util import remove_placement_group

        remove_placement_group(self.group)


def _merged(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {**a, **b}}


def place(trainer: tuple[int, dict], rollout: tuple[int, list[dict]], strategy: str = "PACK", timeout_s: float = 60.0,
          colocate: bool = False) -> Placement:
    """Reserve ``trainer`` = (ranks, bundle) and ``rollout`` = (actors, one engine's bundles) on the running cluster.
    ``colocate``: engine i and trainer rank i share bundle i (one GPU, which each reserves a share of)."""
    import ray
    from ray.util import placement_group, placement_group_table

    (num_ranks, tb), (num_actors, ebs) = trainer, rollout
    rb = ebs[0] if ebs else {}  # no engines: no engine bundles
    if colocate:
        named = [(f"trainer rank {i} with rollout actor {i}", _merged(tb, rb)) for i in range(num_ranks)]
    else:
        named = [(f"trainer rank {i}", tb) for i in range(num_ranks)]
        for i in range(num_actors):
            named += [(f"rollout actor {i}" + (f" (tensor-parallel rank {j})" if len(ebs) > 1 else ""), b)
                      for j, b in enumerate(ebs)]
    together = [(f"rollout actor {i}'s {len(ebs)} tensor-parallel ranks together",  # they must share a node
                 {k: sum(b.get(k, 0.0) for b in ebs) for k in rb}) for i in range(num_actors if len(ebs) > 1 else 0)]
    check_fits(named + together, ray.nodes())
    group = placement_group([b for _, b in named], strategy=strategy.upper())
    if not group.wait(timeout_seconds=timeout_s):
        free = ray.available_resources()
        from ray.util import remove_placement_group

        remove_placement_group(group)
        raise PlacementError(
            f"the cluster could not hold this run's {len(named)} bundles ({num_ranks} x [{_describe(tb)}] for the trainer, "
            f"{num_actors} x {len(ebs)} x [{_describe(rb)}] for rollout, strategy {strategy}) within {timeout_s:.0f} s "
            f"(cluster.placement_timeout_s); free now: {_describe({k: v for k, v in free.items() if k in ('CPU', 'GPU')})} "
            f"over {sum(n['Alive'] for n in ray.nodes())} node(s). Other jobs may hold them, or "
            f"strategy '{strategy.lower()}' cannot be met (cluster.placement)")
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    deadline = time.monotonic() + 10
    while True:  # the table fills in once the group is placed
        nodes = placement_group_table(group).get("bundles_to_node_id", {})
        if len(nodes) == len(named) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    first = 0 if colocate else num_ranks
    engines = [list(range(first + i * len(ebs), first + (i + 1) * len(ebs))) for i in range(num_actors)]
    placement = Placement(group, list(range(num_ranks)), engines, [ips.get(nodes.get(i), "127.0.0.1") for i in range(len(named))],
                          [b.get("GPU", 0.0) for _, b in named])
    try:
        placement.check_engines_within_nodes()
    except PlacementError:
        placement.remove()
        raise
    return placement


def place_recipe(recipe, rollout_actors: int) -> "Placement | None":
    """The recipe's bundles reserved on the running cluster (None in a run without Ray)."""
    if not recipe.use_ray:
        return None
    t, ro, c = recipe.trainer, recipe.rollout, recipe.cluster
    return place((t.num_ranks, bundle(t.num_cpus_per_rank, t.num_gpus_per_rank, t.resources)),
                 (rollout_actors, engine_bundle_specs(ro.tensor_parallel_size, ro.num_cpus_per_actor, ro.num_gpus_per_actor,
                                                      ro.resources)),
                 strategy=c.placement, timeout_s=c.placement_timeout_s, colocate=ro.colocate and rollout_actors > 0)


def choose_transport(requested: str, placement: Placement | None) -> str:
    """The weight transport for this placement (``auto`` decides; an explicit choice that cannot work is an error)."""
    if placement is None and requested in ("object_store", "collective"):
        raise PlacementError(f"cluster.weight_transport={requested} needs use_ray: true (it moves weights between Ray actors)")
    one_node = placement is None or placement.engines_share_trainer_node()
    if requested == "auto":
        return "shared_file" if one_node else "object_store"
    if requested in ("shared_file", "ipc") and not one_node:
        far = sorted({placement.bundle_node_ips[b] for b in placement.rollout_bundles} - {placement.master_addr})
        raise PlacementError(f"cluster.weight_transport={requested} needs every engine on trainer rank 0's node "
                             f"({placement.master_addr}); rollout actors were placed on {', '.join(far)}: "
                             "use object_store or auto, or cluster.placement=strict_pack")
    return requested


def collective_backend(trainer_gpus: float, engine_gpus: float) -> str:
    """The collective transport's backend: NCCL, GPU to GPU, when trainer rank 0 and the engines hold GPUs; else gloo.

    >>> collective_backend(1, 1), collective_backend(1, 0), collective_backend(0, 0)
    ('nccl', 'gloo', 'gloo')
    """
    return "nccl" if trainer_gpus > 0 and engine_gpus > 0 else "gloo"
