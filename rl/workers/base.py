"""What every group of workers shares: Ray started once per run (``init_ray``), and ``WorkerGroup``, a list
of workers called alike, as Ray actors or as plain objects in this process, every wait watched."""

from __future__ import annotations

import math
import os
import random
import socket
import sys
import time
from typing import Any, Optional, Sequence

from rl.watchdog import HINTS, NodeLost, Watchdog, WorkerStalled, lost_nodes


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


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(low: int = 20000) -> int:
    """A port free now, for another process to listen on later. Drawn at random from below the kernel's
    ephemeral range: a port the kernel handed out (``bind(0)``) can go to any outgoing connection before
    the listener binds it (an ``EADDRINUSE`` at rendezvous); these ports are taken only by explicit binds.
    Above Ray's worker ports (10002-19999)."""
    start, end = _ephemeral_range()
    candidates = range(low, start) if start - low >= 1000 else range(end + 1, 65536)
    for port in random.SystemRandom().sample(candidates, min(64, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every draw taken: fall back to what the kernel offers
        s.bind(("", 0))
        return s.getsockname()[1]


def describe_asks(num_cpus: float, num_gpus: float, resources: Optional[dict]) -> str:
    """What an actor asks Ray for, as its error messages name it: "1 CPU, 0 GPU, 1 head"."""
    extra = "".join(f", {v:g} {k}" for k, v in (resources or {}).items())
    return f"{num_cpus:g} CPU, {num_gpus:g} GPU{extra}"


def require_free(who: str, asks: dict[str, tuple[float, str]]) -> None:
    """Actors started outside the run's placement group (a teacher's engines, reward models) wait for resources
    forever when none are free: say what is missing instead. ``asks``: resource -> (amount in all, the field asking)."""
    import ray

    free = ray.available_resources()
    for name, (amount, field) in asks.items():
        if amount > free.get(name, 0.0) + 1e-9:
            raise RuntimeError(f"{who}: {amount:g} {name} asked ({field}), {free.get(name, 0.0):g} {name} free beside the "
                               "run's trainer ranks and engines")


class WorkerGroup:
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

    def wait_ready(self) -> None:
        """Returns once every actor is up, so start-up errors surface here, not at the first call. On a failure the
        group is shut down first: an actor that never started (or still waits for resources) must not linger."""
        if not self.remote:
            return  # a local worker is up once constructed
        try:
            self.call_all("ready")
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        if self.remote:
            import ray

            for w in self.workers:
                ray.kill(w)
        else:  # in this process: release now what an actor's process takes with it when it ends
            for w in self.workers:
                if hasattr(w, "release"):
                    w.release()
        self.workers = []
