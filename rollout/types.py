"""What the rollout side produces and reads: how to sample, what comes back, and where a
published policy version can be read from. Plain dataclasses of lists, so they pickle cheaply
through Ray and read the same in local mode."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, Sequence


@dataclass
class SamplingSpec:
    """How to sample. ``n`` is G (completions per prompt); temperature 0 is greedy."""

    n: int = 1
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    logprobs: bool = True
    seed: Optional[int] = None  # per-request seeds are derived from it: seed + prompt index
    seeds: Optional[list[int]] = None  # one seed per prompt instead (requests gathered from several sources)


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    prompt_index: int  # index into the request's prompt list
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]  # the sampler's logprob of each token in ``token_ids``
    finish_reason: str  # "stop" (EOS) or "length"; "" while a partial rollout is unfinished
    policy_version: int = 0  # the policy version the engine held when it sampled this (the oldest, if several did)
    # 1 where the policy sampled the token, 0 where it was given it (an environment's observation in a
    # multi-turn episode, logprob 0.0 there); empty: every token was sampled.
    loss_mask: list[int] = field(default_factory=list)
    # A partial rollout continued across weight updates: the version that sampled each token; empty: one version.
    token_versions: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return bool(self.finish_reason)

    def versions(self) -> list[int]:
        """The policy version that sampled each token."""
        return self.token_versions or [self.policy_version] * len(self.token_ids)


class WeightKind(str, Enum):
    """What a published version carries."""

    WEIGHTS = "weights"  # full named tensors
    SPARSE_DELTA = "sparse_delta"  # a sparse adapter's indices/values, added to the base in place
    LORA = "lora"  # a PEFT LoRA directory
    LORA_PER_PROMPT = "lora_per_prompt"  # a directory of LoRAs named by ``prompt_key`` (``names``)


@dataclass(frozen=True)
class WeightHandle:
    """Where a published policy version can be read from. Opaque to the driver; never changed once made
    (a transport that moves a version makes a new handle)."""

    version: int
    transport: str  # the registered name of the transport that reads it
    location: str  # a file path, a shared-memory name, ...
    num_bytes: int = 0
    names: list[str] = field(default_factory=list)
    kind: WeightKind = WeightKind.WEIGHTS
    # The data itself, for transports that carry it (``object_store``: a Ray ObjectRef of {file name: bytes}).
    payload: Any = None

    def __post_init__(self):
        object.__setattr__(self, "kind", WeightKind(self.kind))  # a plain string (a handle rebuilt from a dict) too

    @property
    def is_lora(self) -> bool:
        """vLLM reads it from a directory, as a LoRA served over the unchanged base weights."""
        return self.kind in (WeightKind.LORA, WeightKind.LORA_PER_PROMPT)


def prompt_key(prompt_token_ids: Sequence[int]) -> str:
    """A short stable name for a prompt (its token ids), shared by the trainer and the engines."""
    return hashlib.sha1(",".join(map(str, prompt_token_ids)).encode()).hexdigest()[:16]
