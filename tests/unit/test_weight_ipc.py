"""The ipc transport on a CPU: another process reads the trainer's packed buckets from shared memory
in place, bit for bit, from a handle of plain data; the memory goes when the trainer releases it."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from safetensors.torch import load, save

from rollout.shared_buffers import open_shared, share, shared_buffer
from rollout.types import WeightHandle, WeightKind
from rollout.weight_buckets import pack
from rollout.weight_sync import IpcTransport

_g = torch.Generator().manual_seed(0)
TENSORS = {
    "embed": torch.randn(7, 5, generator=_g),
    "norm": torch.randn(5, generator=_g).to(torch.bfloat16),
    "scale": torch.tensor(3.0, dtype=torch.float64),  # 0-dim
    "mask": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 4),
    "ids": torch.arange(11, dtype=torch.int64),
    "half": torch.randn(3, 1, 2, generator=_g).to(torch.float16),
}


def _plain(x) -> bool:
    """Data that crosses Ray and vLLM's msgpack RPCs as it is: no tensors, no objects, no functions."""
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(_plain(v) for v in x)
    return x is None or isinstance(x, (bytes, str, int, float, bool))


def _read(handles, results) -> None:
    """An engine's worker: rebuilds the handle from the dict it is sent as and receives the version."""
    try:
        for _ in range(2):
            handle = WeightHandle(**handles.get(timeout=60))
            views = list(IpcTransport().receive(handle))  # all held at once: distinct storages are distinct mappings
            storages = len({t.untyped_storage().data_ptr() for _, t in views})
            # bytes: the process may end before the test reads them
            results.put((handle.version, [n for n, _ in views], save({n: t.clone() for n, t in views}), storages))
    except Exception as e:  # reported to the test
        results.put(("error", repr(e), None, None))


def _shm_names(handle: WeightHandle) -> list[str]:
    return [b["buffer"]["cpu"]["name"].decode() for b in handle.payload]


def test_another_process_reads_each_version_in_place_and_release_frees_it(monkeypatch):
    import multiprocessing as mp

    monkeypatch.setattr(IpcTransport, "BUCKET_BYTES", 96)  # a few buckets
    trainer = IpcTransport()
    versions = {v: {n: t if t.dtype == torch.bool else t * v for n, t in TENSORS.items()} for v in (1, 2)}
    handles = [trainer.publish(iter(versions[v].items()), v) for v in versions]
    for h in handles:
        assert h.kind == WeightKind.WEIGHTS and h.names == list(TENSORS) and 1 < len(h.payload) < len(TENSORS)
        assert h.num_bytes == sum(t.numel() * t.element_size() for t in TENSORS.values())
        assert _plain(h.payload)
        assert all(os.path.exists(f"/dev/shm{name}") for name in _shm_names(h))

    ctx = mp.get_context("spawn")
    to_reader, results = ctx.Queue(), ctx.Queue()
    reader = ctx.Process(target=_read, args=(to_reader, results))
    reader.start()
    for h in handles:
        to_reader.put(dataclasses.asdict(h))  # what the vLLM worker is sent
    out = [results.get(timeout=120) for _ in handles]
    reader.join(timeout=30)
    assert not [o for o in out if o[0] == "error"], out
    for (version, names, data, storages), h in zip(out, handles):
        assert names == list(TENSORS)  # in the order published
        for name, t in load(data).items():
            want = versions[version][name]
            assert t.dtype == want.dtype and t.shape == want.shape and torch.equal(t, want), (version, name)
        assert storages == len(h.payload)  # views of one mapped buffer per bucket, not a copy per tensor

    names = _shm_names(handles[0])
    trainer.release(handles[0])
    assert not any(os.path.exists(f"/dev/shm{name}") for name in names)  # nobody maps it any more
    assert all(os.path.exists(f"/dev/shm{name}") for name in _shm_names(handles[1]))  # the served version stays
    trainer.close()
    assert not any(os.path.exists(f"/dev/shm{name}") for name in _shm_names(handles[1]))


def test_a_shared_buffer_opens_as_the_same_memory():
    buffer = shared_buffer(48)
    pack([torch.arange(10, dtype=torch.int32)], out=buffer)
    view = open_shared(share(buffer))
    assert view.numel() == 48 and torch.equal(view, buffer)
    buffer[0] = 7
    assert view[0] == 7  # one memory, two mappings


def test_pack_refuses_a_buffer_of_the_wrong_size():
    with pytest.raises(ValueError, match="uint8 buffer of 16 bytes"):
        pack([torch.ones(3)], out=torch.empty(8, dtype=torch.uint8))
