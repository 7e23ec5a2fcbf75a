"""Sequence-level off-policy masks (``trainer.algorithms.off_policy``) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from trainer import algorithms
from trainer.config import AlgorithmConfig

ROLLOUT = torch.zeros(4, 3)
# log(pi_old / pi_rollout) per token: row 0 on policy; row 1 [0, -2, *]: mean -1 over its 2 tokens;
# row 2 [0, ln 3, 0]: geometric mean 3^(1/3) = 1.44, but one token at 3; row 3 has no tokens.
OLD = torch.tensor([[0.0, 0.0, 0.0], [0.0, -2.0, 5.0], [0.0, math.log(3.0), 0.0], [9.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])


def test_geometric_mean_keeps_sequences_whose_mean_ratio_is_in_the_band():
    keep = algorithms.get("sequence_mask", "geometric_mean")(OLD, ROLLOUT, MASK, low=0.5, high=2.0)
    # row 1: e^-1 = 0.37 < 0.5 (its masked token at +5 is not read); row 2: 1.44 inside; row 3: no tokens, kept
    assert keep.tolist() == [1.0, 0.0, 1.0, 1.0]
    keep = algorithms.get("sequence_mask", "geometric_mean")(OLD, ROLLOUT, MASK, low=0.3, high=1.4)
    assert keep.tolist() == [1.0, 1.0, 0.0, 1.0]  # 0.37 now inside, 1.44 above 1.4


def test_token_extremes_drop_a_sequence_for_one_far_token():
    keep = algorithms.get("sequence_mask", "token_extremes")(OLD, ROLLOUT, MASK, low=0.5, high=2.0)
    # row 1: a token at e^-2 = 0.14 < 0.5; row 2: a token at 3 > 2 (its geometric mean was inside)
    assert keep.tolist() == [1.0, 0.0, 0.0, 1.0]
    keep = algorithms.get("sequence_mask", "token_extremes")(OLD, ROLLOUT, MASK, low=0.1, high=3.5)
    assert keep.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_masks_are_detached():
    old = OLD.clone().requires_grad_(True)
    assert not algorithms.get("sequence_mask", "geometric_mean")(old, ROLLOUT, MASK, low=0.5, high=2.0).requires_grad


@pytest.mark.parametrize("settings, message", [
    (dict(sequence_mask="nope"), "not registered"),
    (dict(sequence_mask="geometric_mean", sequence_mask_low=1.5), "sequence_mask_low <= 1"),
    (dict(name="online_dpo", group_size=2, sequence_mask="geometric_mean"), "does not use it"),
])
def test_config_errors_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        AlgorithmConfig(**settings)
