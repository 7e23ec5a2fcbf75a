"""GRPO / Dr.GRPO / 2-GRPO / RLOO / REINFORCE++ advantages against hand-computed values."""

import math

import pytest
import torch

from trainer.algorithms import (
    contrastive_pair_advantages,
    get,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    tied_groups,
)


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


# ----------------------------------------------------------------------------- RLOO


def test_rloo_hand_values():
    # [1, 0, 0, 1]: 1 - (0+0+1)/3 = 2/3; 0 - (1+0+1)/3 = -2/3
    close(rloo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]])), [[0.666667, -0.666667, -0.666667, 0.666667]])
    # [3, 1, 2]: 3 - 1.5 = 1.5; 1 - 2.5 = -1.5; 2 - 2 = 0
    # [1, 0, 0]: 1 - 0 = 1;     0 - 0.5 = -0.5 (twice)
    close(rloo_advantages(torch.tensor([[3.0, 1.0, 2.0], [1.0, 0.0, 0.0]])), [[1.5, -1.5, 0.0], [1.0, -0.5, -0.5]])
    # G = 2: the other sample is the baseline: [1, 0] -> [1, -1]; [0.2, 0.9] -> [-0.7, 0.7]
    close(rloo_advantages(torch.tensor([[1.0, 0.0], [0.2, 0.9]])), [[1.0, -1.0], [-0.7, 0.7]])
    assert get("advantage", "rloo") is rloo_advantages


def test_rloo_is_dr_grpo_scaled_by_g_over_g_minus_1():
    rewards = torch.tensor([[0.3, 1.0, 0.0, 0.7, 0.2], [1.0, 1.0, 0.0, 0.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(rewards), 5 / 4 * grpo_advantages(rewards, normalize_std=False))


@pytest.mark.parametrize("group", [2, 3, 4])
def test_rloo_ties_give_exact_zero(group):
    # 0.1 * (G-1) / (G-1) need not round back to 0.1: the tie is detected, not computed
    rewards = torch.tensor([[0.1] * group, [1.0] * group, [0.0] * group])
    assert torch.equal(rloo_advantages(rewards), torch.zeros(3, group))


@pytest.mark.parametrize("shape", [(3, 1), (4,), (2, 2, 2)])
def test_rloo_bad_shapes_raise(shape):
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(shape))


# ----------------------------------------------------------------------------- REINFORCE++


def test_reinforce_pp_normalizes_over_the_whole_batch():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # all 4 rewards: mean 0.25 -> centered [0.75, -0.25, -0.25, -0.25]
    # unbiased var (0.5625 + 3 * 0.0625)/3 = 0.25 -> std 0.5 -> [1.5, -0.5, -0.5, -0.5]
    # (the tied second prompt is not 0: there is no per-prompt baseline)
    close(reinforce_pp_advantages(rewards, std_eps=0.0), [[1.5, -0.5], [-0.5, -0.5]])
    # population var 0.75/4 = 0.1875 -> std 0.433013: 0.75/0.433013 = 1.732051, 0.25/0.433013 = 0.577350
    close(reinforce_pp_advantages(rewards, std_eps=0.0, unbiased_std=False), [[1.732051, -0.577350], [-0.577350, -0.577350]])
    # default eps: 0.75 / 0.500001 = 1.499997, 0.25 / 0.500001 = 0.499999
    close(get("advantage", "reinforce_pp")(rewards), [[1.499997, -0.499999], [-0.499999, -0.499999]])
    close(reinforce_pp_advantages(rewards, normalize_std=False), [[0.75, -0.25], [-0.25, -0.25]])


def test_reinforce_pp_one_sample_per_prompt():
    # G = 1 (the paper's setting): [1, 0, 1], mean 2/3 -> [1/3, -2/3, 1/3]
    # unbiased var (1/9 + 4/9 + 1/9)/2 = 1/3 -> std 0.577350 -> [0.577350, -1.154701, 0.577350]
    close(reinforce_pp_advantages(torch.tensor([[1.0], [0.0], [1.0]]), std_eps=0.0), [[0.577350], [-1.154701], [0.577350]])


def test_reinforce_pp_baseline_hand_values():
    rewards = torch.tensor([[3.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    # group means 2 and 1/3 -> centered [1, -1, 0] and [2/3, -1/3, -1/3]
    # sum of squares over the batch 1 + 1 + 0 + 4/9 + 1/9 + 1/9 = 8/3; unbiased var (8/3)/5 = 0.533333
    # -> std 0.730297: 1/0.730297 = 1.369306; (2/3)/0.730297 = 0.912871; (1/3)/0.730297 = 0.456435
    # (GRPO scales each row to unit std instead: [1, -1, 0] and [1.154701, -0.577350, -0.577350])
    close(
        reinforce_pp_baseline_advantages(rewards, std_eps=0.0),
        [[1.369306, -1.369306, 0.0], [0.912871, -0.456435, -0.456435]],
    )
    # population var (8/3)/6 = 0.444444 -> std 0.666667: [1.5, -1.5, 0], [1, -0.5, -0.5]
    close(
        reinforce_pp_baseline_advantages(rewards, std_eps=0.0, unbiased_std=False),
        [[1.5, -1.5, 0.0], [1.0, -0.5, -0.5]],
    )
    close(reinforce_pp_baseline_advantages(rewards, normalize_std=False), [[1.0, -1.0, 0.0], [0.666667, -0.333333, -0.333333]])
    assert get("advantage", "reinforce_pp_baseline") is reinforce_pp_baseline_advantages


def test_reinforce_pp_baseline_tied_group_stays_zero_and_counts_in_the_std():
    # centered [0.5, -0.5, 0, 0]: unbiased var 0.5/3 -> std 0.408248; 0.5/0.408248 = 1.224745
    out = reinforce_pp_baseline_advantages(torch.tensor([[1.0, 0.0], [0.1, 0.1]]), std_eps=0.0)
    close(out, [[1.224745, -1.224745], [0.0, 0.0]])
    assert torch.equal(out[1], torch.zeros(2))


@pytest.mark.parametrize("fn", [reinforce_pp_advantages, reinforce_pp_baseline_advantages])
@pytest.mark.parametrize("std_eps", [1e-6, 0.0])
def test_reinforce_pp_all_equal_batch_gives_exact_zero(fn, std_eps):
    for value in (0.1, 1.0, 0.0):
        out = fn(torch.full((3, 4), value), std_eps=std_eps)
        assert not torch.isnan(out).any()
        assert torch.equal(out, torch.zeros(3, 4))
    # baseline: every group tied, but not to the same value
    out = reinforce_pp_baseline_advantages(torch.tensor([[0.1, 0.1], [1.0, 1.0]]), std_eps=std_eps)
    assert torch.equal(out, torch.zeros(2, 2))


def test_reinforce_pp_bad_shapes_raise():
    for fn in (reinforce_pp_advantages, reinforce_pp_baseline_advantages):
        with pytest.raises(ValueError):
            fn(torch.zeros(4))
    with pytest.raises(ValueError, match="G >= 2"):
        reinforce_pp_baseline_advantages(torch.zeros(3, 1))
