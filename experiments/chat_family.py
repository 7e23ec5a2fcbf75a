"""A family of short chat tasks for SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``): numbers and
letters, each asked as one ChatML user turn, each a skill the base model already has in part.

Every prompt is the same chat: a system message asking for the answer only, one fixed demonstration
exchange on an unrelated question (without it the base explains instead of answering and scores 0% on
almost every task), then the question. The answer is checked leniently, as a reward function would: the
last number (or word) of the completion's first line must equal the answer, so "66 - 21 = 45" and
"The first letter of 'moon' is 'm'." both count. Letter answers ignore case except for ``upper``.

Words are the 4-7 letter lowercase whole-word tokens of the model's own vocabulary (10,683 of them; some
are word pieces such as "abbre": a letter task does not need a dictionary word). Train and test are split
by a stable hash of the question, as in :mod:`experiments.arithmetic_family`.

>>> is_correct("66 - 21 = 45", "45"), is_correct("The first letter of the word 'moon' is 'M'.", "m")
(True, True)
>>> is_correct("Moon", "MOON", case_sensitive=True), is_correct("45\\nor 46", "46")
(False, False)
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from experiments.arithmetic_family import draw
from rl.tasks.arithmetic import SPLITS, in_test_split

SYSTEM = "Reply with the answer only."
DEMONSTRATION = ({"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris"})
MAX_NEW_TOKENS = 20  # enough for the base model's one-sentence answers; an expert answers in 2-4 tokens
# The experts' settings (experiments.family_experts.Settings fields) on this family, shared by the Arrow/MBC and
# merging experiments so that both use the same cached LoRA experts. 24 SFT steps of 16 (~85 s per LoRA expert on
# 2 cores) take each task well above the base. Probes (seed 0, 64 test prompts): LoRA lr 2e-3 on `sub`, 7% -> 19% after
# 20 steps of 16, 33% after 40; full lr 3e-5 on `upper`, 3% -> 50% after these 24. The sparse lr (3e-4, ten times full's:
# a sparse adapter trains 5% of the projections' entries) is not probed.
LIBRARY_TASKS = ("add", "mul", "max", "lastdigit", "upper", "first")  # the experts; `sub` and `last` are held out
EXPERT_SETTINGS = dict(family="smollm2-chat", subtasks=LIBRARY_TASKS, sft_steps=24, batch_size=16, warmup_steps=3, lr_lora=2e-3,
                       lr_full=3e-5, lr_sparse=3e-4, calibration_chunk=16, test_prompts=64)
_WORD_TOKEN = re.compile(r"Ġ([a-z]{4,7})")  # a word-initial token of the byte-level BPE vocabulary


@dataclass(frozen=True)
class ChatSubtask:
    name: str
    description: str
    space: Callable[[tuple[str, ...]], Iterator[tuple[str, str]]]  # words -> every (question, answer)
    case_sensitive: bool = False


def _numbers(fmt: str, pairs: Iterator[tuple[int, ...]], value: Callable[..., int]) -> Iterator[tuple[str, str]]:
    return ((fmt.format(*p), str(value(*p))) for p in pairs)


_D2, _D3 = range(10, 100), range(10, 300)
SUBTASKS: dict[str, ChatSubtask] = {
    t.name: t
    for t in (
        ChatSubtask("add", "What is a + b? (a, b in 10-99)",
                    lambda w: _numbers("What is {} + {}?", ((a, b) for a in _D2 for b in _D2), lambda a, b: a + b)),
        ChatSubtask("sub", "What is a - b? (a >= b, both in 10-99)",
                    lambda w: _numbers("What is {} - {}?", ((a, b) for a in _D2 for b in _D2 if a >= b), lambda a, b: a - b)),
        ChatSubtask("mul", "What is a * b? (a in 2-9, b in 10-99)",
                    lambda w: _numbers("What is {} * {}?", ((a, b) for a in range(2, 10) for b in _D2), lambda a, b: a * b)),
        ChatSubtask("max", "Which is larger, a or b? (distinct, in 10-299)",
                    lambda w: _numbers("Which is larger, {} or {}?", ((a, b) for a in _D3 for b in _D3 if a != b), max)),
        ChatSubtask("lastdigit", "What is the last digit of n? (n in 100-9999)",
                    lambda w: _numbers("What is the last digit of {}?", ((n,) for n in range(100, 10000)), lambda n: n % 10)),
        ChatSubtask("upper", "Write the word 'w' in capital letters.",
                    lambda w: ((f"Write the word '{x}' in capital letters.", x.upper()) for x in w), case_sensitive=True),
        ChatSubtask("first", "What is the first letter of the word 'w'?",
                    lambda w: ((f"What is the first letter of the word '{x}'?", x[0]) for x in w)),
        ChatSubtask("last", "What is the last letter of the word 'w'?",
                    lambda w: ((f"What is the last letter of the word '{x}'?", x[-1]) for x in w)),
    )
}


def is_correct(completion: str, answer: str, case_sensitive: bool = False) -> bool:
    """The last number (a numeric answer) or word of the completion's first line equals ``answer``."""
    lines = completion.strip().splitlines()
    pattern = r"-?\d+" if answer.lstrip("-").isdigit() else r"[A-Za-z]+"
    found = re.findall(pattern, lines[0]) if lines else []
    if not found:
        return False
    return found[-1] == answer if case_sensitive else found[-1].lower() == answer.lower()


def reward(prompts: list[str], completions: list[str], *, answer: list[str], task: list[str], **columns) -> list[float]:
    """The family's check as a reward function (``experiments/chat_family.py:reward``; rows carry ``answer`` and ``task``)."""
    return [float(is_correct(c, str(a), SUBTASKS[t].case_sensitive)) for c, a, t in zip(completions, answer, task)]


def vocabulary_words(tokenizer) -> tuple[str, ...]:
    """The 4-7 letter lowercase word-initial tokens of ``tokenizer``'s vocabulary, sorted."""
    return tuple(sorted({m.group(1) for t in tokenizer.get_vocab() if (m := _WORD_TOKEN.fullmatch(t))}))


def chat_prompt(tokenizer, question: str) -> str:
    """The model's text for ``question``: system message, the demonstration, the question, the assistant's turn."""
    messages = [{"role": "system", "content": SYSTEM}, *DEMONSTRATION, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@functools.lru_cache(maxsize=None)
def _pool(name: str, words: tuple[str, ...], split: str, test_fraction: float) -> tuple[tuple[str, str], ...]:
    if name not in SUBTASKS:
        raise ValueError(f"unknown chat sub-task {name!r}; known: {sorted(SUBTASKS)}")
    want_test = split == "test"
    return tuple((q, a) for q, a in SUBTASKS[name].space(words) if in_test_split(q, test_fraction) == want_test)


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled (answer + EOS) tokens, as ``rl.tasks.tiny_sft.sft_loss``, with the LM head
    applied only at the positions that predict them: a prompt of ~50 tokens and an answer of ~3 make the full
    [rows x length x 49,152] logits a quarter of an SFT step's time here.

    ``batch``: ``encode_sft_batch``'s ``input_ids``, ``attention_mask``, ``labels``, each [N, L].
    """
    labels = batch["labels"][:, 1:]  # [N, L-1]: position t predicts token t+1
    keep = labels != -100
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # [labelled, V]
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


class ChatFamily:
    """The family bound to one tokenizer: problems as ``{"prompt", "answer", "question"}`` rows and their accuracy."""

    name = "smollm2-chat"
    loss = staticmethod(answer_loss)

    def __init__(self, tokenizer, test_fraction: float = 0.1):
        self.tokenizer, self.test_fraction = tokenizer, test_fraction
        self.words = vocabulary_words(tokenizer)
        self.subtasks = {t.name: t.description for t in SUBTASKS.values()}

    def problems(self, name: str, n: int, seed: int, split: str) -> list[dict]:
        """``n`` problems of one split, drawn deterministically from ``seed`` (the split again in a new order past its size)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        pool = _pool(name, self.words, split, self.test_fraction)
        if not pool:
            raise ValueError(f"chat sub-task {name!r} has no {split} problems ({len(self.words)} vocabulary words)")
        rng = random.Random(f"chat_family/{name}/{split}/{self.test_fraction}/{seed}")
        return [{"prompt": chat_prompt(self.tokenizer, q), "answer": a, "question": q} for q, a in draw(pool, n, rng)]

    def split_size(self, name: str, split: str) -> int:
        return len(_pool(name, self.words, split, self.test_fraction))

    @torch.no_grad()
    def accuracy(self, model, tokenizer, rows: list[dict], task: str) -> float:
        """Greedy accuracy of ``model`` on ``rows`` of ``task``: one left-padded batch through ``generate`` (KV cache)."""
        completions = greedy_completions(model, tokenizer, [r["prompt"] for r in rows], MAX_NEW_TOKENS)
        case = SUBTASKS[task].case_sensitive
        return sum(is_correct(c, r["answer"], case) for c, r in zip(completions, rows)) / len(rows)


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy completions of ``prompts``, stopping at the tokenizer's EOS (``<|im_end|>`` for a ChatML model)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
