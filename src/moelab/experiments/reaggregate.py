"""Recompute a committed results page from the per-seed values stored in its results.json.

    python -m moelab.experiments.reaggregate docs/results/reproduce/NAME [...]

Nothing is rerun: the claims (paired differences, CIs, p-values, verdicts, Benjamini-Hochberg
``p_bh`` over the table), each arm's Δ vs the first arm and the factorial effects are
computed again with today's rules from ``arms[*].metrics[*].per_seed``, checked against the
stored numbers (means, CIs, p-values and verdicts must agree; a change of rule that alters
one is reported, not hidden), and written back. In results.md only the generated sections
that depend on them are replaced (Results, Claims, steps-to-target targets, Factorial
effects); notes added by hand stay, and Provenance gets a line saying what was redone. The
rule text stored in results.json (``verdict_rule``) is refreshed.

A steps-to-target page written before the current rule (its metric has no ``rule``: the
target was the baseline's mean final loss) cannot be recomputed: that needs each run's
validation curve. Its claims keep the old plain paired difference, its labels and claim texts
stay the stored ones, and the page says plainly that it uses the old rule
(``results.OLD_STEPS_RULE``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moelab.experiments.registry import get_experiment
from moelab.experiments.results import (
    _clean,
    compare_arms,
    factorial_result,
    render_markdown,
    verdict_rule,
)
from moelab.experiments.spec import Experiment
from moelab.experiments.stats import NOT_ENOUGH

__all__ = ["as_stored", "old_steps_metrics", "reaggregate", "splice_sections"]

_FIELDS = ("mean", "ci_low", "ci_high", "p_value")


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return (a is None or not math.isfinite(a)) and (b is None or not math.isfinite(b))
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _rows(c: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(c["per_layer"]) if "per_layer" in c else [c]


def _compare_to_stored(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]
                       ) -> list[str]:
    """What differs between stored and recomputed claims (empty: nothing). A verdict that
    became ``not enough runs`` (n < 2) is the new rule, listed separately by the caller."""
    if [c["text"] for c in old] != [c["text"] for c in new]:
        return ["the claims are not the ones of the current definition"]
    out = []
    for o, n in zip(old, new, strict=True):
        for i, (ro, rn) in enumerate(zip(_rows(o), _rows(n), strict=True)):
            where = o["text"] + (f" (layer {i})" if "per_layer" in o else "")
            bad = [f for f in _FIELDS if not _close(ro.get(f), rn.get(f))]
            if bad:
                out.append(f"{where}: {', '.join(bad)} differ")
            if ro["verdict"] != rn["verdict"] and rn["verdict"] != NOT_ENOUGH:
                out.append(f"{where}: verdict {ro['verdict']} -> {rn['verdict']}")
    return out


def splice_sections(old_md: str, new_md: str, headings: Sequence[str]) -> str:
    """``old_md`` with each ``## heading`` section (up to the next ``## ``) replaced by the
    same section of ``new_md`` (a section new_md lacks is removed; one old_md lacks is
    inserted before ``## Claims``)."""
    def sections(text: str) -> dict[str, str]:
        parts = re.split(r"(?m)^(?=## )", text)
        return {p.splitlines()[0]: p for p in parts if p.startswith("## ")}

    old, new = sections(old_md), sections(new_md)
    out = old_md
    for h in headings:
        key = f"## {h}"
        if key in old:
            out = out.replace(old[key], new.get(key, ""), 1)
        elif key in new:
            out = out.replace("## Claims\n", new[key] + "## Claims\n", 1)
    return out


def old_steps_metrics(doc: Mapping[str, Any]) -> set[str]:
    """The steps-to-target metrics that the stored page computed with the old rule."""
    return {name for a in doc["arms"] for name, x in a["metrics"].items()
            if "censored" in x and "rule" not in x}


def as_stored(exp: Experiment, doc: Mapping[str, Any], old: set[str]) -> Experiment:
    """``exp`` with the stored labels and claim texts of the old-rule metrics ``old`` (their
    numbers follow the old definition, so the words must too)."""
    if not old:
        return exp
    labels = {m["name"]: m["label"] for m in doc["experiment"]["metrics"]}
    metrics = tuple(dataclasses.replace(m, label=labels.get(m.name, m.label))
                    if m.name in old else m for m in exp.metrics)
    stored = doc["experiment"]["claims"]
    if len(stored) != len(exp.claims):
        return dataclasses.replace(exp, metrics=metrics)
    claims = tuple(dataclasses.replace(c, text=sc["text"])
                   if (c.metric or exp.metric.name) in old else c
                   for c, sc in zip(exp.claims, stored, strict=True))
    return dataclasses.replace(exp, metrics=metrics, claims=claims)


def _headings(exp: Experiment) -> list[str]:
    out = ["Results", "Claims"] if not exp.sources else ["Claims"]
    out += [f"{m.label}: targets and censoring" for m in exp.metrics if m.target is not None]
    if exp.factors:
        out.append("Factorial effects")
    return out


def reaggregate(directory: str | Path, command: str = "", when: str | None = None
                ) -> dict[str, Any]:
    """Recompute ``directory``'s results.json / results.md in place (see the module
    docstring); returns ``{"name", "claims", "p_bh_min", "new_no_verdict"}``. Raises
    ValueError naming the differences if a recomputed number disagrees with the stored one."""
    d = Path(directory)
    doc = json.loads((d / "results.json").read_text(encoding="utf-8"))
    old = old_steps_metrics(doc)
    exp = as_stored(get_experiment(doc["experiment"]["name"]), doc, old)
    arms = doc["arms"]
    for a in arms:
        a.pop("vs_first", None)
    old_claims = doc["claims"]
    claims = compare_arms(exp, arms)
    problems = _compare_to_stored(old_claims, claims)
    if problems:
        raise ValueError(f"{d}: recomputed claims differ from the stored ones: "
                         + "; ".join(problems))
    no_verdict = [rn for c in claims for rn in _rows(c) if rn["verdict"] == NOT_ENOUGH]
    doc["claims"] = claims
    doc["verdict_rule"] = verdict_rule(exp, old_steps=bool(old))
    if exp.factors:
        doc["factorial"] = factorial_result(exp, arms)
    when = when or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc["meta"]["reaggregated"] = {
        "when": when, "command": command,
        "what": "claims, Δ vs the first arm, factorial effects and the rule text recomputed "
                "from the stored per-seed values with the current rules; nothing rerun"
                + ("; steps-to-target on the old rule (no curves stored)" if old else "")}
    res = {k: doc[k] for k in ("arms", "claims", "failed", "factorial", "data_sources")
           if k in doc}
    new_md = render_markdown(exp, res, doc["meta"])
    md_path = d / "results.md"
    md = splice_sections(md_path.read_text(encoding="utf-8"), new_md, _headings(exp))
    line = (f"- Re-aggregated {when} from the per-seed values in results.json "
            f"(`{command}`): claims, p (BH) and rule text recomputed with the current rules; "
            "nothing rerun; the stored means, CIs, p-values and verdicts recomputed equal"
            + (" (steps-to-target: the old rule, see above)." if old else "."))
    for head in ("- Profile: ", "- Base config: "):  # generated from the runs, not typed
        new_line = next((x for x in new_md.splitlines() if x.startswith(head)), None)
        if new_line is not None:
            md = re.sub(rf"(?m)^{re.escape(head)}.*$", lambda _m, x=new_line: x, md, count=1)
    md = re.sub(r"(?m)^- Re-aggregated .*\n", "", md)  # a later run replaces its line
    md = re.sub(r"(?m)^(- Finished: .*)$", lambda m: m.group(1) + "\n" + line, md, count=1)
    (d / "results.json").write_text(json.dumps(_clean(doc), indent=1) + "\n",
                                    encoding="utf-8")
    md_path.write_text(md, encoding="utf-8")
    p_bh = [rn["p_bh"] for c in claims for rn in _rows(c)
            if rn.get("p_bh") is not None and math.isfinite(rn["p_bh"])]
    return {"name": exp.name, "claims": len(claims), "p_bh_min": min(p_bh, default=None),
            "new_no_verdict": len(no_verdict)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moelab.experiments.reaggregate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders holding results.json")
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "moelab.experiments.reaggregate", *args.dirs])
    for d in args.dirs:
        try:
            r = reaggregate(d, command)
        except (ValueError, FileNotFoundError, KeyError) as e:
            print(f"reaggregate: error: {e}", file=sys.stderr)
            return 2
        print(f"{d}: {r['claims']} claims, smallest p (BH) {r['p_bh_min']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
