"""A tensor-parallel engine's bundles, and colocated engines and trainer ranks, placed on a real Ray cluster
that declares GPUs (no device needed).

vLLM's Ray executor starts one worker per index in ``VLLM_RAY_BUNDLE_INDICES``, in the engine actor's own
placement group, each reserving ``VLLM_RAY_PER_WORKER_GPUS`` GPUs. The probe actor below does the same from
the options ``rl.placement`` gives a rollout actor, so the test sees which GPU each rank would get.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import json, os, ray
from rl.placement import PlacementError, bundle, engine_bundle_specs, place

ray.init(address="local", num_cpus=4, num_gpus=5, include_dashboard=False, configure_logging=False, log_to_driver=False)

@ray.remote
class Rank:
    def gpus(self):
        return ray.get_gpu_ids()

@ray.remote
class Engine:  # what vLLM's Ray executor does inside a rollout actor
    def start_ranks(self):
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        group = get_current_placement_group()
        ranks = [Rank.options(num_cpus=0, num_gpus=float(os.environ["VLLM_RAY_PER_WORKER_GPUS"]),
                              scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=b))
                 .remote() for b in map(int, os.environ["VLLM_RAY_BUNDLE_INDICES"].split(","))]
        return {"own_gpus": ray.get_gpu_ids(), "ranks": ray.get([r.gpus.remote() for r in ranks])}

placement = place((1, bundle(0.5, 1, {})), (2, engine_bundle_specs(2, 0.5, 2, {})))
out = {"engine_bundles": placement.engine_bundles, "engines": []}
for options in placement.rollout_options():
    env = options.pop("env_vars")  # as rl.workers.rollout merges them: the recipe's ask, then the placement's
    engine = Engine.options(**({"num_cpus": 0.5, "num_gpus": 2.0} | options), runtime_env={"env_vars": env}).remote()
    out["engines"].append(ray.get(engine.start_ranks.remote()))
placement.remove()
# Colocated: engine i and trainer rank i each reserve half of bundle i's GPU, as TrainerGroup and RolloutGroup ask.
placement = place((2, bundle(0.5, 0.5, {})), (2, engine_bundle_specs(1, 0.5, 0.5, {})), colocate=True)
out["colocated_bundles"] = [placement.trainer_bundles, placement.engine_bundles]
ranks = [Rank.options(num_cpus=0.5, num_gpus=0.5, **o).remote() for o in placement.trainer_options()]
engines = [Rank.options(num_cpus=0.5, num_gpus=0.5, **o).remote() for o in placement.rollout_options()]
out["colocated_gpus"] = [ray.get([t.gpus.remote(), e.gpus.remote()]) for t, e in zip(ranks, engines)]
placement.remove()
try:  # an engine's ranks must fit one node together, however its single bundles would fit
    place((1, bundle(0.5, 1, {})), (1, engine_bundle_specs(8, 0.5, 8, {})))
except PlacementError as e:
    out["too_wide"] = str(e)
print("RESULT " + json.dumps(out))
"""


def test_each_tensor_parallel_rank_gets_its_own_reserved_gpu_and_a_colocated_pair_shares_one():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, done.stdout[-2000:] + done.stderr[-4000:]
    out = json.loads(line[len("RESULT "):])
    assert out["engine_bundles"] == [[1, 2], [3, 4]]  # bundle 0 is the trainer rank's
    gpus = [g for engine in out["engines"] for rank in engine["ranks"] for g in rank]
    assert all(engine["own_gpus"] == [] for engine in out["engines"])  # the actor reserves none of its ranks' GPUs
    assert all(len(rank) == 1 for engine in out["engines"] for rank in engine["ranks"])
    assert len(set(gpus)) == 4  # four ranks, four different GPUs, none the trainer's
    assert "rollout actor 0's 8 tensor-parallel ranks together asks for 0.5 CPU, 8 GPU" in out["too_wide"]
    assert out["colocated_bundles"] == [[0, 1], [[0], [1]]]  # engine i in trainer rank i's bundle
    (t0, e0), (t1, e1) = out["colocated_gpus"]
    assert t0 == e0 and t1 == e1 and len(t0) == 1 and t0 != t1  # each pair on one GPU of its own
