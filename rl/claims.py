"""Verdicts on a paper's claim from per-seed results: "holds", "does not hold" or "not distinguishable".

A claim compares two arms on one metric: "arm A reaches at least ``fraction`` of arm B". Each arm gives one
final value per seed. The verdict comes from a confidence interval of ``mean(A) - fraction * mean(B)``
(Welch: the arms' variances are not assumed equal), never from the means alone: "holds" when the whole
interval is at or above zero, "does not hold" when it is below, and "not distinguishable at this scale"
when it straddles zero. One seed per arm has no interval; the verdict then says so.

    >>> at_least([0.60, 0.62, 0.61], [0.50, 0.52, 0.51]).verdict
    'holds'
    >>> at_least([0.40, 0.45, 0.42], [0.50, 0.52, 0.51], fraction=0.95).verdict
    'does not hold'
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

HOLDS, DOES_NOT_HOLD, NOT_DISTINGUISHABLE = "holds", "does not hold", "not distinguishable at this scale"
ONE_SEED = "no interval (one seed)"


@dataclass(frozen=True)
class Comparison:
    """``mean(a) >= fraction * mean(b)`` on one metric, with the interval the verdict comes from."""

    ratio: float | None         # mean(a) / mean(b); None when mean(b) is 0
    gain_share: float | None    # (mean(a) - start) / (mean(b) - start): the share of B's improvement A makes
    low: float | None           # the confidence interval of mean(a) - fraction * mean(b)
    high: float | None
    verdict: str


def welch_interval(a: Sequence[float], b: Sequence[float], fraction: float = 1.0,
                   confidence: float = 0.95) -> tuple[float, float] | None:
    """Two-sided ``confidence`` interval of ``mean(a) - fraction * mean(b)`` (Welch-Satterthwaite degrees of
    freedom); None when either arm has fewer than two values. Zero spread in both gives a point interval.

    >>> welch_interval([1.0, 1.0], [0.5, 0.5])
    (0.5, 0.5)
    >>> low, high = welch_interval([0.6, 0.8], [0.5, 0.7]); round(low, 3), round(high, 3)
    (-0.508, 0.708)
    """
    from scipy.stats import t

    if len(a) < 2 or len(b) < 2:
        return None
    diff = statistics.mean(a) - fraction * statistics.mean(b)
    va, vb = statistics.variance(a) / len(a), fraction**2 * statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return diff, diff
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(t.ppf(0.5 + confidence / 2, dof)) * se
    return diff - half, diff + half


def at_least(a: Sequence[float], b: Sequence[float], fraction: float = 1.0, start: float | None = None,
             confidence: float = 0.95) -> Comparison:
    """The verdict on "A reaches at least ``fraction`` of B" from per-seed finals ``a`` and ``b``; ``start``
    (the value both arms start from) adds the share of B's gain that A makes, when B gained (a share of a loss
    would read backwards)."""
    ma, mb = statistics.mean(a), statistics.mean(b)
    ratio = ma / mb if mb else None
    gain_share = (ma - start) / (mb - start) if start is not None and mb > start else None
    interval = welch_interval(a, b, fraction, confidence)
    if interval is None:
        return Comparison(ratio, gain_share, None, None, ONE_SEED)
    low, high = interval
    verdict = HOLDS if low >= 0.0 else DOES_NOT_HOLD if high < 0.0 else NOT_DISTINGUISHABLE
    return Comparison(ratio, gain_share, low, high, verdict)


def describe(c: Comparison, fraction: float = 1.0) -> str:
    """One line for a report: the ratio, the share of the gain, the interval and the verdict."""
    parts = [f"{100 * c.ratio:.1f}% of the reference's final value" if c.ratio is not None else "reference at 0"]
    if c.gain_share is not None:
        parts.append(f"{100 * c.gain_share:.0f}% of its gain over the start")
    if c.low is not None:
        parts.append(f"95% interval of A - {fraction:g} x B: [{c.low:+.3f}, {c.high:+.3f}]")
    return "; ".join(parts) + f": **{c.verdict}**"


def mean_std(values: Sequence[float], percent: bool = False) -> str:
    """A report's cell for per-seed values: ``mean ± std`` (the mean alone for one seed, ``–`` for none); ``percent``
    writes fractions as percentages to 0.1, else values to 0.001.

    >>> mean_std([0.5, 0.7]), mean_std([0.5, 0.7], percent=True), mean_std([0.25]), mean_std([])
    ('0.600 ± 0.141', '60.0 ± 14.1', '0.250', '–')
    """
    if not values:
        return "–"
    scale, digits = (100, 1) if percent else (1, 3)
    m = statistics.mean(values) * scale
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"
