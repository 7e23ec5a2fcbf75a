"""The three places that right-pad ragged rows (per-token values, reward-model inputs, adapter prompt passes):
values where the rows have them, the pad elsewhere, and a mask that says which is which; an empty row is all pad."""

from __future__ import annotations

import torch

from rewards.model_reward import pad_right
from rl.token_advantages import padded, unpadded
from trainer.batching import padded_prompts

RAGGED = [[3, 1, 2], [], [7]]
MASK = [[1, 1, 1], [0, 0, 0], [1, 0, 0]]


def test_per_token_values_padded_with_zero_and_back():
    values, mask = padded(RAGGED)
    assert values.dtype == torch.float32 and mask.dtype == torch.bool
    assert values.tolist() == [[3.0, 1.0, 2.0], [0.0, 0.0, 0.0], [7.0, 0.0, 0.0]] and mask.int().tolist() == MASK
    assert unpadded(values, RAGGED) == [[3.0, 1.0, 2.0], [], [7.0]]
    empty_values, empty_mask = padded([])
    assert empty_values.shape == empty_mask.shape == (0, 0) and empty_values.dtype == torch.float32


def test_reward_model_inputs_padded_with_the_pad_id():
    ids, mask, lengths = pad_right(RAGGED, pad_id=9)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[3, 1, 2], [9, 9, 9], [7, 9, 9]] and mask.tolist() == MASK and lengths.tolist() == [3, 0, 1]


def test_adapter_prompt_passes_padded_on_the_device_asked():
    ids, mask = padded_prompts([[3, 1, 2], [7]], pad_id=9, device=torch.device("cpu"))
    assert ids.tolist() == [[3, 1, 2], [7, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]] and mask.dtype == torch.long
