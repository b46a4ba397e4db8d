"""moelab.experiments.stats on hand-computed cases."""

import math

import pytest

from moelab.experiments.stats import (
    NOT_ENOUGH,
    PairedDiff,
    bh_adjust,
    combine_verdicts,
    escape_fraction,
    paired_difference,
    pick_lr,
    summarize,
    verdict,
)


def test_summarize_mean_sample_std_and_count_skip_missing():
    s = summarize([1.0, None, 2.0, float("nan"), 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)  # std with n-1: sqrt(((1)^2+0+1)/2) = 1
    one = summarize([0.5])
    assert one.mean == 0.5 and math.isnan(one.std) and one.n == 1
    assert summarize([None]).n == 0


def test_paired_t_interval_by_hand():
    # differences 2, 3, 4: mean 3, sd 1, se 1/sqrt(3); for df = 2 the t quantile has the closed
    # form (2q - 1) / sqrt(2 q (1 - q)), q = 0.975 -> 0.95 / sqrt(0.04875) = 4.302652...
    t975 = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    half = t975 / math.sqrt(3)
    # two-sided p for df = 2: 1 - t / sqrt(t^2 + 2), t = 3 / (1/sqrt(3)) = sqrt(27)
    p = 1 - math.sqrt(27) / math.sqrt(29)
    d = paired_difference({0: 3.0, 1: 5.0, 2: 7.0, 9: 1.0}, {0: 1.0, 1: 2.0, 2: 3.0, 5: 0.0})
    assert d.n == 3  # seeds 9 and 5 have no partner
    assert d.mean == pytest.approx(3.0)
    assert d.ci_low == pytest.approx(3.0 - half, rel=1e-9)
    assert d.ci_high == pytest.approx(3.0 + half, rel=1e-9)
    assert d.p_value == pytest.approx(p, rel=1e-9)
    assert half == pytest.approx(2.484138, rel=1e-6)


def test_paired_difference_is_paired_not_pooled():
    # huge between-seed spread, constant +1 gain: the paired interval is a point at +1
    d = paired_difference({0: 11.0, 1: 51.0, 2: 91.0}, {0: 10.0, 1: 50.0, 2: 90.0})
    assert (d.mean, d.ci_low, d.ci_high, d.p_value) == (1.0, 1.0, 1.0, 0.0)


def test_paired_difference_few_pairs_and_missing_values():
    d = paired_difference({0: 2.0, 1: None}, {0: 1.0, 1: 1.0})
    assert d.n == 1 and d.mean == 1.0 and math.isnan(d.ci_low) and math.isnan(d.p_value)
    assert paired_difference({}, {}).n == 0
    with pytest.raises(ValueError, match="confidence"):
        paired_difference({0: 1.0}, {0: 1.0}, confidence=1.5)


def _d(lo, hi, n=5):
    return PairedDiff((lo + hi) / 2, lo, hi, 0.01, n)


@pytest.mark.parametrize(("lo", "hi", "direction", "expected"), [
    (0.1, 0.5, "higher", "supported"),
    (0.1, 0.5, "lower", "contradicted"),
    (-0.5, -0.1, "lower", "supported"),
    (-0.5, -0.1, "higher", "contradicted"),
    (-0.1, 0.5, "higher", "inconclusive"),
    (-0.1, 0.5, "lower", "inconclusive"),
    (0.0, 0.5, "higher", "inconclusive"),  # touching 0 does not exclude it
])
def test_verdict_rule(lo, hi, direction, expected):
    assert verdict(_d(lo, hi), direction) == expected


def test_verdict_undefined_interval_and_bad_direction():
    assert verdict(PairedDiff(1.0, math.nan, math.nan, math.nan, 1), "higher") == NOT_ENOUGH
    assert verdict(PairedDiff(math.nan, math.nan, math.nan, math.nan, 0), "lower") == NOT_ENOUGH
    assert NOT_ENOUGH == "not enough runs"
    with pytest.raises(ValueError, match="direction"):
        verdict(_d(0.1, 0.2), "up")


def test_combine_verdicts():
    assert combine_verdicts(["supported", "supported"]) == "supported"
    assert combine_verdicts(["supported", "inconclusive"]) == "inconclusive"
    assert combine_verdicts(["supported", "contradicted", "inconclusive"]) == "contradicted"
    assert combine_verdicts([]) == NOT_ENOUGH
    assert combine_verdicts(["supported", NOT_ENOUGH]) == NOT_ENOUGH
    assert combine_verdicts(["contradicted", NOT_ENOUGH]) == "contradicted"


def test_pick_lr_on_validation_mean():
    vals = {0.1: [0.5, 0.6], 0.3: [0.7, None], 1.0: [None, None]}
    assert pick_lr(vals, higher_is_better=True) == 0.3  # mean of finite values; 1.0 all failed
    assert pick_lr({0.1: [2.0], 0.3: [1.0]}, higher_is_better=False) == 0.3
    assert pick_lr({0.3: [1.0], 0.1: [1.0]}, higher_is_better=True) == 0.1  # tie: smaller lr
    with pytest.raises(ValueError, match="no learning rate"):
        pick_lr({0.1: [None]}, higher_is_better=True)


def test_escape_fraction_counts_failures_as_trapped():
    frac, n = escape_fraction([0.1, 0.25, None, 0.21, 0.2], chance=0.1)
    assert (frac, n) == (2 / 5, 5)  # 0.2 is not > 0.2
    assert math.isnan(escape_fraction([], 0.1)[0])


def test_bh_adjust_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.5 (m = 4): p * m / rank = 0.04, 0.06, 0.0533, 0.5; then the
    # running minimum from the largest rank down: 0.04, 0.0533, 0.0533, 0.5
    adj = bh_adjust([0.01, 0.04, 0.03, 0.5])
    assert adj == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])
    # missing p-values stay NaN and do not count in m (m = 2 here: 0.02, 0.04)
    adj = bh_adjust([None, 0.01, math.nan, 0.04])
    assert math.isnan(adj[0]) and math.isnan(adj[2])
    assert adj[1] == pytest.approx(0.02) and adj[3] == pytest.approx(0.04)
    assert bh_adjust([]) == [] and bh_adjust([0.3]) == pytest.approx([0.3])
