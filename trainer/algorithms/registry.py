"""Name -> function registries for the algorithm math.

Every variant the recipe can name (an advantage estimator, a policy loss, a KL estimator, a loss
aggregation, a preference loss) is a pure tensor function registered here under ``(kind, name)``.
The public entry points (``aggregate_loss(mode=...)``, ``kl_estimate(estimator=...)``,
``dpo_loss(loss_type=...)``) look their variant up here on every call, the default included, so
there is exactly one code path per piece of math.

Calling contract of each kind (shapes use B prompts, G group size, N = B*G sequences, L tokens,
P preference pairs):

- ``advantage``: ``fn(rewards [B, G], **options) -> advantages [B, G]`` (the driver binds the
  options the function takes among ``normalize_std`` and ``std_eps``)
- ``reward_shaping``: ``fn(rewards [B, G], logprobs [B, G], **options) -> rewards [B, G]``, applied to
  each group before the advantage (``logprobs``: each rollout's mean token logprob under the sampler)
- ``policy_loss``: ``fn(logprobs, old_logprobs, advantages, mask, **options) -> (scalar, metrics)``;
  advantages [N] or [N, L] (per token with ``kl_penalty: reward``); the trainer passes
  ``clip_low, clip_high, dual_clip, aggregation, is_weights, importance_sampling_level`` and the
  global counts
- ``kl``: ``fn(logprobs [N, L], ref_logprobs [N, L]) -> per-token estimate [N, L]``
- ``aggregation``: ``fn(values [N, L], mask [N, L], *, num_sequences, num_tokens,
  max_response_len) -> scalar``
- ``preference_loss``: ``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
  ref_rejected_logps, *, beta, label_smoothing) -> (losses [P], chosen_rewards [P],
  rejected_rewards [P])``
- ``token_advantage``: ``fn(student_logprobs [N, L], teacher_logprobs [N, L], mask [N, L]) -> [N, L]``, a
  per-token term added to each sequence's advantage (on-policy distillation's negative reverse KL)
- ``value_loss``: ``fn(values, old_values, returns, mask [N, L], *, clip, aggregation, global counts) ->
  (scalar, metrics)``: PPO's critic loss
- ``algorithm``: not a function but an ``objectives.Algorithm``: what ``algorithm.name`` means to the
  driver and the trainer (rollouts or pairs, the rows trained on, the loss, the reference)

Each registered variant has the signature of its public entry point minus the selector argument,
so ``get("kl", "k3")(lp, ref)`` equals ``kl_estimate(lp, ref, "k3")``.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from common.registry import Registry

F = TypeVar("F", bound=Callable)

KINDS = ("advantage", "reward_shaping", "policy_loss", "sequence_mask", "kl", "aggregation", "preference_loss",
         "token_advantage", "value_loss", "algorithm")

REGISTRIES: dict[str, Registry[Callable]] = {kind: Registry(kind) for kind in KINDS}


def _registry(kind: str) -> Registry[Callable]:
    if kind not in REGISTRIES:
        raise ValueError(f"unknown kind {kind!r}; kinds are {list(KINDS)}")
    return REGISTRIES[kind]


def register(kind: str, name: str) -> Callable[[F], F]:
    """Decorator registering ``fn`` under ``(kind, name)``; returns ``fn`` unchanged.

    Raises ValueError for an unknown ``kind`` or a ``name`` already taken for that kind (a silent
    overwrite would let a plugin replace the default math without anyone noticing).
    """
    return _registry(kind).register(name)


def get(kind: str, name: str) -> Callable:
    """The function registered under ``(kind, name)``.

    Raises KeyError naming the registered names for ``kind`` and the closest one to ``name``;
    ValueError for an unknown ``kind``.
    """
    return _registry(kind).get(name)


def names(kind: str) -> list[str]:
    """Sorted names registered for ``kind`` (ValueError for an unknown kind)."""
    return _registry(kind).names()
