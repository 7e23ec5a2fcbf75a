"""Registry behaviour: built-ins present, duplicate / unknown names fail loudly with a hint."""

import pytest
import torch

import trainer.algorithms as alg
from trainer.algorithms import registry


def test_builtin_names_registered_on_import():
    assert alg.names("advantage") == ["contrastive_pair", "grpo", "reinforce_pp", "reinforce_pp_baseline", "rloo"]
    assert alg.names("policy_loss") == ["clipped"]
    assert alg.names("kl") == ["k1", "k2", "k3"]
    assert alg.names("aggregation") == [
        "seq-mean-token-mean",
        "seq-mean-token-sum-norm",
        "token-mean",
    ]
    assert alg.names("preference_loss") == ["ipo", "sigmoid"]
    assert alg.get("advantage", "grpo") is alg.grpo_advantages
    assert alg.get("policy_loss", "clipped") is alg.clipped_policy_loss


def test_register_returns_function_and_get_finds_it(monkeypatch):
    monkeypatch.setattr(registry.REGISTRIES["advantage"], "_entries", dict(registry.REGISTRIES["advantage"]._entries))

    def mine(rewards):
        return rewards

    assert alg.register("advantage", "mine")(mine) is mine
    assert alg.get("advantage", "mine") is mine
    assert "mine" in alg.names("advantage")


def test_duplicate_name_raises():
    with pytest.raises(ValueError, match="already registered"):
        alg.register("advantage", "grpo")(lambda rewards: rewards)
    assert alg.get("advantage", "grpo") is alg.grpo_advantages  # the original survives


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown kind"):
        alg.register("advantages", "x")
    with pytest.raises(ValueError, match="unknown kind"):
        alg.get("losses", "x")
    with pytest.raises(ValueError, match="unknown kind"):
        alg.names("nope")


def test_unknown_name_lists_available_and_closest():
    with pytest.raises(KeyError) as info:
        alg.get("aggregation", "token_mean")
    message = str(info.value)
    for name in ("seq-mean-token-mean", "seq-mean-token-sum-norm", "token-mean"):
        assert name in message
    assert "did you mean 'token-mean'" in message

    with pytest.raises(KeyError, match="did you mean 'grpo'"):
        alg.get("advantage", "gpro")


def test_registered_variant_equals_public_entry_point():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-2.0, -1.0]])
    torch.testing.assert_close(alg.get("kl", "k2")(lp, ref), alg.kl_estimate(lp, ref, "k2"))


# ------------------------------------------------------------------------- algorithms (objectives.Algorithm)


def test_algorithms_are_registered_objects():
    assert alg.names("algorithm") == ["dpo", "grpo", "online_dpo", "ppo"]
    ppo = alg.get("algorithm", "ppo")
    assert ppo.critic and ppo.policy_gradient and ppo.min_group_size == 1 and not ppo.needs_reference(0.0)
    grpo, online_dpo, dpo = (alg.get("algorithm", n) for n in ("grpo", "online_dpo", "dpo"))
    assert grpo.online and online_dpo.online and not dpo.online
    assert grpo.policy_gradient and not online_dpo.policy_gradient and not dpo.policy_gradient
    # The reference model: DPO's loss needs it always, GRPO only for a KL term.
    assert not grpo.needs_reference(0.0) and grpo.needs_reference(0.01)
    assert online_dpo.needs_reference(0.0) and dpo.needs_reference(0.0)
    assert (grpo.rows_per_unit, online_dpo.rows_per_unit) == (1, 2) and online_dpo.group_size == 2


def test_rows_each_algorithm_trains_on():
    adv = torch.tensor([[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]])  # B=3 pairs: discordant, tied, discordant
    assert alg.get("algorithm", "grpo").select_rows(adv) == ([0, 1, 2, 3, 4, 5], [1.0, -1.0, 0.0, 0.0, -1.0, 1.0])
    # Online DPO: (chosen, rejected) per discordant pair, the tie dropped.
    assert alg.get("algorithm", "online_dpo").select_rows(adv) == ([0, 1, 5, 4], [1.0, -1.0, 1.0, -1.0])


def test_recipe_names_an_algorithm_from_the_registry():
    from trainer.config import AlgorithmConfig

    with pytest.raises(ValueError, match="did you mean 'online_dpo'"):
        AlgorithmConfig(name="online-dpo")
    with pytest.raises(ValueError, match="group_size must be 2 for online_dpo"):
        AlgorithmConfig(name="online_dpo", group_size=4)
    with pytest.raises(ValueError, match="group_size must be >= 2 for grpo"):
        AlgorithmConfig(name="grpo", group_size=1)
    assert AlgorithmConfig(name="online_dpo", group_size=2).spec is alg.get("algorithm", "online_dpo")
