"""A family of verifiable arithmetic sub-tasks for the embedded model: one expert per sub-task.

Every sub-task writes its problems in the tiny model's alphabet (:data:`rl.tasks.arithmetic.ALPHABET`),
as ``{"prompt": "12-34=", "answer": "-22"}`` rows, answers at most :data:`MAX_ANSWER_CHARS`
characters; the reward is the exact match of :func:`rl.tasks.arithmetic.is_correct`.

Train and test are split exactly as in :mod:`rl.tasks.arithmetic`: a problem is in the test split
when a stable hash of its prompt falls below ``test_fraction`` (:func:`arithmetic.in_test_split`), so
the split is a property of the problem, not of ``seed``. ``add`` has the same prompts as
:mod:`rl.tasks.arithmetic`, hence the same split: the embedded model's SFT never saw its test split.

>>> sorted(SUBTASKS)
['add', 'add3', 'mix', 'mul', 'neg', 'sub']
>>> make_subtask_problems("neg", 2, seed=0, split="test")
[{'prompt': '23-26=', 'answer': '-3'}, {'prompt': '74-76=', 'answer': '-2'}]
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Callable, Iterator

from rl.tasks.arithmetic import ALPHABET, SPLITS, in_test_split

# Longest answer of any sub-task: with <eos> it fits the tiny model's generation budget.
MAX_ANSWER_CHARS = 4

_D1, _D2 = range(10), range(100)  # 1-digit and (up to) 2-digit operands


@dataclass(frozen=True)
class Subtask:
    """One sub-task: a description and a generator of its whole problem space (small: enumerated)."""

    name: str
    description: str
    space: Callable[[], Iterator[dict]]


def _row(prompt: str, value: int) -> dict:
    return {"prompt": prompt, "answer": str(value)}


def _add() -> Iterator[dict]:
    """
    >>> next(_add())
    {'prompt': '0+0=', 'answer': '0'}
    """
    return (_row(f"{a}+{b}=", a + b) for a in _D2 for b in _D2)


def _sub() -> Iterator[dict]:
    """
    >>> [r for r in _sub() if r["prompt"] == "52-17="]
    [{'prompt': '52-17=', 'answer': '35'}]
    """
    return (_row(f"{a}-{b}=", a - b) for a in _D2 for b in _D2 if a >= b)


def _neg() -> Iterator[dict]:
    """
    >>> [r for r in _neg() if r["prompt"] == "17-52="]
    [{'prompt': '17-52=', 'answer': '-35'}]
    """
    return (_row(f"{a}-{b}=", a - b) for a in _D2 for b in _D2 if a < b)


def _mul() -> Iterator[dict]:
    """
    >>> [r["answer"] for r in _mul() if r["prompt"] in ("7*86=", "86*7=")]
    ['602', '602']
    """
    return (_row(f"{a}*{b}=", a * b) for a in _D2 for b in _D2 if a < 10 or b < 10)


def _add3() -> Iterator[dict]:
    """
    >>> [r for r in _add3() if r["prompt"] == "98+9+9="]
    [{'prompt': '98+9+9=', 'answer': '116'}]
    """
    return (_row(f"{a}+{b}+{c}=", a + b + c) for a in _D2 for b in _D1 for c in _D1)


def _mix() -> Iterator[dict]:
    """
    >>> [r for r in _mix() if r["prompt"] in ("4+3-7=", "4+3-8=", "95+9-0=")]
    [{'prompt': '4+3-7=', 'answer': '0'}, {'prompt': '95+9-0=', 'answer': '104'}]
    """
    return (_row(f"{a}+{b}-{c}=", a + b - c) for a in _D2 for b in _D1 for c in _D1 if a + b >= c)


SUBTASKS: dict[str, Subtask] = {
    t.name: t
    for t in (
        Subtask("add", "a+b=, a and b in 0-99 (the embedded model's own task)", _add),
        Subtask("sub", "a-b=, a and b in 0-99, a >= b (result 0-99)", _sub),
        Subtask("neg", "a-b=, a and b in 0-99, a < b (negative result, e.g. -23)", _neg),
        Subtask("mul", "a*b=, one operand in 0-9, the other in 0-99 (either order)", _mul),
        Subtask("add3", "a+b+c=, a in 0-99, b and c in 0-9", _add3),
        Subtask("mix", "a+b-c=, a in 0-99, b and c in 0-9, a+b >= c", _mix),
    )
}


def _lookup(name: str) -> Subtask:
    if name not in SUBTASKS:
        raise ValueError(f"unknown sub-task {name!r}; known: {sorted(SUBTASKS)}")
    return SUBTASKS[name]


@functools.lru_cache(maxsize=None)
def _pool(name: str, split: str, test_fraction: float) -> tuple[tuple[str, str], ...]:
    """Every (prompt, answer) of one split of a sub-task, in enumeration order."""
    want_test = split == "test"
    return tuple(
        (r["prompt"], r["answer"]) for r in _lookup(name).space() if in_test_split(r["prompt"], test_fraction) == want_test
    )


def split_sizes(name: str, test_fraction: float = 0.1) -> dict[str, int]:
    """Number of distinct problems in each split of a sub-task.

    >>> split_sizes("add")  # the same split as rl.tasks.arithmetic.split_size()
    {'train': 9020, 'test': 980}
    """
    return {s: len(_pool(name, s, test_fraction)) for s in SPLITS}


def make_subtask_problems(name: str, n: int, seed: int, split: str, *, test_fraction: float = 0.1) -> list[dict]:
    """Draw ``n`` problems of one split of sub-task ``name``, deterministically from ``seed``.

    As :func:`rl.tasks.arithmetic.make_problems`: the ``n`` problems are distinct while the split
    has that many; past that the split is drawn again in a new order (for long SFT streams).

    >>> rows = make_subtask_problems("mul", 3, seed=1, split="train")
    >>> all(eval(r["prompt"][:-1]) == int(r["answer"]) for r in rows)
    True
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    pool = _pool(name, split, test_fraction)
    if not pool:
        raise ValueError(f"sub-task {name!r} has no {split} problems at test_fraction {test_fraction}")
    rng = random.Random(f"arithmetic_family/{name}/{split}/{test_fraction}/{seed}")
    return [{"prompt": p, "answer": a} for p, a in draw(pool, n, rng)]


def draw(pool: tuple, n: int, rng: random.Random) -> list:
    """``n`` items of ``pool`` in ``rng``'s order: distinct while the pool has that many, then the pool again in a
    new order (for long SFT streams).

    >>> draw((1, 2, 3), 5, random.Random(0))
    [1, 3, 2, 3, 2]
    """
    out: list = []
    while len(out) < n:
        order = list(pool)
        rng.shuffle(order)
        out.extend(order[: n - len(out)])
    return out


def check_alphabet(rows: list[dict]) -> None:
    """Raise ValueError if a prompt or answer leaves the alphabet or an answer is too long.

    >>> check_alphabet([{"prompt": "1/2=", "answer": "0"}])
    Traceback (most recent call last):
    ...
    ValueError: '1/2=' has characters outside the alphabet
    """
    allowed = set(ALPHABET)
    for r in rows:
        for text in (r["prompt"], r["answer"]):
            if not set(text) <= allowed:
                raise ValueError(f"{text!r} has characters outside the alphabet")
        if len(r["answer"]) > MAX_ANSWER_CHARS:
            raise ValueError(f"answer {r['answer']!r} of {r['prompt']!r} is longer than {MAX_ANSWER_CHARS} characters")
