"""Under ZeRO-3 the trainer builds the policy as its rank's shard from the start (``trainer.engine.sharded_build``):
its parameters are ZeRO parameters holding no full tensor, they gather to the checkpoint's weights, and a model
loaded afterwards (the reference) is whole again. Publishing it gathers one parameter at a time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
sys.path.insert(0, {root!r})
import deepspeed
import torch
from transformers import AutoModelForCausalLM

from trainer.config import TrainerConfig
from trainer.engine import sharded_build
from trainer.process import init_distributed

init_distributed(0, 1, "127.0.0.1", 0, 0)
with sharded_build(TrainerConfig(zero_stage=3), "float32"):
    shard = AutoModelForCausalLM.from_pretrained({path!r})
whole = AutoModelForCausalLM.from_pretrained({path!r})
print("sharded", all(hasattr(p, "ds_id") and p.numel() == 0 for p in shard.parameters()))
print("whole after", not any(hasattr(p, "ds_id") for p in whole.parameters()))
with deepspeed.zero.GatheredParameters(list(shard.parameters())):
    print("same weights", all(torch.equal(a, b) for a, b in zip(shard.parameters(), whole.parameters())))

# Publishing the whole policy gathers one parameter at a time: each gather holds one full parameter on the rank,
# and every yielded copy is the checkpoint's weight.
from trainer.engine import full_parameters

gathered_at_once = []
Gathered = deepspeed.zero.GatheredParameters
class Recording(Gathered):
    def __enter__(self):
        super().__enter__()
        gathered_at_once.append(sum(1 for p in shard.parameters() if p.numel() > 0))
deepspeed.zero.GatheredParameters = Recording
reference = dict(whole.named_parameters())
with full_parameters(shard, 3, all_weights=True) as named:
    published = [(name, torch.equal(t, reference[name])) for name, t in named]
print("one at a time", len(gathered_at_once) == len(reference) and set(gathered_at_once) == {{1}})
print("published", [n for n, _ in published] == list(reference) and all(same for _, same in published))
"""


def test_zero3_builds_the_policy_as_a_shard(tiny_model_root):
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), path=str(tiny_model_root / "model"))],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.split(" ")[0] in ("sharded", "whole", "same")]
    assert lines == ["sharded True", "whole after True", "same weights True"], out.stdout[-2000:]
    published = [line for line in out.stdout.splitlines() if line.split(" ")[0] in ("one", "published")]
    assert published == ["one at a time True", "published True"], out.stdout[-2000:]
