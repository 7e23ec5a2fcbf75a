"""``ipc``: the engines read the trainer's packed buckets in place from memory shared on its node."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator, Sequence

import torch

from rollout.shared_buffers import open_shared, share, shared_buffer
from rollout.shared_dirs import shm_free
from rollout.types import WeightHandle
from rollout.weight_buckets import in_buckets, pack, packed_bytes, spec_bytes, spec_of, unpack
from rollout.weight_sync.registry import register_transport
from rollout.weight_sync.shared_file import SharedFileTransport


@register_transport("ipc")
class IpcTransport:
    """The engines read the trainer's weights in place from memory the trainer shares with its node: the
    weights are packed into buckets (``rollout.weight_buckets``) that live in shared memory on a CPU and
    in the trainer's GPU memory on a GPU (CUDA IPC), and the handle carries only the buckets' layout and
    their shared-memory names (``rollout.shared_buffers``). One copy in all (the packing: the trainer
    goes on updating its parameters); no file, no serialization. One node only, like ``shared_file``.

    Each published version's buckets are held until the trainer releases its handle (it keeps every
    version a queued batch may still load); on a GPU that is one model's size of GPU memory per version
    kept. A LoRA directory travels as ``shared_file`` does.
    """

    BUCKET_BYTES: ClassVar[int] = 256 * 2**20

    def __init__(self, directory: str | os.PathLike | None = None, room_bytes: int = 0):
        """``room_bytes``: what the versions kept at once need in /dev/shm (a CPU trainer's buckets live there: writing
        past what it holds would kill the trainer with SIGBUS); ``MemoryError`` when it has less free."""
        free = shm_free() or 0
        if free < room_bytes:
            raise MemoryError(f"it keeps {room_bytes / 2**20:.0f} MiB of weights in /dev/shm, which has {free / 2**20:.0f} MiB free")
        self._held: dict[str, list[torch.Tensor]] = {}  # each handle's buckets, by its location (a fresh name)
        self._staging = SharedFileTransport(directory)

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, kind: str = "weights") -> WeightHandle:
        names, buckets, held, num_bytes = [], [], [], 0
        for bucket in in_buckets(named_tensors, lambda nt: spec_bytes(spec_of(nt[1])), self.BUCKET_BYTES):
            tensors = [t.detach() for _, t in bucket]
            flat = pack(tensors, out=shared_buffer(packed_bytes(tensors), tensors[0].device))
            names += [n for n, _ in bucket]
            buckets.append({"specs": [spec_of(t) for t in tensors], "buffer": share(flat)})
            held.append(flat)
            num_bytes += sum(t.numel() * t.element_size() for t in tensors)
        if any(flat.is_cuda for flat in held):
            torch.cuda.synchronize()  # the copies are done before any engine reads them
        location = f"ipc-v{version:06d}-{uuid.uuid4().hex[:8]}"
        self._held[location] = held
        return WeightHandle(version=version, transport=self.name, location=location, kind=kind, names=names,
                            num_bytes=num_bytes, payload=buckets)

    def publish_lora(self, version: int, write: Callable[[Path], int]) -> WeightHandle:
        return self._staging.publish_lora(version, write)

    def publish_prompt_loras(self, version: int, prompts: Sequence[Sequence[int]], write: Callable[[Path, int], int]) -> WeightHandle:
        return self._staging.publish_prompt_loras(version, prompts, write)

    def localize(self, handle: WeightHandle, directory: Path) -> WeightHandle:
        return handle  # shared memory on this node already

    def receive(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        """Views of the trainer's buckets (no copy): the caller copies them into the model before the trainer releases them."""
        names = iter(handle.names)
        for bucket in handle.payload:
            for t in unpack(open_shared(bucket["buffer"]), bucket["specs"]):
                yield next(names), t

    def release(self, handle: WeightHandle) -> None:
        if handle.transport != self.name:
            self._staging.release(handle)
        self._held.pop(handle.location, None)  # freed once no engine still maps them

    def close(self) -> None:
        self._held.clear()
        self._staging.close()
