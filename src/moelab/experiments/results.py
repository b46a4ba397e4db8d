"""From finished runs to a verdict: lr selection, per-arm summaries, claims, results.md/json.

``aggregate`` works on plain data (the experiment and its run outcomes) and returns a
JSON-ready dict; ``write_results`` writes ``results.json`` and ``results.md`` from it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moelab.experiments.runner import RunOutcome, outcome_dict
from moelab.experiments.spec import (
    Experiment,
    Metric,
    divergence,
    factorial_arm_name,
    factorial_factors,
    final_on_other_windows,
    target_curve,
)
from moelab.experiments.stats import (
    CENSORED_RULE,
    MULTIPLICITY_NOTE,
    VERDICT_RULE,
    bh_adjust,
    censored_difference,
    censored_verdict,
    combine_verdicts,
    escape_fraction,
    factorial_effects,
    paired_difference,
    pick_lr,
    steps_to_target,
    summarize,
    value_at,
    verdict,
)

__all__ = ["OLD_STEPS_RULE", "aggregate", "arm_key", "compare_arms", "factorial_result",
           "render_markdown", "verdict_rule", "write_results"]


def arm_key(source: str, arm: str, exp: Experiment) -> str:
    """How an arm is named in a result: ``arm``, or ``source/arm`` for analysed runs."""
    return arm if source == exp.name else f"{source}/{arm}"


def _records(o: RunOutcome) -> list[dict[str, Any]]:
    from moelab.runs.directory import read_metrics

    if o.status == "failed" or not Path(o.spec.run_dir).is_dir():
        return []
    return read_metrics(o.spec.run_dir)


def _value(metric: Metric, records: list[dict[str, Any]], val: bool = False,
           run: RunOutcome | None = None) -> Any:
    if not records:
        return None
    fn = metric.val if val else metric.test
    try:
        if fn is not None and metric.from_run:
            return None if run is None else fn(Path(run.spec.run_dir))
        return None if fn is None else fn(records)
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def _target_value(exp: Experiment, m: Metric, sel: dict[str, dict[str, Any]]
                  ) -> dict[str, dict[str, Any]]:
    """Per arm: its target (``Target``; None when no baseline run gives one), the baseline
    seeds it comes from and the baseline seeds left out (diverged; curve not covering the
    step, or on mixed windows)."""
    t = m.target
    assert t is not None
    out: dict[str, dict[str, Any]] = {}
    for arm in exp.arms:
        if t.value is not None:
            out[arm.name] = {"target": t.value, "from": [], "excluded_diverged": [],
                             "excluded_unreadable": []}
            continue
        base = sel.get(t.baseline_of(arm.name), {}).get("runs", {})
        vals, used, div, bad = [], [], [], []
        for seed, (o, r) in sorted(base.items()):
            if divergence(r, o.status) is not None:
                div.append(seed)
                continue
            planned = _planned_steps(o)
            try:
                v = None if planned is None else value_at(target_curve(r, t.key),
                                                          t.fraction * planned)
            except ValueError:
                v = None
            if v is None:
                bad.append(seed)
            else:
                vals.append(v)
                used.append(seed)
        s = summarize(vals)
        out[arm.name] = {"target": s.mean if s.n else None, "from": used,
                         "excluded_diverged": div, "excluded_unreadable": bad}
    return out


def _planned_steps(o: RunOutcome) -> float | None:
    """The run's ``train.steps`` (from its definition; None if that cannot be resolved)."""
    from moelab.experiments.runner import resolve_config

    try:
        return float(resolve_config(o.spec).train.steps)
    except (ValueError, FileNotFoundError, KeyError, TypeError):
        return None


def _steps_values(m: Metric, runs: Mapping[int, tuple[RunOutcome, list]],
                  target: float | None) -> tuple[dict[int, float | None], dict[str, Any]]:
    """Steps-to-target per seed and how each was read (``Target``): ``censored`` (never
    reached: at its last evaluated step; a diverged run at its planned final step),
    ``diverged``, ``other_final_windows`` (final evaluation left out of the curve: other
    windows) and ``refused`` (seed -> why no value: periodic evaluations on mixed windows).
    None for a run without an evaluation or without a target."""
    assert m.target is not None
    values: dict[int, float | None] = {}
    censored, diverged, other, refused = [], [], [], {}
    for seed, (o, records) in runs.items():
        try:
            curve = target_curve(records, m.target.key) if records else []
        except ValueError as e:
            values[seed] = None
            refused[str(seed)] = str(e)
            continue
        if records and final_on_other_windows(records, m.target.key):
            other.append(seed)
        if target is None or (not curve and o.status != "diverged"):
            values[seed] = None
            continue
        if divergence(records, o.status) is not None:
            planned = _planned_steps(o)
            values[seed] = planned if planned is not None else (curve[-1][0] if curve else None)
            censored.append(seed)
            diverged.append(seed)
            continue
        values[seed], cens = steps_to_target(curve, target, m.target.interpolate)
        if cens:
            censored.append(seed)
    return values, {"censored": sorted(censored), "diverged": sorted(diverged),
                    "other_final_windows": sorted(other), "refused": refused}


def _summary(values: Mapping[int, Any], per_layer: bool) -> Any:
    """ArmSummary dict, or a list of them (one per layer) for a per-layer metric."""
    if not per_layer:
        return summarize(list(values.values())).as_dict()
    lists = [v for v in values.values() if v]
    n_layers = max((len(v) for v in lists), default=0)
    return [summarize([v[i] for v in lists if len(v) > i]).as_dict() for i in range(n_layers)]


def _select(exp: Experiment, outcomes: Sequence[RunOutcome]) -> dict[str, dict[str, Any]]:
    """Per arm: the lr picked on validation (primary metric) and its runs at that lr."""
    by_arm: dict[str, dict[Any, list[tuple[RunOutcome, list]]]] = {}
    for o in outcomes:
        by_arm.setdefault(o.spec.arm, {}).setdefault(o.spec.lr, []).append((o, _records(o)))
    out: dict[str, dict[str, Any]] = {}
    m = exp.metric
    for arm in exp.arms:
        grid = by_arm.get(arm.name, {})
        selection = []
        val_by_lr = {}
        for lr, runs in sorted(grid.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            vals = [_value(m, r, val=True, run=o) for o, r in runs]
            val_by_lr[lr] = vals
            selection.append({"lr": lr, **summarize(vals).as_dict()})
        chosen = None
        if len(grid) == 1:
            chosen = next(iter(grid))
        elif grid and m.val is not None:
            try:
                chosen = pick_lr(val_by_lr, m.higher_is_better)
            except ValueError:
                chosen = None
        runs = grid.get(chosen, []) if (chosen is not None or None in grid) else []
        out[arm.name] = {"lr": chosen, "lr_selection": selection if len(grid) > 1 else [],
                         "runs": {o.spec.seed: (o, r) for o, r in runs}, "all": grid}
    return out


def _arm_result(exp: Experiment, source: str, arm: str, sel: dict[str, Any],
                chance: float | None,
                targets: Mapping[str, Mapping[str, float | None]] | None = None
                ) -> dict[str, Any]:
    runs = sel["runs"]
    res: dict[str, Any] = {"key": arm_key(source, arm, exp), "source": source, "arm": arm,
                           "lr": sel["lr"], "lr_selection": sel["lr_selection"],
                           "seeds": sorted(runs), "metrics": {},
                           "run_dirs": {str(s): o.spec.run_dir for s, (o, _) in
                                        sorted(runs.items()) if o.ok}}
    for m in exp.metrics:
        extra: dict[str, Any] = {}
        if m.target is not None:
            tv = (targets or {}).get(m.name, {}).get(arm) or {"target": None}
            values, how = _steps_values(m, runs, tv["target"])
            extra = {"target": tv["target"], "rule": m.target.describe(),
                     "target_from": tv.get("from", []),
                     "target_excluded_diverged": tv.get("excluded_diverged", []),
                     "target_excluded_unreadable": tv.get("excluded_unreadable", []), **how}
        else:
            values = {s: _value(m, r, run=o) for s, (o, r) in runs.items()}
        res["metrics"][m.name] = {"per_seed": {str(s): v for s, v in sorted(values.items())},
                                  "summary": _summary(values, m.per_layer), **extra}
    if exp.report_divergence:
        res["divergence"] = _divergence_by_lr(sel.get("all", {}))
    if chance is not None and not exp.metric.per_layer:
        vals = list(res["metrics"][exp.metric.name]["per_seed"].values())
        frac, n = escape_fraction(vals, chance)
        res["escape"] = {"fraction": frac, "n": n, "threshold": chance + 0.10}
    return res


def _picked_arm(exp: Experiment, name: str, cands: Sequence[str],
                selected: Mapping[str, dict[str, Any]], arms: list[dict[str, Any]]
                ) -> dict[str, Any]:
    """The pseudo-arm ``name``: a copy of the result of the candidate with the best mean
    validation value of the primary metric (``Experiment.picks``), with ``picked`` = that
    arm and every candidate's validation summary. No candidate with a validation value: no
    runs (its claims get no verdict)."""
    m = exp.metric
    val = [{"arm": a, **summarize([_value(m, r, val=True, run=o) for o, r in
                                   selected[a]["runs"].values()]).as_dict()} for a in cands]
    ok = [v for v in val if v["n"] and math.isfinite(v["mean"])]
    best = (max if m.higher_is_better else min)(ok, key=lambda v: v["mean"])["arm"] \
        if ok else None
    by_name = {a["arm"]: a for a in arms}
    if best is None:
        empty = {mm.name: {"per_seed": {}, "summary": summarize([]).as_dict()}
                 for mm in exp.metrics}
        base = {"lr": None, "lr_selection": [], "seeds": [], "metrics": empty, "run_dirs": {}}
    else:
        base = by_name[best]
    return {**base, "key": arm_key(exp.name, name, exp), "arm": name,
            "picked": {"arm": best, "candidates": list(cands), "validation": val}}


def _divergence_by_lr(grid: Mapping[Any, list[tuple[RunOutcome, list]]]) -> list[dict]:
    """Per lr of the arm: runs, diverged runs (``spec.divergence``, with the reason per seed)
    and failed runs (other errors; not counted as diverged)."""
    out = []
    for lr, runs in sorted(grid.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        why = {o.spec.seed: divergence(r, o.status) for o, r in runs}
        out.append({"lr": lr, "n": len(runs),
                    "diverged": sum(1 for w in why.values() if w),
                    "failed": sum(1 for o, _ in runs if o.status == "failed"),
                    "reasons": {str(s): w for s, w in sorted(why.items()) if w}})
    return out


def factorial_result(exp: Experiment, arms: list[dict[str, Any]]) -> dict[str, Any]:
    """Main effects and interactions of every non-per-layer metric (``stats``). For a
    steps-to-target metric, the main effect of a factor that changes the target (e.g. the
    sparsity, each with its own Top-K target) is left out: it would compare steps to
    different targets. Its interactions, differences of within-target gains, are kept."""
    out: dict[str, Any] = {"factors": list(exp.factors), "metrics": {}}
    for m in exp.metrics:
        if m.per_layer:
            continue
        cells = {factorial_factors(a["arm"], exp.factors): _per_seed(a, m.name) for a in arms}
        effects = [e.as_dict() for e in factorial_effects(cells, exp.factors)]
        if m.target is not None:
            moves = _target_factors(exp, m)
            effects = [e for e in effects if not (len(e["factors"]) == 1
                                                  and e["factors"][0] in moves)]
            if moves:
                out.setdefault("omitted", {})[m.name] = sorted(moves)
        out["metrics"][m.name] = effects
    return out


def _target_factors(exp: Experiment, m: Metric) -> set[str]:
    """The factors whose switch changes an arm's steps-to-target target."""
    assert m.target is not None
    names = {a.name for a in exp.arms}
    moves = set()
    for a in names:
        on = factorial_factors(a, exp.factors)
        for f in exp.factors:
            b = factorial_arm_name(on ^ {f}, exp.factors)
            if b in names and not m.target.shared(a, b):
                moves.add(f)
    return moves


def _per_seed(arm_res: dict[str, Any], metric: str) -> dict[int, Any]:
    return {int(s): v for s, v in arm_res["metrics"][metric]["per_seed"].items()}


def _compare_steps(a: Mapping[str, Any], b: Mapping[str, Any], m: Metric,
                   direction: str) -> dict[str, Any]:
    """A steps-to-target comparison of two arms' results: censored pairs handled by
    ``stats.censored_difference`` (a page written before that rule, whose metric has no
    ``rule``, keeps the old plain paired difference: ``"rule": "old"``)."""
    xa, xb = a["metrics"][m.name], b["metrics"][m.name]
    pa, pb = _per_seed(a, m.name), _per_seed(b, m.name)
    if "rule" not in xa:
        return {**_compare(pa, pb, m, direction), "rule": "old"}
    d, pairs = censored_difference(pa, pb, xa.get("censored", []), xb.get("censored", []))
    return {**d.as_dict(), "pairs": pairs.as_dict(),
            "verdict": censored_verdict(d, pairs, direction)}


def _compare(a: dict[int, Any], b: dict[int, Any], m: Metric, direction: str,
             margin: float = 0.0) -> dict[str, Any]:
    if margin:  # non-inferiority: the difference tested against margin x the baseline's mean
        bound = margin * abs(summarize(list(b.values())).mean) * (
            1.0 if direction == "lower" else -1.0)
        d = paired_difference({s: None if v is None else v - bound for s, v in a.items()}, b)
        out = {**d.as_dict(), "verdict": verdict(d, direction), "margin": margin,
               "bound": bound}
        for k in ("mean", "ci_low", "ci_high"):
            out[k] = out[k] + bound
        return out
    if not m.per_layer:
        d = paired_difference(a, b)
        return {**d.as_dict(), "verdict": verdict(d, direction)}
    n_layers = min((len(v) for v in list(a.values()) + list(b.values()) if v), default=0)
    layers = []
    for i in range(n_layers):
        d = paired_difference({s: v[i] for s, v in a.items() if v},
                              {s: v[i] for s, v in b.items() if v})
        layers.append({"layer": i, **d.as_dict(), "verdict": verdict(d, direction)})
    return {"per_layer": layers, "verdict": combine_verdicts([x["verdict"] for x in layers])}


def _p_rows(claims: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the claims table that carry a p-value: each claim, or each of its layers."""
    return [x for c in claims for x in (c["per_layer"] if "per_layer" in c else [c])]


def _add_bh(claims: list[dict[str, Any]]) -> None:
    """Adds ``p_bh`` (Benjamini-Hochberg over every p-value of the claims table) to each row."""
    rows = _p_rows(claims)
    for x, a in zip(rows, bh_adjust([x.get("p_value") for x in rows]), strict=True):
        x["p_bh"] = a


def aggregate(exp: Experiment, outcomes: Sequence[RunOutcome],
              sources: Mapping[str, tuple[Experiment, Sequence[RunOutcome]]] | None = None
              ) -> dict[str, Any]:
    """Selection, summaries and claim verdicts of ``exp``.

    For an experiment with ``sources``, ``sources[name] = (experiment, its outcomes)``: each
    source arm's runs are taken at the lr that source selected.
    """
    arms: list[dict[str, Any]] = []
    if exp.sources:
        if sources is None or any(s not in sources for s in exp.sources):
            raise ValueError(f"{exp.name} needs the runs of {exp.sources}")
        for name in exp.sources:
            src_exp, src_out = sources[name]
            for arm, sel in _select(src_exp, src_out).items():
                arms.append(_arm_result(exp, name, arm, sel, None))
        all_outcomes = [o for name in exp.sources for o in sources[name][1]]
    else:
        selected = _select(exp, outcomes)
        targets = {m.name: _target_value(exp, m, selected) for m in exp.metrics
                   if m.target is not None}
        for arm, sel in selected.items():
            arms.append(_arm_result(exp, exp.name, arm, sel, exp.chance, targets))
        arms += [_picked_arm(exp, name, cands, selected, arms)
                 for name, cands in exp.picks.items()]
        all_outcomes = list(outcomes)
    claims = compare_arms(exp, arms)
    failed = [{"run": o.spec.label, "run_dir": o.spec.run_dir, "error": o.error}
              for o in all_outcomes if o.status == "failed"]
    extra = {"factorial": factorial_result(exp, arms)} if exp.factors else {}
    return {"arms": arms, "claims": claims, "failed": failed, **extra,
            "runs": [outcome_dict(o) for o in outcomes],
            "data_sources": sorted({o.data_source for o in all_outcomes if o.data_source})}


def compare_arms(exp: Experiment, arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """From the arms' per-seed values alone: each arm's Δ vs the first arm (``vs_first``,
    set in ``arms``) and the claims with verdicts and Benjamini-Hochberg p (returned)."""
    by_key = {a["key"]: a for a in arms}

    # every arm vs the first arm (same lr grid), on the primary metric
    m0 = exp.metric
    if not exp.sources and not m0.per_layer:
        first = exp.arms[0]
        for a in arms[1:]:
            if "picked" in a:
                continue  # the picked arm's own row has it
            if m0.target is not None and not m0.target.shared(a["arm"], first.name):
                continue  # steps to different targets do not compare
            if exp.arm(a["arm"]).lr_grid == first.lr_grid:
                how = "higher" if m0.higher_is_better else "lower"
                cmp = (_compare_steps(a, by_key[first.name], m0, how) if m0.target is not None
                       else _compare(_per_seed(a, m0.name),
                                     _per_seed(by_key[first.name], m0.name), m0, how))
                a["vs_first"] = {"baseline": first.name, **cmp}

    claims = []
    for c in exp.claims:
        m = exp.metric_named(c.metric)
        src = c.source or exp.name
        ka, kb = arm_key(src, c.arm, exp), arm_key(src, c.baseline, exp)
        if ka not in by_key or kb not in by_key:
            raise ValueError(f"{exp.name}: claim {c.arm} vs {c.baseline}: arm not in {src}")
        cmp = (_compare_steps(by_key[ka], by_key[kb], m, c.direction) if m.target is not None
               else _compare(_per_seed(by_key[ka], m.name), _per_seed(by_key[kb], m.name), m,
                             c.direction, c.margin))
        claims.append({"text": c.text or f"{c.arm} {c.direction} than {c.baseline}",
                       "arm": ka, "baseline": kb, "metric": m.name, "direction": c.direction,
                       **cmp})
    _add_bh(claims)
    return claims


# ------------------------------------------------------------------------------ writing


NONINFERIORITY_RULE = (
    "Non-inferiority claims (those with a bound): the bound is the margin times the "
    "baseline's mean; *supported*: the whole 95% CI of Δ lies on the claimed side of the bound "
    "(the arm is worse by less than the margin); *contradicted*: the whole CI lies beyond it; "
    "*inconclusive* otherwise. Their p-value tests Δ = bound.")


def _f(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec)


def _ms(s: Mapping[str, Any], pct: bool) -> str:
    scale, spec = (100.0, ".2f") if pct else (1.0, ".4f")
    if not s["n"]:
        return "– (no finished run)"
    mean = _f(s["mean"] * scale, spec)
    std = _f(s["std"] * scale, spec) if s["n"] > 1 else "–"
    return f"{mean} ± {std}"


def _is_pct(name: str) -> bool:
    return name.endswith("_acc")


def _diff(d: Mapping[str, Any], pct: bool) -> tuple[str, str, str]:
    scale, spec = (100.0, "+.2f") if pct else (1.0, "+.4f")
    mean = _f(d["mean"] * scale if d.get("mean") is not None else None, spec)
    lo, hi = d.get("ci_low"), d.get("ci_high")
    ci = (f"[{_f(lo * scale, spec)}, {_f(hi * scale, spec)}]"
          if lo is not None and hi is not None and math.isfinite(lo) else "–")
    return mean, ci, _f(d.get("p_value"), ".3g")


def render_markdown(exp: Experiment, res: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """results.md text: setting, per-arm table, claims with verdicts, rule, provenance."""
    L: list[str] = [f"# {exp.name}", "", f"**Claim** ({exp.paper}): {exp.claim}", ""]
    L += [_profile_line(exp, res, meta),
          f"- Dataset actually used: {', '.join(res['data_sources']) or meta.get('data', '–')}",
          _base_line(exp, meta)]
    if exp.notes and meta["profile"] == "full":
        L.append(f"- Notes: {exp.notes}")
    elif exp.notes:
        L.append(f"- Profile `{meta['profile']}`: a smoke test of the pipeline; its numbers are "
                 f"not evidence. The notes below describe the full profile's setting.")
        L.append(f"- Notes (full profile): {exp.notes}")
    L.append("")
    primary = exp.metric
    if not exp.sources:
        pct = _is_pct(primary.name)
        unit = " (%)" if pct else ""
        L += ["## Results", "",
              f"{primary.label}{unit}: mean ± std over seeds at each arm's lr (picked on "
              "validation); Δ = paired same-seed difference vs the first arm with its 95% "
              "Student-t CI and paired-t p-value.", ""]
        head = "| arm | overrides | lr | " + primary.label + unit + " | n | Δ vs " \
            + exp.arms[0].name + " | 95% CI | p |"
        if exp.chance is not None:
            head += " escaped |"
        L += [head, "|" + "---|" * (head.count("|") - 1)]
        for a in res["arms"]:
            s = a["metrics"][primary.name]["summary"]
            ov = (f"= **{a['picked']['arm']}** (best mean validation of "
                  f"{', '.join(a['picked']['candidates'])})" if "picked" in a else
                  " ".join(f"`{o}`" for o in exp.arm(a["arm"]).overrides) or "–")
            d = a.get("vs_first")
            mean, ci, p = _diff(d, pct) if d else ("–", "–", "–")
            row = (f"| {a['arm']} | {ov} | {_f(a['lr'], 'g')} | {_ms(s, pct)} | {s['n']} | "
                   f"{mean} | {ci} | {p} |")
            if exp.chance is not None:
                e = a.get("escape", {})
                row += f" {_f(e.get('fraction'), '.0%')} of {e.get('n', 0)} |"
            L.append(row)
        if exp.chance is not None:
            L += ["", f"Escaped: share of seeds with test accuracy > chance "
                  f"({exp.chance:.0%}) + 10 points."]
        if primary.target is not None:
            L += ["", f"Δ only for arms with the same target as {exp.arms[0].name} (steps to "
                  "different targets do not compare; the claims pair each arm with its own "
                  "baseline)."]
        L.append("")
    else:
        for m in exp.metrics:
            L += [f"## {m.label}", ""]
            if m.per_layer:
                n = max((len(a["metrics"][m.name]["summary"]) for a in res["arms"]), default=0)
                head = "| arm | lr | " + " | ".join(f"layer {i}" for i in range(n)) + " |"
                L += [head, "|" + "---|" * (n + 2)]
                for a in res["arms"]:
                    cells = [_ms(s, False) for s in a["metrics"][m.name]["summary"]]
                    cells += ["–"] * (n - len(cells))
                    L.append(f"| {a['key']} | {_f(a['lr'], 'g')} | " + " | ".join(cells) + " |")
            else:
                L += ["| arm | lr | mean ± std | n |", "|---|---|---|---|"]
                for a in res["arms"]:
                    s = a["metrics"][m.name]["summary"]
                    L.append(f"| {a['key']} | {_f(a['lr'], 'g')} | {_ms(s, False)} | {s['n']} |")
            L.append("")
    if not exp.sources:
        L += _render_extra(exp, res)
    elif exp.extra_sections is not None:
        L += exp.extra_sections(res)
    n_p = sum(1 for x in _p_rows(res["claims"])
              if x.get("p_bh") is not None and math.isfinite(x["p_bh"]))
    bh = n_p > 1  # one p-value needs no adjustment

    def p_cells(x: Mapping[str, Any], p: str) -> str:
        return f"{p} | {_f(x.get('p_bh'), '.3g')}" if bh else p

    L += ["## Claims", "", "| claim | metric | Δ (arm − baseline) | 95% CI | p | "
          + ("p (BH) | " if bh else "") + "n | verdict |", "|" + "---|" * (8 if bh else 7)]
    for c in res["claims"]:
        pct = _is_pct(c["metric"])
        if "per_layer" in c:
            for x in c["per_layer"]:
                mean, ci, p = _diff(x, pct)
                L.append(f"| {c['text']} (layer {x['layer']}) | {c['metric']} | {mean} | {ci} | "
                         f"{p_cells(x, p)} | {x['n']} | {x['verdict']} |")
            L.append(f"| **{c['text']}** (all layers) | {c['metric']} | | | | "
                     + ("| " if bh else "") + f"| **{c['verdict']}** |")
        else:
            mean, ci, p = _diff(c, pct)
            text = c["text"] + (f" (bound: Δ {'<' if c['direction'] == 'lower' else '>'} "
                                f"{_f(c['bound'], '+.4f')})" if c.get("margin") else "")
            L.append(f"| {text} | {c['metric']} | {mean} | {ci} | {p_cells(c, p)} | "
                     f"{c['n']} | **{c['verdict']}** |")
    L += ["", VERDICT_RULE + (" Accuracy differences are in percentage points."
                              if any(_is_pct(c["metric"]) for c in res["claims"]) else ""), ""]
    L += _steps_claim_lines(res["claims"])
    if any(c.get("margin") for c in res["claims"]):
        L += [NONINFERIORITY_RULE, ""]
    if bh:
        L += [MULTIPLICITY_NOTE.format(n=n_p), ""]
    picks = [a for a in res["arms"] if "picked" in a]
    if picks:
        L += ["## Picked on validation", "", f"Each pseudo-arm is its candidate with the best "
              f"mean validation {primary.name.replace('test_', '')} (test not read for the "
              "pick).", "", "| pseudo-arm | candidate | validation mean ± std | n |",
              "|---|---|---|---|"]
        for a in picks:
            for v in a["picked"]["validation"]:
                name = f"**{v['arm']}**" if v["arm"] == a["picked"]["arm"] else v["arm"]
                L.append(f"| {a['arm']} | {name} | {_ms(v, False)} | {v['n']} |")
        L.append("")
    sel = [a for a in res["arms"] if a["lr_selection"]]
    if sel:
        L += ["## Learning-rate selection (validation)", "",
              f"Every arm trained at each lr of its grid; the lr with the best mean validation "
              f"{primary.name.replace('test_', '')} is reported (on test) above.", "",
              "| arm | lr | validation mean ± std | n |", "|---|---|---|---|"]
        for a in sel:
            for x in a["lr_selection"]:
                mark = " (picked)" if x["lr"] == a["lr"] else ""
                L.append(f"| {a['key']} | {_f(x['lr'], 'g')}{mark} | "
                         f"{_ms(x, _is_pct(primary.name))} | {x['n']} |")
        L.append("")
    if res["failed"]:
        L += ["## Failed runs", ""]
        L += [f"- {f['run']}: {f['error']} (`{f['run_dir']}/reproduce.json`)"
              for f in res["failed"]]
        L.append("")
    if meta.get("plots"):
        L += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in meta["plots"]]
        L.append("")
    L += ["## Provenance", "", f"- Command: `{meta['command']}`",
          f"- torch {meta['torch']}, Python {meta['python']}, moelab {meta['moelab']}",
          f"- Machine: {meta['machine']}", _wall_line(meta, exp.name, len(res["failed"])),
          f"- Finished: {meta['finished']}", ""]
    return "\n".join(L)


def _seed_list(seeds: Sequence[int]) -> str:
    if seeds and list(seeds) == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
    return ", ".join(map(str, seeds))


def _profile_line(exp: Experiment, res: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """``- Profile: ..., seeds: ...``: the seeds of the runs the page's arms hold (not the
    profile's number, which an analysis-only page does not use)."""
    seeds = sorted({int(s) for a in res["arms"] for s in a.get("seeds", [])})
    counts = sorted({len(a.get("seeds", [])) for a in res["arms"]})
    text = f"{len(seeds)} ({_seed_list(seeds)})" if seeds else "none finished"
    if len(counts) > 1:
        text += f"; {counts[0]}–{counts[-1]} per arm (n in the tables)"
    if exp.sources:
        return (f"- Profile: `{meta['profile']}` of the runs analysed, seeds: {text}")
    return f"- Profile: `{meta['profile']}`, seeds: {text}"


def _base_line(exp: Experiment, meta: Mapping[str, Any]) -> str:
    """``- Base config: ...``; for an analysis-only page, the base configs of its sources."""
    if not exp.sources:
        return (f"- Base config: `{exp.base}` with overrides: "
                + (", ".join(f"`{o}`" for o in meta.get("overrides", [])) or "none"))
    from moelab.experiments.registry import EXPERIMENTS

    bases = [f"{n} (`{EXPERIMENTS[n].base}`)" if n in EXPERIMENTS else n for n in exp.sources]
    return ("- Base config: none of its own (trains nothing); the runs analysed are those of "
            + ", ".join(bases))


def _wall_line(meta: Mapping[str, Any], name: str, n_failed: int) -> str:
    """Provenance line on time: this experiment's own run time and evaluation time, and the
    wall time of the invocation it ran in (shared with the others named). Pages written
    before these fields existed have only ``wall_s``."""
    if "invocation_wall_s" not in meta:
        return (f"- Time: {meta.get('wall_s', 0.0):.0f} s wall ({meta.get('n_run', 0)} runs "
                f"trained, {meta.get('n_skipped', 0)} already done, {n_failed} failed)")
    others = [n for n in meta["invocation_experiments"] if n != name]
    shared = f", shared with {', '.join(others)}" if others else ""
    return (f"- Time: this experiment's runs {meta['runs_wall_s']:.0f} s summed over runs "
            f"(jobs {meta['jobs']}; a run finished by an earlier invocation counts its own "
            f"training time), result evaluation {meta['aggregate_wall_s']:.0f} s; "
            f"invocation wall time {meta['invocation_wall_s']:.0f} s{shared} "
            f"({meta['n_run']} runs trained or resumed, {meta['n_skipped']} already done, "
            f"{n_failed} failed)")


def _render_extra(exp: Experiment, res: Mapping[str, Any]) -> list[str]:
    """results.md sections for the other metrics, steps-to-target targets and censoring,
    divergence counts and factorial effects (each only when the experiment has them)."""
    L: list[str] = []
    others = [m for m in exp.metrics[1:] if not m.per_layer]
    if others:
        L += ["## Other metrics", "", "mean ± std over seeds (n) at each arm's lr.", "",
              "| arm | " + " | ".join(m.label for m in others) + " |",
              "|---|" + "---|" * len(others)]
        for a in res["arms"]:
            cells = []
            for m in others:
                s = a["metrics"][m.name]["summary"]
                cells.append(f"{_ms(s, _is_pct(m.name))} ({s['n']})")
            L.append(f"| {a['arm']} | " + " | ".join(cells) + " |")
        L.append("")
    if exp.extra_sections is not None:
        L += exp.extra_sections(res)
    for m in exp.metrics:
        if m.target is not None:
            L += _targets_section(exp, m, res)
    if exp.report_divergence:
        L += ["## Divergence", "",
              "Diverged: stopped at a non-finite loss, or finished with a non-finite final "
              "validation loss or one more than 5% above the initial training loss (a run "
              "that ended near its initial loss did not learn; it did not diverge). Diverged "
              "runs are an outcome, not a failure; they have no metric value when they "
              "stopped early.", "",
              "| arm | lr | diverged | of n | failed (other errors) | reasons |",
              "|---|---|---|---|---|---|"]
        for a in res["arms"]:
            for d in a.get("divergence", []):
                why = "; ".join(f"s{k}: {v}" for k, v in d["reasons"].items()) or "–"
                L.append(f"| {a['arm']} | {_f(d['lr'], 'g')} | {d['diverged']} | {d['n']} | "
                         f"{d['failed']} | {why} |")
        L.append("")
    fac = res.get("factorial")
    if fac:
        L += ["## Factorial effects", "",
              "Per seed (seeds with every cell finished): main effect = mean over the cells "
              "with the factor on − mean over those with it off; A × B = half of [A's effect "
              "with B on − A's effect with B off]; additivity gap = (all on − none) − Σ (one "
              "on − none): 0 when the single gains add up. Mean with 95% Student-t CI over "
              "seeds; an interaction whose CI excludes 0 means the methods do not add.", ""]
        for name, effects in fac["metrics"].items():
            pct = _is_pct(name)
            L += [f"### {exp.metric_named(name).label}", ""]
            omitted = fac.get("omitted", {}).get(name)
            if omitted:
                L += [f"Main effect of {', '.join(omitted)} left out: switching it changes the "
                      "target, and steps to different targets do not compare.", ""]
            L += ["| effect | mean | 95% CI | p | n |", "|---|---|---|---|---|"]
            for e in effects:
                mean, ci, p = _diff(e, pct)
                L.append(f"| {e['name']} | {mean} | {ci} | {p} | {e['n']} |")
            L.append("")
    return L


OLD_STEPS_RULE = (
    "**This page uses the old steps-to-target rule** (its runs were not rerun): the target "
    "was the baseline arm's mean *final* validation loss, diverged baseline runs included, "
    "so the baseline's own slower runs never reach it; a run that never reached it counted "
    "at its last evaluated step as if it had got there then, so an arm that never gets there "
    "looks like one that got there last. The current rule (docs/REPRODUCE.md, "
    "'Steps to a target') needs each run's validation curve, which results.json does not "
    "hold; rerun the experiment to apply it.")


def _steps_claim_lines(claims: Sequence[Mapping[str, Any]]) -> list[str]:
    """Under the claims table: the censoring rule and each steps claim's pairs, or the old
    rule's warning."""
    steps = [c for c in claims if "pairs" in c]
    old = [c for c in claims if c.get("rule") == "old"]
    L: list[str] = []
    if steps:
        L += [CENSORED_RULE, ""]
        for c in steps:
            p = c["pairs"]
            L.append(f"- {c['text']}: {p['both']} pairs both reached the target, "
                     f"{p['arm_censored']} with only the arm's run censored, "
                     f"{p['baseline_censored']} with only the baseline's, {p['neither']} "
                     "where neither reached it (left out)")
        L.append("")
    if old:
        L += [OLD_STEPS_RULE, ""]
    return L


def _targets_section(exp: Experiment, m: Metric, res: Mapping[str, Any]) -> list[str]:
    """``## <label>: targets and censoring``: the rule, per arm its target, where it comes
    from and what was censored; a loud warning when windows differ or a run was refused."""
    assert m.target is not None
    xs = {a["arm"]: a["metrics"][m.name] for a in res["arms"]}
    L = [f"## {m.label}: targets and censoring", ""]
    if any("rule" not in x for x in xs.values()):
        L += [OLD_STEPS_RULE, "", "| arm | baseline | target | reached | censored seeds | "
              "diverged seeds |", "|---|---|---|---|---|---|"]
        for arm, x in xs.items():
            n = sum(1 for v in x["per_seed"].values() if v is not None)
            cens = x.get("censored", [])
            L.append(f"| {arm} | {m.target.baseline_of(arm)} | {_f(x.get('target'))} | "
                     f"{n - len(cens)} of {n} | {', '.join(map(str, cens)) or '–'} | "
                     f"{', '.join(map(str, x.get('diverged', []))) or '–'} |")
        return L + [""]
    how = ("linearly interpolated between the two evaluations around the crossing"
           if m.target.interpolate else "the first evaluation step at or below it")
    L += [f"Target of each arm: {m.target.describe()}; fixed by the definition before any "
          f"run. Curve: the periodic validation evaluations, all on one set of windows, plus "
          f"the final evaluation when it used the same windows. Steps: {how}. A run that "
          "never reaches its target is censored at its last evaluated step (a diverged run at "
          "its planned final step); claims handle censored pairs as stated under Claims. "
          "Only arms with the same target are compared.", ""]
    other = sorted({f"{a}/s{s}" for a, x in xs.items() for s in x.get("other_final_windows", [])})
    if other:
        L += [f"> **Warning: windows.** The final evaluation of {len(other)} run(s) used other "
              "windows than the periodic ones; it is left out of their curves, which end at "
              "the last periodic evaluation (give data.final_eval_batches = "
              "data.eval_batches to include it).", ""]
    refused = [f"{a}/s{s}: {why}" for a, x in xs.items() for s, why in x.get("refused", {}).items()]
    if refused:
        L += ["> **Refused:** no steps-to-target value for " + "; ".join(refused), ""]
    L += ["| arm | baseline | target | from baseline seeds | left out of the target | reached "
          "| censored seeds | diverged seeds |", "|---|---|---|---|---|---|---|---|"]
    for arm, x in xs.items():
        n = sum(1 for v in x["per_seed"].values() if v is not None)
        cens = x.get("censored", [])
        out = [f"{s} (diverged)" for s in x.get("target_excluded_diverged", [])]
        out += [f"{s} (curve does not cover the step)"
                for s in x.get("target_excluded_unreadable", [])]
        src = ", ".join(map(str, x.get("target_from", []))) or (
            "fixed" if m.target.value is not None else "–")
        L.append(f"| {arm} | {m.target.baseline_of(arm)} | {_f(x.get('target'))} | {src} | "
                 f"{', '.join(out) or '–'} | {n - len(cens)} of {n} | "
                 f"{', '.join(map(str, cens)) or '–'} | "
                 f"{', '.join(map(str, x.get('diverged', []))) or '–'} |")
    return L + [""]


def verdict_rule(exp: Experiment, old_steps: bool = False) -> str:
    """The verdict rule text of ``exp``'s results (the censoring rule added for a
    steps-to-target metric; ``old_steps``: a page on the old steps rule says so instead)."""
    if old_steps:
        return VERDICT_RULE + " " + OLD_STEPS_RULE.replace("**", "")
    if any(m.target is not None for m in exp.metrics):
        return VERDICT_RULE + " " + CENSORED_RULE
    return VERDICT_RULE


def write_results(out_dir: Path, exp: Experiment, res: Mapping[str, Any],
                  meta: Mapping[str, Any]) -> Path:
    """Write ``results.json`` and ``results.md`` into ``out_dir``; returns results.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {"name": exp.name, "claim": exp.claim, "paper": exp.paper, "base": exp.base,
            "notes": exp.notes, "sources": list(exp.sources),
            "arms": [{"name": a.name, "overrides": list(a.overrides),
                      "lr_grid": list(a.lr_grid or exp.lr_grid or [])} for a in exp.arms],
            "metrics": [{"name": m.name, "label": m.label,
                         "higher_is_better": m.higher_is_better} for m in exp.metrics],
            "claims": [{"arm": c.arm, "baseline": c.baseline, "direction": c.direction,
                        "metric": c.metric or exp.metric.name, "source": c.source,
                        "text": c.text} for c in exp.claims]}
    doc = {"experiment": spec, "meta": dict(meta), **res, "verdict_rule": verdict_rule(exp)}
    (out_dir / "results.json").write_text(json.dumps(_clean(doc), indent=1) + "\n",
                                          encoding="utf-8")
    md = out_dir / "results.md"
    md.write_text(render_markdown(exp, res, meta), encoding="utf-8")
    return md


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x
