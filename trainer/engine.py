"""One rank's DeepSpeed engine, configured: the DeepSpeed config (we own the accumulation boundary and, under
ZeRO-0 in float32, the clipping), the dtypes, the decoder/LM-head split the chunked logprobs use, and the full
parameters of a ZeRO-3 shard."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from trainer.batching import packed_row
from trainer.config import TrainerConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def decoder_and_head(model):
    """(decoder, LM head) of an HF causal LM whose logits are ``head(decoder(...).last_hidden_state)``,
    else None. ``model`` may be a DeepSpeed engine, a PEFT model or the plain model."""
    module = getattr(model, "module", model) if type(model).__name__ == "DeepSpeedEngine" else model
    try:
        decoder, head = module.get_decoder(), module.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    cfg = getattr(module, "config", None)
    if decoder is None or head is None or cfg is None or getattr(cfg, "final_logit_softcapping", None) or hasattr(cfg, "logit_scale"):
        return None
    return decoder, head


def forward_packed_or_padded(module, mb: dict, **kwargs):
    """``module``'s output on a collated micro-batch: on its one packed row where ``collate(packed=True)``
    made one (position ids restarting per sequence, no attention mask: the model keeps the sequences apart),
    else on the padded rows. Gather positions back with ``unpack``."""
    if "packed_input_ids" in mb:  # no cache: transformers reads packed sequences from the position ids only without one
        return module(input_ids=mb["packed_input_ids"], position_ids=mb["packed_position_ids"], use_cache=False,
                      **sequence_bounds(mb["packed_cu_seq_lens"]), **kwargs)
    return module(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], **kwargs)


def sequence_bounds(cu_seq_lens: torch.Tensor) -> dict:
    """The packed row's sequence boundaries as the keyword arguments transformers hands to the attention kernel
    (flash-attention's varlen path and ``sdpa_varlen`` attend within them; ``sdpa`` and ``eager`` ignore them).
    ``cu_seq_lens`` [sequences + 1], int32: 0, then each sequence's end. ``packed_bounds`` holds the same ends as
    Python ints, read from the device once per forward: ``sdpa_varlen`` slices by them in every layer."""
    bounds = tuple(cu_seq_lens.tolist())
    longest = max(end - start for start, end in zip(bounds[:-1], bounds[1:]))
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest, "max_length_k": longest,
            "packed_bounds": bounds}


def unpack(per_position: torch.Tensor, mb: dict) -> torch.Tensor:
    """[rows, T, ...] from ``forward_packed_or_padded`` -> [n, T-1, ...]: the values at the predicting
    positions of the padded layout (packed: gathered by ``packed_index``; padded rows: the last position dropped)."""
    if "packed_input_ids" in mb:
        return per_position[0][mb["packed_index"]]
    return per_position[:, :-1]


def check_packing(model) -> None:
    """Refuse a model whose attention crosses packed sequences (it ignores restarting position ids): two
    short sequences give the same output packed into one row as each alone, or training with
    ``trainer.max_tokens_per_micro_batch`` would silently mix them."""
    seqs = [[5, 9, 2, 7, 3], [4, 8, 6]]
    parts = decoder_and_head(model)
    module = parts[0] if parts else model

    def out(o):
        return (o.last_hidden_state if parts else o.logits).float()

    with torch.no_grad():
        alone = [out(module(input_ids=torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long)))[0] for s in seqs]
        try:
            packed = out(forward_packed_or_padded(module, packed_row(seqs)))[0]
        except TypeError as e:  # a forward without **kwargs cannot take the sequence bounds
            raise ValueError(f"{type(model).__name__} does not take packed sequence bounds ({e}): set "
                             "trainer.max_tokens_per_micro_batch=0") from e
    together = torch.cat(alone)
    gap = float((packed - together).abs().max() / together.abs().max().clamp(min=1e-6))
    # Rounding alone stays well below these (a model that mixes the sequences: ~0.18 on a 2-layer random Llama).
    if gap > (1e-2 if next(model.parameters()).dtype == torch.float32 else 5e-2):
        raise ValueError(f"{type(model).__name__} does not keep packed sequences apart (relative gap {gap:.3g} between a "
                         "sequence packed after another and alone): set trainer.max_tokens_per_micro_batch=0")



def clip_gradients(optimizer, max_grad_norm: float) -> float:
    """Clip the gradients of ``optimizer``'s parameters to ``max_grad_norm`` (0: measure only); their norm before.
    Registered as an optimizer step pre-hook where DeepSpeed leaves clipping to us (``clips_in_hook``)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf")))


def begin_micro_batch(engine) -> None:
    """What DeepSpeed's ``engine.forward`` does first, for a forward through ``engine.module`` (ours: it returns
    hidden states, not logits): a ZeRO optimizer learns that a new micro-batch begins. Under ZeRO-3 that is what
    makes it add this micro-batch's gradient partition to the earlier ones: without it each backward overwrote
    them, and an update of several micro-batches applied only the last one's gradient (two ranks of two
    micro-batches each moved 11-38% of each tensor's elements the other way from one rank:
    tests/e2e/test_trainer_ranks.py)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    if isinstance(engine.optimizer, ZeROOptimizer):
        engine.optimizer.clear_backward_seen_flag()


def clips_in_hook(cfg: TrainerConfig, dtype: str) -> bool:
    """ZeRO-0 in float32 hands us the plain torch optimizer, whose step we hook; in bf16/fp16 DeepSpeed
    wraps it in its own mixed-precision optimizer (no step hooks), which clips and reports the norm itself."""
    return cfg.zero_stage == 0 and dtype == "float32"


def deepspeed_config(cfg: TrainerConfig, dtype: str) -> dict:
    """The DeepSpeed config of one rank: we own the accumulation boundary and, under ZeRO-0, the clipping."""
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        # Any number of micro-batches, then step() (each micro-batch opened by ``begin_micro_batch``).
        "managed_gradient_accumulation": False,
        # ZeRO-0 in float32 discards the norm it clips with; there we clip (and measure) in an optimizer hook.
        "gradient_clipping": 0.0 if clips_in_hook(cfg, dtype) else cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "betas": list(cfg.adam_betas), "weight_decay": cfg.weight_decay,
                       "torch_adam": True},  # no op compilation on CPU
        },
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.warmup_steps > 0:
        ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr,
                                                          "warmup_num_steps": cfg.warmup_steps, "warmup_type": "linear"}}
    return ds


@contextmanager
def sharded_build(cfg: TrainerConfig, dtype: str) -> Iterator[None]:
    """Under ZeRO-3, a model loaded inside is built as this rank's shard from the start (transformers'
    ``from_pretrained`` under ``deepspeed.zero.Init``, which it follows while an ``HfDeepSpeedConfig`` lives): no rank
    ever holds the whole model, which on a node of 8 ranks would be 8 full copies in host memory. Elsewhere nothing."""
    if cfg.zero_stage != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    config = HfDeepSpeedConfig(deepspeed_config(cfg, dtype))  # transformers keeps only a weak reference to it
    try:
        yield
    finally:
        del config  # models loaded later (the reference) are whole again


@contextmanager
def full_parameters(module, zero_stage: int, all_weights: bool) -> Iterator[Iterable[tuple[str, torch.Tensor]]]:
    """``module``'s named parameters, full. Under ZeRO-3 each rank holds a shard and gathering is a collective every
    rank joins: with ``all_weights`` (a policy whose engines receive every weight) they come one at a time, each
    gathered, copied to the CPU and let go, so no rank ever holds the whole model (iterate them once, in order, on
    every rank); otherwise the trainable ones are gathered for the duration (an adapter)."""
    params = list(module.named_parameters())
    if zero_stage != 3:
        yield params
        return
    import deepspeed

    if all_weights:
        yield _gathered_one_at_a_time(params)
        return
    with deepspeed.zero.GatheredParameters([p for _, p in params if p.requires_grad], modifier_rank=None):
        yield params


def _gathered_one_at_a_time(params: list[tuple[str, torch.nn.Parameter]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each ZeRO-3 parameter gathered in turn (a collective), yielded as a full CPU copy, then released."""
    import deepspeed

    for name, p in params:
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            full = p.detach().to("cpu", copy=True)
        yield name, full
