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

Each transport is a module of this package, registered by name in ``registry`` (the interface); importing
the package registers them all.
"""

from rollout.weight_sync.registry import Transports, WeightTransport, get_transport, register_transport, transport_class
from rollout.weight_sync.shared_file import SharedFileTransport
from rollout.weight_sync.object_store import ObjectStoreTransport
from rollout.weight_sync.collective import CollectiveTransport, join_weight_group
from rollout.weight_sync.ipc import IpcTransport
from rollout.weight_sync.local_copies import LocalCopies

__all__ = ["CollectiveTransport", "IpcTransport", "LocalCopies", "ObjectStoreTransport", "SharedFileTransport",
           "Transports", "WeightTransport", "get_transport", "join_weight_group", "register_transport",
           "transport_class"]
