"""Statistics of one rank, each declared with how the ranks combine it.

A rank records ``sum`` (counts; losses already normalized by whole-batch counts), ``max``
(maxima), ``same`` (a value every rank shares: updates applied, the learning rate) or ``mean``
(a weighted mean: the weighted sum and the weight are summed over ranks separately, so a token
mean over two ranks is the token mean of the whole batch). ``reduce_stats`` applies them; no
naming convention decides anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REDUCTIONS = ("sum", "max", "same", "mean")


@dataclass
class Stats:
    """{name: [reduction, value, weight]}; plain lists, so it pickles cheaply through Ray."""

    entries: dict[str, list] = field(default_factory=dict)

    def _entry(self, key: str, how: str, init: float) -> list:
        entry = self.entries.setdefault(key, [how, init, 0.0])
        if entry[0] != how:
            raise ValueError(f"stat {key!r} is declared {entry[0]!r} and {how!r}")
        return entry

    def sum(self, key: str, value: float) -> None:
        self._entry(key, "sum", 0.0)[1] += float(value)

    def max(self, key: str, value: float) -> None:
        entry = self._entry(key, "max", float("-inf"))
        entry[1] = max(entry[1], float(value))

    def same(self, key: str, value: float) -> None:
        self._entry(key, "same", 0.0)[1] = float(value)

    def mean(self, key: str, weighted_sum: float, weight: float) -> None:
        """Add ``weighted_sum`` (e.g. a sum over tokens) with its ``weight`` (e.g. the token count)."""
        entry = self._entry(key, "mean", 0.0)
        entry[1] += float(weighted_sum)
        entry[2] += float(weight)


def reduce_stats(per_rank: list[Stats]) -> dict[str, float]:
    """Combine the ranks' stats by each one's declared reduction.

    >>> a, b = Stats(), Stats()
    >>> for s, tokens in ((a, 3), (b, 1)):
    ...     s.sum("tokens", tokens); s.same("updates_applied", 1); s.mean("entropy", 2.0 * tokens, tokens)
    >>> a.max("ratio_max", 1.5); b.max("ratio_max", 1.2)
    >>> reduce_stats([a, b])
    {'tokens': 4.0, 'updates_applied': 1.0, 'entropy': 2.0, 'ratio_max': 1.5}
    """
    out: dict[str, float] = {}
    weights: dict[str, float] = {}
    kinds: dict[str, str] = {}
    for stats in per_rank:
        for key, (how, value, weight) in stats.entries.items():
            if kinds.setdefault(key, how) != how:
                raise ValueError(f"stat {key!r} is reduced as {kinds[key]!r} on one rank and {how!r} on another")
            if key not in out:
                out[key], weights[key] = value, weight
            elif how == "sum":
                out[key] += value
            elif how == "max":
                out[key] = max(out[key], value)
            elif how == "mean":
                out[key] += value
                weights[key] += weight
            elif how == "same" and out[key] != value:
                raise ValueError(f"stat {key!r} should be the same on every rank, got {out[key]} and {value}")
    for key, how in kinds.items():
        if how == "mean":
            out[key] = out[key] / weights[key] if weights[key] else 0.0
    return out
