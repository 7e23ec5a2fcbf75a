"""``sdpa_varlen``: the trainer's attention kernel for packed micro-batches where no flash-attn package is
installed. A packed row holds several sequences end to end; transformers' ``sdpa`` keeps them apart with a
block-diagonal mask over the whole row, so it computes (and discards) every cross-sequence score. This kernel
runs PyTorch's SDPA once per sequence, causal, from the sequence boundaries that
``trainer.engine.forward_packed_or_padded`` passes (``cu_seq_lens_q``, the argument flash-attention's varlen path
reads, and the same ends as Python ints, ``packed_bounds``):
the same numbers, with attention work that grows with each sequence's length squared rather than the row's.
Anything else (padded rows, sliding windows, soft-capping, attention sinks) goes to transformers' ``sdpa``.

Importing this module registers the kernel with transformers under ``ATTENTION``."""

from __future__ import annotations

from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "sdpa_varlen"


def sdpa_varlen(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                cu_seq_lens_q: Optional[torch.Tensor] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention over one packed row. query [1, heads, T, d], key/value [1, kv_heads, T, d] (grouped-query
    attention: heads a multiple of kv_heads), ``cu_seq_lens_q`` [sequences + 1] (0, then each sequence's end
    in the row; ``packed_bounds``, the same as Python ints, spares a read from the device in every layer).
    Returns ([1, T, heads, d], None), as transformers' attention functions do."""
    plain = (cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]
             or not getattr(module, "is_causal", True) or kwargs.get("sliding_window") or kwargs.get("softcap")
             or getattr(module, "sinks", None) is not None)
    if plain:  # transformers built the mask that keeps these apart
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    bounds = kwargs.get("packed_bounds") or cu_seq_lens_q.tolist()  # host ints: no device read per layer
    grouped = query.shape[1] != key.shape[1]
    out = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], dropout_p=dropout, is_causal=True,
        scale=scaling, enable_gqa=grouped) for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, sdpa_varlen)
# Padded rows (reference passes, scoring) and the fallbacks above read the mask sdpa would have had.
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def attend_within_sequences(model) -> str:
    """Switch ``model`` from transformers' ``sdpa`` to ``sdpa_varlen`` where it dispatches attention through
    transformers' kernel registry (Llama and Qwen do); leave any other kernel alone.
    Returns the kernel the model uses now."""
    if model.config._attn_implementation == "sdpa" and getattr(model, "_supports_attention_backend", False):
        model.set_attn_implementation(ATTENTION)
    return model.config._attn_implementation
