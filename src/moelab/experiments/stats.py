"""Statistics of a multi-seed comparison (scipy.stats): summaries, paired differences, verdicts.

    summarize([0.41, 0.43, 0.42])                 # ArmSummary(mean, std (n-1), n)
    d = paired_difference({0: .46, 1: .47}, {0: .41, 1: .43})   # arm - baseline, same seeds
    verdict(d, "higher")                          # "supported" | "contradicted" | "inconclusive"

The confidence interval of a paired difference is Student t on the per-seed differences
(``mean ± t_{0.975, n-1} · sd / sqrt(n)``), the p-value the two-sided one-sample t test of
mean difference 0 (``scipy.stats.ttest_1samp``), i.e. a paired t test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st

__all__ = ["DIRECTIONS", "VERDICT_RULE", "ArmSummary", "PairedDiff", "combine_verdicts",
           "escape_fraction", "paired_difference", "pick_lr", "summarize", "verdict"]

DIRECTIONS = ("higher", "lower")

VERDICT_RULE = (
    "Verdict rule: for each claim, the per-seed difference (arm − baseline, same seed) is "
    "averaged and given a 95% Student-t confidence interval over seeds. *supported*: the "
    "interval excludes 0 on the claimed side; *contradicted*: it excludes 0 on the other side; "
    "*inconclusive*: it contains 0 (or fewer than 2 paired seeds). A claim over several "
    "quantities (e.g. every depth) is supported only if each one is, contradicted if any one is.")


@dataclass(frozen=True)
class ArmSummary:
    """Mean, sample standard deviation (ddof 1; NaN for n < 2) and count of finite values."""

    mean: float
    std: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairedDiff:
    """Mean of arm − baseline over the seeds both have, its CI and paired-t p-value."""

    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    confidence: float = 0.95

    def as_dict(self) -> dict:
        return asdict(self)


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def summarize(values: Sequence[float | None]) -> ArmSummary:
    """Summary of the finite values (None / NaN, e.g. failed runs, are left out)."""
    x = _finite(values)
    if not x:
        return ArmSummary(math.nan, math.nan, 0)
    std = float(np.std(x, ddof=1)) if len(x) > 1 else math.nan
    return ArmSummary(float(np.mean(x)), std, len(x))


def paired_difference(arm: Mapping[int, float | None], baseline: Mapping[int, float | None],
                      confidence: float = 0.95) -> PairedDiff:
    """Paired (same-seed) difference ``arm - baseline`` over the seeds where both are finite.

    With n < 2 pairs the interval and p-value are NaN. With n >= 2 and identical differences
    (zero spread) the interval is the point itself and p is 0 (or 1 if the difference is 0).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} is invalid: need 0 < confidence < 1")
    seeds = sorted(s for s in arm if s in baseline)
    d = [float(arm[s]) - float(baseline[s]) for s in seeds
         if arm[s] is not None and baseline[s] is not None
         and math.isfinite(float(arm[s])) and math.isfinite(float(baseline[s]))]
    n = len(d)
    if n == 0:
        return PairedDiff(math.nan, math.nan, math.nan, math.nan, 0, confidence)
    mean = float(np.mean(d))
    if n < 2:
        return PairedDiff(mean, math.nan, math.nan, math.nan, 1, confidence)
    sd = float(np.std(d, ddof=1))
    if sd == 0.0:
        return PairedDiff(mean, mean, mean, 1.0 if mean == 0.0 else 0.0, n, confidence)
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    p = float(_st.ttest_1samp(d, 0.0).pvalue)
    return PairedDiff(mean, mean - half, mean + half, p, n, confidence)


def verdict(diff: PairedDiff, direction: str) -> str:
    """``supported`` if the CI excludes 0 in ``direction`` ("higher": arm > baseline;
    "lower": arm < baseline), ``contradicted`` if it excludes 0 the other way, else
    ``inconclusive`` (also when the CI is undefined)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is invalid: choose one of {DIRECTIONS}")
    lo, hi = diff.ci_low, diff.ci_high
    if diff.n < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    above, below = lo > 0, hi < 0
    if direction == "higher":
        return "supported" if above else "contradicted" if below else "inconclusive"
    return "supported" if below else "contradicted" if above else "inconclusive"


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """One verdict for a claim over several quantities: supported only if all are,
    contradicted if any is, else inconclusive (and inconclusive for an empty list)."""
    if not verdicts:
        return "inconclusive"
    if any(v == "contradicted" for v in verdicts):
        return "contradicted"
    return "supported" if all(v == "supported" for v in verdicts) else "inconclusive"


def pick_lr(val_by_lr: Mapping[float, Sequence[float | None]], higher_is_better: bool) -> float:
    """The learning rate with the best mean validation value over its finite seeds.

    A learning rate whose every run failed or diverged (no finite value) is never picked;
    ties go to the smaller learning rate. Raises ValueError if no lr has a finite value.
    """
    best: tuple[float, float] | None = None
    for lr in sorted(val_by_lr):
        s = summarize(val_by_lr[lr])
        if s.n == 0:
            continue
        score = s.mean if higher_is_better else -s.mean
        if best is None or score > best[1]:
            best = (lr, score)
    if best is None:
        raise ValueError("no learning rate has a finished run with a finite validation value")
    return best[0]


def escape_fraction(values: Sequence[float | None], chance: float,
                    margin: float = 0.10) -> tuple[float, int]:
    """Share of runs whose accuracy exceeds ``chance + margin`` (failed runs count as not
    escaped) and the number of runs: ``(fraction, n)``; ``(nan, 0)`` for no runs."""
    n = len(values)
    if n == 0:
        return math.nan, 0
    hits = sum(1 for v in values if v is not None and math.isfinite(v) and v > chance + margin)
    return hits / n, n
