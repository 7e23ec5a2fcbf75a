"""Many tensors packed into a few flat byte buffers, so a collective moves a model in a few large
messages instead of one per tensor (SmolLM2-135M has 272 tensors, and every broadcast pays a fixed
cost). Pure functions; the sender's layout (each bucket's tensor specs) travels in the weight handle.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

ALIGN = 16  # every tensor starts at a multiple of this many bytes, so a byte slice can be viewed as its dtype

T = TypeVar("T")
TensorSpec = tuple[tuple[int, ...], str]  # (shape, dtype name as in torch, e.g. "bfloat16")


def spec_of(t: torch.Tensor) -> TensorSpec:
    return tuple(t.shape), str(t.dtype).removeprefix("torch.")


def _raw_bytes(spec: TensorSpec) -> int:
    shape, dtype = spec
    return torch.Size(shape).numel() * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def spec_bytes(spec: TensorSpec) -> int:
    """Bytes the tensor takes in a bucket, padded to ``ALIGN``."""
    return -(-_raw_bytes(spec) // ALIGN) * ALIGN


def in_buckets(items: Iterable[T], size: Callable[[T], int], bucket_bytes: int) -> Iterator[list[T]]:
    """Consecutive items, in order, grouped into buckets of at most ``bucket_bytes`` (``size(item)`` each);
    a larger item makes a bucket of its own. Lazy: a bucket is yielded as soon as it is full.

    >>> [len(b) for b in in_buckets([16, 16, 16, 400, 16], size=lambda n: n, bucket_bytes=40)]
    [2, 1, 1, 1]
    """
    bucket: list[T] = []
    used = 0
    for item in items:
        n = size(item)
        if bucket and used + n > bucket_bytes:
            yield bucket
            bucket, used = [], 0
        bucket.append(item)
        used += n
    if bucket:
        yield bucket


def packed_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(spec_bytes(spec_of(t)) for t in tensors)


def pack(tensors: Sequence[torch.Tensor], device: torch.device | str = "cpu", out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensors' bytes, each at an ``ALIGN``-ed offset: one [packed_bytes] uint8 tensor on ``device``, or
    written into ``out`` (a uint8 tensor of that size, e.g. a ``rollout.shared_buffers`` buffer)."""
    flat = torch.empty(packed_bytes(tensors), dtype=torch.uint8, device=device) if out is None else out
    if flat.numel() != packed_bytes(tensors) or flat.dtype != torch.uint8:
        raise ValueError(f"pack needs a uint8 buffer of {packed_bytes(tensors)} bytes, got {flat.dtype} x {flat.numel()}")
    offset = 0
    for t in tensors:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        flat[offset:offset + raw.numel()].copy_(raw)
        offset += spec_bytes(spec_of(t))
    return flat


def unpack(flat: torch.Tensor, specs: Sequence[TensorSpec]) -> list[torch.Tensor]:
    """Views of ``flat`` (what ``pack`` made) as the tensors ``specs`` describe; no copy.

    >>> ts = [torch.arange(3, dtype=torch.bfloat16), torch.tensor(True), torch.ones(2, 2)]
    >>> all(torch.equal(a, b) for a, b in zip(unpack(pack(ts), [spec_of(t) for t in ts]), ts))
    True
    """
    out, offset = [], 0
    for shape, dtype in specs:
        out.append(flat[offset:offset + _raw_bytes((shape, dtype))].view(getattr(torch, dtype)).reshape(shape))
        offset += spec_bytes((shape, dtype))
    return out
