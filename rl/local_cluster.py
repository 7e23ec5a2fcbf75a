"""A two-node Ray cluster on one machine: for the multi-node tests, and for trying ``rl submit``
without a cluster.

    python -m rl.local_cluster up [--name rl] [--head-cpus 1] [--worker-cpus 1]
    python -m rl.local_cluster down [--name rl]

Each node lives in its own network namespace (its own IP on a veth pair) and its own mount
namespace with a private ``/dev/shm`` and Ray temp dir, so a process on the worker node cannot
read the head node's shared memory or files there: it behaves like a second machine. Needs root
(``ip netns``, ``unshare -m``). The Ray Jobs address exists only inside the namespaces: run
clients with the printed prefix (``ip netns exec <name>-head ...``).

Each node carries a custom resource named after its role (``head``, ``worker``) so a recipe can
pin actors (``trainer.resources={head: 1}``). Everything started here is stopped by process id
(every process inside the node's network namespace): never ``ray stop``, which kills every Ray
process of the machine, other runs' included.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

GCS_PORT, DASHBOARD_PORT = 6379, 8265


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check)


@dataclass
class LocalCluster:
    name: str = "rl"
    nodes: dict = field(default_factory=dict)  # role -> {"ns", "ip", "cpus", "dir"}

    @property
    def subnet(self) -> str:
        return f"10.231.{zlib.crc32(self.name.encode()) % 250 + 1}"

    @property
    def state_file(self) -> Path:
        return Path("/tmp") / f"rl-local-cluster-{self.name}.json"

    @property
    def head_ip(self) -> str:
        return f"{self.subnet}.1"

    @property
    def jobs_address(self) -> str:
        return f"http://{self.head_ip}:{DASHBOARD_PORT}"

    @property
    def gcs_address(self) -> str:
        return f"{self.head_ip}:{GCS_PORT}"

    def ns(self, role: str) -> str:
        return f"{self.name}-{role}"

    def exec_prefix(self, role: str = "head") -> list[str]:
        """Prefix a command with this to run it on a node (inside its network namespace)."""
        return ["ip", "netns", "exec", self.ns(role)]

    # ------------------------------------------------------------------ up

    def up(self, head_cpus: int = 1, worker_cpus: int = 1, timeout_s: float = 120.0) -> "LocalCluster":
        if os.geteuid() != 0:
            raise PermissionError("a local cluster needs root (network and mount namespaces)")
        if self.state_file.exists():
            raise RuntimeError(f"cluster '{self.name}' is already up ({self.state_file}); "
                               f"`python -m rl.local_cluster down --name {self.name}` first")
        veth = {r: f"{self.name[:10]}-{r[0]}" for r in ("head", "worker")}  # interface names: 15 characters at most
        try:
            for role, last in (("head", 1), ("worker", 2)):
                _sh("ip", "netns", "add", self.ns(role))
                self.nodes[role] = {"ns": self.ns(role), "ip": f"{self.subnet}.{last}",
                                    "dir": f"/tmp/rl-cluster-{self.name}-{role}", "cpus": head_cpus if role == "head" else worker_cpus}
            _sh("ip", "link", "add", veth["head"], "type", "veth", "peer", "name", veth["worker"])
            for role in ("head", "worker"):
                ns, dev = self.ns(role), veth[role]
                _sh("ip", "link", "set", dev, "netns", ns)
                _sh("ip", "-n", ns, "addr", "add", f"{self.nodes[role]['ip']}/24", "dev", dev)
                _sh("ip", "-n", ns, "link", "set", dev, "up")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
            self._save()
            self.start_node("head")
            self.start_node("worker")
            self.wait_for_nodes(2, timeout_s)
        except BaseException:
            self.down()
            raise
        return self

    def start_node(self, role: str) -> None:
        """Start (or restart, after ``kill_node``) one node's Ray processes in its namespaces."""
        node = self.nodes[role]
        Path(node["dir"]).mkdir(parents=True, exist_ok=True)
        ray_bin = Path(sys.executable).parent / "ray"
        join = ["--head", f"--port={GCS_PORT}", "--include-dashboard=true", f"--dashboard-host={node['ip']}",
                f"--dashboard-port={DASHBOARD_PORT}"] if role == "head" else [f"--address={self.gcs_address}"]
        start = [str(ray_bin), "start", *join, f"--node-ip-address={node['ip']}", f"--num-cpus={node['cpus']}", "--num-gpus=0",
                 f"--resources={json.dumps({role: 1})}", f"--temp-dir={node['dir']}/ray", "--object-store-memory=1000000000",
                 "--disable-usage-stats", "--block"]
        # A private /dev/shm: the node's object store and anything a process writes there stay on this node.
        script = "mount -t tmpfs -o size=3g tmpfs /dev/shm && exec " + " ".join(_quote(a) for a in start)
        log = open(Path(node["dir"]) / "ray-start.log", "ab")
        subprocess.Popen([*self.exec_prefix(role), "unshare", "-m", "--propagation", "private", "sh", "-c", script],
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **cluster_env()})
        if role == "head":
            self._wait_port(node["ip"], GCS_PORT, role)

    def _wait_port(self, ip: str, port: int, role: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        probe = f"import socket; socket.create_connection(('{ip}', {port}), timeout=1)"
        while _sh(*self.exec_prefix(role), sys.executable, "-c", probe, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {role} node's Ray did not open {ip}:{port}; see {self.nodes[role]['dir']}/ray-start.log")
            time.sleep(0.5)

    def alive_nodes(self) -> int:
        probe = ("import ray; ray.init(address='%s', logging_level='ERROR', configure_logging=False); "
                 "print('ALIVE', sum(n['Alive'] for n in ray.nodes()))" % self.gcs_address)
        out = _sh(*self.exec_prefix("head"), sys.executable, "-c", probe, check=False)
        lines = [l for l in out.stdout.splitlines() if l.startswith("ALIVE ")]
        return int(lines[-1].split()[1]) if lines else 0

    def wait_for_nodes(self, count: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.alive_nodes() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} Ray nodes alive after {timeout_s:.0f} s; logs in /tmp/rl-cluster-{self.name}-*/")
            time.sleep(1.0)

    # ------------------------------------------------------------------ down

    def node_pids(self, role: str) -> list[int]:
        out = _sh("ip", "netns", "pids", self.ns(role), check=False)
        return [int(p) for p in out.stdout.split()]

    def kill_node(self, role: str) -> list[int]:
        """SIGKILL every process of one node (what losing the machine looks like); returns their ids."""
        pids = self.node_pids(role)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.node_pids(role) and time.monotonic() < deadline:
            time.sleep(0.2)
        return pids

    def down(self) -> None:
        """Kill both nodes' processes by id and delete the namespaces; safe to call twice."""
        for role in ("worker", "head"):
            self.kill_node(role)
            _sh("ip", "netns", "delete", self.ns(role), check=False)
            if role in self.nodes:
                import shutil

                shutil.rmtree(self.nodes[role]["dir"], ignore_errors=True)  # the node's Ray temp dir and logs
        self.state_file.unlink(missing_ok=True)

    # ------------------------------------------------------------------ state

    def _save(self) -> None:
        self.state_file.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, name: str) -> "LocalCluster":
        path = cls(name=name).state_file
        return cls(**json.loads(path.read_text())) if path.exists() else cls(name=name)


def cluster_env() -> dict[str, str]:
    """Environment for the cluster's processes and its clients: a private test cluster needs no token."""
    return {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rl.local_cluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["up", "down", "status"])
    ap.add_argument("--name", default="rl")
    ap.add_argument("--head-cpus", type=int, default=1)
    ap.add_argument("--worker-cpus", type=int, default=1)
    args = ap.parse_args(argv)
    if args.action == "up":
        c = LocalCluster(name=args.name).up(args.head_cpus, args.worker_cpus)
        print(f"[rl] cluster '{c.name}' up: head {c.head_ip} ({args.head_cpus} CPU), worker {c.nodes['worker']['ip']} "
              f"({args.worker_cpus} CPU)\n[rl] Ray Jobs address: {c.jobs_address}\n[rl] run clients inside it: "
              f"{' '.join(c.exec_prefix())} env RAY_AUTH_MODE=disabled rl submit RECIPE --address {c.jobs_address}")
    elif args.action == "down":
        LocalCluster.load(args.name).down()
        print(f"[rl] cluster '{args.name}' down")
    else:
        c = LocalCluster.load(args.name)
        if not c.nodes:
            print(f"[rl] cluster '{args.name}' is not up")
            return 1
        print(f"[rl] cluster '{c.name}': {c.alive_nodes()} node(s) alive; Jobs at {c.jobs_address}; "
              + "; ".join(f"{r}: {len(c.node_pids(r))} processes" for r in c.nodes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
