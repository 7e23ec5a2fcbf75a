"""Policies: what the trainer trains, one interface for every kind (see ``base.Policy``).

``build_policy(spec, model, ...)`` is the only place that turns a kind into a class.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from trainer.policies.base import POLICY_KINDS, Policy, PolicySpec
from trainer.policies.full import FullModelPolicy


def build_policy(spec: PolicySpec, model: nn.Module, *, load_reference: Optional[Callable[[], nn.Module]] = None,
                 pad_id: int = 0) -> Policy:
    """The policy ``spec`` describes, over ``model`` (the loaded ``spec.model_path``).

    ``load_reference`` loads a frozen copy of the base for a full-model policy whose losses need a
    reference; an adapter's reference is its base with the adapter off, so it is never called.
    """
    if spec.kind == "full":
        return FullModelPolicy(model, load_reference() if load_reference else None)
    if spec.kind == "lora":
        from trainer.policies.lora import LoraPolicy

        return LoraPolicy(model, spec.adapter, spec.start_from)
    if spec.kind == "sparse":
        from trainer.policies.sparse import SparsePolicy

        return SparsePolicy(model, spec.adapter, spec.start_from, calibration=spec.calibration_token_ids, pad_id=pad_id)
    from trainer.policies.arrow import ArrowPolicy

    return ArrowPolicy(model, spec.adapter, spec.start_from, experts=spec.expert_dirs)


__all__ = ["POLICY_KINDS", "FullModelPolicy", "Policy", "PolicySpec", "build_policy"]
