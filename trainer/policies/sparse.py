"""A sparse adapter as the policy: masked deltas on base weights (``adapters.sparse.SparseAdapter``;
mask chosen once by connection sensitivity). vLLM has no sparse adapters, so a sync sends only the
mask's (indices, values) and each engine rebuilds the touched weights as ``base + delta`` in place
(``rollout/vllm_extension.py``): exact, logprob mismatch at float rounding."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from adapters.sparse import SPARSE_CONFIG_FILE, SparseAdapter, connection_sensitivity_mask, sensitivity_inputs
from trainer.config import AdapterConfig
from trainer.batching import padded_prompts
from trainer.policies.base import Policy


def target_weight_names(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """The parameter name of the weight of every Linear whose last name component is in ``target_modules``.

    A weight shared by two modules goes by its first name in ``named_parameters``: a tied LM head's is
    the embedding's (``model.embed_tokens.weight``), which is also the only name the tied checkpoint
    and vLLM know it by.
    """
    canonical = {id(p): name for name, p in model.named_parameters()}
    names = list(dict.fromkeys(canonical[id(m.weight)] for n, m in model.named_modules()
                               if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in set(target_modules)))
    if not names:
        raise ValueError(f"adapter.target_modules {list(target_modules)} match no Linear layer of the model")
    return names


def snip_masks(model: nn.Module, names: list[str], prompts: Sequence[Sequence[int]], keep_ratio: float,
               block_size: Optional[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Connection-sensitivity masks from the base model's next-token loss on ``prompts``.

    RL has no labelled loss before the first rollout; the language-modelling loss of the task's own
    prompts says which weights the task's inputs run through. Same prompts, same masks on every rank.
    """
    params = dict(model.named_parameters())
    was = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in names)
    ids, mask = padded_prompts(prompts, pad_id, device)
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    masks = connection_sensitivity_mask(*sensitivity_inputs(model, names), keep_ratio=keep_ratio, block_size=block_size)
    model.zero_grad(set_to_none=True)
    for n, p in params.items():
        p.requires_grad_(was[n])
    return masks


class SparsePolicy(Policy):
    def __init__(self, model: nn.Module, cfg: AdapterConfig, init_dir: Optional[str], calibration=None, pad_id: int = 0):
        if init_dir:
            self.adapter = SparseAdapter.load(init_dir)
            self.selection = json.loads((Path(init_dir) / SPARSE_CONFIG_FILE).read_text())
        else:
            if not calibration:
                raise ValueError("a new sparse adapter needs calibration prompts to choose its mask")
            device = next(model.parameters()).device
            names = target_weight_names(model, cfg.target_modules)
            masks = snip_masks(model, names, calibration, cfg.keep_ratio, cfg.block_size, pad_id, device)
            self.adapter = SparseAdapter(masks)
            self.selection = {"selection": "snip", "keep_ratio": cfg.keep_ratio, "block_size": cfg.block_size,
                              "calibration_prompts": len(calibration)}
        self.model = self.adapter.attach(model)

    @contextmanager
    def reference(self):
        with self.adapter.disabled():
            yield self.model

    def publish(self, transport, version, params=(), prompts=None, pad_id=0):
        return transport.publish(self.adapter.tensors().items(), version, kind="sparse_delta")

    def save(self, path, base_model, state_dict=None):
        extra = {k: v for k, v in self.selection.items() if k in ("selection", "keep_ratio", "block_size", "calibration_prompts")}
        self.adapter.save(path, base_model_name_or_path=base_model, **extra)
