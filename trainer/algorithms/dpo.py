"""Preference losses on (chosen, rejected) pairs: DPO (sigmoid, optionally label-smoothed) and IPO.

Axis: P preference pairs. Inputs are sequence log-probabilities, i.e. per-token logprobs summed
over each response's tokens (``logprobs_from_logits`` then a masked sum), [P] each.
Implicit rewards are ``beta * (log pi(y) - log pi_ref(y))``, returned detached for logging.
"""

from __future__ import annotations

import torch  # noqa: F401 -- the doctests use it
import torch.nn.functional as F
from torch import Tensor

from trainer.algorithms.registry import get, register


def _margins(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(h [P], chosen_rewards [P], rejected_rewards [P]); h = (pc - rc) - (pr - rr)."""
    shapes = {
        tuple(t.shape)
        for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    }
    if len(shapes) != 1:
        raise ValueError(f"all four log-prob tensors must have one shape [P], got {sorted(shapes)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps.detach()  # [P]
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps.detach()  # [P]
    h = chosen_log_ratio - rejected_log_ratio  # [P]
    return h, (beta * chosen_log_ratio).detach(), (beta * rejected_log_ratio).detach()


@register("preference_loss", "sigmoid")
def sigmoid_preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO loss -(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h): [P] x 4 -> 3 x [P].

    DPO (https://arxiv.org/abs/2305.18290, eq. 7) when ``label_smoothing`` eps = 0. With eps > 0
    this is conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): each label is
    assumed flipped with probability eps, which keeps the loss from driving h to infinity.
    eps must be in [0, 0.5).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h, chosen_rewards, rejected_rewards = _margins(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
        -beta * h
    )
    return losses, chosen_rewards, rejected_rewards


@register("preference_loss", "ipo")
def ipo_preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO loss (h - 1/(2 beta))**2: [P] x 4 -> 3 x [P].

    IPO (https://arxiv.org/abs/2310.12036, with beta as the paper's tau) regresses the
    margin h to a finite target instead of pushing it up without bound as DPO does on
    deterministic preferences. h uses sequence-summed log-probs, as in the paper (some
    implementations average over tokens instead). IPO has no label smoothing: a nonzero
    ``label_smoothing`` raises ValueError rather than being silently ignored.
    """
    if label_smoothing != 0.0:
        raise ValueError("label_smoothing is not defined for IPO; set it to 0")
    h, chosen_rewards, rejected_rewards = _margins(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses, chosen_rewards, rejected_rewards


def preference_wins(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """[P] 1 where the chosen reward beats the rejected one, 1/2 on an exact tie, else 0.

    Before any update the policy is the reference: every margin is exactly 0 and reward accuracy
    is chance (0.5), not 0. Offline and online DPO both count wins with this function.

    >>> preference_wins(torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 0.0])).tolist()
    [1.0, 0.5, 0.0]
    """
    margin = chosen_rewards - rejected_rewards
    return (margin > 0).to(margin.dtype) + 0.5 * (margin == 0).to(margin.dtype)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss: 4 x [P] -> (losses, chosen_rewards, rejected_rewards), each [P].

    ``loss_type`` names a registered ``preference_loss``: "sigmoid" (DPO / conservative DPO) or
    "ipo". Rewards are beta * (policy - ref) log-probs, detached. Reduce ``losses`` with
    ``.mean()``.
    """
    return get("preference_loss", loss_type)(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
    )


def pairwise_dpo_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    num_pairs: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Online DPO on sampled pairs: rows (2i, 2i+1) are (chosen, rejected) of pair i.

    logprobs, ref_logprobs, mask [2P, L] -> (scalar loss, metrics). Sequence logprobs are the
    masked sums over tokens; the loss is ``sum(dpo_loss) / num_pairs`` where ``num_pairs`` counts
    the pairs of the whole batch (default: the P here), so split batches sum to the full loss.

    This is the step 2-GRPO shares with DPO ("It Takes Two", arXiv:2510.00977): the driver samples
    G=2 completions, ranks them with ``contrastive_pair_advantages`` (+1 / -1), drops ties, and puts
    the +1 row first. Only the loss differs from 2-GRPO's clipped surrogate.
    """
    if logprobs.shape[0] % 2:
        raise ValueError(f"pairwise_dpo_loss needs an even number of rows (chosen, rejected), got {logprobs.shape[0]}")
    mask = mask.to(logprobs.dtype)
    seq = (logprobs * mask).sum(-1)  # [2P]
    ref_seq = (ref_logprobs.detach() * mask).sum(-1)  # [2P]
    losses, chosen_r, rejected_r = dpo_loss(
        seq[0::2], seq[1::2], ref_seq[0::2], ref_seq[1::2],
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
    )
    denom = float(num_pairs) if num_pairs else float(losses.shape[0])
    metrics = {
        "reward_accuracy": preference_wins(chosen_r, rejected_r).sum() / denom,
        "reward_margin": (chosen_r - rejected_r).sum() / denom,
    }
    return losses.sum() / denom, metrics
