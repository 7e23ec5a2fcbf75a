"""DPO (sigmoid, label-smoothed) and IPO losses against hand-computed values."""

import pytest
import torch

from trainer.algorithms import dpo_loss, get

# pair 0: chosen ratio (-1) - (-2) = 1, rejected ratio (-3) - (-2) = -1 -> h = 2
# pair 1: chosen ratio (-2) - (-2) = 0, rejected ratio (-1) - (-2) = 1  -> h = -1
PC = torch.tensor([-1.0, -2.0])
PR = torch.tensor([-3.0, -1.0])
RC = torch.tensor([-2.0, -2.0])
RR = torch.tensor([-2.0, -2.0])


def close(actual, expected, atol=1e-6):
    expected = torch.tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def test_sigmoid_hand_values_and_rewards():
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.5)
    # beta*h = [1, -0.5]: -logsigmoid(1) = ln(1 + e^-1) = 0.313262
    #                     -logsigmoid(-0.5) = ln(1 + e^0.5) = 0.974077
    close(losses, [0.313262, 0.974077])
    close(chosen, [0.5, 0.0])  # 0.5 * [1, 0]
    close(rejected, [-0.5, 0.5])  # 0.5 * [-1, 1]
    # equal policy and reference: h = 0 -> ln 2
    close(dpo_loss(PC, PR, PC, PR)[0], [0.693147, 0.693147])


def test_sigmoid_label_smoothing():
    losses, _, _ = dpo_loss(PC[:1], PR[:1], RC[:1], RR[:1], beta=0.5, label_smoothing=0.1)
    # 0.9 * ln(1 + e^-1) + 0.1 * ln(1 + e) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    close(losses, [0.413262])
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, label_smoothing=0.5)


def test_ipo_hand_values():
    # target 1/(2*0.5) = 1: (2 - 1)^2 = 1, (-1 - 1)^2 = 4
    close(dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo")[0], [1.0, 4.0])
    # target 1/(2*0.25) = 2: (2 - 2)^2 = 0, (-1 - 2)^2 = 9
    ipo = get("preference_loss", "ipo")
    losses, chosen, rejected = ipo(PC, PR, RC, RR, beta=0.25, label_smoothing=0.0)
    close(losses, [0.0, 9.0])
    close(chosen, [0.25, 0.0])
    close(rejected, [-0.25, 0.25])
    with pytest.raises(ValueError, match="IPO"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo", label_smoothing=0.1)


def test_gradients_reach_policy_only():
    pc = PC[:1].clone().requires_grad_(True)
    rc = RC[:1].clone().requires_grad_(True)
    losses, chosen, rejected = dpo_loss(pc, PR[:1], rc, RR[:1], beta=0.5)
    losses.sum().backward()
    # d/dpc of -logsigmoid(beta*h) = -beta * (1 - sigmoid(1)) = -0.5 * 0.268941 = -0.134471
    close(pc.grad, [-0.134471])
    assert rc.grad is None
    assert not chosen.requires_grad and not rejected.requires_grad


def test_bad_arguments():
    with pytest.raises(KeyError, match="did you mean 'sigmoid'"):
        dpo_loss(PC, PR, RC, RR, loss_type="sigmod")
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError):
        dpo_loss(PC, PR[:1], RC, RR)


def test_pairwise_dpo_loss_on_hand_values():
    import math

    import torch

    from trainer.algorithms import pairwise_dpo_loss

    # Two pairs; rows (chosen, rejected). Token logprobs, the last token of row 1 is padding.
    lp = torch.tensor([[-1.0, -1.0], [-2.0, -9.0], [-0.5, -0.5], [-0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.5], [-1.5, -9.0], [-0.5, -0.5], [-0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    # pair 0: chosen log-ratio (-2) - (-3) = 1; rejected (-2) - (-1.5) = -0.5; h = 1.5
    # pair 1: h = 0.  beta = 1: losses = -logsigmoid(1.5), -logsigmoid(0) = log(1+e^-1.5), log 2
    loss, m = pairwise_dpo_loss(lp, ref, mask, beta=1.0)
    expected = (math.log(1 + math.exp(-1.5)) + math.log(2.0)) / 2
    assert abs(loss.item() - expected) < 1e-6
    assert abs(m["reward_accuracy"].item() - 0.75) < 1e-7  # pair 0 right (1), pair 1 tied (1/2), as offline DPO counts
    assert abs(m["reward_margin"].item() - 0.75) < 1e-6  # (1.5 + 0) / 2
    # With the global pair count of a larger batch, the chunk's share scales down.
    half, _ = pairwise_dpo_loss(lp, ref, mask, beta=1.0, num_pairs=4)
    assert abs(half.item() - expected / 2) < 1e-6
