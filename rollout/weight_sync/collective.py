"""``collective``: trainer rank 0 broadcasts packed buckets to every engine over a process group of their own."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator, Sequence

import torch

from rollout.types import WeightHandle
from rollout.weight_buckets import in_buckets, pack, spec_bytes, spec_of, unpack
from rollout.weight_sync.registry import register_transport
from rollout.weight_sync.shared_file import SharedFileTransport


def join_weight_group(name: str, addr: str, port: int, world_size: int, rank: int, local_ip: str, backend: str = "gloo",
                      timeout_s: float = 300.0):
    """Join the process group ``name`` between trainer rank 0 (rank 0, which hosts the store at
    ``addr:port``) and the engines (ranks 1..N), reached at ``local_ip``. A group of its own, beside
    any default group the process has (DeepSpeed's, vLLM's): ``gloo`` moves CPU tensors, ``nccl``
    tensors on this process's current GPU."""
    from datetime import timedelta

    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.PrefixStore(name, dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=timeout))
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_ip)]  # the address the nodes reach each other on
    return dist.ProcessGroupGloo(store, rank, world_size, opts)


@register_transport("collective")
class CollectiveTransport:
    """Trainer rank 0 broadcasts the weights to every engine over a process group of their own (the
    engines join it at start, ``join_weight_group``): no file, no object store, any node. ``gloo``
    moves them through the CPU; ``nccl`` (trainer and engines on GPUs) from GPU to GPU.

    ``publish`` packs the tensors into buckets of about ``BUCKET_BYTES`` (``rollout.weight_buckets``),
    returns the handle at once (the buckets' layout) and broadcasts them in a background thread; each
    engine's ``receive`` takes part in the same broadcasts, in the same order, and hands vLLM views of
    each bucket. A LoRA directory's files travel as byte tensors and are written on the engine's
    node. The engines must load every version published (they do: one load per publish).
    """

    BUCKET_BYTES: ClassVar[int] = 64 * 2**20
    joins_a_group: ClassVar[bool] = True
    # This process's side of each group, by name: (group, device its tensors live on). Per process, not per object:
    # on the engine side the rollout actor joins, and the vLLM worker it runs in process (reached only through
    # plain-dict RPCs) receives.
    groups: ClassVar[dict[str, tuple["torch.distributed.ProcessGroup", torch.device]]] = {}

    def __init__(self, group: str = "rl-weights"):
        self.group = group
        self._sender = None
        self._staging = SharedFileTransport()

    def join(self, addr: str, port: int, world_size: int, rank: int, local_ip: str, backend: str = "gloo") -> None:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.groups[self.group] = (join_weight_group(self.group, addr, port, world_size, rank, local_ip, backend), device)

    def _send(self, tensors: list[torch.Tensor]) -> None:
        import threading

        self.wait()  # versions go out in order
        group, device = self.groups[self.group]
        tensors = [t.to(device) for t in tensors]

        def run():
            for t in tensors:
                group.broadcast(t, 0).wait()

        self._sender = threading.Thread(target=run, name="weight-broadcast", daemon=True)
        self._sender.start()

    def _broadcast_into(self, t: torch.Tensor) -> torch.Tensor:
        """Receive one broadcast into ``t`` (allocated here on the group's device)."""
        group, _ = self.groups[self.group]
        group.broadcast(t, 0).wait()
        return t

    def wait(self) -> None:
        if self._sender is not None:
            self._sender.join()
            self._sender = None

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, kind: str = "weights") -> WeightHandle:
        _, device = self.groups[self.group]
        names, layout, packed, num_bytes = [], [], [], 0
        # Packing copies (the trainer goes on updating its parameters while the broadcast runs), one bucket at
        # a time: a ZeRO-3 parameter gathered for it is let go once it is packed.
        for bucket in in_buckets(named_tensors, lambda nt: spec_bytes(spec_of(nt[1])), self.BUCKET_BYTES):
            names += [n for n, _ in bucket]
            layout.append([spec_of(t) for _, t in bucket])
            packed.append(pack([t for _, t in bucket], device))
            num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        self._send(packed)
        return WeightHandle(version=version, transport=self.name, location="", kind=kind, names=names,
                            num_bytes=num_bytes, payload=layout)

    def _files(self, handle: WeightHandle) -> WeightHandle:
        root = Path(handle.location)
        files = {str(p.relative_to(root)): torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
                 for p in sorted(root.rglob("*")) if p.is_file()}
        shutil.rmtree(root, ignore_errors=True)
        sizes = torch.tensor([t.numel() for t in files.values()], dtype=torch.int64)
        self._send([sizes, *files.values()])
        return replace(handle, transport=self.name, location=root.name, payload=list(files))

    def publish_lora(self, version: int, write: Callable[[Path], int]) -> WeightHandle:
        return self._files(self._staging.publish_lora(version, write))

    def publish_prompt_loras(self, version: int, prompts: Sequence[Sequence[int]], write: Callable[[Path, int], int]) -> WeightHandle:
        return self._files(self._staging.publish_prompt_loras(version, prompts, write))

    def receive(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        _, device = self.groups[self.group]
        names = iter(handle.names)
        for bucket in handle.payload:
            flat = self._broadcast_into(torch.empty(sum(map(spec_bytes, bucket)), dtype=torch.uint8, device=device))
            for t in unpack(flat, bucket):  # not zip(names, ...): it would draw one name too many per bucket
                yield next(names), t

    def localize(self, handle: WeightHandle, directory: Path) -> WeightHandle:
        """Tensors are received while vLLM loads them; a LoRA version's files are received here, into ``directory``
        (vLLM reads a LoRA from a directory): returns a ``shared_file`` handle to them."""
        if not handle.is_lora:
            return handle
        _, device = self.groups[self.group]
        sizes = self._broadcast_into(torch.empty(len(handle.payload), dtype=torch.int64, device=device)).cpu()
        dest = directory / f"v{handle.version:06d}-{uuid.uuid4().hex[:8]}"
        for name, size in zip(handle.payload, sizes.tolist()):
            t = self._broadcast_into(torch.empty(size, dtype=torch.uint8, device=device))
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(t.cpu().numpy().tobytes())
        return replace(handle, transport="shared_file", location=str(dest), payload=None)

    def release(self, handle: WeightHandle) -> None:
        pass  # nothing is kept once the broadcast is done

    def close(self) -> None:
        self.wait()
        self._staging.close()
