"""A PEFT LoRA as the policy (new, a library expert continued, or a merge); vLLM serves it as a LoRA
and a sync is the adapter directory. The reference is the base with the adapter disabled."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from torch import nn

from trainer.config import AdapterConfig
from trainer.policies.base import Policy


def trainable_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


class LoraPolicy(Policy):
    def __init__(self, model: nn.Module, cfg: AdapterConfig, init_dir: Optional[str]):
        from peft import LoraConfig, PeftModel, get_peft_model

        if init_dir:
            self.model = PeftModel.from_pretrained(model, init_dir, is_trainable=True)
        else:
            lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
            self.model = get_peft_model(model, lora)

    @contextmanager
    def reference(self):
        with self.model.disable_adapter():
            yield self.model

    def publish(self, transport, version, params=(), prompts=None, pad_id=0):
        def write(directory: Path) -> int:
            self.model.save_pretrained(directory, safe_serialization=True)
            return trainable_bytes(self.model)

        return transport.publish_lora(version, write)

    def save(self, path, base_model, state_dict=None):
        self.model.save_pretrained(path, safe_serialization=True)
