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
5. With ``timeout_seconds`` set, a call that has not returned in time counts as
   ``"timeout"`` for each sample it leaves unscored (see "Time limit" below).

Each function gets its own copies of the lists, so one that mutates its input cannot
change what the next one sees. A batched failure whose per-sample retries all succeed
(a function that breaks only on batches) costs no sample; it is logged once per reward.

Time limit
----------
``RewardScorer(..., timeout_seconds=T)`` runs every reward call in a daemon worker thread
and waits at most ``T`` for it, so a hung reward (a dead HTTP judge, a regex that
backtracks forever, generated code that never ends) cannot stall the run:

- The batched call gets ``T``. If it runs over, it is abandoned and the samples are
  retried one per call, **concurrently** (up to :data:`MAX_RETRY_THREADS` threads), all
  sharing **one** further budget of ``T``: a sample that hangs again costs only itself,
  its neighbours still get scored, and the per-sample retries cannot multiply the delay.
  A sample whose call is still running when the budget ends, or that never got a thread
  (all threads held by hung samples), scores ``fallback`` and counts as ``"timeout"``.
  The same shared budget bounds the retries after a batched call that raised. So one
  reward costs at most ``2*T`` per :meth:`RewardScorer.score` call (plus thread start-up).
- Python cannot stop a thread: an abandoned call **keeps running** in its daemon thread
  until it returns by itself (using CPU, memory, and the GIL meanwhile); its result is
  discarded, and daemon threads do not keep the process from exiting.
  :attr:`RewardScorer.abandoned_threads` counts the ones still running. So that a reward
  that hangs every step cannot pile up threads without end, a reward with
  :data:`MAX_ABANDONED_THREADS` abandoned calls still running is not called at all: its
  samples count as ``"timeout"`` at once, until some of those calls return. Rewards that
  run code should bound their own work too (``python_tests`` kills its subprocess).
- In that mode reward functions run outside the main thread, some concurrently with
  themselves: they must be thread-safe, and signal-based timeouts inside them are
  disabled (``math_verify`` then parses without its own ``SIGALRM`` timeout).

``timeout_seconds=None`` (the default) calls the functions directly in the calling
thread, one sample at a time in the fallback: no threads at all.

>>> scorer = RewardScorer([RewardSpec("arithmetic_exact"), RewardSpec("length_penalty", weight=0.5)])
>>> result = scorer.score(["1+1=", "2+2="], ["2", "5"], {"answer": ["2", "4"]})
>>> result.per_reward["arithmetic_exact"], result.total
([1.0, 0.0], [0.9995, -0.0005])
>>> result.failures
{'exception': 0, 'nan': 0, 'timeout': 0, 'wrong_length': 0, 'wrong_type': 0}
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from rewards.registry import get_reward

__all__ = ["FAILURE_KINDS", "MAX_RETRY_THREADS", "MAX_ABANDONED_THREADS", "RewardSpec", "ScoreResult", "RewardScorer"]

logger = logging.getLogger("rewards")

FAILURE_KINDS: tuple[str, ...] = ("exception", "nan", "timeout", "wrong_length", "wrong_type")

MAX_RETRY_THREADS = 16
"""With ``timeout_seconds`` set: at most this many per-sample retries of one reward run at once."""

MAX_ABANDONED_THREADS = 64
"""With ``timeout_seconds`` set: a reward with this many timed-out calls still running is skipped."""

# What one call of a reward function came to: ("ok", returned value), ("raised", traceback
# text), ("running", None) -- still running at the deadline -- or ("not_started", None).
_Outcome = tuple[str, Any]

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
        impl: the callable itself, already built (a reward model served by an actor:
            :class:`rewards.model_reward.ModelReward`); ``fn`` is then only its name, not
            resolved by :func:`rewards.get_reward`. It is called, and its faults isolated
            and timed, exactly as a function's.
    """

    fn: str
    weight: float = 1.0
    impl: Callable[..., Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.fn, str) or not self.fn.strip():
            raise ValueError(f"RewardSpec.fn must be a non-empty spec string, got {self.fn!r}")
        weight = float(self.weight)
        if not math.isfinite(weight):
            raise ValueError(f"RewardSpec.weight for {self.fn!r} must be finite, got {self.weight!r}")
        self.weight = weight
        if self.impl is not None and not callable(self.impl):
            raise TypeError(f"RewardSpec.impl for {self.fn!r} must be callable, got {type(self.impl).__name__}")


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
        timeout_seconds: wall-clock limit per reward call, or None for none. A positive
            number runs calls in worker threads; see "Time limit" in the module docstring.

    Attributes:
        total_failures: kind -> failures counted over every :meth:`score` call so far.
    """

    def __init__(self, specs: Sequence[RewardSpec], fallback: float = 0.0, timeout_seconds: float | None = None):
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
        if timeout_seconds is not None:
            timeout = float(timeout_seconds)
            if not (math.isfinite(timeout) and timeout > 0):
                raise ValueError(f"timeout_seconds must be a positive number of seconds or None, got {timeout_seconds!r}")
            timeout_seconds = timeout
        self.timeout_seconds: float | None = timeout_seconds
        self.specs = specs
        self.fns: dict[str, Callable[..., Any]] = {s.fn: s.impl if s.impl is not None else get_reward(s.fn) for s in specs}
        self.total_failures: dict[str, int] = dict.fromkeys(FAILURE_KINDS, 0)
        self._warned_kinds: set[str] = set()
        self._warned_batch: set[str] = set()
        self._warned_reserved: set[str] = set()
        self._abandoned: dict[str, list[threading.Thread]] = {}  # reward -> timed-out calls' threads

    @property
    def abandoned_threads(self) -> int:
        """Timed-out reward calls whose threads are still running (they cannot be stopped)."""
        return sum(self._still_running(name) for name in list(self._abandoned))

    def _still_running(self, name: str) -> int:
        alive = [t for t in self._abandoned.get(name, []) if t.is_alive()]
        self._abandoned[name] = alive
        return len(alive)

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
        if self.timeout_seconds is not None and self._still_running(name) >= MAX_ABANDONED_THREADS:
            description = (f"reward {name!r} not called: {self._still_running(name)} of its earlier calls timed out "
                           f"and are still running (limit MAX_ABANDONED_THREADS={MAX_ABANDONED_THREADS})")
            return [self._fail("timeout", description, failures, first) for _ in range(n)]
        batch_call = (list(prompts), list(completions)), {k: list(v) for k, v in columns.items()}
        if self.timeout_seconds is None:
            status, out = _invoke(fn, *batch_call)
        else:
            [(status, out)] = self._run_in_threads(name, fn, [batch_call], self.timeout_seconds)
        if status == "ok":
            values = _as_list(out)
            if values is None:
                problem = f"the batched call returned {type(out).__name__}, not a sequence of scores"
            elif len(values) != n:
                problem = f"the batched call returned {len(values)} scores for {n} completions"
            else:
                return [self._check(name, i, v, failures, first) for i, v in enumerate(values)]
        elif status == "raised":
            problem = f"the batched call raised:\n{out}"
        else:
            problem = (f"the batched call did not return within timeout_seconds={self.timeout_seconds:g}; "
                       "it is abandoned and keeps running in a daemon thread")

        if name not in self._warned_batch:
            self._warned_batch.add(name)
            logger.warning("reward %r: %s\nscoring one sample at a time to isolate bad samples (logged once)",
                           name, problem)
        sample_calls = [(([prompts[i]], [completions[i]]), {k: [v[i]] for k, v in columns.items()}) for i in range(n)]
        if self.timeout_seconds is None:
            outcomes = [_invoke(fn, *call) for call in sample_calls]
        else:
            outcomes = self._run_in_threads(name, fn, sample_calls, self.timeout_seconds)
        return [self._score_sample(name, i, outcome, failures, first) for i, outcome in enumerate(outcomes)]

    def _score_sample(self, name, i, outcome: _Outcome, failures, first) -> float:
        status, out = outcome
        if status == "raised":
            return self._fail("exception", f"reward {name!r} raised on sample {i}:\n{out}", failures, first)
        if status == "running":
            return self._fail("timeout", f"reward {name!r} on sample {i} did not return within the shared "
                              f"per-sample budget of timeout_seconds={self.timeout_seconds:g}; abandoned, it keeps "
                              "running in a daemon thread", failures, first)
        if status == "not_started":
            return self._fail("timeout", f"reward {name!r} on sample {i} was not started before the shared "
                              f"per-sample budget of timeout_seconds={self.timeout_seconds:g} ran out (all "
                              f"{MAX_RETRY_THREADS} retry threads were busy with other samples)", failures, first)
        values = _as_list(out)
        if values is None:
            return self._fail("wrong_type", f"reward {name!r} returned {type(out).__name__} for sample {i}, "
                              "not a sequence of scores", failures, first)
        if len(values) != 1:
            return self._fail("wrong_length", f"reward {name!r} returned {len(values)} scores for a one-sample "
                              f"batch (sample {i})", failures, first)
        return self._check(name, i, values[0], failures, first)

    def _run_in_threads(self, name, fn, calls: list[tuple[tuple, dict]], budget: float) -> list[_Outcome]:
        """``fn(*args, **kwargs)`` for every call, in up to :data:`MAX_RETRY_THREADS` daemon threads
        sharing one deadline ``budget`` seconds away. Calls still running at the deadline are
        abandoned ("running"); calls no thread reached are "not_started". A ``BaseException``
        that is not an ``Exception`` (``KeyboardInterrupt``, ``SystemExit``) is re-raised here,
        as it would propagate from a direct call."""
        outcomes: list[_Outcome] = [("not_started", None)] * len(calls)
        lock = threading.Lock()
        pending = iter(range(len(calls)))
        stopped = False

        def worker() -> None:
            while True:
                with lock:
                    i = None if stopped else next(pending, None)
                    if i is None:
                        return
                    outcomes[i] = ("running", None)
                try:
                    outcome = _invoke(fn, *calls[i])
                except BaseException as e:  # noqa: BLE001 -- handed to the caller below
                    outcome = ("fatal", e)
                with lock:
                    if not stopped:
                        outcomes[i] = outcome

        deadline = time.monotonic() + budget
        threads = [threading.Thread(target=worker, name=f"reward-{name}-{k}", daemon=True)
                   for k in range(min(MAX_RETRY_THREADS, len(calls)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with lock:
            stopped = True
            result = list(outcomes)
        self._abandoned.setdefault(name, []).extend(t for t in threads if t.is_alive())
        for status, out in result:
            if status == "fatal":
                raise out
        return result

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


def _invoke(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> _Outcome:
    """One call ``fn(*args, **kwargs)``: ("ok", value), or ("raised", traceback text) for an ``Exception``."""
    try:
        return "ok", fn(*args, **kwargs)
    except Exception:
        return "raised", traceback.format_exc()


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
