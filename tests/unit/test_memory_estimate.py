"""The trainer-memory estimate a run states at start (rl/resources.py::trainer_memory, trainer/memory.py), and its
warning when one rank would need more than the machine has."""

from __future__ import annotations

import pytest

from rl.config import load_recipe
from rl.resources import memory_warning, trainer_memory
from trainer.memory import ACTIVATION_VECTORS_PER_LAYER, count_parameters
from trainer.policies.base import PolicySpec


def _recipe(root, *extra):
    return load_recipe(None, [f"model.path={root / 'model'}", f"data.train={root / 'data' / 'train.jsonl'}",
                              f"data.test={root / 'data' / 'test.jsonl'}", "rollout.max_new_tokens=8",
                              "rollout.max_model_len=64", "trainer.micro_batch_size=4", *extra])


def test_padded_and_packed_micro_batches_count_every_position_they_hold(tiny_model_root):
    size = count_parameters(str(tiny_model_root / "model"))
    policy = PolicySpec(kind="full", base_model=str(tiny_model_root / "model"))
    per_position = ACTIVATION_VECTORS_PER_LAYER * size.layers * size.hidden * 4 / 2**30
    padded = trainer_memory(_recipe(tiny_model_root), policy, longest_prompt=10, response_len=8)
    assert padded["activations"] == pytest.approx(4 * (10 + 8) * per_position)  # 4 rows of the longest prompt + reply
    assert padded["logits"] == pytest.approx(3 * 4 * 8 * size.vocab * 4 / 2**30)  # the response positions only
    capped = trainer_memory(_recipe(tiny_model_root), policy, longest_prompt=100, response_len=8)
    assert capped["activations"] == pytest.approx(4 * 64 * per_position)  # never longer than max_model_len
    packed = trainer_memory(_recipe(tiny_model_root, "trainer.max_tokens_per_micro_batch=48"), policy, 10, 8)
    assert packed["activations"] == pytest.approx(48 * per_position)
    checkpointed = trainer_memory(_recipe(tiny_model_root, "trainer.gradient_checkpointing=true"), policy, 10, 8)
    assert checkpointed["activations"] == pytest.approx(padded["activations"] * (size.layers + ACTIVATION_VECTORS_PER_LAYER)
                                                        / (size.layers * ACTIVATION_VECTORS_PER_LAYER))
    chunked = trainer_memory(_recipe(tiny_model_root, "trainer.logits_chunk_rows=5"), policy, 10, 8)
    assert chunked["logits"] == pytest.approx(3 * 5 * size.vocab * 4 / 2**30)
    assert padded["total"] == pytest.approx(sum(v for k, v in padded.items() if k != "total"))


def test_an_estimate_above_the_machines_memory_is_said_with_what_to_lower(tiny_model_root, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    recipe = _recipe(tiny_model_root)
    assert memory_warning({"total": 0.5, "activations": 0.1}, recipe) is None
    warning = memory_warning({"total": 1e6, "activations": 9e5}, recipe)
    assert "1000000.0 GiB" in warning and "trainer.micro_batch_size" in warning and "gradient_checkpointing" in warning
    packed = memory_warning({"total": 1e6, "activations": 0.0}, _recipe(tiny_model_root, "trainer.max_tokens_per_micro_batch=48"))
    assert "trainer.max_tokens_per_micro_batch" in packed and "gradient_checkpointing" not in packed
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # inside a cluster job the trainer may run on a bigger node
    assert memory_warning({"total": 1e6, "activations": 0.0}, recipe) is None
