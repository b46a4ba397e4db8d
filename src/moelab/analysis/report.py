"""Plots and a Markdown comparison table from one or more run directories.

    make_report(["runs/a", "runs/b"], out_dir="report")   # -> Path("report/report.md")

Figures (matplotlib, Agg backend, PNG):

* ``loss.png``          training loss and validation perplexity (LM) or accuracy vs step,
                        all runs overlaid
* ``gini_by_depth.png`` Gini coefficient of expert utilization per MoE layer at the final eval
                        (Excitation, Fig. 4)
* ``router_entropy.png`` mean per-token router entropy (normalised by ln E) over training,
                        one panel per MoE layer (Excitation, Fig. 5)
* ``utilization_<run>.png`` per run: expert share (expert x eval step) heatmap per layer
* ``norm_share.png``    share of selections per expert, experts ordered by mean output norm,
                        final eval, one panel per layer (MomentumSMoE, Fig. 5) — when recorded

``report.md`` has a table comparing the runs (final val ppl/acc, test, steps, params,
throughput, mean Gini, dead experts), for Default MoE runs each layer's EMA β range and mean
horizon at the last evaluation, and embeds the figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.config import tomllib
from moelab.runs.directory import CONFIG, METRICS, read_metrics

__all__ = ["RunData", "default_moe_table", "load_run", "make_report"]

MATPLOTLIB_PIP = "pip install matplotlib"


@dataclass
class RunData:
    """What the report needs from one run directory."""

    name: str
    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None
    model_kind: str = "lm"

    @property
    def is_lm(self) -> bool:
        return self.model_kind in ("lm", "hf")

    @property
    def last_eval(self) -> dict[str, Any] | None:
        return self.evals[-1] if self.evals else None

    @property
    def n_layers(self) -> int:
        return max((len(e.get("layers", [])) for e in self.evals), default=0)


def load_run(run_dir: str | Path, name: str | None = None) -> RunData:
    """Read ``RUN/metrics.jsonl`` (and the model kind from ``RUN/config.toml``)."""
    path = Path(run_dir)
    if not (path / METRICS).is_file():
        raise FileNotFoundError(f"{path} is not a moelab run directory (no {METRICS})")
    entries = read_metrics(path)
    run = RunData(name=name or path.resolve().name, path=path)
    kind = None
    cfg_file = path / CONFIG
    if cfg_file.is_file():
        try:
            kind = tomllib.loads(cfg_file.read_text("utf-8")).get("model", {}).get("kind")
        except (tomllib.TOMLDecodeError, AttributeError):
            kind = None
    for e in entries:
        k = e.get("kind")
        if k == "train":
            run.train.append(e)
        elif k == "eval":
            run.evals.append(e)
        elif k == "final":
            run.final = e
            kind = kind or e.get("model_kind")
    if kind is None:
        kind = "lm" if any("val_ppl" in e for e in run.evals) else "vit"
    run.model_kind = kind
    return run


def _unique_names(runs: list[RunData]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        if r.name in seen:
            seen[r.name] += 1
            r.name = f"{r.name}-{seen[r.name]}"
        else:
            seen[r.name] = 1


def _safe(name: str) -> str:
    return re.sub(r"[^\w.+-]", "_", name)


# ------------------------------------------------------------------------------ figures


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ModuleNotFoundError(f"moelab report needs matplotlib: {MATPLOTLIB_PIP}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _layer_grid(plt, n_layers: int, title: str, height: float = 3.0):
    cols = min(n_layers, 4)
    rows = math.ceil(n_layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 0.6, height * rows + 0.6),
                             squeeze=False, sharey=True, layout="constrained")
    fig.suptitle(title)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n_layers:]:
        ax.set_visible(False)
    return fig, flat[:n_layers]


def _finite(v: Any) -> bool:
    """A number that is not NaN/inf (metrics.jsonl writes non-finite values as null)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def run_notes(r: RunData) -> list[str]:
    """What the figures and table of run ``r`` leave out, in words (non-finite values, no
    final evaluation)."""
    notes = []
    bad = [e["step"] for e in r.train if not _finite(e.get("loss"))]
    if bad:
        notes.append(f"`{r.name}`: {len(bad)} of {len(r.train)} logged training losses are "
                     f"NaN/inf (null in metrics.jsonl), first at step {bad[0]}: the run "
                     "diverged there; they are left out of the plots")
    key = "val_ppl" if r.is_lm else "val_acc"
    bad_ev = [e["step"] for e in r.evals if not _finite(e.get(key))]
    if bad_ev:
        notes.append(f"`{r.name}`: {len(bad_ev)} evaluations have a non-finite {key}, first "
                     f"at step {bad_ev[0]}; left out of the plots")
    skipped = max((e.get("skipped_steps", 0) for e in r.train), default=0)
    if skipped:
        notes.append(f"`{r.name}`: {skipped} steps with a NaN/inf loss or gradient were "
                     "skipped (train.skip_nonfinite_steps)")
    if r.final is None:
        notes.append(f"`{r.name}`: no final evaluation (still running, stopped or diverged); "
                     "the table shows its last logged values")
    return notes


def plot_loss(plt, runs: list[RunData], out: Path) -> Path:
    fig, (ax_l, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    missing = []
    for r in runs:
        pts = [(e["step"], e["loss"]) for e in r.train if _finite(e.get("loss"))]
        if pts:
            ax_l.plot(*zip(*pts, strict=True), label=r.name)
        elif r.train:
            missing.append(r.name)
        key = "val_ppl" if r.is_lm else "val_acc"
        pts = [(e["step"], e[key]) for e in r.evals if _finite(e.get(key))]
        if pts:
            ax_v.plot(*zip(*pts, strict=True), marker="o", ms=3, label=r.name)
    if missing:
        ax_l.text(0.5, 0.5, "no finite training loss logged:\n" + ", ".join(missing),
                  transform=ax_l.transAxes, ha="center", va="center", color="tab:red")
    ax_l.set(title="training loss", xlabel="step", ylabel="cross-entropy (nats)")
    lm = all(r.is_lm for r in runs)
    if lm:
        ax_v.set(title="validation perplexity", xlabel="step", ylabel="perplexity")
        ax_v.set_yscale("log")
    else:
        ax_v.set(title="validation accuracy" if not any(r.is_lm for r in runs)
                 else "validation ppl (LM) / acc", xlabel="step")
    for ax in (ax_l, ax_v):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, out / "loss.png")


def plot_gini(plt, runs: list[RunData], out: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(6, 4))
    any_line = False
    for r in runs:
        ev = r.last_eval
        layers = (ev or {}).get("layers") or []
        pts = [(i, x["gini"]) for i, x in enumerate(layers) if _finite(x.get("gini"))]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=r.name)
            any_line = True
    if not any_line:
        plt.close(fig)
        return None
    ax.set(title="expert-utilization Gini by depth (final eval)", xlabel="MoE layer",
           ylabel="Gini (0 = balanced)")
    ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "gini_by_depth.png")


def plot_entropy(plt, runs: list[RunData], out: Path) -> Path | None:
    n = max((r.n_layers for r in runs), default=0)
    if n == 0:
        return None
    fig, axes = _layer_grid(plt, n, "router entropy / ln E over training (validation)")
    for i, ax in enumerate(axes):
        for r in runs:
            pts = [(e["step"], e["layers"][i]["entropy_normalized"]) for e in r.evals
                   if len(e.get("layers", [])) > i
                   and e["layers"][i].get("entropy_normalized") is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=r.name)
        ax.set(title=f"MoE layer {i}", xlabel="step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalised entropy")
    axes[0].legend(fontsize=8)
    return _save(fig, out / "router_entropy.png")


def plot_utilization(plt, run: RunData, out: Path) -> Path | None:
    import numpy as np

    n = run.n_layers
    if n == 0:
        return None
    fig, axes = _layer_grid(plt, n, f"expert share per eval step: {run.name}", height=3.2)
    steps = [e["step"] for e in run.evals]
    im = None
    vmax = 0.0
    grids = []
    for i in range(n):
        cols = [e["layers"][i]["share"] if len(e.get("layers", [])) > i else None
                for e in run.evals]
        n_exp = max((len(c) for c in cols if c), default=0)
        grid = np.full((n_exp, len(cols)), np.nan)
        for j, c in enumerate(cols):
            if c:
                grid[: len(c), j] = c
        grids.append(grid)
        vmax = max(vmax, float(np.nanmax(grid)) if grid.size else 0.0)
    for i, (ax, grid) in enumerate(zip(axes, grids, strict=True)):
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0,
                       vmax=vmax or 1, interpolation="nearest")
        ax.set(title=f"MoE layer {i}", xlabel="eval step", ylabel="expert")
        ticks = list(range(len(steps)))
        if len(ticks) > 8:
            ticks = ticks[:: math.ceil(len(ticks) / 8)]
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks], rotation=45, fontsize=7)
        ax.yaxis.get_major_locator().set_params(integer=True)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.9, label="share of assignments")
    return _save(fig, out / f"utilization_{_safe(run.name)}.png")


def plot_norm_share(plt, runs: list[RunData], out: Path) -> Path | None:
    have = [r for r in runs if r.last_eval
            and any("norm_order_share" in x for x in r.last_eval.get("layers", []))]
    if not have:
        return None
    n = max(r.n_layers for r in have)
    fig, axes = _layer_grid(plt, n, "share per expert, experts by ascending output norm "
                                    "(final eval)")
    for i, ax in enumerate(axes):
        for r in have:
            layers = r.last_eval["layers"]
            if len(layers) > i and "norm_order_share" in layers[i]:
                s = layers[i]["norm_order_share"]
                ax.plot(range(len(s)), s, marker="o", ms=3, label=r.name)
                ax.axhline(1 / len(s), color="grey", lw=0.8, ls=":")
        ax.set(title=f"MoE layer {i}", xlabel="expert rank by output norm")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of assignments")
    axes[0].legend(fontsize=8)
    return _save(fig, out / "norm_share.png")


# ------------------------------------------------------------------------------- table


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return format(v, spec)


def summary_row(r: RunData) -> dict[str, Any]:
    """The numbers of one run in the comparison table (None where unknown)."""
    f = r.final or {}
    ev = r.last_eval or {}
    layers = ev.get("layers") or []
    last_train = r.train[-1] if r.train else {}
    unit = "tokens_per_s" if r.is_lm else "images_per_s"
    ginis = [x["gini"] for x in layers if _finite(x.get("gini"))]
    row = {
        "run": r.name,
        "model": r.model_kind,
        "steps": f.get("step", last_train.get("step")),
        "params": f.get("params"),
        "val": f.get("val_ppl" if r.is_lm else "val_acc",
                     ev.get("val_ppl" if r.is_lm else "val_acc")),
        "test": f.get("test_ppl" if r.is_lm else "test_acc"),
        "throughput": f.get(unit, last_train.get(unit)),
        "gini": (sum(ginis) / len(ginis)) if ginis else None,
        "dead": sum(x["dead"] for x in layers if _finite(x.get("dead"))) if layers else None,
        "train_time_s": f.get("train_time_s", last_train.get("elapsed_s")),
    }
    return row


def markdown_table(runs: list[RunData]) -> str:
    rows = [summary_row(r) for r in runs]
    lm = [r.is_lm for r in runs]
    val_head = "val ppl" if all(lm) else "val acc" if not any(lm) else "val (ppl / acc)"
    test_head = "test ppl" if all(lm) else "test acc" if not any(lm) else "test (ppl / acc)"
    thr_head = "tokens/s" if all(lm) else "images/s" if not any(lm) else "items/s"
    head = ["run", "model", "steps", "params", val_head, test_head, thr_head, "train time (s)",
            "mean Gini", "dead experts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, row in zip(runs, rows, strict=True):
        metric = ".2f" if r.is_lm else ".4f"
        cells = [row["run"], row["model"], _fmt(row["steps"]), _fmt(row["params"]),
                 _fmt(row["val"], metric), _fmt(row["test"], metric),
                 _fmt(row["throughput"], ",.0f"), _fmt(row["train_time_s"], ".1f"),
                 _fmt(row["gini"], ".3f"), _fmt(row["dead"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def default_moe_table(runs: list[RunData]) -> list[str]:
    """Markdown lines: per Default MoE run and layer, the range of the experts' EMA β and
    their mean memory in tokens at the last evaluation (``method_summary``'s ``beta`` and
    ``horizon``); empty when no run recorded them."""
    rows = []
    for r in runs:
        for row in ((r.last_eval or {}).get("default_moe") or []):
            betas, horizons = row.get("beta"), row.get("horizon")
            if betas and horizons:
                rows.append(f"| {r.name} | {row['layer']} | {min(betas):.4f} – "
                            f"{max(betas):.4f} | {sum(horizons) / len(horizons):,.0f} |")
    if not rows:
        return []
    return ["", "Default MoE: each expert's EMA β at the last training step (1: not routed "
            "then) and its memory in tokens, n / (1 − β), at the last evaluation:", "",
            "| run | layer | β (min – max) | mean horizon (tokens) |", "|---|---|---|---|",
            *rows]


def make_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> Path:
    """Write the figures and ``report.md`` for ``run_dirs`` into ``out_dir`` (default: the
    run directory itself for one run, ``report/`` otherwise). Returns the path of report.md."""
    if not run_dirs:
        raise ValueError("make_report needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    _unique_names(runs)
    out = Path(out_dir) if out_dir is not None else (
        Path(run_dirs[0]) if len(runs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    figures: list[tuple[str, Path | None]] = [
        ("Loss and validation metric", plot_loss(plt, runs, out)),
        ("Gini of expert utilization by depth", plot_gini(plt, runs, out)),
        ("Router entropy over training", plot_entropy(plt, runs, out)),
    ]
    for r in runs:
        figures.append((f"Expert utilization: {r.name}", plot_utilization(plt, r, out)))
    figures.append(("Norm-ordered expert share (MomentumSMoE view)",
                    plot_norm_share(plt, runs, out)))
    lines = ["# moelab report", "", markdown_table(runs), "Runs:", ""]
    lines += [f"- `{r.name}`: {r.path}" for r in runs]
    notes = [n for r in runs for n in run_notes(r)]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += default_moe_table(runs)
    for title, path in figures:
        if path is not None:
            lines += ["", f"## {title}", "", f"![{title}]({path.name})"]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md
