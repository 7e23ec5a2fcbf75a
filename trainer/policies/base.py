"""The policy interface: one object answers, for every kind, what trains, what the reference is,
what the engines receive after an update, and how it is saved and written back.

Kinds (``PolicySpec.kind``): ``full`` (the whole model trains), ``lora``, ``sparse``, ``arrow``
(adapters over a frozen base). The trainer never branches on the kind: it asks the policy.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from torch import nn

from trainer.config import AdapterConfig

POLICY_KINDS = ("full", "lora", "sparse", "arrow")


@dataclass
class PolicySpec:
    """What the policy is and where it starts, decided once from the recipe (``rl.prepare.prepare_policy``).

    ``base_model``: the run's original model: the KL / DPO reference, and the frozen base of an adapter.
    ``start_from``: full: a checkpoint to start from (resume), else the base; adapter: an adapter
    directory (a library expert, a merge, a checkpoint), or None for a new adapter.
    ``expert_dirs``: Arrow's routed library experts. ``lora_rank``: rank of the LoRA the engines serve.
    ``calibration_token_ids``: prompts that choose a new sparse adapter's mask.
    """

    kind: str = "full"
    base_model: str = ""
    start_from: Optional[str] = None
    adapter: Optional[AdapterConfig] = None
    expert_dirs: list[str] = field(default_factory=list)
    lora_rank: int = 0
    calibration_token_ids: Optional[list[list[int]]] = None

    def __post_init__(self):
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"unknown policy kind {self.kind!r}; known: {POLICY_KINDS}")

    @property
    def is_adapter(self) -> bool:
        return self.kind != "full"

    @property
    def model_path(self) -> str:
        """The weights the trainer and the engines load at start-up (an adapter's base never changes)."""
        return self.start_from if self.kind == "full" and self.start_from else self.base_model

    @property
    def served_lora_rank(self) -> int:
        """Rank of the LoRA the engines serve (0: the engines hold the policy's weights themselves)."""
        return self.lora_rank if self.kind in ("lora", "arrow") else 0

    @property
    def routes_per_batch(self) -> bool:
        """An Arrow policy is published for each batch: its served routing is averaged over the prompts."""
        return self.kind == "arrow"

    def loras_per_batch(self, prompts_per_step: int) -> int:
        """LoRAs one engine batch may hold: one per prompt for per-prompt Arrow serving, else one."""
        if self.kind == "arrow" and self.adapter.arrow_serving == "prompt":
            return min(prompts_per_step, 64)
        return 1


class Policy:
    """``model`` is what DeepSpeed wraps; only its trainable parameters change."""

    model: nn.Module
    # The engines receive every weight (a full model): under ZeRO-3 the trainer then gathers them one at a time
    # as they are published; an adapter policy needs only its trainable parameters gathered.
    publishes_all_weights: bool = False

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The module whose logprobs are the KL / DPO reference (the frozen base or a frozen copy)."""
        raise NotImplementedError
        yield  # pragma: no cover

    def publish(self, transport, version: int, params: Sequence = (), prompts: Optional[Sequence[Sequence[int]]] = None,
                pad_id: int = 0):
        """Hand what the engines need for this version to ``transport`` (rank 0); returns its handle.

        ``params`` are the model's named parameters, full (under ZeRO-3 gathered, for a policy that
        ``publishes_all_weights`` lazily: iterate them once, in order); ``prompts`` the batch about to be
        sampled (an Arrow policy is routed over them).
        """
        raise NotImplementedError

    def save(self, path: str | os.PathLike, base_model: str, state_dict: Optional[dict] = None) -> None:
        """The policy into a checkpoint directory, loadable as ``PolicySpec.start_from`` of the same kind
        (``state_dict``: the full weights, gathered, where the model holds only a ZeRO-3 shard)."""
        raise NotImplementedError

    def library_sources(self, checkpoint: str | os.PathLike) -> dict[str, Path]:
        """{name suffix: adapter directory} to write into the adapter library ('' = the adapter itself)."""
        return {"": Path(checkpoint)}

    def numel_in_memory(self) -> int:
        """Parameters this policy holds: the model, plus frozen copies or experts kept outside it."""
        return held_numel(self.model)


def held_numel(module: nn.Module) -> int:
    """Parameters ``module`` holds on this rank: of a ZeRO-3 parameter its shard (the parameter itself is then an
    empty placeholder), of any other the whole tensor."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
