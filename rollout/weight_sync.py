"""Weight transport: how a new policy version travels from the trainer to the rollout engines.

One small interface, several implementations (CPU and GPU differ):

- the trainer calls ``publish(named_tensors, version) -> WeightHandle`` (rank 0, after an update);
- the handle (a few strings) travels through the driver to every rollout actor;
- inside each vLLM worker, ``receive(handle)`` yields ``(name, tensor)`` pairs that are fed to
  vLLM's in-place ``reload_weights`` (no engine restart, no model reload from disk).

The trainer side sees only the publishing half (``publish``, ``publish_lora``,
``publish_prompt_loras``, ``release``, ``close``); ``rl`` builds the transport and hands it to the
trainer, so ``trainer/`` never imports this module. A handle's ``kind`` (``WeightKind``) says what it carries:
full named tensors, a sparse adapter's indices/values (added to the base in place), a PEFT LoRA
directory, or a directory of LoRAs named by ``prompt_key``, one per prompt.

The rollout side keeps one transport object per kind of handle for the run (``LocalCopies``, and
the vLLM worker's own): ``localize(handle, directory)`` makes a handle this node can read (a pull
from the object store, LoRA files received over the collective group), ``receive(handle)`` yields
its tensors.

``shared_file`` writes one safetensors file (or LoRA directory) to a RAM-backed directory
(``/dev/shm`` when it exists): works for every process on one node, CPU or GPU, and costs
(times per transport: docs/benchmarks/transports.md).

``object_store`` puts each version once into Ray's object store from trainer rank 0 (its owner);
each rollout actor pulls it to its own node (``localize``) and reads it from a node-local RAM file
like ``shared_file``: works across nodes, CPU or GPU. ``rl.placement`` picks between the two from
where the actors were placed.

``collective`` broadcasts the weights, packed into a few buckets, from trainer rank 0 to every engine
over a process group of their own (any node; ``cluster.weight_transport=collective``): gloo through
the CPU, NCCL from GPU to GPU when the trainer and the engines have GPUs.

``ipc`` packs the weights into buckets in memory the trainer shares with its node (shared memory on a
CPU, CUDA IPC on a GPU); the engines read them in place (one node; ``cluster.weight_transport=ipc``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from dataclasses import replace
from typing import Callable, ClassVar, Iterable, Iterator, Protocol, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file

from rollout.shared_buffers import open_shared, share, shared_buffer
from rollout.shared_dirs import OwnedDir, default_shared_dir
from rollout.types import WeightHandle, WeightKind, prompt_key
from rollout.weight_buckets import in_buckets, pack, packed_bytes, spec_bytes, spec_of, unpack


class WeightTransport(Protocol):
    name: str

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, kind: str = "weights") -> WeightHandle: ...

    def localize(self, handle: WeightHandle, directory: Path) -> WeightHandle: ...

    def publish_lora(self, version: int, write: Callable[[Path], int]) -> WeightHandle: ...

    def publish_prompt_loras(self, version: int, prompts: Sequence[Sequence[int]], write: Callable[[Path, int], int]) -> WeightHandle: ...

    def receive(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]: ...

    def release(self, handle: WeightHandle) -> None: ...


_TRANSPORTS: dict[str, type] = {}


def register_transport(name: str):
    def deco(cls):
        if name in _TRANSPORTS:
            raise ValueError(f"weight transport '{name}' is already registered")
        cls.name = name
        _TRANSPORTS[name] = cls
        return cls

    return deco


def get_transport(name: str, **kwargs) -> WeightTransport:
    if name not in _TRANSPORTS:
        raise KeyError(f"unknown weight transport '{name}'; available: {sorted(_TRANSPORTS)}")
    return _TRANSPORTS[name](**kwargs)


class Transports(dict):
    """One transport object per name, made at first use and kept: a process's reading side of each transport."""

    def __missing__(self, name: str) -> WeightTransport:
        self[name] = transport = get_transport(name)
        return transport


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

    def _fresh_dir(self, stem: str) -> tuple[Path, Path]:
        """A (temporary, final) pair of directory names no earlier publish used (a version can be re-published)."""
        self._dir.make()
        tag = f"{stem}-{uuid.uuid4().hex[:8]}"
        return self.directory / f"{tag}.tmp", self.directory / tag

    def publish_lora(self, version: int, write: Callable[[Path], int]) -> WeightHandle:
        """``write(directory)`` writes a PEFT LoRA there and returns its weight bytes."""
        tmp, final = self._fresh_dir(f"lora-v{version:06d}")
        num_bytes = write(tmp)
        os.replace(tmp, final)
        return WeightHandle(version=version, transport=self.name, location=str(final), num_bytes=num_bytes, kind=WeightKind.LORA)

    def publish_prompt_loras(self, version: int, prompts: Sequence[Sequence[int]], write: Callable[[Path, int], int]) -> WeightHandle:
        """One LoRA per distinct prompt: ``write(directory, i)`` writes prompt i's; engines find it by ``prompt_key``."""
        tmp, final = self._fresh_dir(f"loras-v{version:06d}")
        keys, num_bytes = [], 0
        for i, p in enumerate(prompts):
            key = prompt_key(p)
            if key not in keys:
                num_bytes += write(tmp / key, i)
                keys.append(key)
        os.replace(tmp, final)
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


def join_weight_group(name: str, addr: str, port: int, world_size: int, rank: int, local_ip: str, backend: str = "gloo",
                      timeout_s: float = 300.0):
    """Join the process group ``name`` between trainer rank 0 (rank 0, which hosts the store at
    ``addr:port``) and the engines (ranks 1..N), reached at ``local_ip``. A group of its own, beside
    any default group the process has (DeepSpeed's, vLLM's): ``gloo`` moves CPU tensors, ``nccl``
    tensors on this process's current GPU."""
    from datetime import timedelta

    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.PrefixStore(name, dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=timeout))
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_ip)]  # the address the nodes reach each other on
    return dist.ProcessGroupGloo(store, rank, world_size, opts)


@register_transport("collective")
class CollectiveTransport:
    """Trainer rank 0 broadcasts the weights to every engine over a process group of their own (the
    engines join it at start, ``join_weight_group``): no file, no object store, any node. ``gloo``
    moves them through the CPU; ``nccl`` (trainer and engines on GPUs) from GPU to GPU.

    ``publish`` packs the tensors into buckets of about ``BUCKET_BYTES`` (``rollout.weight_buckets``),
    returns the handle at once (the buckets' layout) and broadcasts them in a background thread; each
    engine's ``receive`` takes part in the same broadcasts, in the same order, and hands vLLM views of
    each bucket. A LoRA directory's files travel as byte tensors and are written on the engine's
    node. The engines must load every version published (they do: one load per publish).
    """

    BUCKET_BYTES: ClassVar[int] = 64 * 2**20
    # This process's side of each group, by name: (group, device its tensors live on). Per process, not per object:
    # on the engine side the rollout actor joins, and the vLLM worker it runs in process (reached only through
    # plain-dict RPCs) receives.
    groups: ClassVar[dict[str, tuple["torch.distributed.ProcessGroup", torch.device]]] = {}

    def __init__(self, group: str = "rl-weights"):
        self.group = group
        self._sender = None
        self._staging = SharedFileTransport()

    def join(self, addr: str, port: int, world_size: int, rank: int, local_ip: str, backend: str = "gloo") -> None:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.groups[self.group] = (join_weight_group(self.group, addr, port, world_size, rank, local_ip, backend), device)

    def _send(self, tensors: list[torch.Tensor]) -> None:
        import threading

        self.wait()  # versions go out in order
        group, device = self.groups[self.group]
        tensors = [t.to(device) for t in tensors]

        def run():
            for t in tensors:
                group.broadcast(t, 0).wait()

        self._sender = threading.Thread(target=run, name="weight-broadcast", daemon=True)
        self._sender.start()

    def _broadcast_into(self, t: torch.Tensor) -> torch.Tensor:
        """Receive one broadcast into ``t`` (allocated here on the group's device)."""
        group, _ = self.groups[self.group]
        group.broadcast(t, 0).wait()
        return t

    def wait(self) -> None:
        if self._sender is not None:
            self._sender.join()
            self._sender = None

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, kind: str = "weights") -> WeightHandle:
        _, device = self.groups[self.group]
        names, layout, packed, num_bytes = [], [], [], 0
        # Packing copies (the trainer goes on updating its parameters while the broadcast runs), one bucket at
        # a time: a ZeRO-3 parameter gathered for it is let go once it is packed.
        for bucket in in_buckets(named_tensors, lambda nt: spec_bytes(spec_of(nt[1])), self.BUCKET_BYTES):
            names += [n for n, _ in bucket]
            layout.append([spec_of(t) for _, t in bucket])
            packed.append(pack([t for _, t in bucket], device))
            num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        self._send(packed)
        return WeightHandle(version=version, transport=self.name, location="", kind=kind, names=names,
                            num_bytes=num_bytes, payload=layout)

    def _files(self, handle: WeightHandle) -> WeightHandle:
        root = Path(handle.location)
        files = {str(p.relative_to(root)): torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
                 for p in sorted(root.rglob("*")) if p.is_file()}
        shutil.rmtree(root, ignore_errors=True)
        sizes = torch.tensor([t.numel() for t in files.values()], dtype=torch.int64)
        self._send([sizes, *files.values()])
        return replace(handle, transport=self.name, location=root.name, payload=list(files))

    def publish_lora(self, version: int, write: Callable[[Path], int]) -> WeightHandle:
        return self._files(self._staging.publish_lora(version, write))

    def publish_prompt_loras(self, version: int, prompts: Sequence[Sequence[int]], write: Callable[[Path, int], int]) -> WeightHandle:
        return self._files(self._staging.publish_prompt_loras(version, prompts, write))

    def receive(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        _, device = self.groups[self.group]
        names = iter(handle.names)
        for bucket in handle.payload:
            flat = self._broadcast_into(torch.empty(sum(map(spec_bytes, bucket)), dtype=torch.uint8, device=device))
            for t in unpack(flat, bucket):  # not zip(names, ...): it would draw one name too many per bucket
                yield next(names), t

    def localize(self, handle: WeightHandle, directory: Path) -> WeightHandle:
        """Tensors are received while vLLM loads them; a LoRA version's files are received here, into ``directory``
        (vLLM reads a LoRA from a directory): returns a ``shared_file`` handle to them."""
        if not handle.is_lora:
            return handle
        _, device = self.groups[self.group]
        sizes = self._broadcast_into(torch.empty(len(handle.payload), dtype=torch.int64, device=device)).cpu()
        dest = directory / f"v{handle.version:06d}-{uuid.uuid4().hex[:8]}"
        for name, size in zip(handle.payload, sizes.tolist()):
            t = self._broadcast_into(torch.empty(size, dtype=torch.uint8, device=device))
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(t.cpu().numpy().tobytes())
        return replace(handle, transport="shared_file", location=str(dest), payload=None)

    def release(self, handle: WeightHandle) -> None:
        pass  # nothing is kept once the broadcast is done

    def close(self) -> None:
        self.wait()
        self._staging.close()


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

    def __init__(self, directory: str | os.PathLike | None = None):
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


class LocalCopies:
    """The rollout side of a transport: turns a handle into one this node's processes can read
    (``localize``), and removes the node-local copies once a newer version is loaded."""

    def __init__(self):
        self._dir = OwnedDir(default_shared_dir())
        self._current: list[Path] = []  # the served version's copy
        self._previous: list[Path] = []  # copies to remove once the new version is loaded
        self.transports = Transports()  # this process's reading side of each transport, kept for the run

    @property
    def directory(self) -> Path:
        return self._dir.path

    def localize(self, handle: WeightHandle) -> WeightHandle:
        local = self.transports[handle.transport].localize(handle, self._dir.make())
        if local is not handle:  # a copy on this node, kept until a newer version is loaded
            self._previous, self._current = self._current, [Path(local.location)]
        return local

    def loaded(self) -> None:
        """The engine holds the new version: the copies of older ones can go (a LoRA is read at its first use, so the current stays)."""
        for p in self._previous:
            shutil.rmtree(p.parent if p.is_file() else p, ignore_errors=True)
        self._previous = []

    def close(self) -> None:
        self._dir.remove()
