"""A complete reward-function file: name it in a recipe as

    rewards:
      functions:
        - fn: docs/guide/examples/answer_reward.py:close_answer   # path (from where you run `rl`) : function
          name: close_answer                                       # its key in metrics (reward/close_answer)
      accuracy: close_answer

The contract: ``fn(prompts, completions, **columns) -> list[float]``, called on a whole batch.
``prompts[i]`` is the rendered prompt that produced ``completions[i]``; every column of the data
file arrives as a keyword argument holding a list aligned with them (here ``answer``). Take the
columns you need by name and accept the rest with ``**columns``. Return one float per completion.

A function that raises, returns NaN or a list of the wrong length costs only the samples concerned
(they score ``rewards.fallback``, counted in ``reward_failures_*``); the run goes on.

>>> close_answer(["12+34="] * 5, ["46", " 46\\n7+1=8", "44", "4x", "99"], answer=["46"] * 5)
[1.0, 1.0, 0.32, 0.0, 0.0]
"""

from __future__ import annotations

from typing import Any

PARTIAL = 0.4  # the most a wrong answer earns: below 0.5, so held-out `accuracy` (scores >= 0.5) counts exact answers only
WINDOW = 10  # a wrong answer this far off (or further) earns nothing


def close_answer(prompts: list[str], completions: list[str], *, answer: list[Any], **columns: Any) -> list[float]:
    """1.0 for the exact answer; partial credit ``PARTIAL * (1 - |error| / WINDOW)`` for a number
    within ``WINDOW`` of it; 0.0 otherwise (not a number, or too far off).

    The completion is read up to its first newline (a small model may go on with a next problem).
    """
    scores = []
    for completion, gold in zip(completions, answer, strict=True):
        text = str(completion).strip().split("\n", 1)[0].strip()
        target = str(gold).strip()
        if text == target:
            scores.append(1.0)
            continue
        try:
            error = abs(int(text) - int(target))
        except ValueError:
            scores.append(0.0)
            continue
        scores.append(round(PARTIAL * max(0.0, 1.0 - error / WINDOW), 6))
    return scores
