"""``object_store``: each version is one object in Ray's object store, pulled to each engine's node."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from safetensors.torch import save as save_bytes

from rollout.types import WeightHandle
from rollout.weight_sync.registry import register_transport
from rollout.weight_sync.shared_file import SharedFileTransport


@register_transport("object_store")
class ObjectStoreTransport:
    """Each version is one object in Ray's object store: {file name: bytes} of the same files
    ``shared_file`` would write. Needs a Ray worker on both sides (trainer rank 0 puts; the rollout
    actor gets, in ``localize``); the object lives while the trainer holds the handle (``release``)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self._staging = SharedFileTransport(directory)  # LoRA directories are written here, then packed

    def _put(self, files: dict[str, bytes], handle: WeightHandle) -> WeightHandle:
        import numpy as np
        import ray

        # uint8 arrays travel without a copy through the object store (bytes would be copied once more).
        arrays = {name: np.frombuffer(data, dtype=np.uint8) for name, data in files.items()}
        return replace(handle, transport=self.name, payload=ray.put(arrays))

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, kind: str = "weights") -> WeightHandle:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in named_tensors}
        handle = WeightHandle(version=version, transport=self.name, location="policy.safetensors", kind=kind, names=list(tensors),
                              num_bytes=sum(t.numel() * t.element_size() for t in tensors.values()))
        return self._put({handle.location: save_bytes(tensors)}, handle)

    def _packed(self, handle: WeightHandle) -> WeightHandle:
        """Pack a directory the staging transport wrote, and remove it."""
        root = Path(handle.location)
        files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        shutil.rmtree(root, ignore_errors=True)
        return self._put(files, replace(handle, location=root.name))

    def publish_lora(self, version: int, write: Callable[[Path], int]) -> WeightHandle:
        return self._packed(self._staging.publish_lora(version, write))

    def publish_prompt_loras(self, version: int, prompts: Sequence[Sequence[int]], write: Callable[[Path, int], int]) -> WeightHandle:
        return self._packed(self._staging.publish_prompt_loras(version, prompts, write))

    def localize(self, handle: WeightHandle, directory: Path) -> WeightHandle:
        """Pull the version to this node: its files under ``directory``; returns a ``shared_file`` handle to them."""
        import ray

        files = ray.get(handle.payload)
        dest = directory / f"v{handle.version:06d}-{uuid.uuid4().hex[:8]}"
        for name, data in files.items():
            path = dest / name
            path.parent.mkdir(parents=True, exist_ok=True)
            data.tofile(path)
        return replace(handle, transport="shared_file", location=str(dest if handle.is_lora else dest / handle.location), payload=None)

    def receive(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        raise RuntimeError("object_store handles are read after `localize` (a Ray worker pulls them to its node first)")

    def release(self, handle: WeightHandle) -> None:
        pass  # the object is freed once no handle refers to it: the trainer drops its own after this call

    def close(self) -> None:
        self._staging.close()
