"""The collective transport's buckets: packing is exact for every dtype and shape, and a version
broadcast in several buckets over a real gloo group arrives whole, in order (two ranks as threads)."""

from __future__ import annotations

import torch
from safetensors.torch import load, save

from rl.workers.base import free_port
from rollout.types import WeightKind
from rollout.weight_buckets import ALIGN, in_buckets, pack, spec_bytes, spec_of, unpack
from rollout.weight_sync import CollectiveTransport

_g = torch.Generator().manual_seed(0)  # the same values in every process
TENSORS = {
    "embed": torch.randn(7, 5, generator=_g),
    "norm": torch.randn(5, generator=_g).to(torch.bfloat16),
    "scale": torch.tensor(3.0, dtype=torch.float64),  # 0-dim
    "mask": torch.tensor([True, False, True]),
    "ids": torch.arange(11, dtype=torch.int64),
    "half": torch.randn(3, 1, 2, generator=_g).to(torch.float16),
}


def test_pack_then_unpack_gives_every_tensor_back_bit_for_bit():
    tensors = list(TENSORS.values())
    flat = pack(tensors)
    assert flat.dtype == torch.uint8 and flat.numel() == sum(spec_bytes(spec_of(t)) for t in tensors)
    back = unpack(flat, [spec_of(t) for t in tensors])
    for a, b in zip(back, tensors):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        assert a.data_ptr() % ALIGN == 0 or a.numel() == 0  # views into the bucket, aligned for their dtype


def test_buckets_keep_order_and_respect_the_limit():
    sizes = [100, 30, 30, 500, 10, 10, 10]
    buckets = list(in_buckets(sizes, size=lambda n: n, bucket_bytes=64))
    assert [x for b in buckets for x in b] == sizes  # nothing lost, nothing reordered
    assert buckets == [[100], [30, 30], [500], [10, 10, 10]]  # only a lone oversized item exceeds the limit


def _versions(version: int) -> dict[str, torch.Tensor]:
    return {n: t if t.dtype == torch.bool else t * version for n, t in TENSORS.items()}


BUCKET_BYTES = {1: 1, 2: 96, 3: 2**20}  # per version: one tensor per bucket, a few buckets, all in one


def _rank(rank: int, port: int, handles, results) -> None:
    """One side of the group, in a process of its own (a process holds one side of each named group)."""
    try:
        transport = CollectiveTransport("test-weights")
        transport.join("127.0.0.1", port, 2, rank, "127.0.0.1")
        if rank == 0:  # the trainer: versions in a row, each waits for the one before's broadcasts
            for version, size in BUCKET_BYTES.items():
                CollectiveTransport.BUCKET_BYTES = size
                handles.put(transport.publish(iter(_versions(version).items()), version))
            transport.close()
            results.put(("sent", None))
        else:  # an engine: receives each version as vLLM would load it
            for _ in BUCKET_BYTES:
                handle = handles.get(timeout=60)
                got = [(n, t.clone()) for n, t in transport.receive(handle)]
                results.put((handle, [n for n, _ in got], save(dict(got))))  # bytes: the process ends before the test reads
    except Exception as e:  # reported to the test
        results.put(("error", repr(e)))


def test_versions_broadcast_in_buckets_arrive_whole_over_gloo():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    handles, results = ctx.Queue(), ctx.Queue()
    port = free_port()
    ranks = [ctx.Process(target=_rank, args=(r, port, handles, results)) for r in (0, 1)]
    for p in ranks:
        p.start()
    out = [results.get(timeout=120) for _ in range(len(BUCKET_BYTES) + 1)]
    for p in ranks:
        p.join(timeout=30)
    assert not [o for o in out if o[0] == "error"], out
    received = sorted((o for o in out if o[0] != "sent"), key=lambda o: o[0].version)
    assert [len(h.payload) for h, *_ in received][::2] == [len(TENSORS), 1]  # one tensor per bucket; all in one
    assert 1 < len(received[1][0].payload) < len(TENSORS)
    for version, (handle, names, data) in zip(BUCKET_BYTES, received):
        assert handle.version == version and handle.kind == WeightKind.WEIGHTS
        assert handle.num_bytes == sum(t.numel() * t.element_size() for t in TENSORS.values())
        assert names == list(TENSORS)  # in the order published
        tensors = load(data)
        for name, want in _versions(version).items():
            assert tensors[name].dtype == want.dtype and torch.equal(tensors[name], want), (version, name)
