"""The verdict logic of the experiment reports (rl/claims.py): intervals checked against scipy's Welch test,
and each verdict reached from numbers where it is known by hand."""

import pytest
from scipy.stats import ttest_ind

from rl.claims import DOES_NOT_HOLD, HOLDS, NOT_DISTINGUISHABLE, ONE_SEED, at_least, describe, welch_interval


@pytest.mark.parametrize("fraction", [1.0, 0.95, 0.5])
def test_interval_is_welchs(fraction):
    a, b = [0.61, 0.55, 0.70, 0.64], [0.66, 0.58, 0.71]
    want = ttest_ind(a, [fraction * x for x in b], equal_var=False).confidence_interval(0.95)
    low, high = welch_interval(a, b, fraction)
    assert low == pytest.approx(want.low) and high == pytest.approx(want.high)


def test_verdicts():
    assert at_least([0.60, 0.62, 0.61], [0.50, 0.52, 0.51]).verdict == HOLDS
    assert at_least([0.40, 0.42, 0.41], [0.50, 0.52, 0.51]).verdict == DOES_NOT_HOLD
    # Means 3 points apart with a 10-point spread: the interval straddles zero.
    assert at_least([0.50, 0.70, 0.60], [0.45, 0.65, 0.61]).verdict == NOT_DISTINGUISHABLE
    # The same means hold at 95% but not at 100%: the fraction moves the line.
    assert at_least([0.97, 0.975, 0.98], [1.0, 1.0, 1.0], fraction=0.95).verdict == HOLDS
    assert at_least([0.97, 0.975, 0.98], [1.0, 1.0, 1.0], fraction=1.0).verdict == DOES_NOT_HOLD


def test_one_seed_has_no_interval():
    c = at_least([0.7], [0.5])
    assert c.verdict == ONE_SEED and c.low is None and c.ratio == pytest.approx(1.4)
    assert "no interval" in describe(c)


def test_ratio_and_gain_share():
    # From 0.2: A gains 0.3, B gains 0.4 -> 75% of B's gain, 0.5 / 0.6 of its final value.
    c = at_least([0.5, 0.5], [0.6, 0.6], start=0.2)
    assert c.ratio == pytest.approx(0.5 / 0.6) and c.gain_share == pytest.approx(0.75)
    assert c.verdict == DOES_NOT_HOLD and c.low == c.high == pytest.approx(-0.1)
    assert "75% of its gain" in describe(c)
    assert at_least([0.5, 0.5], [0.2, 0.2], start=0.2).gain_share is None  # B made no gain
    assert at_least([0.5, 0.5], [0.1, 0.1], start=0.2).gain_share is None  # nor when it lost ground
