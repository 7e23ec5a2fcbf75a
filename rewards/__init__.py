"""Rewards: the reward contract, a registry of built-ins, plugin loading and fault-tolerant scoring.

The reward contract
-------------------
A reward is a plain function, called on a whole batch::

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
        ...

- ``prompts[i]`` is the prompt that produced ``completions[i]`` (a prompt is repeated for
  each of its ``G`` completions, so both lists hold ``N = B*G`` entries).
- Every other dataset column arrives as a keyword argument holding a list aligned with
  them, e.g. ``answer=[...]``. Take the columns you need by name and accept the rest with
  ``**columns``: the dataset may carry columns your function does not know about.
- Return one float per completion, in order.

For example, with the embedded arithmetic task::

    def exact(prompts, completions, answer, **columns):
        return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]

    exact(["12+34=", "2+2="], ["46", "5"], answer=["46", "4"], split=["train", "train"])
    # -> [1.0, 0.0]

A recipe names rewards by *spec* (resolved by :func:`get_reward`):

- a registered short name: ``arithmetic_exact``, ``math_verify``, ``format_answer``,
  ``length_penalty``, ``python_tests`` (see :mod:`rewards.builtin`), or any name registered with
  ``@register_reward("name")``;
- a file: ``path/to/my_rewards.py:my_reward`` (relative to the current directory);
- a module: ``my_package.my_module:my_reward``.

:class:`RewardScorer` combines several ``RewardSpec(fn, weight)`` into a weighted sum per
completion. A reward function that raises, returns the wrong length, a non-number or NaN,
or (with ``timeout_seconds``) does not return in time costs only the samples concerned
(they score ``fallback`` and are counted by kind in :attr:`ScoreResult.failures`); it never
stops the run. See :mod:`rewards.scoring`.

A recipe entry can name a reward model instead of a function (``{model: path/to/rm, kind:
classifier | judge}``, see :mod:`rewards.config`): it becomes a :class:`ModelReward`, a callable
with the same contract that asks the model's actor, so the scorer weights it, isolates its
faults and times it as any function. See :mod:`rewards.model_reward`.

Rewards that execute model output (``python_tests``, or your own) run it with
:func:`rewards.sandbox.run_python`: a separate process with time, CPU, memory, file,
process and output limits, and no network (a kernel network namespace where permitted, else
only a best-effort in-process guard: see :mod:`rewards.sandbox`).

>>> from rewards import RewardScorer, RewardSpec
>>> RewardScorer([RewardSpec("arithmetic_exact")]).score(["12+34="], ["46"], {"answer": ["46"]}).total
[1.0]
"""

from rewards import builtin as builtin  # noqa: F401 -- registers the built-in names
from rewards.registry import RewardFn, get_reward, register_reward, reward_names
from rewards.model_reward import ModelReward, RewardModel, RewardModelError, RewardModelSpec
from rewards.scoring import RewardScorer, RewardSpec, ScoreResult

__all__ = [
    "RewardFn",
    "register_reward",
    "get_reward",
    "reward_names",
    "RewardScorer",
    "RewardSpec",
    "ScoreResult",
    "ModelReward",
    "RewardModel",
    "RewardModelError",
    "RewardModelSpec",
]
