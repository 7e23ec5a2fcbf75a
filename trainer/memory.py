"""What one trainer rank holds, estimated before any weight is loaded: the model is built on the
meta device (``accelerate.init_empty_weights``), so a 7B model is counted in a second without 28 GB
of memory.

The parts, for a full-model policy (an adapter policy trains only its own parameters):
weights (P x dtype), gradients (trainable x dtype), AdamW's two fp32 moments (8 B per trainable
parameter), an fp32 master copy when the dtype is 16-bit, the reference model when a loss needs one,
and the LM-head logits of one micro-batch (response tokens x vocab x 4 B, about three such
tensors live at the peak of the backward: logits, their softmax, its gradient). ZeRO-1 partitions
the optimizer state over the ranks, ZeRO-2 also the gradients, ZeRO-3 also the weights.
Activations of the decoder layers and the process itself (torch, DeepSpeed: ~1-2 GiB on CPU) come
on top.
"""

from __future__ import annotations

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def count_parameters(model_path: str, trust_remote_code: bool = False) -> tuple[int, int]:
    """(parameters, vocabulary size) of an HF causal LM, from its config only (meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # on the meta device the tie is not made by construction: count a tied matrix once
    return sum(p.numel() for p in model.parameters()), int(config.vocab_size)


def training_memory(params: int, vocab: int, dtype: str, trainable: int, zero_stage: int, num_ranks: int,
                    reference: bool, micro_batch_tokens: int) -> dict[str, float]:
    """Bytes per rank by part.

    >>> m = training_memory(51_700_000, 32_000, "float32", 51_700_000, 0, 1, False, 32 * 128)
    >>> round(m["weights"] / 2**20), round(m["optimizer"] / 2**20), round(m["logits"] / 2**30, 2)
    (197, 394, 1.46)
    >>> training_memory(51_700_000, 32_000, "float32", 51_700_000, 2, 2, False, 0)["gradients"] == 51_700_000 * 4 / 2
    True
    """
    b = BYTES[dtype]
    split = lambda nbytes, stage: nbytes / num_ranks if zero_stage >= stage else nbytes  # noqa: E731
    return {
        "weights": split(params * b, 3),
        "gradients": split(trainable * b, 2),
        "optimizer": split(trainable * 8 + (trainable * 4 if b < 4 else 0), 1),  # AdamW moments (+ fp32 master)
        "reference": params * b if reference else 0.0,
        "logits": 3.0 * micro_batch_tokens * vocab * 4,
    }
