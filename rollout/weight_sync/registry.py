"""The weight transports by name: the interface each implements, and the registry ``rl`` builds them from."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator, Protocol, Sequence

import torch

from common.registry import Registry
from rollout.types import WeightHandle


class WeightTransport(Protocol):
    name: str
    # The engines join a process group with trainer rank 0 before the first version (``join``); an engine started
    # again later cannot join the group already formed, so it cannot be given the current version.
    joins_a_group: ClassVar[bool]

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, kind: str = "weights") -> WeightHandle: ...

    def localize(self, handle: WeightHandle, directory: Path) -> WeightHandle: ...

    def publish_lora(self, version: int, write: Callable[[Path], int]) -> WeightHandle: ...

    def publish_prompt_loras(self, version: int, prompts: Sequence[Sequence[int]], write: Callable[[Path, int], int]) -> WeightHandle: ...

    def receive(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]: ...

    def release(self, handle: WeightHandle) -> None: ...


TRANSPORTS: Registry[type] = Registry("weight transport")


def register_transport(name: str):
    def deco(cls):
        TRANSPORTS.register(name)(cls)  # first: a refused class keeps its attributes
        cls.name = name
        cls.joins_a_group = getattr(cls, "joins_a_group", False)
        return cls

    return deco


def transport_class(name: str) -> type:
    """The transport registered as ``name``: what it can do (``joins_a_group``) without building one."""
    return TRANSPORTS.get(name)


def get_transport(name: str, **kwargs) -> WeightTransport:
    return transport_class(name)(**kwargs)


class Transports(dict):
    """One transport object per name, made at first use and kept: a process's reading side of each transport."""

    def __missing__(self, name: str) -> WeightTransport:
        self[name] = transport = get_transport(name)
        return transport
