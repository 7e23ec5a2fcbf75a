"""Adaptive sampling: Reinforce-Ada's rules, Knapsack RL's allocation, the unlikeliness penalty, and how groups of
different sizes reach the advantage and the loss. Hand-computed values; the Knapsack allocation against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from rl.allocation import ALLOCATIONS, Knapsack, allocation_metrics, mean_logprob, resample_seed, training_rows
from rl.config import RecipeError, load_recipe
from rl.rollouts import Group, Sampled
from rollout.types import Completion
from trainer import algorithms
from trainer.algorithms import (
    ada_done,
    ada_training_subset,
    clipped_policy_loss,
    grouped_apply,
    grpo_advantages,
    knapsack_allocation,
    knapsack_value,
    pool_baseline_advantages,
    unlikeliness_rewards,
)

# ----------------------------------------------------------------------------- Reinforce-Ada


@pytest.mark.parametrize("rewards, rule, done", [
    ([0, 0, 0, 0], "positive", False),
    ([0, 0, 0, 1], "positive", True),
    ([0, 0, 0, 1], "balance", False),  # G=4 needs 2 successes and 2 failures
    ([1, 0, 1, 0], "balance", True),
    ([1, 1, 1, 1, 1, 0], "balance", False),  # one failure short
    ([1, 1, 1, 0, 1, 0], "balance", True),
])
def test_ada_stopping_rules(rewards, rule, done):
    assert ada_done(torch.tensor(rewards, dtype=torch.float32), rule, 4, 0.5) is done


def test_ada_stopping_rule_uses_the_threshold_and_rejects_unknown_rules():
    assert not ada_done(torch.tensor([0.5, 0.2]), "positive", 4, 0.5)  # 0.5 is not above 0.5
    assert ada_done(torch.tensor([0.51]), "positive", 4, 0.5)
    with pytest.raises(ValueError, match="positive, balance"):
        ada_done(torch.tensor([1.0]), "both", 4, 0.5)


@pytest.mark.parametrize("rewards, subset", [
    ([1, 1, 1, 1, 0, 0, 0, 0], [0, 1, 4, 5]),  # two of each, the earliest
    ([0, 0, 0, 0, 0, 1, 0, 0], [0, 1, 2, 5]),  # one success: failures fill in
    ([1, 1, 1, 1, 1, 1, 1, 0], [0, 1, 2, 7]),  # one failure: successes fill in
    ([0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 2, 3]),  # no signal: the first four (advantage 0)
    ([1, 0], [0, 1]),  # a pool smaller than G trains whole
])
def test_ada_training_subset(rewards, subset):
    assert ada_training_subset(torch.tensor(rewards, dtype=torch.float32), 4, 0.5) == subset


def test_pool_baseline_advantages():
    pool = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # mean 0.25
    train = pool[[0, 1, 2, 7]]
    assert pool_baseline_advantages(train, pool).tolist() == [0.75, -0.25, -0.25, 0.75]
    std = pool.std().item()  # unbiased: sqrt(8 * 0.25 * 0.75 / 7) = 0.46291
    got = pool_baseline_advantages(train, pool, normalize_std=True, std_eps=0.0)
    torch.testing.assert_close(got, torch.tensor([0.75, -0.25, -0.25, 0.75]) / std)
    assert abs(std - 0.46291) < 1e-5
    tied = torch.ones(6)
    assert pool_baseline_advantages(tied[:4], tied, normalize_std=True).tolist() == [0.0] * 4


# ----------------------------------------------------------------------------- Knapsack RL


def test_knapsack_value_hand_values():
    # p = 0.25, n = 4: (1 - 0.25^4 - 0.75^4) * 0.25 * 0.75^2 = (1 - 0.00390625 - 0.31640625) * 0.140625 = 0.0955810546875
    assert knapsack_value(torch.tensor(4.0), torch.tensor(0.25)).item() == pytest.approx(0.0955810546875)
    assert knapsack_value(torch.tensor(10.0), torch.tensor(0.0)).item() == 0.0
    assert knapsack_value(torch.tensor(10.0), torch.tensor(1.0)).item() == 0.0


def _brute_force(p: list[float], budget: int, low: int, high: int) -> float:
    best = 0.0
    for counts in itertools.product(range(low, high + 1), repeat=len(p)):
        if sum(counts) <= budget:
            best = max(best, sum(knapsack_value(torch.tensor(float(n)), torch.tensor(q)).item() for n, q in zip(counts, p)))
    return best


@pytest.mark.parametrize("p, budget", [([0.5, 0.9, 0.2], 12), ([0.1, 0.3, 0.6, 0.95], 14), ([0.7, 0.05], 9), ([0.5, 0.5, 0.5], 20)])
def test_knapsack_allocation_is_optimal(p, budget):
    counts = knapsack_allocation(p, budget, low=2, high=8, default=4)
    assert all(2 <= n <= 8 for n in counts) and sum(counts) == min(budget, 8 * len(p))
    got = sum(knapsack_value(torch.tensor(float(n)), torch.tensor(q)).item() for n, q in zip(counts, p))
    assert got == pytest.approx(_brute_force(p, budget, 2, 8), abs=1e-12)


def test_knapsack_allocation_fixed_budgets_and_fallback():
    # None: no history (default 4); 0 and 1: a tied group, the minimum 2. The budget left after 0.5 reaches 8 goes
    # to the never-solved prompt first.
    assert knapsack_allocation([None, 0.0, 1.0, 0.5], budget=20, low=2, high=8, default=4) == [4, 6, 2, 8]
    assert knapsack_allocation([None, None], budget=8, low=2, high=8, default=4) == [4, 4]
    with pytest.raises(ValueError, match="cannot give 3 prompts their minimum"):
        knapsack_allocation([None, 0.5, 0.5], budget=7, low=2, high=8, default=4)


def test_knapsack_history_window_and_state_round_trip():
    recipe = load_recipe(None, ["algorithm.allocation=knapsack", "algorithm.group_size=4", "data.prompts_per_step=2"],
                         check_paths=False)
    k = Knapsack(recipe)
    batch = _sampled([[1, 0, 0, 0], [1, 1, 1, 1]], indices=[7, 3])
    k.observe(batch, step=1)
    assert k.estimate(7, step=2) is None  # 4 outcomes: not yet trusted
    k.observe(batch, step=2)
    assert k.estimate(7, step=3) == 0.25 and k.estimate(3, step=3) == 1.0
    for step in range(3, 8):
        k.observe(batch, step)
    assert len(k.history[7]) == 16  # the window
    again = Knapsack(recipe)
    again.load_state_dict(k.state_dict())
    assert again.history == k.history
    assert k.first_counts([7, 3], step=8) == [6, 2]  # B*G = 8: the solved prompt gets the minimum, the other the rest


def test_asynchronous_knapsack_shares_out_each_step_from_the_outcomes_it_would_have_seen():
    """max_staleness 1: step j is submitted before step j - 1 trains, so it sees outcomes of steps <= j - 2 only,
    whether the step before it has been observed yet or not (a resumed run allocates as the uninterrupted one)."""
    recipe = load_recipe(None, ["algorithm.allocation=knapsack", "algorithm.group_size=4", "data.prompts_per_step=2",
                                "rollout.max_staleness=1"], check_paths=False)
    k = Knapsack(recipe)
    k.observe(_sampled([[0, 0, 0, 0], [1, 1, 1, 1]], indices=[7, 3]), step=1)
    k.observe(_sampled([[0, 0, 0, 0], [1, 1, 1, 1]], indices=[7, 3]), step=2)
    assert k.estimate(7, step=3) is None  # step 2's outcomes came after step 3 was submitted
    assert k.estimate(7, step=4) == 0.0 and k.estimate(3, step=4) == 1.0
    k.observe(_sampled([[1, 1, 1, 1], [0, 0, 0, 0]], indices=[7, 3]), step=3)
    assert k.estimate(7, step=4) == 0.0  # unchanged by step 3, observed since
    assert k.estimate(7, step=5) == 4 / 12
    # The window keeps what a later step can still see: 16 settled outcomes plus the unsettled step's.
    for step in range(4, 10):
        k.observe(_sampled([[1, 0, 1, 0], [1, 1, 1, 1]], indices=[7, 3]), step)
    assert len(k.history[7]) == 16 + 4 and k.estimate(7, step=10) == 0.5
    again = Knapsack(recipe)
    again.load_state_dict(k.state_dict())
    assert again.history == k.history and again.first_counts([7, 3], step=10) == k.first_counts([7, 3], step=10)


# ----------------------------------------------------------------------------- Rewarding the Unlikely


def test_unlikeliness_rewards_hand_values():
    rewards = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    logprobs = torch.tensor([[-0.1, -2.0, -0.5, -1.0], [-1.0, -1.0, -3.0, -0.2]])
    # group 1 ranks (rollouts less likely): [3, 0, 2, 1]; group 2: [1, 1, 0, 3] (equally likely: one rank)
    got = unlikeliness_rewards(rewards, logprobs, beta=0.25)
    torch.testing.assert_close(got, torch.tensor([[1 - 0.25 * 3 / 4, 1.0, 0.0, 1 - 0.25 / 4], [0.0, 1 - 0.25 / 4, 1.0, 0.0]]))
    # Copies of one answer keep equal rewards, so their updates do not cancel.
    copies = unlikeliness_rewards(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[-0.3, -0.3, -2.0]]), beta=0.5)
    assert copies[0, 0] == copies[0, 1] == 1 - 0.5 / 3
    assert algorithms.get("reward_shaping", "unlikeliness") is unlikeliness_rewards
    assert torch.equal(unlikeliness_rewards(rewards, logprobs, beta=0.0), rewards)
    # An unlikely correct rollout ends with a larger GRPO advantage than a likely correct one.
    adv = grpo_advantages(got)
    assert adv[0, 1] > adv[0, 3] > adv[0, 0]


# ----------------------------------------------------------------------------- groups of different sizes


def _completion(b: int, lps: list[float]) -> Completion:
    return Completion(b, [1, 2], [5] * len(lps), "x", lps, "stop")


def _sampled(rewards: list[list[float]], indices=None, logprobs=None) -> Sampled:
    groups = []
    for b, rs in enumerate(rewards):
        lps = logprobs[b] if logprobs else [[-1.0]] * len(rs)
        groups.append(Group([_completion(b, lp) for lp in lps], [float(r) for r in rs], {"acc": [float(r) for r in rs]}))
    return Sampled(indices or list(range(len(rewards))), groups, sampled_rollouts=sum(map(len, rewards)))


def test_grouped_apply_equals_each_group_alone():
    groups = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2.0, 1.0]), torch.tensor([0.0, 0.0, 1.0]), torch.tensor([3.0, 3.0])]
    got = grouped_apply(grpo_advantages, groups)
    for g, a in zip(groups, got):
        torch.testing.assert_close(a, grpo_advantages(g[None])[0])


def _recipe(*overrides):
    return load_recipe(None, ["data.prompts_per_step=3", "algorithm.group_size=4", *overrides], check_paths=False)


def test_training_rows_of_each_allocation():
    from rl.online import advantage_fn

    # Knapsack-like ragged groups: every rollout trains, each group's GRPO advantages.
    r = _recipe("algorithm.allocation=knapsack")
    batch = _sampled([[1, 0], [0, 0, 1, 1, 0], [1, 1]])
    rows, adv = training_rows(batch, advantage_fn(r), r)
    assert rows == list(range(9))
    expected = torch.cat([grpo_advantages(torch.tensor([[1.0, 0.0]]))[0], grpo_advantages(torch.tensor([[0.0, 0, 1, 1, 0]]))[0],
                          torch.zeros(2)])
    torch.testing.assert_close(torch.tensor(adv), expected)
    # Reinforce-Ada: the chosen subset of each pool, against the pool's mean (no std: normalize_std=false).
    r = _recipe("algorithm.allocation=reinforce_ada", "algorithm.normalize_std=false", "algorithm.group_size=2",
                "algorithm.ada_round_size=4")
    batch = _sampled([[0, 0, 0, 1], [1, 1, 1, 1]])
    batch.trained = [[0, 3], [0, 1]]
    rows, adv = training_rows(batch, advantage_fn(r), r)
    assert rows == [0, 3, 4, 5] and adv == [-0.25, 0.75, 0.0, 0.0]
    # A uniform batch goes through the algorithm's own selection: online DPO's discordant pairs.
    r = _recipe("algorithm.name=online_dpo", "algorithm.group_size=2", "algorithm.advantage=contrastive_pair")
    rows, adv = training_rows(_sampled([[0, 1], [1, 1], [1, 0]]), advantage_fn(r), r)
    assert rows == [1, 0, 4, 5] and adv == [1.0, -1.0, 1.0, -1.0]


def test_training_rows_shape_rewards_by_the_samplers_logprobs():
    from rl.online import advantage_fn

    r = _recipe("algorithm.unlikeliness_beta=0.5")
    # Two correct rollouts: the likely one (mean logprob -0.1) is penalised, the unlikely one (-2.0) is not.
    batch = _sampled([[1, 1, 0, 0]], logprobs=[[[-0.1, -0.1], [-1.0, -3.0], [-0.5], [-0.7]]])
    assert [mean_logprob(c) for c in batch.groups[0].completions] == [-0.1, -2.0, -0.5, -0.7]
    _, adv = training_rows(batch, advantage_fn(r), r)
    shaped = unlikeliness_rewards(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.tensor([[-0.1, -2.0, -0.5, -0.7]]), beta=0.5)
    torch.testing.assert_close(torch.tensor(adv), grpo_advantages(shaped)[0])
    assert adv[1] > adv[0]


def test_multi_turn_mean_logprob_counts_the_policys_tokens_only():
    c = Completion(0, [1], [5, 6, 7], "x", [-1.0, 0.0, -3.0], "stop", loss_mask=[1, 0, 1])
    assert mean_logprob(c) == -2.0


def test_ragged_groups_leave_the_loss_split_invariant():
    """Advantages of groups of 2, 5 and 3 rollouts, flattened as the trainer gets them: the loss of the whole batch
    equals the sum over micro-batches that cut across groups (global token counts)."""
    gen = torch.Generator().manual_seed(0)
    adv = torch.cat(grouped_apply(grpo_advantages, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1, 1, 0, 0]), torch.tensor([1.0, 0, 0])]))
    N, L = adv.numel(), 6
    logprobs = -torch.rand(N, L, generator=gen, dtype=torch.float64)
    old = logprobs + 0.1 * torch.randn(N, L, generator=gen, dtype=torch.float64)
    mask = torch.arange(L)[None, :] < torch.tensor([6, 2, 4, 1, 5, 3, 6, 2, 4, 3])[:, None]
    counts = dict(num_sequences=N, num_tokens=int(mask.sum()), max_response_len=L)
    for aggregation in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        full, _ = clipped_policy_loss(logprobs, old, adv.double(), mask, aggregation=aggregation, **counts)
        parts = sum(clipped_policy_loss(lp, o, a.double(), m, aggregation=aggregation, **counts)[0]
                    for lp, o, a, m in zip(logprobs.split([3, 4, 3]), old.split([3, 4, 3]), adv.split([3, 4, 3]), mask.split([3, 4, 3])))
        torch.testing.assert_close(parts, full)


def test_allocation_metrics():
    batch = _sampled([[1, 0], [0, 0, 1, 1, 0, 0], [1, 1, 1, 1]])
    batch.sampled_rollouts = 14  # two more were sampled and replaced
    m = allocation_metrics(batch, budget=16)
    assert m == {"rollouts_per_prompt": [2.0, 4.0, 6.0],
                 "rollouts_per_prompt_min": 2.0, "rollouts_per_prompt_median": 4.0, "rollouts_per_prompt_max": 6.0,
                 "prompts_with_signal": 2 / 3, "rollout_budget_used": 14 / 16}


def test_resample_seeds_are_distinct_from_main_rollouts():
    assert resample_seed(1, 1, 3) == 1_000_000_005 and len({resample_seed(s, r, 3) for s in range(5) for r in range(1, 4)}) == 15


# ----------------------------------------------------------------------------- recipes


def test_every_allocation_has_a_driver():
    import typing

    from trainer.config import AlgorithmConfig

    assert set(typing.get_args(AlgorithmConfig.model_fields["allocation"].annotation)) == set(ALLOCATIONS)


def test_tie_handling_resample_is_the_resample_ties_allocation():
    assert _recipe("algorithm.tie_handling=resample").algorithm.allocation == "resample_ties"
    with pytest.raises(RecipeError, match="tie_handling=resample is the resample_ties allocation"):
        _recipe("algorithm.tie_handling=resample", "algorithm.allocation=knapsack")


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.allocation=knapsack", "rollout.max_staleness=1", "rollout.partial_rollouts=true"],
     "knapsack does not combine with rollout.partial_rollouts"),
    (["algorithm.allocation=knapsack", "algorithm.rollout_budget=8"], r"must be >= data.prompts_per_step x algorithm.group_size \(12\)"),
    (["algorithm.allocation=knapsack", "algorithm.knapsack_max=3"], r"within \[knapsack_min, knapsack_max\]"),
    (["algorithm.allocation=knapsack", "algorithm.advantage=reinforce_pp"], "needs a group-relative advantage"),
    (["algorithm.allocation=reinforce_ada", "algorithm.advantage=rloo"], "set algorithm.advantage=grpo"),
    (["algorithm.allocation=reinforce_ada", "algorithm.ada_round_size=2"], "must be >= algorithm.group_size"),
    (["algorithm.allocation=reinforce_ada", "algorithm.rollout_budget=20"], "the first round samples every prompt"),
    (["algorithm.allocation=knapsack", "algorithm.name=online_dpo", "algorithm.group_size=2", "algorithm.knapsack_min=2"],
     "needs fixed pairs"),
    (["algorithm.allocation=knapsak"], "allocation"),
])
def test_bad_allocation_recipes_name_the_field(overrides, message):
    with pytest.raises(RecipeError, match=message):
        _recipe(*overrides)
