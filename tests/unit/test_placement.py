"""Placement decisions that need no cluster: bundles, what fits, and the weight transport."""

from __future__ import annotations

import os

import pytest

from rl.placement import Placement, PlacementError, bundle, check_fits, choose_transport

NODES = [
    {"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 1.0, "head": 1.0}},
    {"Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 4.0, "worker": 1.0}},
    {"Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 64.0, "GPU": 8.0}},
]


def test_bundle_keeps_what_is_asked_and_is_never_empty():
    assert bundle(1, 0, {"worker": 1}) == {"CPU": 1.0, "worker": 1.0}
    assert bundle(0, 0, {}) == {"CPU": 0.01}


def test_a_bundle_that_fits_no_alive_node_names_the_field():
    check_fits([("trainer rank 0", {"CPU": 1.0, "head": 1.0}), ("rollout actor 0", {"CPU": 3.0})], NODES)
    with pytest.raises(PlacementError, match=r"trainer rank 0 asks for 2 CPU, 1 head.*lower trainer.num_cpus_per_rank"):
        check_fits([("trainer rank 0", {"CPU": 2.0, "head": 1.0})], NODES)
    with pytest.raises(PlacementError, match=r"rollout actor 1 asks for 1 CPU, 1 GPU.*lower rollout.num_gpus_per_actor"):
        check_fits([("rollout actor 1", {"CPU": 1.0, "GPU": 1.0})], NODES)  # the GPU node is dead
    with pytest.raises(PlacementError, match=r"lower rollout.resources"):
        check_fits([("rollout actor 0", {"CPU": 1.0, "gpu-node": 1.0})], NODES)


def _placement(ips):
    return Placement(group=None, trainer_bundles=[0], engine_bundles=[[i] for i in range(1, len(ips))], bundle_node_ips=ips)


def test_transport_follows_the_placement():
    one_node, two_nodes = _placement(["10.0.0.1", "10.0.0.1"]), _placement(["10.0.0.1", "10.0.0.1", "10.0.0.2"])
    assert choose_transport("auto", None) == "shared_file"
    assert choose_transport("auto", one_node) == "shared_file"
    assert choose_transport("auto", two_nodes) == "object_store"
    assert choose_transport("object_store", one_node) == "object_store"
    assert two_nodes.master_addr == "10.0.0.1" and two_nodes.nodes == 2
    with pytest.raises(PlacementError, match=r"shared_file needs every engine on trainer rank 0's node \(10.0.0.1\); "
                                             r"rollout actors were placed on 10.0.0.2"):
        choose_transport("shared_file", two_nodes)
    assert choose_transport("ipc", one_node) == "ipc"
    with pytest.raises(PlacementError, match=r"ipc needs every engine on trainer rank 0's node"):
        choose_transport("ipc", two_nodes)


def test_group_nodes_only_when_the_run_spans_nodes():
    assert _placement(["10.0.0.1", "10.0.0.1"]).group_nodes("rollout", 5.0) is None
    assert _placement(["10.0.0.1", "10.0.0.2"]).group_nodes("rollout", 5.0) == {"node_ips": ["10.0.0.2"], "node_loss_wait_s": 5.0}


def test_shared_file_weights_leave_a_small_dev_shm_for_the_disk(monkeypatch):
    """Docker's default /dev/shm is 64 MB: a model whose published versions need more goes through a
    directory on disk instead of failing at its first push."""
    import shutil
    import tempfile
    from collections import namedtuple

    from rollout.weight_sync import get_transport

    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm here")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64 << 20, 0, 64 << 20))
    assert str(get_transport("shared_file", room_bytes=32 << 20).directory).startswith("/dev/shm/")
    roomless = get_transport("shared_file", room_bytes=3 * 538 << 20)  # three versions of a 538 MB model
    assert str(roomless.directory).startswith(tempfile.gettempdir() + "/")


def test_ipc_weights_refuse_a_dev_shm_too_small_for_them(monkeypatch, tiny_model_root):
    """On a CPU, ``ipc`` keeps each version in /dev/shm, and writing past what it holds would kill the trainer
    with SIGBUS: a /dev/shm without room for the versions kept at once is a clear error before the first push."""
    import shutil
    from collections import namedtuple

    from rl.config import RecipeError, load_recipe
    from rl.resources import weight_transport
    from trainer.policies.base import PolicySpec

    recipe = load_recipe(None, [f"model.path={tiny_model_root / 'model'}", "cluster.weight_transport=ipc"])
    policy = PolicySpec(kind="full", base_model=str(tiny_model_root / "model"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64 << 20, 64 << 20, 4096))
    with pytest.raises(RecipeError, match=r"weight_transport=ipc: it keeps \d+ MiB of weights in /dev/shm, which has 0 MiB free"):
        weight_transport(recipe, policy, "ipc")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64 << 20, 0, 64 << 20))
    assert weight_transport(recipe, policy, "ipc").name == "ipc"


def test_only_the_collective_transport_joins_a_group_that_a_restarted_engine_cannot_rejoin():
    """What the driver asks of a transport (join the engines to trainer rank 0's group; refuse to restart an engine
    that would have to rejoin it) comes from the transport's type, not from its name."""
    import pytest

    from rollout.weight_sync import transport_class

    assert {name: transport_class(name).joins_a_group for name in ("shared_file", "object_store", "collective", "ipc")} == \
        {"shared_file": False, "object_store": False, "collective": True, "ipc": False}
    with pytest.raises(KeyError, match="unknown weight transport 'nccl'.* registered: .*collective"):
        transport_class("nccl")
