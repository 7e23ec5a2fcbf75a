"""The SmolLM2 chat task family of the Arrow/MBC and merging experiments (experiments/chat_family.py): answers,
splits, the lenient answer check, and the SFT loss that applies the LM head only where the answer is."""

from __future__ import annotations

import re

import pytest
import torch

from experiments import chat_family as cf
from rl.tasks.tiny_sft import encode_sft_batch, sft_loss


class ChatMLTokenizer:
    """The two things ChatFamily reads of a tokenizer: its vocabulary and its chat template (ChatML)."""

    def __init__(self, tokens: list[str]):
        self.vocab = {t: i for i, t in enumerate(tokens)}

    def get_vocab(self) -> dict[str, int]:
        return self.vocab

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@pytest.fixture(scope="module")
def family():
    made_up = ["Ġ" + "".join(chr(97 + (i * 7 + j * 3) % 26) for j in range(4 + i % 4)) for i in range(400)]
    return cf.ChatFamily(ChatMLTokenizer(made_up))


def test_words_are_the_vocabularys_lowercase_word_initial_tokens_of_4_to_7_letters():
    tokens = ["Ġapple", "Ġmoon", "Ġriver", "Ġstone", "Ġab", "Ġtoolongword", "ĠCapital", "Ġhouse", "moon", "Ġgreen"]
    assert cf.vocabulary_words(ChatMLTokenizer(tokens)) == ("apple", "green", "house", "moon", "river", "stone")


def test_a_split_without_problems_is_an_error_not_a_hang():
    tiny = cf.ChatFamily(ChatMLTokenizer(["Ġmoon"]))
    with pytest.raises(ValueError, match="no (train|test) problems"):
        [tiny.problems("first", 1, 0, split) for split in ("train", "test")]


@pytest.mark.parametrize("task", list(cf.SUBTASKS))
def test_every_answer_is_right_and_train_and_test_never_share_a_question(family, task):
    train, test = family.problems(task, 200, 0, "train"), family.problems(task, 200, 0, "test")
    assert {r["question"] for r in train}.isdisjoint(r["question"] for r in test)
    for r in train[:50] + test[:50]:
        q, a = r["question"], r["answer"]
        assert r["prompt"].endswith(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
        assert cf.SYSTEM in r["prompt"] and cf.DEMONSTRATION[1]["content"] in r["prompt"]
        numbers = [int(x) for x in re.findall(r"\d+", q)]
        word = re.search(r"'(\w+)'", q).group(1) if "'" in q else None
        expected = {"add": lambda: sum(numbers), "sub": lambda: numbers[0] - numbers[1], "mul": lambda: numbers[0] * numbers[1],
                    "max": lambda: max(numbers), "lastdigit": lambda: numbers[0] % 10, "upper": lambda: word.upper(),
                    "first": lambda: word[0], "last": lambda: word[-1]}[task]()
        assert a == str(expected), (q, a)


def test_problems_are_drawn_by_seed(family):
    assert family.problems("add", 20, 3, "train") == family.problems("add", 20, 3, "train")
    assert family.problems("add", 20, 3, "train") != family.problems("add", 20, 4, "train")
    assert len(family.problems("mul", family.split_size("mul", "test") + 5, 0, "test")) == family.split_size("mul", "test") + 5


@pytest.mark.parametrize("completion, answer, case_sensitive, correct", [
    ("45", "45", False, True),
    ("66 - 21 = 45", "45", False, True),
    ("The answer is 466.", "466", False, True),
    ("45\nand then 46", "46", False, False),  # only the first line counts
    ("To add 59 and 63, you simply add them", "122", False, False),
    ("The last letter of the word 'moon' is 'N'.", "n", False, True),
    ("MOON", "MOON", True, True),
    ("Moon", "MOON", True, False),
    ("", "4", False, False),
    ("-3", "-3", False, True),
])
def test_the_answer_check(completion, answer, case_sensitive, correct):
    assert cf.is_correct(completion, answer, case_sensitive) is correct


class CharIds:
    """A character tokenizer over digits and a few symbols (what ``encode_sft_batch`` reads of a tokenizer)."""

    eos_token_id, pad_token_id = 1, 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[2 + "0123456789+-=?".index(c) for c in t] for t in texts]}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def test_answer_loss_equals_the_full_logits_loss():
    """The LM head at the labelled positions only gives the cross-entropy of the full [N, L, V] logits."""
    model = _tiny_llama()
    batch = encode_sft_batch(CharIds(), [{"prompt": "12+3=", "answer": "15"}, {"prompt": "7-2=", "answer": "5"}])
    torch.testing.assert_close(cf.answer_loss(model, batch), sft_loss(model, batch), rtol=1e-6, atol=1e-6)


def test_the_sparse_experts_calibration_gradient_is_the_same_in_chunks():
    """SNIP's gradient of the calibration batch, taken a few rows per backward (answers of different lengths), is
    the whole batch's: chunking only bounds memory."""
    from experiments import family_experts as fx

    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (12, 34), (99, 99), (5, 50), (7, 3), (60, 47), (8, 8)]]
    grads = {}
    for chunk in (0, 3):
        model = _tiny_llama()
        kind = fx.SparseKind(CharIds(), fx.Settings(calibration_chunk=chunk), sft_loss)
        kind._batch_gradient(model, rows)
        grads[chunk] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[0].keys() == grads[3].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[3][n], grads[0][n], rtol=1e-5, atol=1e-7)
