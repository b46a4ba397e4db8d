"""Figures of an experiment (matplotlib, Agg, PNG) from its aggregated result.

* ``metric.png``          primary metric per arm: mean with 95% Student-t CI bars over seeds
* ``curves.png``          validation accuracy / perplexity and training loss vs step,
                          mean ± std band over seeds, per arm (at its picked lr)
* ``gini_by_depth.png``   Gini of expert utilization per MoE layer at the final eval, mean ± std
* ``router_entropy.png``  router entropy / ln E (mean over MoE layers) vs step, mean ± std
* ``interaction.png``     factorial experiments: primary metric, factor A off/on per B state
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as _st

from moelab.experiments.spec import Experiment

__all__ = ["make_plots"]


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ModuleNotFoundError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


_MANY = 10  # lines per panel beyond which colours repeat and the legend moves outside


def _distinct_lines(axes, n: int) -> None:
    """Give each of ``n`` lines per panel its own colour / line-style pair (matplotlib's
    default cycle repeats after 10 colours)."""
    if n <= _MANY:
        return
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    styles = ("-", "--", ":", "-.")
    for ax in axes:
        ax.set_prop_cycle(color=[cmap(i % 20) for i in range(n)],
                          linestyle=[styles[(i // 20 + i % 2) % 4] for i in range(n)])


def _finish(fig, axes, path: Path, drew: bool = True) -> Path | None:
    """Grid and legend (where lines were drawn) on each of ``axes``, then save ``fig`` to
    ``path``; with ``drew=False`` close it instead and return None (no empty figures)."""
    axes = list(axes)
    same = len({tuple(line.get_label() for line in ax.lines) for ax in axes}) == 1
    for i, ax in enumerate(axes):
        ax.grid(alpha=0.3)
        if len(ax.lines) > _MANY and same and i < len(axes) - 1:
            continue  # one long legend, beside the last panel, serves panels with equal lines
        if len(ax.lines) > _MANY:  # a long legend goes beside the panel, not over the lines
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      ncol=1 + len(ax.lines) // 25)
        elif ax.lines:
            ax.legend(fontsize=7)
    if not drew:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    return _save(fig, path)


def _records(arm: Mapping[str, Any]) -> list[list[dict[str, Any]]]:
    from moelab.runs.directory import read_metrics

    return [read_metrics(d) for _, d in sorted(arm.get("run_dirs", {}).items())]


def _band(ax, series: list[dict[int, float]], label: str) -> None:
    """Mean ± std over runs of {step: value} series, at the steps every run has."""
    series = [s for s in series if s]
    if not series:
        return
    steps = sorted(set.intersection(*(set(s) for s in series)))
    if not steps:
        return
    y = np.array([[s[t] for t in steps] for s in series], dtype=float)
    mean = np.nanmean(y, axis=0)
    line, = ax.plot(steps, mean, marker="o", ms=2.5, label=f"{label} (n={len(series)})")
    if len(series) > 1:
        sd = np.nanstd(y, axis=0, ddof=1)
        ax.fill_between(steps, mean - sd, mean + sd, alpha=0.2, color=line.get_color())


def _curve(records: list[dict[str, Any]], kind: str, key: str) -> dict[int, float]:
    out = {}
    for r in records:
        if r.get("kind") == kind and r.get(key) is not None:
            out[int(r["step"])] = float(r[key])
    return out


def _entropy(records: list[dict[str, Any]]) -> dict[int, float]:
    out = {}
    for r in records:
        hs = [x.get("entropy_normalized") for x in r.get("layers") or []]
        hs = [h for h in hs if h is not None]
        if r.get("kind") == "eval" and hs:
            out[int(r["step"])] = sum(hs) / len(hs)
    return out


def _gini(records: list[dict[str, Any]]) -> list[float] | None:
    for r in reversed(records):
        if r.get("kind") == "eval" and r.get("layers"):
            return [float(x["gini"]) for x in r["layers"]]
    return None


def metric_bars(res: Mapping[str, Any], name: str
                ) -> tuple[list[str], list[float], list[float], list[float], str]:
    """Bars of ``metric.png``: arm keys, means, lower and upper whisker lengths (95% Student-t
    CI of the mean) and the unit. Accuracy (``*_acc``) is in % like the results table, and
    its whiskers stop at 0 and 100 (a t interval of a mean near 100% can pass it)."""
    pct = name.endswith("_acc")
    scale = 100.0 if pct else 1.0
    names, means, lo_err, hi_err = [], [], [], []
    for a in res["arms"]:
        s = a["metrics"][name]["summary"]
        if not s["n"]:
            continue
        half = (float(_st.t.ppf(0.975, s["n"] - 1)) * s["std"] / math.sqrt(s["n"])
                if s["n"] > 1 else 0.0) * scale
        mean = s["mean"] * scale
        lo, hi = mean - half, mean + half
        if pct:
            lo, hi = max(lo, 0.0), min(hi, 100.0)
        names.append(a["key"])
        means.append(mean)
        lo_err.append(mean - lo)
        hi_err.append(hi - mean)
    return names, means, lo_err, hi_err, "%" if pct else ""


def plot_metric(plt, exp: Experiment, res: Mapping[str, Any], out: Path) -> Path | None:
    m = exp.metric if not exp.metric.per_layer else next(
        (x for x in exp.metrics if not x.per_layer), None)
    if m is None:
        return None
    names, means, lo_err, hi_err, unit = metric_bars(res, m.name)
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 4))
    ax.bar(range(len(names)), means, yerr=[lo_err, hi_err], capsize=4, color="#7aa6c2")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    lo = min(mu - e for mu, e in zip(means, lo_err, strict=True))
    hi = max(mu + e for mu, e in zip(means, hi_err, strict=True))
    pad = 0.15 * (hi - lo or abs(hi) or 1.0)
    ax.set_ylim(lo - pad, hi + pad)
    label = f"{m.label} ({unit})" if unit else m.label
    ax.set(title=f"{exp.name}: {label} (mean, 95% t CI)", ylabel=label)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out / "metric.png")


def plot_curves(plt, exp: Experiment, res: Mapping[str, Any], out: Path) -> Path | None:
    runs = {a["key"]: _records(a) for a in res["arms"]}
    if not any(runs.values()):
        return None
    lm = any(r.get("val_ppl") is not None for rs in runs.values() for run in rs for r in run)
    key = "val_ppl" if lm else "val_acc"
    fig, (ax_l, ax_v) = plt.subplots(1, 2, figsize=(12, 4.2) if len(runs) <= _MANY
                                     else (15, 5.5))
    _distinct_lines((ax_l, ax_v), len(runs))
    for name, rs in runs.items():
        _band(ax_l, [_curve(r, "train", "loss") for r in rs], name)
        _band(ax_v, [_curve(r, "eval", key) for r in rs], name)
    ax_l.set(title="training loss", xlabel="step", ylabel="cross-entropy")
    ax_v.set(title="validation " + ("perplexity" if lm else "accuracy"), xlabel="step")
    fig.suptitle(f"{exp.name}: mean ± std over seeds, each arm at its picked lr")
    return _finish(fig, (ax_l, ax_v), out / "curves.png")


def _by_source(res: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for a in res["arms"]:
        out.setdefault(a["source"], []).append(a)
    return out


def plot_gini(plt, exp: Experiment, res: Mapping[str, Any], out: Path) -> Path | None:
    groups = _by_source(res)
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    _distinct_lines(axes[0], max(len(arms) for arms in groups.values()))
    drew = False
    for ax, (src, arms) in zip(axes[0], groups.items(), strict=True):
        for a in arms:
            ginis = [g for g in (_gini(r) for r in _records(a)) if g]
            if not ginis:
                continue
            n = min(len(g) for g in ginis)
            y = np.array([g[:n] for g in ginis])
            mean = y.mean(axis=0)
            line, = ax.plot(range(n), mean, marker="o", label=f"{a['arm']} (n={len(y)})")
            if len(y) > 1:
                sd = y.std(axis=0, ddof=1)
                ax.fill_between(range(n), mean - sd, mean + sd, alpha=0.2,
                                color=line.get_color())
            drew = True
        ax.set(title=f"{src}: Gini by depth (final eval)", xlabel="MoE layer",
               ylabel="Gini (0 = balanced)")
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _finish(fig, axes[0], out / "gini_by_depth.png", drew)


def plot_entropy(plt, exp: Experiment, res: Mapping[str, Any], out: Path) -> Path | None:
    groups = _by_source(res)
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    _distinct_lines(axes[0], max(len(arms) for arms in groups.values()))
    drew = False
    for ax, (src, arms) in zip(axes[0], groups.items(), strict=True):
        for a in arms:
            series = [_entropy(r) for r in _records(a)]
            if any(series):
                _band(ax, series, a["arm"])
                drew = True
        ax.set(title=f"{src}: router entropy / ln E (mean over layers)", xlabel="step",
               ylabel="normalised entropy")
    return _finish(fig, axes[0], out / "router_entropy.png", drew)


def plot_interaction(plt, exp: Experiment, res: Mapping[str, Any], out: Path) -> Path | None:
    """For a factorial experiment: one panel per pair of factors (A, B), the primary metric
    (mean over seeds and over the other factors' cells) with A off / on, one line per B state;
    parallel lines = no A × B interaction."""
    if not exp.factors or exp.metric.per_layer:
        return None
    import itertools

    from moelab.experiments.spec import factorial_factors

    means = {}
    for a in res["arms"]:
        s = a["metrics"][exp.metric.name]["summary"]
        if s["n"]:
            means[factorial_factors(a["arm"], exp.factors)] = s["mean"]
    pairs = list(itertools.combinations(exp.factors, 2))
    if len(means) < 2 ** len(exp.factors):
        return None
    # one shared y axis: the panels' slopes and gaps compare directly
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.8), squeeze=False,
                             sharey=True)
    for ax, (fa, fb) in zip(axes[0], pairs, strict=True):
        for b_on in (False, True):
            ys = []
            for a_on in (False, True):
                cells = [v for c, v in means.items() if (fa in c) == a_on and (fb in c) == b_on]
                ys.append(float(np.mean(cells)))
            ax.plot([0, 1], ys, marker="o", label=f"{fb} {'on' if b_on else 'off'}")
        ax.set_xticks([0, 1], [f"{fa} off", f"{fa} on"])
        ax.set(title=f"{fa} × {fb}")
    axes[0][0].set_ylabel(exp.metric.label)
    fig.suptitle(f"{exp.name}: interaction plot (means over seeds and the other factor)")
    return _finish(fig, axes[0], out / "interaction.png")


def make_plots(out: Path, exp: Experiment, res: Mapping[str, Any],
               sources: Mapping[str, Any] | None = None) -> list[Path]:
    """All figures that have data; returns their paths (raises ModuleNotFoundError without
    matplotlib)."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fn in (plot_metric, plot_curves, plot_gini, plot_entropy, plot_interaction):
        p = fn(plt, exp, res, out)
        if p is not None:
            paths.append(p)
    return paths
