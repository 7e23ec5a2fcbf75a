"""The embedded default model: a character-level tiny Llama, built and SFT-ed locally, cached.

There is no model hub on the target machine, so the framework builds its own starting point:
a ``tokenizers`` WordLevel tokenizer with one token per character, a randomly initialised
``LlamaForCausalLM``, and a short supervised fine-tune on the synthetic task of
:mod:`rl.tasks.arithmetic`. The SFT is stopped early on purpose, leaving the model partly
right (see :class:`TinyModelSpec` for the measured numbers): that is the headroom RL has to
show it can raise held-out accuracy.

Layout of a build (``build_tiny_model`` returns the directory)::

    <cache>/tiny/<name>-<hash12>/
        model/            LlamaForCausalLM.save_pretrained + PreTrainedTokenizerFast.save_pretrained
                          (float32; loads with AutoModelForCausalLM/AutoTokenizer and with vLLM)
        data/train.jsonl  RL prompts: {"prompt": "12+34=", "answer": "46"} (train split)
        data/test.jsonl   held-out problems (test split, disjoint from train by problem identity)
        build_info.json   spec, SFT held-out greedy accuracy, build seconds, versions

Tokenization contract: ``tokenizer(prompt)`` gives exactly one id per character and adds no
special token (no BOS, with or without ``add_special_tokens``), so the ids vLLM or any HF
caller computes for a prompt are the ids SFT trained on. A completion is the answer's
characters followed by ``<eos>``; ``tokenizer.decode(ids, skip_special_tokens=True)`` joins
characters with no spaces and gives the answer string back exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rl.tasks import arithmetic
from rl.tasks.cache import cached_build, default_cache_dir

# SFT and evaluation live in rl.tasks.tiny_sft; importable from here too. The build looks
# teacher_forced_accuracy up in this module, so a test can replace it here.
from rl.tasks.tiny_sft import (  # noqa: F401 -- encode_sft_batch, generate, sft_loss: re-exported
    encode_sft_batch,
    generate,
    greedy_accuracy,
    run_sft,
    sft_loss,
    teacher_forced_accuracy,
)

# Bump when a code change alters what a given spec builds: it is part of the cache key.
BUILD_FORMAT = 1

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

TASKS = ("arithmetic",)


@dataclass(frozen=True)
class TinyModelSpec:
    """Every setting that changes the built model; its hash keys the cache.

    The defaults are the result of a headroom study (November 2026, this machine kind: 2 shared
    cores, torch 2.13.0+cpu, transformers 5.19.0); ``rl/tasks/RL_SETTINGS.md`` has the details.

    Model and SFT: a 4-layer, hidden-128 Llama (1.05M parameters, 19-token vocabulary) trained
    on 2-digit addition (operands 0-99, answer most-significant digit first), batch 64, AdamW
    lr 1e-3, until greedy accuracy on 256 train-split problems reaches 30%. Build
    (``python -m rl.tasks.tiny_model``, one thread): seed 0 stops at SFT step 410 with
    **28.3% held-out greedy accuracy** (980 test problems); the build took 36 s (SFT 32 s),
    bit-identical whatever the caller's thread count. Other seeds: 30.4% (seed 1, 690 steps), 45.1% (seed 2, 590 steps),
    25.8% (seed 3, 600 steps). vLLM 0.32 (CPU, float32) loads the model and reproduces the
    same greedy accuracy (28.3%).

    RL from it (a pure-PyTorch GRPO prototype: 64 prompts x 8 samples at temperature 1,
    reward = exact match, advantages (r - mean) / (std + 1e-6) per group, token-mean
    policy-gradient loss over response tokens incl. EOS, one AdamW step per batch at lr 1e-4
    after a 10-step linear warm-up, grad-norm clip 1.0, no KL; the command is in
    RL_SETTINGS.md), held-out greedy accuracy::

        SFT seed / RL seed   step 0   step 50   step 100   step 150
        0 / 0 (default)      28.3%    61.4%     67.4%      72.7%    (+44)
        0 / 1 (default)      28.3%    61.6%     71.4%      75.9%    (+48)
        1 / 0                30.4%    61.2%     72.0%      75.6%    (+45)
        1 / 1                30.4%    62.0%     70.5%      77.3%    (+47)
        2 / 0                45.1%    59.3%     65.9%      77.4%    (+32)
        3 / 0                25.8%    38.3%     43.4%      47.7%    (+22, the slowest SFT seed)
        3 / 1                25.8%    38.5%     41.7%      51.7%    (+26)

    About 1 s per RL step for that prototype on one idle core (2-3.5 s with the cores shared).
    Stopping the SFT at a fixed step count instead was fragile: at 450 steps seeds 0/1/2 gave
    34%/13%/8%, and RL from 8-13% gained only 2-9 points in 150 steps.
    """

    # -- task --------------------------------------------------------------------------------
    task: str = "arithmetic"
    digits: int = 2  # operands in [0, 10**digits)
    test_fraction: float = 0.1  # share of the problem space held out (split by identity)
    n_train_rows: int = 0  # rows of data/train.jsonl, the RL prompt pool (0: the whole train split)
    n_test_rows: int = 0  # rows of data/test.jsonl, where SFT accuracy is measured (0: whole split)
    # -- model (LlamaForCausalLM) -------------------------------------------------------------
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: num_heads (multi-head); fewer: grouped-query attention
    tie_word_embeddings: bool = False  # True: the LM head is the embedding matrix (most small instruct models)
    intermediate_size: int = 512
    max_position_embeddings: int = 64
    # -- SFT ----------------------------------------------------------------------------------
    # The SFT stops as soon as greedy accuracy on ``sft_eval_rows`` train-split problems
    # (checked every ``sft_eval_every`` steps) reaches ``sft_target_accuracy``, or after
    # ``sft_steps``. Stopping on accuracy rather than at a fixed step count matters: the
    # learning curve of this model has sudden jumps whose timing varies by seed (at a fixed
    # 450 steps, seeds 0/1/2 gave 34%/13%/8%), and RL's gain depends on where it starts.
    sft_steps: int = 1500
    sft_target_accuracy: float = 0.3  # 0: run all sft_steps
    sft_eval_every: int = 10
    sft_eval_rows: int = 256
    sft_batch_size: int = 64
    sft_lr: float = 1e-3
    sft_warmup_steps: int = 20  # linear warm-up, then constant
    sft_weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; known: {TASKS}")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        longest = 2 * self.digits + 2 + self.digits + 2  # "a+b=" + answer + <eos>
        if self.max_position_embeddings < longest:
            raise ValueError(f"max_position_embeddings must be >= {longest} for {self.digits} digits")

    @property
    def name(self) -> str:
        """A short human-readable directory name (the hash disambiguates the rest)."""
        stop = (
            f"acc{round(100 * self.sft_target_accuracy)}"
            if self.sft_target_accuracy > 0
            else f"sft{self.sft_steps}"
        )
        return f"{self.task}{self.digits}-h{self.hidden_size}-l{self.num_layers}-{stop}"

    @property
    def hash12(self) -> str:
        """First 12 hex digits of a hash of every field (and of ``BUILD_FORMAT``)."""
        fields = dataclasses.asdict(self)
        for name in _HASHED_ONLY_WHEN_SET:  # added later: builds made before them keep their keys
            if fields[name] == _DEFAULTS[name]:
                del fields[name]
        blob = json.dumps({"format": BUILD_FORMAT, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def max_new_tokens(self) -> int:
        """Longest completion in tokens: the sum's digits plus ``<eos>``."""
        return self.digits + 2

    def task_kwargs(self) -> dict:
        return {"digits": self.digits, "test_fraction": self.test_fraction}


# ------------------------------------------------------------------------------------------
# tokenizer and model
# ------------------------------------------------------------------------------------------


def build_tokenizer(alphabet: str = arithmetic.ALPHABET, model_max_length: int = 64):
    """A character-level ``PreTrainedTokenizerFast``: one token per character, no BOS added."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token ("(?m)." in Oniguruma: "." matching newlines too).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join tokens with no separator
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",  # decoder-only generation pads on the left
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


_HASHED_ONLY_WHEN_SET = ("num_kv_heads", "tie_word_embeddings")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TinyModelSpec)}


def build_model(spec: TinyModelSpec, tokenizer):
    """A randomly initialised float32 ``LlamaForCausalLM`` (seeded by ``spec.seed``)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=getattr(spec, "num_kv_heads", 0) or spec.num_heads,  # also built from a TinyTextSpec
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=getattr(spec, "tie_word_embeddings", False),
        dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).float()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


# ------------------------------------------------------------------------------------------
# the cached build
# ------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_tiny_model(
    spec: TinyModelSpec = TinyModelSpec(),
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Build (or reuse) the tiny model of ``spec``; returns ``<cache>/tiny/<name>-<hash12>/``.

    A build is complete when its ``build_info.json`` exists. Everything is written into a
    temporary sibling directory first and renamed into place, so a killed build never leaves a
    half-written cache; when two processes build the same spec at once, the first rename wins
    and the other discards its copy.
    """
    parent = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / "tiny"
    final, info = cached_build(parent, f"{spec.name}-{spec.hash12}", lambda out: _build_into(spec, out, log), "tiny model", log)
    if info is None:
        return final
    how = "shipped with the package" if info.get("shipped") else f"{info['build_seconds']:.0f} s"
    log(f"tiny model: SFT held-out greedy accuracy {info['sft_test_accuracy']:.1%} ({how}) -> {final}")
    return final


def _write_task_data(spec: TinyModelSpec, out: Path) -> tuple[list[dict], list[dict]]:
    """The task's train and held-out rows into ``out/data`` (generated, the same on every machine)."""
    kw = spec.task_kwargs()
    if spec.n_train_rows <= 0 or spec.n_test_rows <= 0:
        if spec.digits > 3:
            raise ValueError("n_train_rows/n_test_rows = 0 (whole split) needs digits <= 3")
        sizes = arithmetic.split_size(**kw)
    n_train = spec.n_train_rows if spec.n_train_rows > 0 else sizes["train"]
    n_test = spec.n_test_rows if spec.n_test_rows > 0 else sizes["test"]
    train_rows = arithmetic.make_problems(n_train, spec.seed, "train", **kw)
    test_rows = arithmetic.make_problems(n_test, spec.seed, "test", **kw)
    (out / "data").mkdir()
    _write_jsonl(out / "data" / "train.jsonl", train_rows)
    _write_jsonl(out / "data" / "test.jsonl", test_rows)
    return train_rows, test_rows


def _build_into(spec: TinyModelSpec, out: Path, log: Callable[[str], None]) -> dict:
    """Tokenizer + model + SFT + data files into ``out``; returns the build info."""
    import transformers

    kw = spec.task_kwargs()
    train_rows, test_rows = _write_task_data(spec, out)
    tokenizer = build_tokenizer(model_max_length=spec.max_position_embeddings)
    model = build_model(spec, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    until = f", stopping at {spec.sft_target_accuracy:.0%} train-split accuracy" if spec.sft_target_accuracy > 0 else ""
    log(f"  {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}, SFT up to {spec.sft_steps} steps{until}")
    # One thread: a model this small runs as fast on one, and the result (the SFT stops on a
    # steep part of the learning curve) does not then depend on the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_sft = time.time()
        val_rows = arithmetic.make_problems(spec.sft_eval_rows, spec.seed + 2, "train", **kw)
        val_acc: list[tuple[int, float]] = []

        def reached_target(step: int, m) -> bool:
            if spec.sft_target_accuracy <= 0 or step % spec.sft_eval_every:
                return False
            val_acc.append((step, teacher_forced_accuracy(m, tokenizer, val_rows)))
            if val_acc[-1][1] >= spec.sft_target_accuracy:
                log(f"  sft step {step}: train-split greedy accuracy {val_acc[-1][1]:.1%}, target reached")
                return True
            return False

        losses = run_sft(model, tokenizer, spec, log, on_step=reached_target)
        sft_seconds = time.time() - t_sft
        acc = greedy_accuracy(model, tokenizer, test_rows, spec.max_new_tokens)
        if spec.sft_target_accuracy > 0 and (not val_acc or val_acc[-1][1] < spec.sft_target_accuracy):
            log(f"  warning: SFT target accuracy {spec.sft_target_accuracy:.0%} not reached in {spec.sft_steps} steps")
    finally:
        torch.set_num_threads(threads)

    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    return {
        "spec": dataclasses.asdict(spec),
        "spec_hash": spec.hash12,
        "build_format": BUILD_FORMAT,
        "num_parameters": n_params,
        "sft_steps_run": len(losses),
        "sft_train_split_accuracy": val_acc[-1][1] if val_acc else None,
        "sft_final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 5),
        "sft_test_accuracy": acc,
        "sft_test_problems": len(test_rows),
        "sft_seconds": round(sft_seconds, 1),
        "max_new_tokens": spec.max_new_tokens,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def load_build_info(build_dir: Path) -> dict:
    """The ``build_info.json`` of a build directory."""
    return json.loads((Path(build_dir) / "build_info.json").read_text())


def _main() -> None:  # pragma: no cover - manual use: python -m rl.tasks.tiny_model
    path = build_tiny_model()
    print(json.dumps(load_build_info(path), indent=2))


if __name__ == "__main__":  # pragma: no cover
    _main()
