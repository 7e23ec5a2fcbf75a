"""Where the actors run: one Ray placement group with a bundle per trainer rank and per rollout
actor, reserved before any actor starts, so a cluster that cannot hold the run fails at once with
what is missing instead of leaving actors waiting for resources.

Once the group is placed, every bundle's node is known, which decides two things: the trainer's
rendezvous address (trainer rank 0's node IP) and the weight transport (``shared_file`` when every
engine shares trainer rank 0's node, else ``object_store``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional


class PlacementError(RuntimeError):
    """The cluster cannot hold the run as the recipe places it; the message says what is missing."""


def bundle(num_cpus: float, num_gpus: float, resources: dict[str, float]) -> dict[str, float]:
    """The Ray resources one actor reserves. A bundle may not be empty: a zero-CPU actor keeps a sliver."""
    b = {"CPU": float(num_cpus), "GPU": float(num_gpus), **{k: float(v) for k, v in resources.items()}}
    b = {k: v for k, v in b.items() if v > 0}
    return b or {"CPU": 0.01}


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
    """A reserved placement group: bundle ``i`` of ``trainer_bundles`` is trainer rank i's, of ``rollout_bundles`` rollout actor i's."""

    group: Any
    trainer_bundles: list[int]
    rollout_bundles: list[int]
    bundle_node_ips: list[str] = field(default_factory=list)

    def options(self, bundle_index: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=bundle_index, placement_group_capture_child_tasks=False)}

    def trainer_options(self) -> list[dict]:
        return [self.options(b) for b in self.trainer_bundles]

    def rollout_options(self) -> list[dict]:
        return [self.options(b) for b in self.rollout_bundles]

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


def place(trainer: tuple[int, dict], rollout: tuple[int, dict], strategy: str = "PACK", timeout_s: float = 60.0) -> Placement:
    """Reserve ``trainer`` = (ranks, bundle) and ``rollout`` = (actors, bundle) on the running cluster."""
    import ray
    from ray.util import placement_group, placement_group_table

    (num_ranks, tb), (num_actors, rb) = trainer, rollout
    named = [(f"trainer rank {i}", tb) for i in range(num_ranks)] + [(f"rollout actor {i}", rb) for i in range(num_actors)]
    check_fits(named, ray.nodes())
    group = placement_group([b for _, b in named], strategy=strategy.upper())
    if not group.wait(timeout_seconds=timeout_s):
        free = ray.available_resources()
        from ray.util import remove_placement_group

        remove_placement_group(group)
        raise PlacementError(
            f"the cluster could not hold this run's {len(named)} bundles ({num_ranks} x [{_describe(tb)}] for the trainer, "
            f"{num_actors} x [{_describe(rb)}] for rollout, strategy {strategy}) within {timeout_s:.0f} s "
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
    return Placement(group, list(range(num_ranks)), list(range(num_ranks, num_ranks + num_actors)),
                     [ips.get(nodes.get(i), "127.0.0.1") for i in range(len(named))])


def place_recipe(recipe, rollout_actors: int) -> "Placement | None":
    """The recipe's bundles reserved on the running cluster (None in a run without Ray)."""
    if not recipe.use_ray:
        return None
    t, ro, c = recipe.trainer, recipe.rollout, recipe.cluster
    return place((t.num_ranks, bundle(t.num_cpus_per_rank, t.num_gpus_per_rank, t.resources)),
                 (rollout_actors, bundle(ro.num_cpus_per_actor, ro.num_gpus_per_actor, ro.resources)),
                 strategy=c.placement, timeout_s=c.placement_timeout_s)


def choose_transport(requested: str, placement: Placement | None) -> str:
    """The weight transport for this placement (``auto`` decides; an explicit choice that cannot work is an error)."""
    if placement is None and requested in ("object_store", "collective"):
        raise PlacementError(f"cluster.weight_transport={requested} needs use_ray: true (it moves weights between Ray actors)")
    one_node = placement is None or placement.engines_share_trainer_node()
    if requested == "auto":
        return "shared_file" if one_node else "object_store"
    if requested == "shared_file" and not one_node:
        far = sorted({placement.bundle_node_ips[b] for b in placement.rollout_bundles} - {placement.master_addr})
        raise PlacementError(f"cluster.weight_transport=shared_file needs every engine on trainer rank 0's node "
                             f"({placement.master_addr}); rollout actors were placed on {', '.join(far)}: "
                             "use object_store or auto, or cluster.placement=strict_pack")
    return requested
