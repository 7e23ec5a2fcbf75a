"""Environments for multi-turn rollouts: the policy speaks, the environment answers.

The environment contract
------------------------
An environment is a class; the episode driver (``rl/episodes.py``) makes one instance per
episode (``cls(**environment.options)``) and calls::

    env.reset(row)          # the dataset row of the episode's prompt (all its columns)
    env.step(turn) -> EnvStep(observation, done, reward)

``turn`` is the text of the policy's latest turn. When ``done`` is false, ``observation`` is
tokenized and appended to the context, the policy speaks again, and those observation tokens are
masked out of the loss. ``reward`` is added to the episode's reward (summed over its steps), on
top of the recipe's reward functions, which score the policy's *last* turn.

A recipe names an environment by a registered name (``scripted``, ``calculator``, ``python``) or
a plugin, ``path/to/file.py:MyEnv`` or ``package.module:MyEnv``, resolved like rewards.

Faults cost the episode, never the run: an environment that raises, does not return within
``step_timeout_s``, or returns something other than an :class:`EnvStep` ends its episode; the
episode then scores the reward fallback and is counted by kind (``env_error``, ``env_timeout``,
``env_malformed``) by :func:`guarded_calls`.
"""

from __future__ import annotations

import ast
import operator
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

from common.registry import Registry
from rewards.registry import load_plugin


@dataclass
class EnvStep:
    """What the environment says after one policy turn."""

    observation: str = ""
    done: bool = True
    reward: float = 0.0


class Environment(Protocol):
    def reset(self, row: dict[str, Any]) -> None: ...

    def step(self, turn: str) -> EnvStep: ...


ENVIRONMENTS: Registry[type] = Registry("environment")


def register_environment(name: str) -> Callable[[type], type]:
    return ENVIRONMENTS.register(name)


def environment_names() -> list[str]:
    return ENVIRONMENTS.names()


def get_environment(spec: str) -> type:
    """Resolve an environment spec (registered name, ``file.py:Class`` or ``module:Class``) to its class.

    >>> get_environment("calculator").__name__
    'CalculatorEnvironment'
    >>> get_environment("calculater")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    common.registry.UnknownName: unknown environment 'calculater'; did you mean 'calculator'? ...
    """
    spec = spec.strip()
    if ":" not in spec:
        return ENVIRONMENTS.get(spec, ". A plugin is named as 'path/to/file.py:Class' or 'package.module:Class'.")
    obj = load_plugin(spec, "environment")
    if not callable(getattr(obj, "step", None)) or not callable(getattr(obj, "reset", None)):
        raise TypeError(f"environment spec {spec!r} resolves to {obj!r}, which has no reset(row) and step(turn) methods")
    return obj


# ---------------------------------------------------------------------------- fault isolation


def guarded_calls(calls: Sequence[Callable[[], Any]], timeout_s: float) -> list[tuple[Optional[str], Any]]:
    """Run each zero-argument call in its own daemon thread under one shared deadline.

    Returns ``(None, value)`` per call that returned, ``("env_error", exception)`` per call that
    raised and ``("env_timeout", None)`` per call still running at the deadline (abandoned: a
    Python thread cannot be killed, so a hung environment keeps its thread).

    >>> import time
    >>> [kind for kind, _ in guarded_calls([lambda: 1, lambda: 1 / 0, lambda: time.sleep(5)], 0.2)]
    [None, 'env_error', 'env_timeout']
    """
    results: list[tuple[Optional[str], Any]] = [("env_timeout", None)] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = (None, calls[i]())
        except Exception as e:  # noqa: BLE001 -- the episode's fault, reported by kind
            results[i] = ("env_error", e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"env-{i}") for i in range(len(calls))]
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [results[i] if not t.is_alive() else ("env_timeout", None) for i, t in enumerate(threads)]


def check_step(value: Any) -> Optional[str]:
    """Why a step's return value is malformed, or None.

    >>> check_step(EnvStep(" 3", False)), check_step(("x", True, 0.0)) is not None, check_step(EnvStep(reward=float("nan")))
    (None, True, 'reward nan is not a finite number')
    """
    if not isinstance(value, EnvStep):
        return f"step returned {type(value).__name__}, not EnvStep"
    if not isinstance(value.observation, str):
        return f"observation is {type(value.observation).__name__}, not str"
    try:
        reward = float(value.reward)
    except (TypeError, ValueError):
        return f"reward {value.reward!r} is not a number"
    if reward != reward or reward in (float("inf"), float("-inf")):
        return f"reward {reward} is not a finite number"
    return None


# ---------------------------------------------------------------------------- built-ins


@register_environment("scripted")
class ScriptedEnvironment:
    """Answers every turn with the same ``observation`` until the policy has spoken ``turns`` times
    (for tests and for checking the loop: every episode has exactly ``turns`` policy turns unless
    it runs out of context). Rewards 0: the recipe's reward functions score the last turn."""

    def __init__(self, observation: str = " =", turns: int = 2):
        self.observation, self.turns, self.spoken = observation, turns, 0

    def reset(self, row: dict[str, Any]) -> None:
        self.spoken = 0

    def step(self, turn: str) -> EnvStep:
        self.spoken += 1
        return EnvStep(self.observation, done=self.spoken >= self.turns)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate_arithmetic(expression: str, max_abs: int = 10**12) -> int:
    """The value of an integer expression of + - * and parentheses (no names, no calls, no powers).

    >>> evaluate_arithmetic("12*34"), evaluate_arithmetic("7 - (2+3)*2"), evaluate_arithmetic("-4+1")
    (408, -3, -3)
    >>> evaluate_arithmetic("2**8")
    Traceback (most recent call last):
    ...
    ValueError: not an arithmetic expression of + - * on integers: '2**8'
    """

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            v = _OPS[type(node.op)](value(node.left), value(node.right))
            if abs(v) > max_abs:
                raise ValueError(f"value out of range in {expression!r}")
            return v
        raise ValueError(f"not an arithmetic expression of + - * on integers: {expression!r}")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression of + - * on integers: {expression!r}") from None
    return value(tree.body)


@register_environment("calculator")
class CalculatorEnvironment:
    """A calculator tool in the embedded alphabet. A turn that is an expression ending in ``=``
    (``"12*34="``) is a tool call: the observation is its value and a space (``" 408 "``), and the
    policy speaks again. Any other turn is the final answer and ends the episode. After
    ``max_calls`` calls the next call is answered with nothing and ends the episode."""

    CALL = re.compile(r"^\s*([0-9+\-* ()]+)=\s*$")

    def __init__(self, max_calls: int = 1, call_reward: float = 0.0):
        self.max_calls, self.call_reward, self.calls = max_calls, call_reward, 0

    def reset(self, row: dict[str, Any]) -> None:
        self.calls = 0

    def step(self, turn: str) -> EnvStep:
        match = self.CALL.match(turn)
        if match is None or self.calls >= self.max_calls:
            return EnvStep(done=True)
        self.calls += 1
        try:
            result = str(evaluate_arithmetic(match.group(1)))
        except ValueError:
            result = "-"  # an expression it cannot evaluate: the policy sees a bare '-'
        return EnvStep(f" {result} ", done=False, reward=self.call_reward)


@register_environment("python")
class PythonToolEnvironment:
    """A Python tool for text models: a turn with a fenced ```python block is a tool call; the block
    runs in :func:`rewards.sandbox.run_python` and its output (stdout, or the last stderr line on
    failure) comes back as ``"\\nOutput:\\n...\\n"``. A turn without a block ends the episode."""

    BLOCK = re.compile(r"```(?:python|py)\s*\n(.*?)```", re.DOTALL)

    def __init__(self, max_calls: int = 2, timeout_seconds: float = 5.0, max_output_chars: int = 512):
        self.max_calls, self.timeout_seconds, self.max_output_chars, self.calls = max_calls, timeout_seconds, max_output_chars, 0

    def reset(self, row: dict[str, Any]) -> None:
        self.calls = 0

    def step(self, turn: str) -> EnvStep:
        from rewards.sandbox import run_python

        blocks = self.BLOCK.findall(turn)
        if not blocks or self.calls >= self.max_calls:
            return EnvStep(done=True)
        self.calls += 1
        result = run_python(blocks[-1], timeout_seconds=self.timeout_seconds)
        if result.returncode == 0:
            output = result.stdout
        else:
            lines = result.stderr.strip().splitlines()
            output = result.killed_reason or (lines[-1] if lines else f"exit {result.returncode}")
        return EnvStep(f"\nOutput:\n{output[: self.max_output_chars].rstrip()}\n", done=False)


__all__ = ["EnvStep", "Environment", "register_environment", "environment_names", "get_environment", "guarded_calls",
           "check_step", "ScriptedEnvironment", "CalculatorEnvironment", "PythonToolEnvironment", "evaluate_arithmetic"]
