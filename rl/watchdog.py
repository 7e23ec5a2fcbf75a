"""No silent waits: what the driver knows about an actor that makes no progress or whose node is
gone (``rl.workers.WorkerGroup.wait_for`` applies it to every wait)."""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence


class WorkerStalled(RuntimeError):
    """An actor made no progress within the watchdog's hard limit; the run stops, its last checkpoint intact."""


class NodeLost(WorkerStalled):
    """A node holding some of the run's actors died and they could not come back elsewhere: the run
    stops like a stall, its last checkpoint intact, and ``resume=auto`` continues it."""


def lost_nodes(ips: Sequence[str], wait_s: float = 0.0) -> list[str]:
    """Those of ``ips`` that Ray no longer counts as alive nodes. Ray marks a node dead a few seconds
    after its processes die (missed health checks), so ``wait_s`` gives it that long."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        alive = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        lost = sorted({ip for ip in ips if ip and ip not in alive})
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(1.0)


@dataclasses.dataclass
class Watchdog:
    """How long the driver waits on its actors without progress: a line on the terminal every
    ``warn_seconds``, a stop (``WorkerStalled``) at ``stop_seconds``; both times ``first_call_factor``
    for the first call of each kind (start-up, engine start, the first step compile and allocate)."""

    warn_seconds: float = 180.0
    stop_seconds: float = 1800.0
    first_call_factor: float = 3.0


# What to check when a call of this kind stalls.
_RANKS_HINT = "a trainer rank: DeepSpeed collectives wait for every rank, so one slow or dead rank holds all"
HINTS = {
    "ready": "start-up: loading the model, starting the engine; on a cluster, whether the resources this group asks for exist",
    "generate": "the vLLM engine (its log above, or `ray logs`): memory for the KV cache (rollout.cpu_kvcache_gib), max_model_len",
    "load_weights": "the weight transport between the trainer and the engines",
    "train_step": _RANKS_HINT,
    "train_pairs": _RANKS_HINT,
    "publish_weights": "trainer rank 0 writing the policy for the engines (disk space of the transport's directory)",
}
