"""One rank's DeepSpeed engine, configured: the DeepSpeed config (we own the accumulation boundary and, under
ZeRO-0 in float32, the clipping), the dtypes, and the decoder/LM-head split the chunked logprobs use."""

from __future__ import annotations

import torch

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



def clip_gradients(optimizer, max_grad_norm: float) -> float:
    """Clip the gradients of ``optimizer``'s parameters to ``max_grad_norm`` (0: measure only); their norm before.
    Registered as an optimizer step pre-hook where DeepSpeed leaves clipping to us (``clips_in_hook``)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf")))


def clips_in_hook(cfg: TrainerConfig, dtype: str) -> bool:
    """ZeRO-0 in float32 hands us the plain torch optimizer, whose step we hook; in bf16/fp16 DeepSpeed
    wraps it in its own mixed-precision optimizer (no step hooks), which clips and reports the norm itself."""
    return cfg.zero_stage == 0 and dtype == "float32"


def deepspeed_config(cfg: TrainerConfig, dtype: str) -> dict:
    """The DeepSpeed config of one rank: we own the accumulation boundary and, under ZeRO-0, the clipping."""
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        # Any number of micro-batches, then step().
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
