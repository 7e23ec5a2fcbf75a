"""Fault-tolerant, weighted reward scoring: a failing reward function costs that sample, not the run.

:class:`RewardScorer` resolves every :class:`RewardSpec` when it is built (a typo in a
recipe fails before any GPU work), then per step calls each reward on the whole batch of
``N = B*G`` completions and sums ``weight * score`` per completion.

Fault semantics, per reward function and step:

1. The function is called once, batched. If that call raises, returns something that is
   not a sequence, or returns the wrong number of scores, it is called again once per
   sample (one-element batches) to isolate the bad samples; a sample whose own call
   raises scores ``fallback`` and counts as ``"exception"`` (``"wrong_type"`` /
   ``"wrong_length"`` for a bad return).
2. Each value: not a real number -> ``fallback`` + ``"wrong_type"``; NaN or +-inf ->
   ``fallback`` + ``"nan"``.
3. The first failure of each kind is described in :attr:`ScoreResult.first_tracebacks`,
   and logged as a warning on the ``"rewards"`` logger only the first time the scorer
   sees that kind (the counts keep going: :attr:`RewardScorer.total_failures`).
4. Exceptions (``Exception`` subclasses) from reward functions never propagate. What
   does raise is a caller bug: misaligned ``prompts`` / ``completions`` / ``columns``.

Each function gets its own copies of the lists, so one that mutates its input cannot
change what the next one sees. A batched failure whose per-sample retries all succeed
(a function that breaks only on batches) costs no sample; it is logged once per reward.

>>> scorer = RewardScorer([RewardSpec("arithmetic_exact"), RewardSpec("length_penalty", weight=0.5)])
>>> result = scorer.score(["1+1=", "2+2="], ["2", "5"], {"answer": ["2", "4"]})
>>> result.per_reward["arithmetic_exact"], result.total
([1.0, 0.0], [0.9995, -0.0005])
>>> result.failures
{'exception': 0, 'nan': 0, 'wrong_length': 0, 'wrong_type': 0}
"""

from __future__ import annotations

import logging
import math
import numbers
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from rewards.registry import get_reward

__all__ = ["FAILURE_KINDS", "RewardSpec", "ScoreResult", "RewardScorer"]

logger = logging.getLogger("rewards")

FAILURE_KINDS: tuple[str, ...] = ("exception", "nan", "wrong_length", "wrong_type")

# Names the contract already uses positionally; a dataset column with one of these names
# cannot also be passed as a keyword.
_RESERVED_COLUMNS = ("prompts", "completions")


@dataclass
class RewardSpec:
    """One weighted reward in a recipe.

    Attributes:
        fn: the spec string for :func:`rewards.get_reward`: a registered name,
            ``"path/to/file.py:fn"`` or ``"package.module:fn"``. Also the key of this
            reward in :attr:`ScoreResult.per_reward`.
        weight: multiplier in the per-completion total; 0 computes and logs it without
            training on it.
    """

    fn: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.fn, str) or not self.fn.strip():
            raise ValueError(f"RewardSpec.fn must be a non-empty spec string, got {self.fn!r}")
        weight = float(self.weight)
        if not math.isfinite(weight):
            raise ValueError(f"RewardSpec.weight for {self.fn!r} must be finite, got {self.weight!r}")
        self.weight = weight


@dataclass
class ScoreResult:
    """Scores of one batch of ``N`` completions.

    Attributes:
        total: ``[N]`` weighted sum over rewards, per completion (failed entries hold
            ``weight * fallback``).
        per_reward: spec string -> ``[N]`` raw (unweighted) scores, ``fallback`` where failed.
        failures: kind -> number of (sample, reward) pairs that fell back in this batch;
            every kind of :data:`FAILURE_KINDS` is present, 0 included.
        first_tracebacks: kind -> the first traceback or description of that kind in this
            batch (only kinds that occurred).
    """

    total: list[float]
    per_reward: dict[str, list[float]]
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_KINDS, 0))
    first_tracebacks: dict[str, str] = field(default_factory=dict)


class RewardScorer:
    """Weighted sum of reward functions with per-sample fault isolation (see module docstring).

    Args:
        specs: the rewards to combine; every spec is resolved here, so an unknown name or a
            missing plugin file raises now (``KeyError`` / ``FileNotFoundError`` /
            ``AttributeError`` / ``TypeError`` from :func:`rewards.get_reward`).
        fallback: the score given to a sample whose reward failed.

    Attributes:
        total_failures: kind -> failures counted over every :meth:`score` call so far.
    """

    def __init__(self, specs: Sequence[RewardSpec], fallback: float = 0.0):
        specs = list(specs)
        if not specs:
            raise ValueError("RewardScorer needs at least one RewardSpec")
        names = [s.fn for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"reward specs listed more than once: {duplicates}; merge their weights")
        self.fallback = float(fallback)
        if not math.isfinite(self.fallback):
            raise ValueError(f"fallback must be finite, got {fallback!r}")
        self.specs = specs
        self.fns: dict[str, Callable[..., Any]] = {s.fn: get_reward(s.fn) for s in specs}
        self.total_failures: dict[str, int] = dict.fromkeys(FAILURE_KINDS, 0)
        self._warned_kinds: set[str] = set()
        self._warned_batch: set[str] = set()
        self._warned_reserved: set[str] = set()

    @property
    def names(self) -> list[str]:
        """The spec strings, in order: the keys of :attr:`ScoreResult.per_reward`."""
        return [s.fn for s in self.specs]

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], columns: dict[str, Sequence[Any]] | None = None
    ) -> ScoreResult:
        """Score ``N`` completions; ``prompts[i]`` and every ``columns[k][i]`` align with ``completions[i]``.

        Raises:
            ValueError: ``prompts`` or a column does not have one entry per completion
                (a caller bug, not a reward failure).
        """
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} completions; repeat each prompt per completion")
        cols: dict[str, Sequence[Any]] = {}
        for key, values in (columns or {}).items():
            if key in _RESERVED_COLUMNS:
                if key not in self._warned_reserved:
                    self._warned_reserved.add(key)
                    logger.warning("dataset column %r clashes with the reward argument of that name; not passed", key)
                continue
            if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != n:
                got = len(values) if hasattr(values, "__len__") else type(values).__name__
                raise ValueError(f"column {key!r} must hold one value per completion ({n}), got {got}")
            cols[key] = values

        failures = dict.fromkeys(FAILURE_KINDS, 0)
        first: dict[str, str] = {}
        per_reward: dict[str, list[float]] = {}
        for spec in self.specs:
            per_reward[spec.fn] = self._score_one(spec.fn, prompts, completions, cols, failures, first) if n else []
        total = [math.fsum(s.weight * per_reward[s.fn][i] for s in self.specs) for i in range(n)]
        for kind, count in failures.items():
            self.total_failures[kind] += count
        return ScoreResult(total=total, per_reward=per_reward, failures=failures, first_tracebacks=first)

    # -- one reward function over the batch ---------------------------------------------

    def _score_one(self, name, prompts, completions, columns, failures, first) -> list[float]:
        fn = self.fns[name]
        n = len(completions)
        try:
            out = fn(list(prompts), list(completions), **{k: list(v) for k, v in columns.items()})
        except Exception:
            problem = f"the batched call raised:\n{traceback.format_exc()}"
        else:
            values = _as_list(out)
            if values is None:
                problem = f"the batched call returned {type(out).__name__}, not a sequence of scores"
            elif len(values) != n:
                problem = f"the batched call returned {len(values)} scores for {n} completions"
            else:
                return [self._check(name, i, v, failures, first) for i, v in enumerate(values)]

        if name not in self._warned_batch:
            self._warned_batch.add(name)
            logger.warning("reward %r: %s\nscoring one sample at a time to isolate bad samples (logged once)",
                           name, problem)
        return [self._score_sample(name, fn, i, prompts, completions, columns, failures, first) for i in range(n)]

    def _score_sample(self, name, fn, i, prompts, completions, columns, failures, first) -> float:
        try:
            out = fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in columns.items()})
        except Exception:
            return self._fail("exception", f"reward {name!r} raised on sample {i}:\n{traceback.format_exc()}",
                              failures, first)
        values = _as_list(out)
        if values is None:
            return self._fail("wrong_type", f"reward {name!r} returned {type(out).__name__} for sample {i}, "
                              "not a sequence of scores", failures, first)
        if len(values) != 1:
            return self._fail("wrong_length", f"reward {name!r} returned {len(values)} scores for a one-sample "
                              f"batch (sample {i})", failures, first)
        return self._check(name, i, values[0], failures, first)

    def _check(self, name, i, value, failures, first) -> float:
        """One returned value -> a finite float, or ``fallback`` with the failure recorded."""
        number = value
        if not isinstance(number, numbers.Real) and getattr(number, "ndim", None) == 0 and hasattr(number, "item"):
            number = number.item()  # a 0-d numpy array or torch tensor
        if not isinstance(number, numbers.Real):
            return self._fail("wrong_type", f"reward {name!r} returned {_short_repr(value)} "
                              f"({type(value).__name__}) for sample {i}, not a number", failures, first)
        try:
            score = float(number)
        except (OverflowError, ValueError):
            score = math.nan
        if not math.isfinite(score):
            return self._fail("nan", f"reward {name!r} returned {_short_repr(value)} for sample {i}", failures, first)
        return score

    def _fail(self, kind: str, description: str, failures: dict[str, int], first: dict[str, str]) -> float:
        failures[kind] += 1
        first.setdefault(kind, description)
        if kind not in self._warned_kinds:
            self._warned_kinds.add(kind)
            logger.warning("reward failure of kind %r, sample scored %s (first of its kind; later ones are only "
                           "counted):\n%s", kind, self.fallback, description)
        return self.fallback


def _as_list(out: Any) -> list | None:
    """A reward's return as a list, or None if it is not a sequence of per-sample values."""
    if isinstance(out, (list, tuple)):
        return list(out)
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "tolist"):
        return None
    try:
        values = out.tolist()  # numpy array / torch tensor
    except Exception:
        return None
    return values if isinstance(values, list) else None


def _short_repr(value: Any, limit: int = 200) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<unrepresentable {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
