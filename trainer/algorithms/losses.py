"""Token-level policy-gradient math: loss aggregation, the clipped surrogate, KL estimators and
truncated importance weights (per-token logprobs and entropy from logits: ``logits.py``).

Axes: N sequences (N = B*G), L response tokens (padded), V vocabulary. ``mask`` is [N, L], bool or
0/1, true on real response tokens. Positions where the mask is 0 never reach a result, even if
they hold NaN or inf (they are selected away with ``torch.where``, not multiplied by 0, which
would turn inf into NaN). Sums run in at least float32.
"""

from __future__ import annotations


import torch
from torch import Tensor

from trainer.algorithms.registry import get, register

# exp(20) ~ 4.9e8: past this the ratio is meaningless and exp() heads for overflow in low precision.
LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------- helpers


def float_dtype(t: Tensor) -> torch.dtype:
    """At least float32 (bf16/fp16 sums lose too much), float64 kept."""
    return torch.promote_types(t.dtype, torch.float32)


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch: {shapes}")


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    """[N, L] values with every masked-out position set to exactly 0, in >= float32."""
    values = values.to(float_dtype(values))
    return torch.where(mask.bool(), values, torch.zeros_like(values))


def _as_count(value: float | Tensor | None, default: float | Tensor, like: Tensor) -> Tensor:
    value = default if value is None else value
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _divide(total: Tensor, denom: Tensor) -> Tensor:
    """total / denom, elementwise, with 0 where denom == 0 (nothing counted, so total is 0 too)."""
    return total / torch.where(denom > 0, denom, torch.ones_like(denom))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is true: values, mask [N, L] -> scalar.

    0 (not NaN) when the mask is empty.
    """
    _check_same_shape(values=values, mask=mask)
    count = mask.bool().sum().to(float_dtype(values))
    return _divide(_masked(values, mask).sum(), count)


# ----------------------------------------------------------------------------- aggregation
# Each reducer takes global counts so that a batch split over ranks or micro-batches sums to the
# full-batch value: pass the counts of the whole batch (all ranks, all micro-batches) and add up
# the per-chunk results. With the defaults (local counts) each chunk is normalised on its own.


@register("aggregation", "token-mean")
def token_mean(
    values: Tensor,
    mask: Tensor,
    *,
    num_sequences: float | Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    max_response_len: int | None = None,
) -> Tensor:
    """sum(values * mask) / num_tokens: values, mask [N, L] -> scalar.

    Every token weighs the same, so long responses weigh more: DAPO's token-level policy-gradient
    loss (https://arxiv.org/abs/2503.14476, sec. 3.3). ``num_tokens`` defaults to ``mask.sum()``.
    ``num_sequences`` and ``max_response_len`` are accepted (one call signature for every mode)
    and unused.
    """
    _check_same_shape(values=values, mask=mask)
    masked = _masked(values, mask)  # [N, L]
    count = _as_count(num_tokens, mask.bool().sum(), masked)
    return _divide(masked.sum(), count)


@register("aggregation", "seq-mean-token-mean")
def seq_mean_token_mean(
    values: Tensor,
    mask: Tensor,
    *,
    num_sequences: float | Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    max_response_len: int | None = None,
) -> Tensor:
    """sum_i (sum_t values*mask / sum_t mask) / num_sequences: values, mask [N, L] -> scalar.

    Mean over each response's tokens, then over responses: the 1/|o_i| normalisation of the GRPO
    objective (DeepSeekMath, https://arxiv.org/abs/2402.03300, eq. 3). ``num_sequences`` defaults
    to N; a row with no tokens contributes 0 but still counts in N. ``num_tokens`` and
    ``max_response_len`` are unused.
    """
    _check_same_shape(values=values, mask=mask)
    masked = _masked(values, mask)  # [N, L]
    tokens_per_seq = mask.bool().sum(dim=-1).to(masked.dtype)  # [N]
    per_seq = _divide(masked.sum(dim=-1), tokens_per_seq)  # [N]
    count = _as_count(num_sequences, values.shape[0], masked)
    return _divide(per_seq.sum(), count)


@register("aggregation", "seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(
    values: Tensor,
    mask: Tensor,
    *,
    num_sequences: float | Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    max_response_len: int | None = None,
) -> Tensor:
    """sum(values * mask) / (num_sequences * max_response_len): values, mask [N, L] -> scalar.

    Dr.GRPO (https://arxiv.org/abs/2503.20783) drops GRPO's 1/|o_i| because it makes
    short correct answers and long wrong ones weigh more per token; a constant takes its place so
    the loss scale does not depend on response lengths. Defaults: N sequences and L =
    ``values.shape[1]``; pass the configured generation limit so the constant does not change with
    the padding of each batch. ``num_tokens`` is unused.
    """
    _check_same_shape(values=values, mask=mask)
    masked = _masked(values, mask)  # [N, L]
    count = _as_count(num_sequences, values.shape[0], masked)
    length = _as_count(max_response_len, values.shape[1], masked)
    return _divide(masked.sum(), count * length)


def aggregate_loss(
    values: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_sequences: float | Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    max_response_len: int | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar: values, mask [N, L] -> scalar.

    ``mode`` names a registered ``aggregation`` ("token-mean", "seq-mean-token-mean",
    "seq-mean-token-sum-norm"; see each for its formula and paper). Pass the global
    ``num_sequences`` / ``num_tokens`` (and ``max_response_len``) when the batch is split across
    ranks or micro-batches: the chunk losses then sum to exactly the full-batch loss.
    """
    return get("aggregation", mode)(
        values,
        mask,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        max_response_len=max_response_len,
    )


# ----------------------------------------------------------------------------- KL estimators
# Per-token estimates of KL(pi || pi_ref) from tokens sampled from pi, with
# log_ratio = log pi - log pi_ref (John Schulman, "Approximating KL Divergence",
# http://joschu.net/blog/kl-approx.html). Masking and reduction are the caller's (aggregate_loss).


@register("kl", "k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log_ratio: [N, L], [N, L] -> [N, L]. Unbiased, high variance, negative per token."""
    return logprobs - ref_logprobs


@register("kl", "k2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = log_ratio**2 / 2: [N, L], [N, L] -> [N, L]. Biased, low variance, always >= 0."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@register("kl", "k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = exp(-log_ratio) - 1 + log_ratio: [N, L], [N, L] -> [N, L]. Unbiased, low variance, >= 0.

    The estimator GRPO puts in its loss (DeepSeekMath, https://arxiv.org/abs/2402.03300, eq. 4).
    Differs from the formula in one place: log_ratio is clamped to [-20, 20] so exp() cannot
    overflow (the gradient is 0 beyond the clamp); ``expm1`` keeps small values accurate.
    """
    log_ratio = (logprobs - ref_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.expm1(-log_ratio) + log_ratio


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref): logprobs, ref_logprobs [N, L] -> [N, L].

    ``estimator`` names a registered ``kl`` function: "k1", "k2" or "k3" (Schulman's blog above).
    The tokens must be samples of pi; in GRPO they come from pi_old, a common approximation.
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    return get("kl", estimator)(logprobs, ref_logprobs)


def kl_reward_to_go(kl: Tensor, mask: Tensor) -> Tensor:
    """Reward-to-go of a per-token KL penalty: kl, mask [N, L] -> [N, L], 0 off the mask.

    ``out[i, t] = sum_{s >= t, mask[i, s]} kl[i, s]`` on real tokens (gamma = 1), the return from
    token t on of the per-token reward -kl. REINFORCE++ (https://arxiv.org/abs/2501.03262) puts
    the KL in the reward, ``r_t = 1[t = last] * r - beta * KL_t``, so token t's advantage becomes
    ``A - beta * kl_reward_to_go(kl, mask)[t]``: a token is charged for the divergence of itself
    and of everything after it, not of the tokens before. Masked positions (prompt, padding) add
    nothing and come out as exactly 0, even if they hold NaN or inf. Not detached: detach ``kl``
    first when it is a reward.
    """
    _check_same_shape(kl=kl, mask=mask)
    masked = _masked(kl, mask)  # [N, L]
    to_go = masked.flip(-1).cumsum(dim=-1).flip(-1)  # [N, L]: sum over s >= t
    return torch.where(mask.bool(), to_go, torch.zeros_like(to_go))


# ----------------------------------------------------------------------------- policy loss


def truncated_is_weights(
    old_logprobs: Tensor, rollout_logprobs: Tensor, cap: float = 2.0
) -> Tensor:
    """Truncated IS weights min(pi_old / pi_rollout, cap): [N, L], [N, L] -> [N, L], detached.

    vLLM samples with its own kernels (and possibly lower precision), so the rollout engine's
    probabilities differ from the trainer's for the same weights; the samples are slightly
    off-policy. Truncated IS (TIS; Yao et al. 2025, "Your Efficient RL Framework Secretly Brings
    You Off-Policy RL Training", https://fengyao.notion.site/off-policy-rl) reweights each token's
    loss by this ratio, capped to bound the variance. Pass the result as ``is_weights`` to
    ``clipped_policy_loss``.
    """
    _check_same_shape(old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs)
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    dtype = float_dtype(old_logprobs)
    log_ratio = old_logprobs.detach().to(dtype) - rollout_logprobs.detach().to(dtype)
    return torch.exp(log_ratio.clamp(max=LOG_RATIO_CLAMP)).clamp(max=cap)


def _check_clip_args(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_low: float,
                     clip_high: float, dual_clip: float | None, importance_sampling_level: str) -> None:
    """``clipped_policy_loss``'s shapes and settings, each refused with what it must be."""
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [N, L], got shape {tuple(logprobs.shape)}")
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"advantages must be [N] or [N, L] = {tuple(logprobs.shape)}, got {tuple(advantages.shape)}")
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (the paper uses 3), got {dual_clip}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")


def _log_ratio(logprobs: Tensor, old: Tensor, keep: Tensor, level: str) -> Tensor:
    """log(pi / pi_old) [N, L], 0 on padding: per token, or (``level="sequence"``, GSPO) each sequence's mean
    over its tokens on every one of them (with gradient)."""
    log_ratio = torch.where(keep, logprobs - old, 0.0)  # [N, L]
    if level == "sequence":
        lengths = keep.sum(dim=-1, keepdim=True).to(log_ratio.dtype)  # [N, 1]
        seq_log_ratio = _divide(log_ratio.sum(dim=-1, keepdim=True), lengths)  # [N, 1]
        log_ratio = torch.where(keep, seq_log_ratio, 0.0)
    return log_ratio


@register("policy_loss", "clipped")
def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    aggregation: str = "token-mean",
    is_weights: Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    max_response_len: int | None = None,
    importance_sampling_level: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO/GRPO clipped surrogate: logprobs, old_logprobs, mask [N, L]; advantages [N] or [N, L].

    Per token, with ratio = exp(logprobs - old_logprobs):
        loss = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
    the PPO clipped objective as GRPO uses it (DeepSeekMath, https://arxiv.org/abs/2402.03300,
    eq. 3; the KL term of that equation is added by the caller with ``kl_estimate``). Variants:
    - ``clip_high > clip_low``: DAPO's clip-higher (https://arxiv.org/abs/2503.14476, sec. 3.1,
      e.g. 0.2 / 0.28), more room to raise unlikely tokens, against entropy collapse.
    - ``dual_clip=c`` (c > 1): for A < 0 the loss is also capped, loss = min(loss, -c * A), so a
      huge ratio on a bad token cannot blow up the step (Dual-clip PPO,
      https://arxiv.org/abs/1912.09729; the paper suggests c = 3).
    - ``is_weights`` [N, L] (detached) multiplies the per-token loss: truncated IS, see
      ``truncated_is_weights``.
    - ``importance_sampling_level="sequence"``: GSPO (Zheng et al. 2025,
      https://arxiv.org/abs/2507.18071). Sequence i has one length-normalized ratio
      ``s_i = exp(mean_t (logprobs - old_logprobs))`` over its response tokens (with gradient),
      clipped per sequence, and every token of it carries ``-min(s_i * A, clip(s_i) * A)``. With
      "seq-mean-token-mean" the loss is GSPO's mean over sequences; the paper's clip range is
      tiny (e.g. clip_low 3e-4, clip_high 4e-4) because s_i is a per-token geometric mean. With
      per-token advantages [N, L] each token takes ``s_i * A_t``: the value of GSPO-token, not its
      gradient (GSPO-token weighs token t's gradient by its own A_t; here all tokens of a sequence
      share the gradient of s_i). "token" (the default) is the per-token ratio above.
    ``aggregation`` and the global counts go to ``aggregate_loss``: GRPO's paper uses
    "seq-mean-token-mean", DAPO "token-mean", Dr.GRPO "seq-mean-token-sum-norm".

    Differs from the formula only for numerical safety: log-ratios are clamped to [-20, 20] before
    exp(). ``advantages`` and ``old_logprobs`` are detached.

    Returns (scalar loss, metrics), metrics all detached scalars: "clip_frac" (fraction of real
    tokens whose loss is held by a clip, so their gradient is 0), "approx_kl_old" (mean k3
    estimate of KL(pi_old || pi) on the tokens, sampled from pi_old), "ratio_mean", "ratio_max"
    (at the sequence level, of the s_i, each weighted by its number of tokens).
    """
    _check_clip_args(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, importance_sampling_level)
    keep = mask.bool()  # [N, L]
    dtype = float_dtype(logprobs)
    adv = advantages.detach().to(dtype)
    if adv.dim() == 1:
        adv = adv[:, None]  # [N, 1]: one advantage for every token of a sequence
    adv = torch.where(keep, adv, 0.0)  # [N, L]
    old = old_logprobs.detach().to(dtype)
    log_ratio = _log_ratio(logprobs.to(dtype), old, keep, importance_sampling_level)  # [N, L]; 0 on padding
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [N, L]; 1 on padding

    unclipped = -adv * ratio  # [N, L]
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [N, L]
    per_token = torch.maximum(unclipped, clipped)  # = -min(ratio*A, clip(ratio)*A)
    held = clipped > unclipped  # the clipped (constant) branch binds: no gradient
    if dual_clip is not None:
        cap = -dual_clip * adv  # [N, L], > 0 where A < 0
        dual_held = (adv < 0) & (per_token > cap)
        per_token = torch.where(dual_held, cap, per_token)
        held = held | dual_held
    if is_weights is not None:
        _check_same_shape(is_weights=is_weights, logprobs=logprobs)
        per_token = per_token * torch.where(keep, is_weights.detach().to(dtype), 0.0)

    loss = aggregate_loss(per_token, keep, aggregation, num_sequences=num_sequences, num_tokens=num_tokens,
                          max_response_len=max_response_len)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean(held.to(dtype), keep),
            # samples come from pi_old, so KL(pi_old || pi) takes old as the sampling policy
            "approx_kl_old": masked_mean(kl_estimate(old, logprobs.to(dtype), "k3"), keep),
            "ratio_mean": masked_mean(ratio, keep),
            "ratio_max": torch.where(keep, ratio, 0.0).max(),  # ratios > 0: 0 only if no tokens
        }
    return loss, {name: value.detach() for name, value in metrics.items()}
