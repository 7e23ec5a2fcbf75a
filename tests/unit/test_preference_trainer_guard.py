"""Offline DPO's guard against a non-finite loss (``PreferenceTrainer.train_pairs``): a step whose loss is NaN is
dropped (no backward, no optimizer step, the weights and the policy version as they were) and counted as the policy
trainer counts its own (``updates_skipped_nonfinite`` 1, ``updates_applied`` 0), and the next finite step trains.

A real one-rank trainer (DeepSpeed on gloo, CPU) on a tiny random Llama, in a child process as
tests/unit/test_sharded_build.py does: the rank's process group must not outlive the test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
sys.path.insert(0, {root!r})
import torch

from rl.tasks.tiny_model import TinyModelSpec, build_model, build_tokenizer
from trainer.config import AlgorithmConfig, TrainerConfig
from trainer.policies import PolicySpec
from trainer.preference_trainer import PreferenceTrainer
from trainer.setup import TrainerSetup
from trainer.stats import reduce_stats
from trainer.types import PreferencePairs

tok = build_tokenizer()
build_model(TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok).save_pretrained({path!r})
tok.save_pretrained({path!r})
trainer = PreferenceTrainer(TrainerSetup(policy=PolicySpec(kind="full", base_model={path!r}), dtype="float32",
                                         trainer=TrainerConfig(lr=1e-2), algorithm=AlgorithmConfig(name="dpo"),
                                         max_response_len=4, master_port=0))
pairs = PreferencePairs(prompt_ids=[[5, 6, 7], [8, 9]], chosen_ids=[[10, 2], [11, 2]], rejected_ids=[[12, 2], [13, 14, 2]])
ref_chosen, ref_rejected = trainer.reference_logprobs(pairs)
params = lambda: [p.detach().clone() for p in trainer.engine.module.parameters()]
before = params()
report = {{}}
for name, chosen in (("nan", [float("nan"), ref_chosen[1]]), ("finite", ref_chosen)):
    metrics = reduce_stats([trainer.train_pairs(pairs, 1, chosen, ref_rejected)])
    after = params()
    report[name] = dict(loss_finite=bool(torch.isfinite(torch.tensor(metrics["loss"]))), version=trainer.version,
                        updates_applied=metrics["updates_applied"], skipped=metrics["updates_skipped_nonfinite"],
                        weights_changed=any(not torch.equal(a, b) for a, b in zip(before, after)),
                        weights_finite=all(bool(torch.isfinite(p).all()) for p in after))
print("REPORT " + json.dumps(report))
"""


def test_a_nan_loss_skips_the_dpo_step_and_counts_it_then_a_finite_step_trains(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), path=str(tmp_path / "model"))],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("REPORT ")]
    report = json.loads(line.removeprefix("REPORT "))
    assert report["nan"] == dict(loss_finite=False, version=0, updates_applied=0, skipped=1, weights_changed=False,
                                 weights_finite=True)
    # The same trainer's next step applies: the skipped one left no NaN gradient or optimizer state behind.
    assert report["finite"] == dict(loss_finite=True, version=1, updates_applied=1, skipped=0, weights_changed=True,
                                    weights_finite=True)
