"""What an experiment is: a named claim tested over arms x seeds (x a learning-rate grid).

An :class:`Experiment` is plain data; copy one from ``moelab.experiments.excitation`` and
register it (``moelab.experiments.register``) to run your own. Every run of an experiment is

    load_config(base, overrides + profile.overrides + arm.overrides
                + [seed, lr, dataset, threads])          # see keys.py

and writes an ordinary run directory (``moelab report`` works on it). The comparison reads the
runs' ``metrics.jsonl`` records through :class:`Metric` extractors, so a metric can be a final
value (``Metric.final("acc")``), something from the learning curve (steps to a target loss) or a
routing statistic per MoE layer (``per_layer=True``).

An experiment with ``sources`` trains nothing itself: it re-reads the runs of the named
experiments (at each arm's selected learning rate) and compares them on its own metrics
(``excitation-specialization`` reads ``excitation-foundation`` and ``excitation-rescue``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moelab.experiments.stats import DIRECTIONS

__all__ = ["DIVERGENCE_MARGIN", "Arm", "Claim", "Experiment", "Metric", "Profile", "Records",
           "Target", "divergence", "eval_curve", "final_on_other_windows", "final_record",
           "run_items", "target_curve"]

#: The entries of one run's metrics.jsonl, in order.
Records = Sequence[dict[str, Any]]
IMAGE_CHOICES = ("cifar10", "fashion-mnist", "mnist5k")
#: the GPU budget profile's and the paper-scale profile's names
GPU, PAPER = "gpu", "paper"
#: a profile with ``smoke`` overrides has a derived two-step CPU variant: its name + this
#: ("gpu-smoke", "paper-smoke")
SMOKE_SUFFIX = "-smoke"
#: what ``--data-dir`` may hold for a profile (``Profile.data_dir``)
DATA_DIR_KINDS = ("cifar10", "wikitext", "textfile")
_NAME = re.compile(r"[a-z0-9][a-z0-9_.+-]*")


def final_record(records: Records) -> dict[str, Any] | None:
    """The ``kind == "final"`` entry of a run (None if the run has not finished)."""
    for r in reversed(records):
        if r.get("kind") == "final":
            return r
    return None


def _final_value(key: str) -> Callable[[Records], float | None]:
    def extract(records: Records) -> float | None:
        fin = final_record(records)
        v = None if fin is None else fin.get(key)
        return None if v is None else float(v)

    extract.__name__ = f"final_{key}"
    return extract


def eval_curve(records: Records, key: str = "val_loss") -> list[tuple[float, float]]:
    """``(step, value)`` of every validation evaluation (the final one included), step order."""
    out = [(float(r["step"]), float(r[key])) for r in records
           if r.get("kind") == "eval" and r.get(key) is not None]
    return sorted(out, key=lambda sv: sv[0])


def _periodic_and_final(records: Records, key: str
                        ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    evals = [r for r in records if r.get("kind") == "eval" and r.get(key) is not None]
    fin = next((r for r in reversed(evals) if r.get("final")), None)
    return [r for r in evals if not r.get("final")], fin


def final_on_other_windows(records: Records, key: str = "val_loss") -> bool:
    """Whether the final evaluation used other windows (``val_items``) than the periodic
    ones: it is then left out of the steps-to-target curve (``target_curve``)."""
    periodic, fin = _periodic_and_final(records, key)
    items = {r["val_items"] for r in periodic if r.get("val_items") is not None}
    return fin is not None and bool(items) and fin.get("val_items") not in (None, *items)


def target_curve(records: Records, key: str = "val_loss") -> list[tuple[float, float]]:
    """The steps-to-target curve: the periodic validation evaluations, all on one set of
    windows (the same ``val_items``; records without it are kept), plus the final one when it
    used those windows too. The target is read on the baseline's curves of the same windows
    (``Target``), so curve and target never mix windows. Raises ValueError when the periodic
    evaluations themselves used different windows."""
    periodic, fin = _periodic_and_final(records, key)
    items = sorted({r["val_items"] for r in periodic if r.get("val_items") is not None})
    if len(items) > 1:
        raise ValueError(f"the periodic evaluations used different windows (val_items "
                         f"{items}): steps-to-target needs one set; evaluate every time on "
                         "the same data.eval_batches")
    kept = periodic + ([fin] if fin is not None and not final_on_other_windows(records, key)
                       else [])
    if not periodic and fin is not None:
        kept = [fin]
    return eval_curve(kept, key)


#: How far above its initial loss a run must finish to count as diverged (a share of it): a
#: run that barely moved (lr 1e-7) ends within noise of its initial loss; it did not learn,
#: it did not diverge.
DIVERGENCE_MARGIN = 0.05


def divergence(records: Records, status: str | None = None) -> str | None:
    """Why a run counts as diverged, or None: it stopped at a non-finite loss (runner status
    ``"diverged"``: ``moelab.train.guard.NonFiniteError``), or it finished with a non-finite final
    validation loss or one more than ``DIVERGENCE_MARGIN`` (5%) above its initial loss (the
    first logged training loss). A run that failed for another reason, has not finished, or
    did not learn (ended near its initial loss) is not diverged (None)."""
    if status == "diverged":
        return "stopped at a non-finite loss"
    fin = final_record(records)
    if fin is None or fin.get("val_loss") is None:
        return None
    v = float(fin["val_loss"])
    if not math.isfinite(v):
        return "non-finite final validation loss"
    first = next((r for r in records if r.get("kind") == "train"
                  and r.get("loss") is not None and math.isfinite(float(r["loss"]))), None)
    if first is not None and v > float(first["loss"]) * (1.0 + DIVERGENCE_MARGIN):
        return (f"final validation loss {v:.4g} more than {DIVERGENCE_MARGIN:.0%} above the "
                f"initial loss {float(first['loss']):.4g}")
    return None


@dataclass(frozen=True)
class Target:
    """Steps-to-target, fixed before any run: a run's value is the first step its validation
    curve (``target_curve``: one set of windows) reaches the target, linearly interpolated
    between evaluations when ``interpolate`` (``stats.steps_to_target``).

    The target of an arm is either the fixed loss ``value``, or (``fraction``, the default)
    the mean over its baseline arm's runs of their curve's value at ``fraction`` of the
    planned training steps (``stats.value_at``), read on the same windows as every curve.
    Diverged baseline runs (``spec.divergence``) are left out of that mean and counted, so a
    diverged run cannot move the target; so are runs whose curve does not cover that step.
    With ``fraction`` 0.5 the baseline itself reaches the target near mid-training, leaving
    room to see an arm up to twice as slow before the end of training.

    Censoring: a run that never reaches its target is censored at its last evaluated step; a
    diverged run at its planned final step (``train.steps``). Claims on it are decided by
    ``stats.censored_difference`` / ``censored_verdict`` (``stats.CENSORED_RULE``).

    baseline: ``(arm, baseline arm)`` pairs, one for every arm of the experiment (a baseline
    arm maps to itself). Only arms with the same baseline share a target and are compared.
    """

    baseline: tuple[tuple[str, str], ...]
    key: str = "val_loss"
    interpolate: bool = True
    fraction: float | None = 0.5
    value: float | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.value is None):
            raise ValueError("steps-to-target: give the target as fraction= (of the baseline's "
                             "training) or value= (a fixed loss), exactly one")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"steps-to-target: fraction={self.fraction!r} is invalid: need "
                             "0 < fraction <= 1")
        if self.value is not None and not math.isfinite(self.value):
            raise ValueError(f"steps-to-target: value={self.value!r} is not finite")

    def baseline_of(self, arm: str) -> str:
        for a, b in self.baseline:
            if a == arm:
                return b
        raise KeyError(f"steps-to-target: arm {arm!r} has no baseline")

    def shared(self, a: str, b: str) -> bool:
        """Whether arms ``a`` and ``b`` have the same target (the same baseline arm)."""
        return self.baseline_of(a) == self.baseline_of(b)

    def describe(self) -> str:
        """The target rule in words (results.json's ``rule`` and the page)."""
        if self.value is not None:
            return f"fixed {self.key} {self.value:g}"
        return (f"the baseline arm's mean {self.key} at {self.fraction:g} of its planned "
                "training steps (diverged runs excluded), on the curve's windows")


@dataclass(frozen=True)
class Metric:
    """The quantity an experiment compares, read from a run's records.

    name: column name (``test_acc``).  label: human-readable name for tables and plots.
    test: extractor of the reported value (records -> float | None; a list of floats, one per
        MoE layer, when ``per_layer``).  val: extractor of the validation value used to pick
        the learning rate (None: the experiment has no lr grid to pick from).
    higher_is_better: the direction in which the metric improves.
    per_layer: ``test`` returns one value per MoE layer (compared layer by layer).
    from_run: ``test`` and ``val`` take the run directory (a ``Path``) instead of the records:
        a post-training evaluation computed when the results are aggregated (e.g. a
        robustness evaluation of the checkpoint; the function caches its own output).
    target: a steps-to-target metric (``Metric.steps_to``): the value is computed from the
        run's validation curve and the target fixed from the baseline arm (``test`` unused).
    """

    name: str
    label: str
    test: Callable[[Records], Any]
    val: Callable[[Records], float | None] | None = None
    higher_is_better: bool = True
    per_layer: bool = False
    from_run: bool = False
    target: Target | None = None

    @classmethod
    def steps_to(cls, baseline: dict[str, str], key: str = "val_loss",
                 interpolate: bool = True, label: str | None = None,
                 fraction: float | None = 0.5, value: float | None = None) -> Metric:
        """Steps until the validation ``key`` reaches the target (``Target``: by default the
        baseline arm's mean ``key`` at half its training; ``baseline``: arm -> its baseline
        arm, every arm listed); lower is better."""
        target = Target(tuple(sorted(baseline.items())), key, interpolate,
                        None if value is not None else fraction, value)
        return cls(f"steps_to_{key}", label or f"steps to the target {key}",
                   lambda records: target_curve(records, key), None, higher_is_better=False,
                   target=target)

    @classmethod
    def final(cls, what: str, label: str | None = None,
              higher_is_better: bool | None = None) -> Metric:
        """``test_<what>`` of the final record, lr picked on ``val_<what>`` (acc, loss, ppl)."""
        hib = (what == "acc") if higher_is_better is None else higher_is_better
        return cls(f"test_{what}", label or f"test {what}", _final_value(f"test_{what}"),
                   _final_value(f"val_{what}"), hib)


@dataclass(frozen=True)
class Arm:
    """One configuration of the comparison: a name and config overrides (``KEY=VALUE``).

    lr_grid: this arm's learning-rate grid (None: the experiment's). Arms compared by a claim
    must share their grid (checked), e.g. an SGD pair and an Adam pair each with its own.
    """

    name: str
    overrides: tuple[str, ...] = ()
    lr_grid: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"arm name {self.name!r} is invalid: use lowercase letters, "
                             "digits, '_', '-', '.', '+'")


@dataclass(frozen=True)
class Claim:
    """``arm`` beats ``baseline`` on ``metric`` in ``direction`` ("higher" | "lower": the
    sign of arm − baseline the paper claims). ``source``: for an experiment with sources, the
    source experiment whose runs hold both arms. ``text``: the claim in words.
    ``margin`` > 0 makes it a non-inferiority claim: the arm is worse than the baseline by
    less than ``margin`` x the baseline's mean (e.g. 0.005: 0.5%); supported when the CI of
    arm − baseline lies on the claimed side of that bound, contradicted when it lies beyond
    it (the p-value tests the difference against the bound)."""

    arm: str
    baseline: str
    direction: str
    metric: str | None = None  # None: the experiment's first metric
    source: str | None = None
    text: str = ""
    margin: float = 0.0

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"claim direction={self.direction!r} is invalid: choose one of "
                             f"{DIRECTIONS}")
        if not (isinstance(self.margin, (int, float)) and 0.0 <= self.margin < 1.0):
            raise ValueError(f"claim margin={self.margin!r} is invalid: need 0 <= margin < 1 "
                             "(a fraction of the baseline's mean)")


@dataclass(frozen=True)
class Profile:
    """A size of the experiment: overrides applied on top of the base (before the arms'),
    the default number of seeds, which entries of each arm's lr grid to run (``lr_index``;
    None: all), and ``cpu_minutes``: the profile's wall time on 2 CPU cores, as measured
    (None, the default: not measured; ``moelab reproduce list`` then says "unknown" with the
    number of runs and steps).

    A GPU profile ("gpu": a budget run on one GPU, sized to ~12 minutes, not to the paper's
    scale) also has ``gpu_minutes`` (its estimated time on one H200 with
    packed runs; how each is estimated is in the experiment's notes). The "paper" profile
    holds the paper's own setting (model size, tokens, lr schedule with warm-up, seeds, and
    data: ``data_dir`` names what ``--data-dir`` must hold, one of :data:`DATA_DIR_KINDS`),
    sized for a cluster: ``gpus_per_run`` GPUs per run (data parallel, ``moelab launch``);
    its GPU-hours are computed from its resolved configs (``moelab.experiments.gpu
    .profile_gpu_hours``). Either may replace the experiment's ``arms`` and ``claims`` (a
    paper's setting that the CPU arms only approximate, e.g. its model depths), and has
    ``smoke``: overrides that shrink every run to a two-step CPU run (applied after the
    arms'), the derived ``gpu-smoke`` / ``paper-smoke`` profile the tests run."""

    overrides: tuple[str, ...] = ()
    seeds: int = 2
    lr_index: tuple[int, ...] | None = None
    cpu_minutes: float | None = None
    gpu_minutes: float | None = None
    arms: tuple[Arm, ...] | None = None
    claims: tuple[Claim, ...] | None = None
    smoke: tuple[str, ...] = ()
    #: overrides applied after the arms' (what ``gpu-smoke`` shrinks every arm with)
    after_arms: tuple[str, ...] = ()
    #: what ``--data-dir`` must hold for this profile (None: the experiment's usual data)
    data_dir: str | None = None
    #: GPUs each run trains on (data parallel, one ``moelab launch`` per run)
    gpus_per_run: int = 1
    #: the paper's setting this profile follows, and where it departs from it (one paragraph)
    setting: str = ""
    #: learning rates every arm trains at under this profile (None: the arm's or experiment's
    #: grid), e.g. the paper's own lr where the CPU grid was tuned for a smaller model
    lr_grid: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.data_dir is not None and self.data_dir not in DATA_DIR_KINDS:
            raise ValueError(f"profile data_dir={self.data_dir!r} is invalid: choose one of "
                             f"{DATA_DIR_KINDS}")
        if not (isinstance(self.gpus_per_run, int) and self.gpus_per_run >= 1):
            raise ValueError(f"profile gpus_per_run={self.gpus_per_run!r} is invalid: need "
                             "an int >= 1")


@dataclass(frozen=True)
class Experiment:
    """A named, falsifiable claim from a paper, as runs plus a comparison.

    name: the CLI name (``excitation-foundation``).  claim: the paper's claim in one sentence.
    paper: citation.  base: shipped config name or TOML path all runs start from.
    overrides: base overrides shared by every arm.  arms: the configurations compared.
    claims: the directional claims that get a verdict.  metrics: what is compared (the first is
    the primary one, used to pick each arm's lr).  lr_grid: learning rates tried for every arm
    (None: the config's lr).  profiles: "quick" and "full" at least.
    image_datasets: the image datasets this experiment may use, in order of preference, among
        "cifar10" (when --data-dir holds it), "fashion-mnist" (when installed) and "mnist5k"
        (always there); the runner takes the first available. Empty: the base config's data.
        None (default): follows the base config's ``model.kind``: all three for an image
        model ("mlp", "vit"), empty for a text one ("lm", "hf").
    chance: accuracy of guessing (for the escape fraction), None when not reported.
    sources: experiments whose runs this one analyses instead of training its own.
    factors: for a full 2^k factorial: the factor names; arm ``"base"`` has none on, every
        other arm is named by its factors joined with ``+`` in this order (``"a+c"``); the
        results then add main effects and interactions (``stats.factorial_effects``).
    report_divergence: list diverged runs per arm and lr (``spec.divergence``) in results.md.
    notes: how the setting was chosen and any change made after results were seen, with why.
    extra_sections: ``f(results) -> Markdown lines`` appended to results.md after the other
        metrics (descriptive tables an experiment needs beyond its claims).
    picks: name -> candidate arms: a pseudo-arm that is the candidate with the best mean
        validation value of the primary metric (picked per experiment, reported on test like
        an arm); claims may name it as their baseline (e.g. the best of a tuned grid).
    """

    name: str
    claim: str
    paper: str
    base: str = "mnist_mlp"
    overrides: tuple[str, ...] = ()
    arms: tuple[Arm, ...] = ()
    claims: tuple[Claim, ...] = ()
    metrics: tuple[Metric, ...] = ()
    lr_grid: tuple[float, ...] | None = None
    profiles: dict[str, Profile] = field(default_factory=dict)
    image_datasets: tuple[str, ...] | None = None
    chance: float | None = None
    sources: tuple[str, ...] = ()
    factors: tuple[str, ...] = ()
    report_divergence: bool = False
    notes: str = ""
    extra_sections: Callable[[Mapping[str, Any]], list[str]] | None = None
    picks: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"experiment name {self.name!r} is invalid")
        if not self.metrics or not all(isinstance(m, Metric) for m in self.metrics):
            raise ValueError(f"experiment {self.name!r}: need at least one Metric")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name!r}: duplicate arm names {names}")
        if bool(self.arms) == bool(self.sources):
            raise ValueError(f"experiment {self.name!r}: give arms (it trains) or sources "
                             "(it analyses other experiments' runs), not both or neither")
        if self.image_datasets is None:
            object.__setattr__(self, "image_datasets", _default_image_datasets(self))
        bad = set(self.image_datasets) - set(IMAGE_CHOICES)
        if bad:
            raise ValueError(f"experiment {self.name!r}: image_datasets {sorted(bad)} invalid: "
                             f"choose from {IMAGE_CHOICES}")
        if self.image_datasets and self.image_datasets[-1] != "mnist5k":
            raise ValueError(f"experiment {self.name!r}: image_datasets must end with the "
                             "always-present 'mnist5k'")
        for p in ("quick", "full"):
            if p not in self.profiles:
                raise ValueError(f"experiment {self.name!r}: missing the {p!r} profile")
        for p in self.profiles:
            if p.endswith(SMOKE_SUFFIX):
                raise ValueError(f"experiment {self.name!r}: {p!r} is derived from the "
                                 f"{p[:-len(SMOKE_SUFFIX)]!r} profile's smoke overrides, "
                                 "not given")
        paper = self.profiles.get(PAPER)
        if paper is not None and self.arms and not paper.smoke:
            raise ValueError(f"experiment {self.name!r}: the {PAPER!r} profile needs smoke "
                             "overrides (its two-step CPU variant, run by the tests)")
        if paper is not None and (paper.arms is not None or paper.claims is not None):
            self.at(PAPER)
        gpu = self.profiles.get(GPU)
        if gpu is not None and gpu.gpu_minutes is None:
            raise ValueError(f"experiment {self.name!r}: the {GPU!r} profile needs its "
                             "gpu_minutes estimate")
        if gpu is not None and (gpu.arms is not None or gpu.claims is not None):
            self.at(GPU)  # its own arms and claims must fit together too
        metric_names = {m.name for m in self.metrics}
        for c in self.claims:
            if c.metric is not None and c.metric not in metric_names:
                raise ValueError(f"experiment {self.name!r}: claim metric {c.metric!r} is not "
                                 f"one of {sorted(metric_names)}")
            if c.margin and self.metric_named(c.metric).per_layer:
                raise ValueError(f"experiment {self.name!r}: claim {c.arm} vs {c.baseline}: "
                                 "a margin needs a single-value metric, not a per-layer one")
            if self.arms:
                for a in (c.arm, c.baseline):
                    if a not in names and a not in self.picks:
                        raise ValueError(f"experiment {self.name!r}: claim arm {a!r} is not "
                                         f"one of {names + list(self.picks)}")
                base = self.picks[c.baseline][0] if c.baseline in self.picks else c.baseline
                if self.arm(c.arm).lr_grid != self.arm(base).lr_grid:
                    raise ValueError(f"experiment {self.name!r}: claim {c.arm} vs "
                                     f"{c.baseline} compares arms with different lr grids")
            elif c.source not in self.sources:
                raise ValueError(f"experiment {self.name!r}: claim source {c.source!r} is not "
                                 f"one of {self.sources}")
        for pick, cands in self.picks.items():
            if pick in names or not cands or not set(cands) <= set(names) \
                    or len({self.arm(a).lr_grid for a in cands}) > 1:
                raise ValueError(f"experiment {self.name!r}: pick {pick!r} needs a new name "
                                 f"and candidates among the arms {names} sharing one lr grid, "
                                 f"got {cands}")
        if self.picks and (self.metric.val is None or self.metric.per_layer
                           or self.metric.target is not None):
            raise ValueError(f"experiment {self.name!r}: picks need a primary metric with a "
                             "validation value (Metric.final)")
        for m in self.metrics:
            if m.target is not None:
                got = dict(m.target.baseline)
                if set(got) != set(names) or not set(got.values()) <= set(names):
                    raise ValueError(f"experiment {self.name!r}: metric {m.name!r} needs a "
                                     f"baseline arm (one of {names}) for every arm, got {got}")
        if self.factors:
            want = {factorial_arm_name(c, self.factors) for c in _subsets(self.factors)}
            if want != set(names):
                raise ValueError(f"experiment {self.name!r}: factors {self.factors} need "
                                 f"exactly the arms {sorted(want)}, got {names}")
        for grid in [self.lr_grid, *(a.lr_grid for a in self.arms)]:
            if grid is not None and (not grid or not all(
                    isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in grid)):
                raise ValueError(f"experiment {self.name!r}: lr grid {grid!r} is invalid: "
                                 "need positive numbers")

    @property
    def metric(self) -> Metric:
        """The primary metric."""
        return self.metrics[0]

    def metric_named(self, name: str | None) -> Metric:
        if name is None:
            return self.metric
        return next(m for m in self.metrics if m.name == name)

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"experiment {self.name!r} has no arm {name!r}")

    def profile(self, name: str) -> Profile:
        """Profile ``name``; "P-smoke" is derived from a profile P with ``smoke`` overrides
        ("gpu-smoke", "paper-smoke"): P's overrides plus its ``smoke`` ones, one seed, the
        first lr of each grid, its usual data, one process."""
        base = name[:-len(SMOKE_SUFFIX)] if name.endswith(SMOKE_SUFFIX) else None
        if base is not None and self._has_smoke(base):
            prof = self.profiles[base]
            return dataclasses.replace(prof, after_arms=prof.smoke, seeds=1, lr_index=(0,),
                                       cpu_minutes=1.0, gpu_minutes=None, data_dir=None,
                                       gpus_per_run=1)
        if name not in self.profiles:
            choices = sorted(self.profiles) + sorted(
                p + SMOKE_SUFFIX for p in self.profiles if self._has_smoke(p))
            raise ValueError(f"profile {name!r} is invalid for {self.name!r}: choose one of "
                             f"{choices}")
        return self.profiles[name]

    def _has_smoke(self, profile: str) -> bool:
        """Whether ``profile`` has a derived "-smoke" variant: it has smoke overrides, or it
        is the paper profile of an analysis-only experiment (which reads its sources'
        paper-smoke runs)."""
        prof = self.profiles.get(profile)
        return prof is not None and bool(prof.smoke or (self.sources and profile == PAPER))

    def at(self, profile: str) -> Experiment:
        """This experiment as run at ``profile``: its arms and claims replaced where the
        profile gives its own (a GPU profile at the paper's setting), and every arm's lr grid
        where the profile gives one; else itself."""
        prof = self.profile(profile)
        if prof.arms is None and prof.claims is None and prof.lr_grid is None:
            return self
        plain = {k: dataclasses.replace(v, arms=None, claims=None, lr_grid=None)
                 for k, v in self.profiles.items()}  # applied once, here
        arms = prof.arms or self.arms
        if prof.lr_grid is not None:
            arms = tuple(dataclasses.replace(a, lr_grid=None) for a in arms)
        return dataclasses.replace(self, arms=arms,
                                   claims=prof.claims if prof.claims is not None
                                   else self.claims, profiles=plain,
                                   lr_grid=prof.lr_grid or self.lr_grid)

    def items_per_run(self, profile: str) -> tuple[int, str] | None:
        """What one run of ``profile`` trains on, from its resolved config (the first arm's):
        ``(steps x batch x seq_len x grad_accum, "tokens")`` for a language model,
        ``(steps x batch x grad_accum, "images")`` otherwise; None for an analysis-only
        experiment (it trains nothing)."""
        from moelab.config import load_config

        exp = self.at(profile)
        if exp.sources:
            return None
        prof = exp.profile(profile)
        arm = exp.arms[0]
        return run_items(load_config(exp.base, list(exp.overrides + prof.overrides
                                                     + arm.overrides + prof.after_arms)))

    def lr_grid_of(self, arm: Arm, profile: Profile) -> tuple[float | None, ...]:
        """The learning rates ``arm`` is trained at under ``profile`` ((None,): config lr)."""
        grid = arm.lr_grid or self.lr_grid
        if not grid:
            return (None,)
        if profile.lr_index is None:
            return tuple(grid)
        return tuple(grid[i] for i in profile.lr_index if -len(grid) <= i < len(grid))


def run_items(cfg) -> tuple[int, str]:
    """What one run of RunConfig ``cfg`` trains on: ``(steps x batch x seq_len x grad_accum,
    "tokens")`` for a language model, ``(steps x batch x grad_accum, "images")`` otherwise."""
    n = cfg.train.steps * cfg.data.batch_size * cfg.train.grad_accum
    if cfg.model.kind in ("lm", "hf"):
        return n * cfg.data.seq_len, "tokens"
    return n, "images"


def _default_image_datasets(exp: Experiment) -> tuple[str, ...]:
    """``image_datasets`` when not given: by the base config's model kind (an analysis-only
    experiment trains nothing: none)."""
    if exp.sources:
        return ()
    from moelab.config import load_config

    try:
        kind = load_config(exp.base).model.kind
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"experiment {exp.name!r}: base config {exp.base!r} cannot be "
                         f"loaded ({e}); give a shipped config name or a TOML path") from e
    return () if kind in ("lm", "hf") else IMAGE_CHOICES


def _subsets(factors: Sequence[str]) -> list[tuple[str, ...]]:
    import itertools

    return [c for r in range(len(factors) + 1) for c in itertools.combinations(factors, r)]


def factorial_arm_name(on: Sequence[str], factors: Sequence[str]) -> str:
    """Arm name of the factorial cell with the factors ``on`` switched on: ``"base"`` for
    none, else those factors joined by ``+`` in ``factors`` order."""
    bad = set(on) - set(factors)
    if bad:
        raise ValueError(f"factors {sorted(bad)} are not among {tuple(factors)}")
    return "+".join(f for f in factors if f in on) or "base"


def factorial_factors(arm: str, factors: Sequence[str]) -> frozenset[str]:
    """Inverse of ``factorial_arm_name``."""
    return frozenset() if arm == "base" else frozenset(arm.split("+"))
