"""What a trainer rank's process sets up around DeepSpeed: its imports, its device and process group (no run-time
op build, the network interface of a multi-node rendezvous), its own log file, how it returns freed host memory,
its peak memory, and the one collective its ranks use to agree on a number."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Optional

import torch

# Packages DeepSpeed and transformers import at import time when installed, which no trainer rank uses: MLflow
# (DeepSpeed's autotuner logs to it) and scikit-learn (transformers' assisted generation tunes a threshold with it).
UNUSED_BY_A_RANK = ("mlflow", "sklearn")


def import_training_libraries() -> None:
    """Import DeepSpeed and transformers' model classes without ``UNUSED_BY_A_RANK``: a rank starts in a fresh
    process, and those two cost 3.3 s of its ~11 s of imports on one core (``/usr/bin/time taskset -c 1 python -c
    'import deepspeed; from transformers import ...'``, with and without them). A package
    already imported is left alone, and both stay importable afterwards: only their import from inside these
    two libraries is skipped (each library then treats the package as absent)."""
    blocked = [name for name in UNUSED_BY_A_RANK if name not in sys.modules]
    sys.modules.update(dict.fromkeys(blocked))  # None in sys.modules: ``import name`` raises ImportError
    try:
        import deepspeed  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (lazy: this loads them)
    finally:
        for name in blocked:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]


def skip_cpu_shm_op() -> None:
    """Tell DeepSpeed not to JIT-build its ``deepspeed_shm_comm`` C++ op.

    On a CPU accelerator ``init_distributed`` compiles it (30-60 s, silently) on first use, under a
    file lock that an interrupted build leaves behind, after which every run waits on it forever.
    The op only speeds up ``inference_all_reduce`` (inference tensor parallelism, which falls back
    to torch.distributed without it); training all-reduces through gloo and never calls it.
    ``deepspeed.ops.__compatible_ops__`` is the cached table its loader consults.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def node_ip() -> str:
    """The IP this process's Ray node is reached at (the rendezvous of a multi-node trainer)."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def interface_of(ip: str) -> Optional[str]:
    """The network interface holding ``ip``, or None."""
    import psutil

    return next((name for name, addrs in psutil.net_if_addrs().items() if any(a.address == ip for a in addrs)), None)


def redirect_output(path: str) -> None:
    """This process's file descriptors 1 and 2 (Python, C++ and DeepSpeed output) into ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)


def set_mmap_threshold(mib: float) -> bool:
    """Host blocks of ``mib`` MiB or more mapped on their own, and unmapped when freed (glibc's ``mallopt``; fixing the
    threshold also stops glibc from raising it). False where the C library has no ``mallopt`` (not glibc)."""
    import ctypes

    m_mmap_threshold = -3  # malloc.h
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return bool(mallopt and mallopt(m_mmap_threshold, int(mib * 2**20)))


def peak_rss_gib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def all_ranks_max(value: float, world_size: int, device) -> float:
    """The largest ``value`` of any rank: a collective, so every rank calls it at the same point."""
    if world_size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, num_gpus_per_rank: float) -> torch.device:
    """Join the ranks' process group (nccl on a GPU, gloo on the CPU); the device this rank trains on."""
    import deepspeed

    os.environ.update(
        MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK="0" if not torch.cuda.is_available() else str(rank % torch.cuda.device_count()),
    )
    if num_gpus_per_rank > 0 and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.num_gpus_per_rank={num_gpus_per_rank:g}, but CUDA is not usable in this "
                           "rank's process: no silent fall-back to the CPU")
    # Only a rank that reserved a GPU uses one (Ray shows every device to zero-GPU actors too).
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if num_gpus_per_rank > 0 else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        skip_cpu_shm_op()
    if world_size > 1 and master_addr not in ("127.0.0.1", "localhost"):
        # Ranks on several nodes: gloo would take the address the host name resolves to, which
        # need not be the one the nodes reach each other on. Use the interface of this node's Ray IP.
        iface = interface_of(node_ip())
        if iface and "GLOO_SOCKET_IFNAME" not in os.environ:
            os.environ["GLOO_SOCKET_IFNAME"] = iface
    # One rank meets no one: a file store, no port that another process could take in the meantime.
    init_method = f"file://{tempfile.mkdtemp(prefix='rl-rendezvous-')}/store" if world_size == 1 else None
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", init_method=init_method,
                               rank=rank, world_size=world_size)
    return device
