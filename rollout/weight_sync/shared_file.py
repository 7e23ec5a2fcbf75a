"""``shared_file``: one safetensors file (or LoRA directory) per version in a RAM-backed directory of this node."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.atomic import atomic_directory
from rollout.shared_dirs import OwnedDir, default_shared_dir
from rollout.types import WeightHandle, WeightKind, prompt_key
from rollout.weight_sync.registry import register_transport


@register_transport("shared_file")
class SharedFileTransport:
    """One safetensors file per version in a RAM-backed directory; older versions are released by the caller."""

    def __init__(self, directory: str | os.PathLike | None = None, room_bytes: int = 0):
        """``room_bytes``: what the versions kept at once need (``directory`` unset: /dev/shm if it has that)."""
        self._dir = OwnedDir(directory or default_shared_dir(room_bytes))

    @property
    def directory(self) -> Path:
        return self._dir.path

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, kind: str = "weights") -> WeightHandle:
        self._dir.make()
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in named_tensors}
        final = self.directory / f"policy-v{version:06d}.safetensors"
        tmp = final.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, final)  # readers never see a half-written file
        return WeightHandle(
            version=version,
            transport=self.name,
            location=str(final),
            num_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
            names=list(tensors),
            kind=kind,
        )

    def localize(self, handle: WeightHandle, directory: Path) -> WeightHandle:
        return handle  # a file on this node already

    def _fresh_dir(self, stem: str) -> Path:
        """A directory name no earlier publish used (a version can be re-published)."""
        self._dir.make()
        return self.directory / f"{stem}-{uuid.uuid4().hex[:8]}"

    def publish_lora(self, version: int, write: Callable[[Path], int]) -> WeightHandle:
        """``write(directory)`` writes a PEFT LoRA there and returns its weight bytes."""
        final = self._fresh_dir(f"lora-v{version:06d}")
        with atomic_directory(final) as tmp:  # engines never see half a LoRA
            num_bytes = write(tmp)
        return WeightHandle(version=version, transport=self.name, location=str(final), num_bytes=num_bytes, kind=WeightKind.LORA)

    def publish_prompt_loras(self, version: int, prompts: Sequence[Sequence[int]], write: Callable[[Path, int], int]) -> WeightHandle:
        """One LoRA per distinct prompt: ``write(directory, i)`` writes prompt i's; engines find it by ``prompt_key``."""
        final = self._fresh_dir(f"loras-v{version:06d}")
        keys, num_bytes = [], 0
        with atomic_directory(final) as tmp:
            for i, p in enumerate(prompts):
                key = prompt_key(p)
                if key not in keys:
                    num_bytes += write(tmp / key, i)
                    keys.append(key)
        return WeightHandle(version=version, transport=self.name, location=str(final), num_bytes=num_bytes,
                            names=keys, kind=WeightKind.LORA_PER_PROMPT)

    def receive(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        with safe_open(handle.location, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)

    def release(self, handle: WeightHandle) -> None:
        if handle.is_lora:
            shutil.rmtree(handle.location, ignore_errors=True)
        else:
            Path(handle.location).unlink(missing_ok=True)

    def close(self) -> None:
        self._dir.remove()
