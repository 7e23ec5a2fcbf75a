"""On-policy distillation: a teacher's per-token verdict on the student's own samples as a dense advantage."""

from __future__ import annotations

from torch import Tensor

from trainer.algorithms.losses import _check_same_shape, _masked
from trainer.algorithms.registry import register


@register("token_advantage", "reverse_kl")
def reverse_kl_advantages(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """The negative per-token reverse KL: student_logprobs, teacher_logprobs, mask [N, L] -> advantages [N, L].

    On-policy distillation (GKD, Agarwal et al. 2024, https://arxiv.org/abs/2306.13649; Thinking
    Machines' "On-Policy Distillation", 2025) trains the student on its own samples to minimize the
    reverse KL(student || teacher). Its single-sample estimate at token t is
    ``log p_student(x_t) - log p_teacher(x_t)`` (the tokens are the student's samples, so this is k1),
    and the advantage of token t is its negative: tokens the teacher finds likelier than the student
    does are pushed up, the rest down. Each token gets its own term, not a sum over later tokens
    (discount 0, as in the on-policy distillation recipe). ``student_logprobs`` are those of the
    distribution that sampled (the rollout engine's, at the rollout temperature); 0 off the mask.

    >>> import torch
    >>> reverse_kl_advantages(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-0.5, -3.0]]), torch.tensor([[1, 0]]))
    tensor([[0.5000, 0.0000]])
    """
    _check_same_shape(student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs, mask=mask)
    return _masked(teacher_logprobs.detach() - student_logprobs.detach(), mask)
