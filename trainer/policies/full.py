"""The full model as the policy: every weight trains; the engines receive every weight."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

from torch import nn

from trainer.policies.base import Policy, held_numel


class FullModelPolicy(Policy):
    """``ref_model``: a frozen copy of the run's original model, kept only when a loss needs a
    reference (KL with beta > 0, online DPO)."""

    publishes_all_weights = True

    def __init__(self, model: nn.Module, ref_model: Optional[nn.Module] = None):
        self.model = model
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)

    @contextmanager
    def reference(self):
        if self.ref_model is None:
            raise RuntimeError("this run's losses need no reference model, so none was loaded")
        yield self.ref_model

    def publish(self, transport, version, params=(), prompts=None, pad_id=0):
        return transport.publish(params, version)

    def save(self, path, base_model, state_dict=None):
        self.model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)

    def library_sources(self, checkpoint):
        return {}  # a full model is not an adapter: nothing to write into a library

    def numel_in_memory(self) -> int:
        return held_numel(self.model) + (held_numel(self.ref_model) if self.ref_model is not None else 0)
