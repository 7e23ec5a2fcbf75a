"""Sequence-level masks for samples the rollout engine drew off the trainer's policy.

The engine samples with its own kernels (and, asynchronously, with older weights), so a sequence's
tokens come from pi_rollout, not from the pi_old the loss's ratio is taken against. Token-level truncated
IS (``losses.truncated_is_weights``) reweights each token; these masks instead drop whole sequences whose
importance ratio pi_old / pi_rollout leaves a band [low, high]: a sequence that drifted far is noise for
every one of its tokens (masked importance sampling; IcePop masks tokens by the same band). Masked
sequences still count in the loss's normalization (as masked tokens do), so the split-invariance holds.

Each function: old_logprobs, rollout_logprobs, mask [N, L] -> keep [N] in {0., 1.}, detached; a sequence
without tokens is kept (it has no loss to drop).
"""

from __future__ import annotations

from torch import Tensor

from trainer.algorithms.losses import LOG_RATIO_CLAMP, _check_same_shape, float_dtype
from trainer.algorithms.registry import register


def _log_ratios(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    _check_same_shape(old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs, mask=mask)
    dtype = float_dtype(old_logprobs)
    log_ratio = (old_logprobs.detach().to(dtype) - rollout_logprobs.detach().to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_ratio, mask.detach().to(dtype)


@register("sequence_mask", "geometric_mean")
def geometric_mean_mask(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, low: float, high: float) -> Tensor:
    """Keep sequence i where its per-token geometric-mean ratio exp(mean_t log(pi_old / pi_rollout)) lies in
    [low, high]: [N, L] x3 -> [N]. Length-normalized, so long and short sequences share one band."""
    log_ratio, m = _log_ratios(old_logprobs, rollout_logprobs, mask)
    count = m.sum(-1)
    geo = (log_ratio * m).sum(-1).div(count.clamp(min=1)).exp()
    return ((count == 0) | ((geo >= low) & (geo <= high))).to(m.dtype)


@register("sequence_mask", "token_extremes")
def token_extremes_mask(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, low: float, high: float) -> Tensor:
    """Keep sequence i where every one of its tokens' ratio pi_old / pi_rollout lies in [low, high] (its min
    >= low and its max <= high): [N, L] x3 -> [N]. One far-off token drops the whole sequence."""
    log_ratio, m = _log_ratios(old_logprobs, rollout_logprobs, mask)
    ratio = log_ratio.exp()
    inside = ((ratio >= low) & (ratio <= high)) | (m == 0)
    return inside.all(-1).to(m.dtype)
