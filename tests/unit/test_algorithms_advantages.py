"""GRPO / Dr.GRPO / 2-GRPO advantages against hand-computed values."""

import math

import pytest
import torch

from trainer.algorithms import contrastive_pair_advantages, get, grpo_advantages, tied_groups


def close(actual, expected, atol=1e-6):
    expected = torch.tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def test_grpo_unbiased_and_population_std():
    rewards = torch.tensor([[3.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    # row 0: mean 2, centered [1, -1, 0]; unbiased var (1+1+0)/2 = 1 -> std 1
    # row 1: mean 1/3, centered [2/3, -1/3, -1/3]; unbiased var (4/9 + 1/9 + 1/9)/2 = 1/3
    #        -> std 0.577350
    #        -> [2/3, -1/3, -1/3] / 0.577350 = [1.154701, -0.577350, -0.577350]
    close(
        grpo_advantages(rewards, std_eps=0.0),
        [[1.0, -1.0, 0.0], [1.154701, -0.577350, -0.577350]],
    )
    # population std: row 0 sqrt(2/3) = 0.816497 -> +-1/0.816497 = +-1.224745
    #                 row 1 sqrt(2/9) = 0.471405 -> [1.414214, -0.707107, -0.707107]
    close(
        grpo_advantages(rewards, std_eps=0.0, unbiased_std=False),
        [[1.224745, -1.224745, 0.0], [1.414214, -0.707107, -0.707107]],
    )


def test_grpo_default_eps_and_registry_path():
    rewards = torch.tensor([[3.0, 1.0, 2.0]])
    # std 1 plus eps 1e-6: 1 / 1.000001 = 0.999999
    close(get("advantage", "grpo")(rewards), [[0.999999, -0.999999, 0.0]])


def test_grpo_g4_unbiased():
    # [1, 0, 0, 1]: mean 0.5, centered +-0.5; unbiased var 4*0.25/3 = 1/3 -> std 0.577350
    # 0.5 / 0.577350 = 0.866025 (= sqrt(3)/2)
    out = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), std_eps=0.0)
    close(out, [[0.866025, -0.866025, -0.866025, 0.866025]])


def test_dr_grpo_skips_std():
    # [3, 1, 2]: mean 2 -> [1, -1, 0] unscaled; [5, 0]: mean 2.5 -> [2.5, -2.5]
    out = grpo_advantages(torch.tensor([[3.0, 1.0, 2.0]]), normalize_std=False)
    close(out, [[1.0, -1.0, 0.0]])
    close(grpo_advantages(torch.tensor([[5.0, 0.0]]), normalize_std=False), [[2.5, -2.5]])


@pytest.mark.parametrize("group", [2, 4])
@pytest.mark.parametrize("std_eps", [1e-6, 0.0])
def test_grpo_all_equal_rewards_give_exact_zero(group, std_eps):
    # 0.1 is not exactly representable: a naive mean can leave a tiny nonzero residual
    rewards = torch.tensor([[0.1] * group, [1.0] * group, [0.0] * group])
    for unbiased in (True, False):
        out = grpo_advantages(rewards, std_eps=std_eps, unbiased_std=unbiased)
        assert not torch.isnan(out).any()
        assert torch.equal(out, torch.zeros(3, group))
    assert torch.equal(grpo_advantages(rewards, normalize_std=False), torch.zeros(3, group))


def test_grpo_g2_tie_next_to_discordant_pair():
    # row 0 tie -> 0; row 1: +-0.5 / (unbiased std 0.707107) = +-0.707107
    out = grpo_advantages(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), std_eps=0.0)
    close(out, [[0.0, 0.0], [0.707107, -0.707107]])


def test_grpo_int_rewards_become_float():
    out = grpo_advantages(torch.tensor([[1, 0]]), unbiased_std=False, std_eps=0.0)
    assert out.dtype == torch.float32
    close(out, [[1.0, -1.0]])


@pytest.mark.parametrize("shape", [(3, 1), (0, 1), (4,), (2, 2, 2)])
def test_grpo_bad_shapes_raise(shape):
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(shape))


def test_contrastive_pair_hand_values():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.2], [0.3, 0.3]])
    out = contrastive_pair_advantages(rewards)
    expected = [[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0], [1.0, -1.0], [0.0, 0.0]]
    assert torch.equal(out, torch.tensor(expected))
    assert not torch.signbit(out[2:3]).any()  # tie is +0.0, not -0.0
    assert get("advantage", "contrastive_pair") is contrastive_pair_advantages


def test_contrastive_pair_is_grpo_g2_up_to_scale():
    rewards = torch.tensor([[1.0, 0.0], [0.2, 0.9], [0.4, 0.4]])
    pair = contrastive_pair_advantages(rewards)
    # unbiased std: +-1/sqrt(2) for any discordant pair, whatever the gap
    close(
        grpo_advantages(rewards, std_eps=0.0),
        [[0.707107, -0.707107], [-0.707107, 0.707107], [0.0, 0.0]],
    )
    torch.testing.assert_close(grpo_advantages(rewards, std_eps=0.0), pair / math.sqrt(2))
    # population std: exactly +-1
    torch.testing.assert_close(grpo_advantages(rewards, std_eps=0.0, unbiased_std=False), pair)


@pytest.mark.parametrize("shape", [(3, 3), (2, 1), (0,)])
def test_contrastive_pair_needs_two(shape):
    with pytest.raises(ValueError):
        contrastive_pair_advantages(torch.zeros(shape))


def test_tied_groups():
    rewards = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.5, 0.5000001], [2.0, 2.0]])
    assert tied_groups(rewards).tolist() == [True, False, False, True]
    assert tied_groups(rewards, atol=1e-3).tolist() == [True, False, True, True]
    groups_of_four = torch.tensor([[1.0, 1.0, 1.0, 0.0], [3.0, 3.0, 3.0, 3.0]])
    assert tied_groups(groups_of_four).tolist() == [False, True]
    with pytest.raises(ValueError):
        tied_groups(torch.zeros(4))
