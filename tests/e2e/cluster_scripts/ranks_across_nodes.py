"""Run inside a two-node cluster (``python ranks_across_nodes.py GCS_ADDRESS MODEL_DIR``): one
ZeRO-0 rank, then two ZeRO-2 ranks placed on different nodes, take one update on the same batch.
Prints ``RESULT {json}``: where the ranks ran, both losses, the largest weight difference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
from safetensors.torch import load as load_bytes
from transformers import AutoTokenizer

from rl.placement import place
from rl.workers import TrainerGroup
from rollout.weight_sync import get_transport
from trainer.config import AlgorithmConfig, TrainerConfig
from trainer.policies import PolicySpec
from trainer.setup import TrainerSetup

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/e2e: the shared helpers
from helpers import random_train_batch  # noqa: E402


def main() -> None:
    gcs, model = sys.argv[1], sys.argv[2]
    ray.init(address=gcs, configure_logging=False, log_to_driver=False)
    data = random_train_batch(AutoTokenizer.from_pretrained(model))
    out = {}
    for ranks, stage, micro in ((1, 0, 12), (2, 2, 3)):
        p = place((ranks, {"CPU": 1.0}), (0, []), strategy="strict_spread", timeout_s=60)
        setup = TrainerSetup(
            policy=PolicySpec(kind="full", base_model=model), dtype="float32", algorithm=AlgorithmConfig(group_size=4),
            max_response_len=6, master_port=0, master_addr=p.master_addr, transport=get_transport("object_store"),
            trainer=TrainerConfig(num_ranks=ranks, zero_stage=stage, lr=1e-2, micro_batch_size=micro, max_grad_norm=1e6),
        )
        group = TrainerGroup.create(setup, ranks, use_ray=True, num_cpus=1, placement=p.trainer_options())
        try:
            stats = group.train_step(data, micro_batch_size=micro)
            handle = group.publish_weights()
            weights = load_bytes(bytes(ray.get(handle.payload)["policy.safetensors"]))
        finally:
            group.close()
            group.shutdown()
            p.remove()
        out[ranks] = {"nodes": sorted(set(p.bundle_node_ips)), "stats": stats, "weights": weights}
    one, two = out[1]["weights"], out[2]["weights"]
    diffs = {k: (one[k] - two[k]).abs() for k in one}
    print("RESULT " + json.dumps({
        "nodes_one": out[1]["nodes"], "nodes_two": out[2]["nodes"],
        "loss_one": out[1]["stats"]["loss"], "loss_two": out[2]["stats"]["loss"],
        "grad_norm_one": out[1]["stats"]["grad_norm"], "grad_norm_two": out[2]["stats"]["grad_norm"],
        "max_diff": max(d.max().item() for d in diffs.values()),
        "frac_above_1e-5": max((d > 1e-5).float().mean().item() for d in diffs.values()),
    }), flush=True)


if __name__ == "__main__":
    main()
