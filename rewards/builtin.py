"""Built-in rewards, registered by short name when :mod:`rewards` is imported.

Every function follows the reward contract ``fn(prompts, completions, **columns) ->
list[float]`` and carries a doctest calling it exactly as the scorer does, so the
documented signature cannot drift from the real call.

==================  ==========  =========================================================
name                column      score per completion
==================  ==========  =========================================================
arithmetic_exact    ``answer``  1.0 if the first line equals ``str(answer)``, else 0.0
math_verify         ``answer``  1.0 if math-verify finds the final answer equal to gold
format_answer       --          1.0 if a ``\\boxed{...}`` or a ``#### <number>`` line is present
length_penalty      --          ``-len(completion) / 1000`` (characters)
python_tests        ``tests``   1.0 if the completion's code passes the asserts in ``tests``
                                when run in :func:`rewards.sandbox.run_python`, else 0.0
==================  ==========  =========================================================
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from rewards.registry import register_reward

__all__ = ["arithmetic_exact", "math_verify", "format_answer", "length_penalty", "python_tests"]

logger = logging.getLogger("rewards")


@register_reward("arithmetic_exact")
def arithmetic_exact(prompts: list[str], completions: list[str], *, answer: list[Any], **columns: Any) -> list[float]:
    """Exact match for the embedded arithmetic task (prompt ``"12+34="``, completion ``"46"``).

    The completion is stripped of surrounding whitespace and cut at the first newline (the
    model may keep generating a next problem); the rest must equal ``str(answer)``
    (also stripped) character for character: no numeric tolerance, ``"046"`` is wrong.

    >>> arithmetic_exact(["12+34=", "12+34=", "12+34=", "2+2="],
    ...                  [" 46\\n7+1=8", "47", "046", "4"],
    ...                  answer=[46, "46", "46", 4], source=["unused column"] * 4)
    [1.0, 0.0, 0.0, 1.0]
    """
    scores = []
    for completion, gold in zip(completions, answer, strict=True):
        first_line = str(completion).strip().split("\n", 1)[0].strip()
        scores.append(1.0 if first_line == str(gold).strip() else 0.0)
    return scores


# --- math_verify -------------------------------------------------------------------------

_HASH_ANSWER = re.compile(r"####[ \t]*([^\n]*)")
# "The answer is 42." / "final answer: $42$" -- up to the end of the line or a sentence
# end (a '.' followed by whitespace or the end; the '.' in "0.75" is not one).
_SAID_ANSWER = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+?)(?:\.(?=\s|$)|\n|$)", re.IGNORECASE)


def _last_boxed(text: str) -> str | None:
    """The last ``\\boxed{...}`` (balanced braces) in ``text``, or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth = 0
        for end in range(start + len("\\boxed"), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return text[start : end + 1]
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: try an earlier one
    return None


def _final_answer_span(completion: str) -> str:
    """Where the final answer is, by GSM8K convention first: ``#### x`` > ``\\boxed{x}`` >
    "the answer is x" > the whole text (math-verify then takes its last expression)."""
    hashes = _HASH_ANSWER.findall(completion)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip()
    boxed = _last_boxed(completion)
    if boxed is not None:
        return boxed
    said = _SAID_ANSWER.findall(completion)
    if said and said[-1].strip():
        return said[-1].strip()
    return completion


def _gold_span(gold: Any) -> str:
    """Gold as a string; GSM8K's full solution ``"...\\n#### 72"`` keeps only ``72``."""
    text = str(gold)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return text.strip()


def _parse(text: str, timeout: int | None) -> list:
    from math_verify import parse

    parsed = parse(text, parsing_timeout=timeout)
    if not parsed and "$" not in text:
        parsed = parse(f"${text}$", parsing_timeout=timeout)  # bare LaTeX: "\frac{3}{4}"
    return parsed


@register_reward("math_verify")
def math_verify(prompts: list[str], completions: list[str], *, answer: list[Any], **columns: Any) -> list[float]:
    """GSM8K-style final-answer check with `math-verify <https://github.com/huggingface/Math-Verify>`_.

    The final answer is taken from, in order: the last ``#### x`` line, the last
    ``\\boxed{x}``, the last "the answer is x", else the whole completion. It is parsed and
    compared to the gold ``answer`` with ``math_verify.parse`` / ``verify`` (so ``3/4``
    equals ``0.75`` and ``1,234`` equals ``1234``). A gold containing ``####`` (a full
    GSM8K solution) is cut to the part after it. Garbage, empty or non-string text scores
    0.0; this function never raises on a completion.

    math-verify's own timeout uses ``signal.alarm``, which only works in the main thread;
    elsewhere (a threaded Ray actor) it runs without one.

    >>> math_verify(["q"] * 5,
    ...             ["The answer is 72.", "so \\\\boxed{3/4}", "4 * 18 = 72\\n#### 72", "}{ garbage \\\\boxed{", "#### 71"],
    ...             answer=["72", "0.75", "Natalia sold 48+24 = 72 clips.\\n#### 72", "72", "72"])
    [1.0, 1.0, 1.0, 0.0, 0.0]
    """
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    from math_verify import verify

    scores = []
    for completion, gold in zip(completions, answer, strict=True):
        score = 0.0
        try:
            if isinstance(completion, str) and gold is not None:
                gold_parsed = _parse(_gold_span(gold), timeout)
                pred_parsed = _parse(_final_answer_span(completion), timeout)
                if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=timeout):
                    score = 1.0
        except Exception:  # noqa: BLE001 -- a malformed completion is a wrong answer, not an error
            logger.debug("math_verify: could not check completion %r", completion, exc_info=True)
        scores.append(score)
    return scores


# --- format_answer -----------------------------------------------------------------------

_HASH_NUMBER_LINE = re.compile(r"^[ \t]*####[ \t]*[-+]?\$?[ \t]*\d[\d,]*(?:\.\d+)?[ \t]*\.?[ \t]*$", re.MULTILINE)


def _has_boxed(text: str) -> bool:
    boxed = _last_boxed(text)
    return boxed is not None and boxed[len("\\boxed{") : -1].strip() != ""


@register_reward("format_answer")
def format_answer(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """Format reward: 1.0 if the completion marks a final answer, else 0.0.

    A marker is a non-empty ``\\boxed{...}`` with balanced braces, or a line holding only
    ``#### <number>`` (GSM8K style; commas, a sign, a leading ``$`` and a trailing ``.``
    are allowed). Correctness is not checked: pair it with ``math_verify``.

    >>> format_answer(["q"] * 5,
    ...               ["so \\\\boxed{12}", "48 + 24 = 72\\n#### 1,072", "#### seventy-two", "\\\\boxed{}", "72"])
    [1.0, 1.0, 0.0, 0.0, 0.0]
    """
    scores = []
    for completion in completions:
        text = completion if isinstance(completion, str) else ""
        ok = bool(_HASH_NUMBER_LINE.search(text)) or _has_boxed(text)
        scores.append(1.0 if ok else 0.0)
    return scores


# --- length_penalty ----------------------------------------------------------------------


@register_reward("length_penalty")
def length_penalty(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """``-len(completion) / 1000``: minus one per thousand characters (not tokens).

    Always <= 0 and unbounded below, so give it a small weight next to a correctness
    reward (e.g. ``weight: 0.1``) to nudge toward shorter answers without swamping it.

    >>> length_penalty(["12+34="] * 2, ["46", "x" * 500])
    [-0.002, -0.5]
    """
    return [-len(completion) / 1000.0 for completion in completions]


# --- python_tests ------------------------------------------------------------------------

# ```python / ```py / ```python3 fences first; a bare ``` fence only when no tagged one exists.
_PYTHON_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_BARE_FENCE = re.compile(r"```[ \t]*\n(.*?)```", re.DOTALL)

PYTHON_TESTS_LIMITS: dict[str, Any] = {"timeout_seconds": 5.0, "cpu_seconds": 5, "memory_mb": 512}
"""Keyword arguments of :func:`rewards.sandbox.run_python` for each ``python_tests`` sample."""


def extract_python(completion: str) -> str:
    """The code in a completion: the last ```python fenced block (also ``py``/``python3``),
    else the last bare ``` block, else the whole text.

    >>> extract_python("Here:\\n```python\\nprint(1)\\n```\\nand a fix:\\n```py\\nprint(2)\\n```")
    'print(2)\\n'
    >>> extract_python("x = 1")
    'x = 1'
    """
    for fence in (_PYTHON_FENCE, _BARE_FENCE):
        blocks = fence.findall(completion)
        if blocks:
            return blocks[-1]
    return completion


@register_reward("python_tests")
def python_tests(prompts: list[str], completions: list[str], *, tests: list[Any], **columns: Any) -> list[float]:
    """Unit-test reward for code generation: 1.0 if the code passes the tests, else 0.0.

    The code is :func:`extract_python` of the completion; ``tests`` holds Python (typically
    ``assert`` statements, as a string or a list of strings). Code and tests run as one
    program in :func:`rewards.sandbox.run_python` with :data:`PYTHON_TESTS_LIMITS` (no
    network, limited time, CPU, memory and processes); exit status 0 scores 1.0. A failed
    assert, an exception, a timeout, or empty ``tests`` score 0.0. Samples run one after
    another (concurrent runs by the same user would share one ``RLIMIT_NPROC`` budget),
    about 50 ms each when they finish quickly.

    >>> python_tests(["Write add(a, b)."] * 3,
    ...              ["```python\\ndef add(a, b):\\n    return a + b\\n```",
    ...               "def add(a, b):\\n    return a - b",
    ...               "I cannot do that."],
    ...              tests=["assert add(2, 3) == 5\\nassert add(-1, 1) == 0",
    ...                     ["assert add(2, 3) == 5"],
    ...                     "assert add(2, 3) == 5"],
    ...              source=["unused column"] * 3)
    [1.0, 0.0, 0.0]
    """
    from rewards.sandbox import run_python  # here: the sandbox probes the kernel on first use

    scores = []
    for completion, test in zip(completions, tests, strict=True):
        if isinstance(test, (list, tuple)):
            test = "\n".join(str(t) for t in test)
        if not isinstance(completion, str) or not isinstance(test, str) or not test.strip():
            scores.append(0.0)
            continue
        result = run_python(f"{extract_python(completion)}\n\n{test}\n", **PYTHON_TESTS_LIMITS)
        scores.append(1.0 if result.returncode == 0 and not result.timed_out else 0.0)
    return scores
