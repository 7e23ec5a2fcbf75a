"""A synthetic verifiable task: integer addition, ``"12+34="`` -> ``"46"``.

Each problem is a dict ``{"prompt": "12+34=", "answer": "46"}``; the model's completion is the
answer followed by EOS, and the reward is an exact match of the completion against ``answer``.

Train and test are split by problem *identity*: a problem belongs to the test split when a
stable hash of its prompt falls below ``test_fraction``. The split is a property of the task
(it does not depend on ``seed``), so every sample of the test split is held out from every
sample of the train split, whatever seeds the two were drawn with. ``seed`` only chooses which
problems of a split are drawn, and in which order.
"""

from __future__ import annotations

import hashlib
import random

# Characters a prompt or an answer of this module can contain. The tiny model's tokenizer
# has one token per character (see ``tiny_model.py``); a few spares keep room for variants.
ALPHABET = "0123456789+-*= "

SPLITS = ("train", "test")

# Above this many (a, b) pairs, problems are drawn by rejection sampling instead of
# enumerating the whole space.
_ENUMERATE_LIMIT = 2_000_000


def format_problem(a: int, b: int) -> dict:
    """One addition problem as a row of the dataset.

    >>> format_problem(12, 34)
    {'prompt': '12+34=', 'answer': '46'}
    """
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def in_test_split(prompt: str, test_fraction: float) -> bool:
    """Whether a problem belongs to the held-out split (stable across runs and machines)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return h / 2**64 < test_fraction


def split_size(digits: int = 2, test_fraction: float = 0.1) -> dict[str, int]:
    """Number of distinct problems in each split (enumerates the space: small ``digits`` only)."""
    hi = 10**digits
    n_test = sum(
        in_test_split(f"{a}+{b}=", test_fraction) for a in range(hi) for b in range(hi)
    )
    return {"train": hi * hi - n_test, "test": n_test}


def make_problems(
    n: int,
    seed: int,
    split: str,
    *,
    digits: int = 2,
    test_fraction: float = 0.1,
) -> list[dict]:
    """Draw ``n`` addition problems of a split, deterministically from ``seed``.

    Operands are uniform in ``[0, 10**digits)`` (written without leading zeros). The ``n``
    problems are distinct while the split has that many; past that the split is drawn again
    in a new order (so ``n`` may exceed the split's size, e.g. for long SFT streams).

    Args:
        n: number of problems.
        seed: chooses which problems are drawn and their order; the split itself does not
            depend on it.
        split: ``"train"`` or ``"test"``.
        digits: maximum number of digits of each operand.
        test_fraction: share of the problem space held out as the test split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    want_test = split == "test"
    # Seed the generator from (seed, split, digits) so the two splits' draws are independent.
    rng = random.Random(f"arithmetic/{split}/{digits}/{test_fraction}/{seed}")
    hi = 10**digits
    out: list[dict] = []
    if hi * hi <= _ENUMERATE_LIMIT:
        pool = [
            (a, b)
            for a in range(hi)
            for b in range(hi)
            if in_test_split(f"{a}+{b}=", test_fraction) == want_test
        ]
        while len(out) < n:
            order = pool[:]
            rng.shuffle(order)
            out.extend(format_problem(a, b) for a, b in order[: n - len(out)])
        return out
    # Huge spaces: rejection-sample distinct problems of the requested split.
    seen: set[tuple[int, int]] = set()
    while len(out) < n:
        a, b = rng.randrange(hi), rng.randrange(hi)
        if (a, b) in seen or in_test_split(f"{a}+{b}=", test_fraction) != want_test:
            continue
        seen.add((a, b))
        out.append(format_problem(a, b))
    return out


def chat_rows(problems: list[dict]) -> list[dict]:
    """The same problems asked in words, for a chat model: ``question`` and ``answer`` columns.

    >>> chat_rows([format_problem(23, 45)])
    [{'question': 'What is 23 + 45?', 'answer': '68'}]
    """
    out = []
    for p in problems:
        a, b = p["prompt"].rstrip("=").split("+")
        out.append({"question": f"What is {a} + {b}?", "answer": p["answer"]})
    return out


def is_correct(completion: str, answer: str) -> bool:
    """Exact-match check of a completion (surrounding whitespace ignored).

    >>> is_correct("46", "46"), is_correct(" 46\\n", "46"), is_correct("460", "46")
    (True, True, False)
    """
    return completion.strip() == answer.strip()
