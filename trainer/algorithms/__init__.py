"""Algorithm math as pure tensor functions, registered by name (see ``registry``).

Importing this package registers every built-in variant:

- advantage: "grpo" (GRPO / Dr.GRPO), "contrastive_pair" (2-GRPO), "rloo" (RLOO),
  "reinforce_pp" and "reinforce_pp_baseline" (REINFORCE++, batch-normalized)
- reward_shaping: "unlikeliness" (Rewarding the Unlikely's rank penalty, before the advantage)
- policy_loss: "clipped" (PPO/GRPO clip, DAPO clip-higher, dual-clip, truncated IS; GSPO with
  ``importance_sampling_level="sequence"``)
- sequence_mask: "geometric_mean", "token_extremes" (drop sequences whose pi_old / pi_rollout ratio
  leaves a band: masked importance sampling; ``off_policy``)
- kl: "k1", "k2", "k3" (in the loss; ``kl_reward_to_go`` turns a per-token KL into REINFORCE++'s
  per-token reward instead)
- aggregation: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"
- preference_loss: "sigmoid" (DPO, conservative DPO), "ipo"
- token_advantage: "reverse_kl" (on-policy distillation: a teacher's per-token verdict on the samples)
- value_loss: "clipped" (PPO's critic; ``critic`` also holds GAE and whitening)
- algorithm: "grpo", "ppo", "online_dpo", "dpo" (``objectives.Algorithm``: what ``algorithm.name`` means)

``allocation`` holds the math of adaptive sampling (Reinforce-Ada's stopping rule and training subset,
Knapsack RL's rollouts per prompt); ``rl.allocation`` drives it.

Axes everywhere: B prompts, G group size, N = B*G sequences, L response tokens, V vocabulary.
"""

from trainer.algorithms.registry import KINDS, get, names, register
from trainer.algorithms.advantages import (
    contrastive_pair_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    tied_groups,
)
from trainer.algorithms.losses import (
    aggregate_loss,
    clipped_policy_loss,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_reward_to_go,
    masked_mean,
    seq_mean_token_mean,
    seq_mean_token_sum_norm,
    token_mean,
    truncated_is_weights,
)
from trainer.algorithms.logits import entropy_from_logits, head_logprobs_and_entropy, logprobs_and_entropy, logprobs_from_logits
from trainer.algorithms.dpo import dpo_loss, ipo_preference_loss, pairwise_dpo_loss, preference_wins, sigmoid_preference_loss
from trainer.algorithms.critic import clipped_value_loss, gae_advantages, outcome_token_rewards, whiten
from trainer.algorithms.distillation import reverse_kl_advantages
from trainer.algorithms.off_policy import geometric_mean_mask, token_extremes_mask
from trainer.algorithms.objectives import Algorithm, all_rows, discordant_pair_rows
from trainer.algorithms.allocation import (
    ada_done,
    ada_training_subset,
    grouped_apply,
    knapsack_allocation,
    knapsack_value,
    pool_baseline_advantages,
    unlikeliness_rewards,
)

__all__ = [
    "KINDS",
    "Algorithm",
    "ada_done",
    "ada_training_subset",
    "grouped_apply",
    "knapsack_allocation",
    "knapsack_value",
    "pool_baseline_advantages",
    "unlikeliness_rewards",
    "all_rows",
    "discordant_pair_rows",
    "aggregate_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "gae_advantages",
    "geometric_mean_mask",
    "outcome_token_rewards",
    "reverse_kl_advantages",
    "whiten",
    "contrastive_pair_advantages",
    "dpo_loss",
    "entropy_from_logits",
    "get",
    "grpo_advantages",
    "head_logprobs_and_entropy",
    "ipo_preference_loss",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_reward_to_go",
    "logprobs_and_entropy",
    "logprobs_from_logits",
    "masked_mean",
    "names",
    "pairwise_dpo_loss",
    "preference_wins",
    "register",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "seq_mean_token_mean",
    "seq_mean_token_sum_norm",
    "sigmoid_preference_loss",
    "tied_groups",
    "token_extremes_mask",
    "token_mean",
    "truncated_is_weights",
]
