"""Every transport besides the default carries both kinds of payload a policy publishes: tensors and a LoRA
directory. The cross-node ones (object store: chosen when the engines are on another node; collective: a gloo
broadcast from trainer rank 0) are here forced on one node, and ipc (the engine reads the trainer's shared
memory in place): the engine then serves exactly the trainer's policy.

Which tensors: a sparse adapter's (int64 indices beside float values: the packed buckets of collective and ipc
mix dtypes) where the transport packs them, the full model's where it writes them whole (object store). How the
engine applies a full or sparse payload does not depend on the transport that brought it (the default transport
runs both kinds in tests/e2e/test_adapter_policy.py and test_weight_sync_agreement.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import vllm_trainer_gap
from rl.config import load_recipe
from rollout.shared_dirs import OWNER

pytestmark = pytest.mark.e2e
LOGPROB_TOL = 1e-4


# ipc sends a LoRA directory as shared_file does (the default transport, which the adapter tests run).
@pytest.mark.parametrize("kind, transport", [("none", "object_store"), ("lora", "object_store"), ("sparse", "collective"),
                                             ("lora", "collective"), ("sparse", "ipc")])
def test_every_transport_serves_the_trainers_policy(kind, transport, tiny_model_root, ray_session, tmp_path):
    from rl.online import OnlineRun

    recipe = load_recipe(None, [
        f"model.path={tiny_model_root / 'model'}", f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
        f"data.test={tiny_model_root / 'data' / 'test.jsonl'}", "data.prompts_per_step=8", "algorithm.group_size=4",
        "rollout.max_new_tokens=6", "rollout.max_model_len=64", "trainer.lr=5e-3", "trainer.micro_batch_size=32",
        "rewards.functions=[{fn: arithmetic_exact}, {fn: length_penalty}]", f"adapter.kind={kind}",
        f"cluster.weight_transport={transport}", "logging.progress=false", f"output_dir={tmp_path / 'run'}",
    ])
    t = OnlineRun(recipe)
    t.start_workers()
    try:
        assert t.workers.transport == transport
        before = t.rollout.score(t.test_set.prompt_token_ids[:2], [[5, 6], [7, 8]])
        metrics = [t.train_one_step() for _ in range(2)]
        assert vllm_trainer_gap(t) < LOGPROB_TOL
        after = t.rollout.score(t.test_set.prompt_token_ids[:2], [[5, 6], [7, 8]])
        assert max(abs(a - b) for ra, rb in zip(before, after) for a, b in zip(ra, rb)) > 1e-4  # the push reached the engine
        assert all(m["weight_sync_bytes"] > 0 for m in metrics)
        local = Path(t.rollout.call_all("local_copies_dir")[0])
        # Only the version the engine holds is copied to its node (broadcast weights leave no file at all; ipc copies nothing).
        copies = sorted(p for p in local.iterdir() if p.name != OWNER) if local.exists() else []  # not its owner lock
        assert len(copies) == {"object_store": 1, "collective": int(kind == "lora"), "ipc": 0}[transport], copies
    finally:
        t.stop_workers()
    assert not local.exists()  # removed when the run stops
