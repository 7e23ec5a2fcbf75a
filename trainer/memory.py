"""What one trainer rank holds, estimated before any weight is loaded: the model is built on the
meta device (``accelerate.init_empty_weights``), so a 7B model is counted in a second without 28 GB
of memory.

The parts, for a full-model policy (an adapter policy trains only its own parameters):
weights (P x dtype), gradients (trainable x dtype), AdamW's two fp32 moments (8 B per trainable
parameter), an fp32 master copy when the dtype is 16-bit, the reference model when a loss needs one,
the LM-head logits of one micro-batch (response tokens x vocab x 4 B, about three such
tensors live at the peak of the backward: logits, their softmax, its gradient), and the decoder
layers' activations kept for the backward of one micro-batch (every position it holds, prompt and
padding included). ZeRO-1 partitions the optimizer state over the ranks, ZeRO-2 also the
gradients, ZeRO-3 also the weights. The process itself (torch, DeepSpeed: ~1-2 GiB on CPU) comes on
top.
"""

from __future__ import annotations

from typing import NamedTuple

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# What one decoder layer keeps for the backward, per position, counted in hidden-size vectors of the model's dtype.
# Measured on SmolLM2-135M-Instruct (30 layers of width 576, float32, no checkpointing): 2.2-2.5 MB per position
# in all four arms of docs/benchmarks/packing.md (peak above the model, less gradients, optimizer and logits;
# padded rows of 537 positions and packed rows of 1024 and 2048), i.e. 32-37 such vectors per layer.
ACTIVATION_VECTORS_PER_LAYER = 35


class ModelSize(NamedTuple):
    params: int
    vocab: int
    layers: int
    hidden: int


def count_parameters(model_path: str, trust_remote_code: bool = False) -> ModelSize:
    """Parameters, vocabulary, decoder layers and hidden size of an HF causal LM, from its config only (meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # on the meta device the tie is not made by construction: count a tied matrix once
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelSize(sum(p.numel() for p in model.parameters()), int(config.vocab_size),
                     int(getattr(text, "num_hidden_layers", 0) or 0), int(getattr(text, "hidden_size", 0) or 0))


def training_memory(params: int, vocab: int, dtype: str, trainable: int, zero_stage: int, num_ranks: int,
                    reference: bool, micro_batch_tokens: int, layers: int = 0, hidden: int = 0,
                    micro_batch_positions: int = 0, gradient_checkpointing: bool = False) -> dict[str, float]:
    """Bytes per rank by part. ``micro_batch_tokens``: the response positions of one micro-batch (they go through
    the LM head); ``micro_batch_positions``: all of its positions (they go through the decoder layers).

    >>> m = training_memory(51_700_000, 32_000, "float32", 51_700_000, 0, 1, False, 32 * 128)
    >>> round(m["weights"] / 2**20), round(m["optimizer"] / 2**20), round(m["logits"] / 2**30, 2)
    (197, 394, 1.46)
    >>> training_memory(51_700_000, 32_000, "float32", 51_700_000, 2, 2, False, 0)["gradients"] == 51_700_000 * 4 / 2
    True

    SmolLM2-135M packed into 1024-position micro-batches (measured: 2.3 GiB of activations), and padded to 32
    rows of 356 positions (the run Ray stopped at 21 GB of memory):

    >>> smol = dict(params=134_515_008, vocab=49_152, dtype="float32", trainable=134_515_008, zero_stage=0, num_ranks=1,
    ...             reference=False, layers=30, hidden=576)
    >>> round(training_memory(**smol, micro_batch_tokens=800, micro_batch_positions=1024)["activations"] / 2**30, 2)
    2.31
    >>> m = training_memory(**smol, micro_batch_tokens=32 * 256, micro_batch_positions=32 * 356)
    >>> round(m["activations"] / 2**30, 1), round(m["logits"] / 2**30, 1), round(sum(m.values()) / 2**30, 1)
    (25.7, 4.5, 32.2)
    """
    b = BYTES[dtype]
    split = lambda nbytes, stage: nbytes / num_ranks if zero_stage >= stage else nbytes  # noqa: E731
    # Checkpointing keeps one vector per layer (its input) and recomputes one layer's activations at a time.
    vectors = layers + ACTIVATION_VECTORS_PER_LAYER if gradient_checkpointing else layers * ACTIVATION_VECTORS_PER_LAYER
    return {
        "weights": split(params * b, 3),
        "gradients": split(trainable * b, 2),
        "optimizer": split(trainable * 8 + (trainable * 4 if b < 4 else 0), 1),  # AdamW moments (+ fp32 master)
        "reference": params * b if reference else 0.0,
        "logits": 3.0 * micro_batch_tokens * vocab * 4,
        "activations": float(vectors * micro_batch_positions * hidden * b),
    }
