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

__all__ = ["CENSORED_RULE", "DIRECTIONS", "MULTIPLICITY_NOTE", "NOT_ENOUGH", "VERDICT_RULE",
           "ArmSummary", "CensoredPairs", "Effect", "PairedDiff", "bh_adjust",
           "censored_difference", "censored_verdict", "combine_verdicts", "escape_fraction",
           "factorial_effects", "paired_difference", "pick_lr", "steps_to_target", "summarize",
           "value_at", "verdict"]

DIRECTIONS = ("higher", "lower")
#: The verdict of a claim with fewer than 2 paired seeds: no interval, so no verdict.
NOT_ENOUGH = "not enough runs"

VERDICT_RULE = (
    "Verdict rule: for each claim, the per-seed difference (arm − baseline, same seed) is "
    "averaged and given a 95% Student-t confidence interval over seeds. *supported*: the "
    "interval excludes 0 on the claimed side; *contradicted*: it excludes 0 on the other side; "
    "*inconclusive*: it contains 0. With fewer than 2 paired seeds there is no interval and no "
    "verdict: *not enough runs*. A claim over several quantities (e.g. every layer) is "
    "supported only if each one is, contradicted if any one is, and has no verdict if one of "
    "them has none.")

MULTIPLICITY_NOTE = (
    "p (BH): the p-values of this table adjusted together for the false-discovery rate "
    "(Benjamini-Hochberg, over the {n} p-values in it). With many claims some "
    "per-claim verdicts are expected by chance; the adjusted p says which survive. It does "
    "not change the verdicts, which follow the rule above.")


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


def bh_adjust(p_values: Sequence[float | None]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (``scipy.stats.false_discovery_control``) over
    the finite entries, in input order; None / NaN entries stay NaN and are not counted."""
    idx = [i for i, p in enumerate(p_values) if p is not None and math.isfinite(float(p))]
    out = [math.nan] * len(p_values)
    if idx:
        adj = _st.false_discovery_control([float(p_values[i]) for i in idx], method="bh")
        for i, a in zip(idx, adj, strict=True):
            out[i] = float(a)
    return out


def verdict(diff: PairedDiff, direction: str) -> str:
    """``supported`` if the CI excludes 0 in ``direction`` ("higher": arm > baseline;
    "lower": arm < baseline), ``contradicted`` if it excludes 0 the other way, else
    ``inconclusive``; ``not enough runs`` (:data:`NOT_ENOUGH`) with fewer than 2 pairs."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is invalid: choose one of {DIRECTIONS}")
    lo, hi = diff.ci_low, diff.ci_high
    if diff.n < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return NOT_ENOUGH
    above, below = lo > 0, hi < 0
    if direction == "higher":
        return "supported" if above else "contradicted" if below else "inconclusive"
    return "supported" if below else "contradicted" if above else "inconclusive"


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """One verdict for a claim over several quantities: contradicted if any is; else
    ``not enough runs`` if any has no verdict (or there is none); else supported only if all
    are, inconclusive otherwise."""
    if any(v == "contradicted" for v in verdicts):
        return "contradicted"
    if not verdicts or any(v == NOT_ENOUGH for v in verdicts):
        return NOT_ENOUGH
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


# ------------------------------------------------------- steps to target, factorial effects


def steps_to_target(curve: Sequence[tuple[float, float]], target: float,
                    interpolate: bool = True) -> tuple[float, bool]:
    """Steps until a decreasing quantity (validation loss) first reaches ``target``.

    curve: ``(step, value)`` evaluations in step order. Returns ``(steps, censored)``: the
    first step whose value is ``<= target`` — with ``interpolate``, the step where the straight
    line between that evaluation and the one before it crosses ``target`` (no interpolation
    before the first evaluation) — and ``censored=False``; if no evaluation reaches the target,
    ``(last step, True)``: the run is right-censored and its steps-to-target is at least its
    last evaluated step. Non-finite values never reach the target. Raises ValueError for an
    empty curve or a non-finite target.
    """
    if not curve:
        raise ValueError("steps_to_target: empty curve (the run has no evaluation)")
    if not math.isfinite(target):
        raise ValueError(f"steps_to_target: target={target!r} is not finite")
    prev: tuple[float, float] | None = None
    for step, value in curve:
        v = float(value)
        if math.isfinite(v) and v <= target:
            if interpolate and prev is not None and prev[1] > v:
                s0, v0 = prev
                return s0 + (v0 - target) / (v0 - v) * (float(step) - s0), False
            return float(step), False
        prev = (float(step), v) if math.isfinite(v) else None
    return float(curve[-1][0]), True


def value_at(curve: Sequence[tuple[float, float]], step: float) -> float | None:
    """The curve's value at ``step``, linearly interpolated between the two evaluations
    around it (exact at an evaluation); None when ``step`` lies outside the evaluated steps
    or a value it needs is not finite."""
    pts = [(float(s), float(v)) for s, v in curve]
    for (s0, v0), (s1, v1) in zip(pts, pts[1:], strict=False):
        if s0 <= step <= s1:
            if step == s0:
                v = v0
            elif step == s1:
                v = v1
            else:
                v = v0 + (v1 - v0) * (step - s0) / (s1 - s0)
            return v if math.isfinite(v) else None
    if len(pts) == 1 and pts[0][0] == step and math.isfinite(pts[0][1]):
        return pts[0][1]
    return None


#: How a steps-to-target claim is decided (``censored_difference`` / ``censored_verdict``).
CENSORED_RULE = (
    "Steps-to-target claims: a run that never reaches its target is *censored*: its steps "
    "are at least its last evaluated step, so it enters the paired difference at that step, "
    "a bound. A pair where only the arm's run is censored bounds the difference from below "
    "(the arm is later by at least that much); only the baseline's, from above; pairs where "
    "neither run reached the target say nothing about the order and are left out (counted). "
    "The interval is the Student-t one on these differences; a verdict is given only in the "
    "direction every bound points to: *supported* / *contradicted* as in the rule above, "
    "but an interval on the 'arm sooner' side with a censored arm run (or on the 'arm "
    "later' side with a censored baseline run) is *inconclusive*, because that run could be "
    "arbitrarily late. So an arm that never gets there is *later*, not *tied at the last "
    "step*, and a verdict of *contradicted* on 'sooner' means the arm's runs reached the "
    "target later than the baseline's or never did.")


@dataclass(frozen=True)
class CensoredPairs:
    """How the seeds of a steps-to-target comparison pair up: both runs reached the target,
    only the arm's run is censored, only the baseline's, or neither reached it (left out)."""

    both: int
    arm_censored: int
    baseline_censored: int
    neither: int

    def as_dict(self) -> dict:
        return asdict(self)


def censored_difference(arm: Mapping[int, float | None], baseline: Mapping[int, float | None],
                        arm_censored: Sequence[int], baseline_censored: Sequence[int],
                        confidence: float = 0.95) -> tuple[PairedDiff, CensoredPairs]:
    """Paired ``arm - baseline`` steps over the seeds both have a value for, censored runs at
    their bound (``CENSORED_RULE``); seeds where both runs are censored are left out."""
    ac, bc = set(arm_censored), set(baseline_censored)
    seeds = [s for s in arm if s in baseline and arm[s] is not None and baseline[s] is not None
             and math.isfinite(float(arm[s])) and math.isfinite(float(baseline[s]))]
    neither = [s for s in seeds if s in ac and s in bc]
    kept = [s for s in seeds if s not in neither]
    pairs = CensoredPairs(sum(1 for s in kept if s not in ac and s not in bc),
                          sum(1 for s in kept if s in ac), sum(1 for s in kept if s in bc),
                          len(neither))
    d = paired_difference({s: arm[s] for s in kept}, {s: baseline[s] for s in kept},
                          confidence)
    return d, pairs


def censored_verdict(diff: PairedDiff, pairs: CensoredPairs, direction: str) -> str:
    """``verdict`` for a steps-to-target claim (lower = sooner), withheld (``inconclusive``)
    when a censored pair bounds the difference against the interval's side."""
    v = verdict(diff, direction)
    if v not in ("supported", "contradicted"):
        return v
    arm_sooner = (v == "supported") == (direction == "lower")
    if (arm_sooner and pairs.arm_censored) or (not arm_sooner and pairs.baseline_censored):
        return "inconclusive"
    return v


@dataclass(frozen=True)
class Effect:
    """A factorial contrast (main effect or interaction) over seeds: per-seed values, their
    mean with a 95% Student-t CI and one-sample t p-value (``PairedDiff`` fields)."""

    name: str
    factors: tuple[str, ...]
    diff: PairedDiff
    per_seed: dict[int, float]

    def as_dict(self) -> dict:
        return {"name": self.name, "factors": list(self.factors), **self.diff.as_dict(),
                "per_seed": {str(s): v for s, v in sorted(self.per_seed.items())}}


def factorial_effects(cells: Mapping[frozenset[str], Mapping[int, float | None]],
                      factors: Sequence[str], confidence: float = 0.95) -> list[Effect]:
    """Main effects, pairwise interactions, the highest-order interaction and the
    additivity gap of a full 2^k factorial, each with a CI over seeds.

    cells: for every subset of ``factors`` (the methods switched on), ``{seed: value}``. Only
    seeds with a finite value in every cell are used (so each effect is a within-seed
    contrast, like a paired difference). With signs x_f = +1 (on) / -1 (off):

    * effect of a set S of factors = mean of y over cells with prod_{f in S} x_f = +1 minus
      mean over cells with -1 (the usual 2^k effect; for S = {A}: on − off averaged over the
      other factors; for S = {A, B}: half of [A's effect with B on − A's effect with B off]);
    * additivity gap = (all on − none) − sum over f of (only f on − none): 0 when the
      single-method gains add up exactly, negative (for a lower-is-better metric: positive)
      when they overlap.
    """
    factors = tuple(factors)
    k = len(factors)
    if k < 2 or len(set(factors)) != k:
        raise ValueError(f"factorial_effects: need >= 2 distinct factors, got {factors}")
    import itertools

    subsets = [frozenset(c) for r in range(k + 1) for c in itertools.combinations(factors, r)]
    missing = [sorted(s) for s in subsets if s not in cells]
    if missing:
        raise ValueError(f"factorial_effects: no cell for the subsets {missing}")
    seeds = sorted(set.intersection(*(set(cells[s]) for s in subsets)))
    seeds = [s for s in seeds if all(cells[c][s] is not None
                                     and math.isfinite(float(cells[c][s])) for c in subsets)]
    y = {s: {c: float(cells[c][s]) for c in subsets} for s in seeds}

    def contrast(sset: tuple[str, ...]) -> dict[int, float]:
        out = {}
        for s in seeds:
            plus = [y[s][c] for c in subsets if math.prod(
                1 if f in c else -1 for f in sset) > 0]
            minus = [y[s][c] for c in subsets if math.prod(
                1 if f in c else -1 for f in sset) < 0]
            out[s] = float(np.mean(plus) - np.mean(minus))
        return out

    wanted: list[tuple[str, ...]] = [(f,) for f in factors]
    wanted += list(itertools.combinations(factors, 2))
    if k > 2:
        wanted.append(factors)
    effects = []
    zero = {s: 0.0 for s in seeds}
    for sset in wanted:
        per = contrast(sset)
        name = sset[0] if len(sset) == 1 else " × ".join(sset)
        effects.append(Effect(name, sset, paired_difference(per, zero, confidence), per))
    none, full = frozenset(), frozenset(factors)
    gap = {s: (y[s][full] - y[s][none]) - sum(y[s][frozenset((f,))] - y[s][none]
                                               for f in factors) for s in seeds}
    effects.append(Effect("additivity gap", factors, paired_difference(gap, zero, confidence),
                          gap))
    return effects
