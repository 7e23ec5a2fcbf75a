"""The arithmetic sub-task family (experiments/arithmetic_family.py): answers, splits, alphabet, lengths."""

from __future__ import annotations

import re

import pytest

from rl.tasks import arithmetic
from experiments.arithmetic_family import MAX_ANSWER_CHARS, SUBTASKS, check_alphabet, make_subtask_problems, split_sizes

# What each sub-task's prompt looks like, and the check its answer must pass.
SHAPES = {
    "add": (r"(\d{1,2})\+(\d{1,2})=", lambda a, b: a + b),
    "sub": (r"(\d{1,2})-(\d{1,2})=", lambda a, b: a - b if a >= b else None),
    "neg": (r"(\d{1,2})-(\d{1,2})=", lambda a, b: a - b if a < b else None),
    "mul": (r"(\d{1,2})\*(\d{1,2})=", lambda a, b: a * b if min(a, b) < 10 else None),
    "add3": (r"(\d{1,2})\+(\d)\+(\d)=", lambda a, b, c: a + b + c),
    "mix": (r"(\d{1,2})\+(\d)-(\d)=", lambda a, b, c: a + b - c if a + b >= c else None),
}


def test_registry_has_a_shape_and_description_for_every_subtask():
    assert set(SUBTASKS) == set(SHAPES)
    for name, t in SUBTASKS.items():
        assert t.name == name and t.description and "\n" not in t.description


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_are_correct(name, split):
    pattern, answer = SHAPES[name]
    for row in make_subtask_problems(name, 300, seed=0, split=split):
        m = re.fullmatch(pattern, row["prompt"])
        assert m, row
        operands = [int(g) for g in m.groups()]
        assert all(str(v) == g for v, g in zip(operands, m.groups())), row  # no leading zeros
        expected = answer(*operands)
        assert expected is not None, f"{row} is outside {name}"
        assert row["answer"] == str(expected)


@pytest.mark.parametrize("name", sorted(SUBTASKS))
def test_splits_are_disjoint_and_cover_the_space(name):
    sizes = split_sizes(name)
    train = {r["prompt"] for r in make_subtask_problems(name, sizes["train"], seed=0, split="train")}
    test = {r["prompt"] for r in make_subtask_problems(name, sizes["test"], seed=5, split="test")}
    assert len(train) == sizes["train"] and len(test) == sizes["test"]  # distinct while the split lasts
    assert not train & test
    space = {r["prompt"] for r in SUBTASKS[name].space()}
    assert train | test == space
    assert 0.05 < sizes["test"] / len(space) < 0.15  # about test_fraction = 0.1
    assert all(arithmetic.in_test_split(p, 0.1) for p in test)  # the same rule as arithmetic.py


def test_add_has_the_embedded_tasks_split():
    assert split_sizes("add") == arithmetic.split_size()
    ours = {r["prompt"] for r in make_subtask_problems("add", 980, seed=0, split="test")}
    theirs = {r["prompt"] for r in arithmetic.make_problems(980, seed=0, split="test")}
    assert ours == theirs


def test_sub_and_neg_do_not_overlap():
    sub = {r["prompt"] for r in SUBTASKS["sub"].space()}
    neg = {r["prompt"] for r in SUBTASKS["neg"].space()}
    assert not sub & neg and len(sub | neg) == 100 * 100


@pytest.mark.parametrize("name", sorted(SUBTASKS))
def test_alphabet_and_lengths(name):
    rows = list(SUBTASKS[name].space())
    check_alphabet(rows)  # raises if a character is outside ALPHABET or an answer is too long
    assert max(len(r["answer"]) for r in rows) <= MAX_ANSWER_CHARS
    assert all(r["prompt"].endswith("=") and r["answer"] for r in rows)
    assert max(len(r["prompt"]) + len(r["answer"]) + 1 for r in rows) <= 64  # the tiny model's positions


def test_check_alphabet_rejects_long_answers():
    with pytest.raises(ValueError, match="longer than"):
        check_alphabet([{"prompt": "1+1=", "answer": "12345"}])


def test_draws_are_deterministic_and_seeded():
    a = make_subtask_problems("mix", 50, seed=3, split="train")
    assert a == make_subtask_problems("mix", 50, seed=3, split="train")
    assert a != make_subtask_problems("mix", 50, seed=4, split="train")


def test_past_the_split_size_the_split_is_drawn_again():
    n = split_sizes("mul")["test"]
    rows = make_subtask_problems("mul", 2 * n + 3, seed=0, split="test")
    assert len(rows) == 2 * n + 3
    assert len({r["prompt"] for r in rows[:n]}) == n and {r["prompt"] for r in rows[n : 2 * n]} == {r["prompt"] for r in rows[:n]}


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown sub-task"):
        make_subtask_problems("div", 1, seed=0, split="train")
    with pytest.raises(ValueError, match="split"):
        make_subtask_problems("add", 1, seed=0, split="dev")
    with pytest.raises(ValueError, match="test_fraction"):
        make_subtask_problems("add", 1, seed=0, split="train", test_fraction=1.5)
