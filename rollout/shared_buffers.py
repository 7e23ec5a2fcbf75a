"""Flat byte buffers that one process writes and other processes on its node read in place, without a copy.

A CPU buffer lives in POSIX shared memory (PyTorch's ``file_system`` sharing: a named file under
``/dev/shm``, freed when the last process holding it lets go, or by PyTorch's ``torch_shm_manager``
once every process that opened it has exited). A GPU buffer is shared through CUDA IPC: the reader maps
the writer's allocation. The GPU is named by its UUID, because each process numbers the GPUs it
sees from 0 (Ray gives each actor its own ``CUDA_VISIBLE_DEVICES``).

The handle ``share`` returns is plain data (bytes, ints, strings, bools), so it crosses Ray and vLLM's
worker RPCs unchanged. The writer must keep the buffer alive until every reader has opened it.
"""

from __future__ import annotations

import torch


def shared_buffer(nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised [nbytes] uint8 tensor on ``device`` that ``share`` hands out without a copy."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)[:nbytes]  # an empty one has nothing to share
    if device.type != "cpu":
        raise ValueError(f"a shared buffer lives on a CPU or a CUDA GPU, not on {device}")
    storage = torch.UntypedStorage(max(nbytes, 1))  # a shared-memory file cannot be empty
    storage._share_filename_cpu_()  # moves the storage into a named shared-memory file (it is empty: nothing to copy)
    return torch.empty(0, dtype=torch.uint8).set_(storage)[:nbytes]


def share(buffer: torch.Tensor) -> dict:
    """What another process on this node needs to open ``buffer`` (made by ``shared_buffer``)."""
    storage = buffer.untyped_storage()
    if buffer.is_cuda:
        device, handle, size, offset, ref_handle, ref_offset, event, event_sync = storage._share_cuda_()
        return {"cuda": {"uuid": str(torch.cuda.get_device_properties(device).uuid), "handle": handle, "size": size,
                         "offset": offset, "ref_handle": ref_handle, "ref_offset": ref_offset, "event": event,
                         "event_sync": event_sync}, "numel": buffer.numel()}
    manager, name, size = storage._share_filename_cpu_()
    return {"cpu": {"manager": manager, "name": name, "size": size}, "numel": buffer.numel()}


def _device_with_uuid(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise RuntimeError(f"GPU {uuid} holds the shared weights but this process does not see it (CUDA_VISIBLE_DEVICES="
                       "..): the ipc weight transport needs the engines to see the trainer's GPU")


def open_shared(handle: dict) -> torch.Tensor:
    """The [numel] uint8 buffer ``handle`` (from ``share``) names, mapped into this process; no copy."""
    if "cpu" in handle:
        h = handle["cpu"]
        storage = torch.UntypedStorage._new_shared_filename_cpu(h["manager"], h["name"], h["size"])
        return torch.empty(0, dtype=torch.uint8).set_(storage)[:handle["numel"]]
    h = handle["cuda"]
    torch.cuda._lazy_init()
    device = _device_with_uuid(h["uuid"])
    storage = torch.UntypedStorage._new_shared_cuda(device, h["handle"], h["size"], h["offset"], h["ref_handle"],
                                                     h["ref_offset"], h["event"], h["event_sync"])
    return torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", device)).set_(storage)[:handle["numel"]]
