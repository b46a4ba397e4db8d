"""The committed results pages (docs/results/reproduce): every one carries the
Benjamini-Hochberg column, and its claims follow from its own stored per-seed values; the
re-aggregation that put BH there, on a page made here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moelab.experiments.reaggregate import (
    as_stored,
    old_steps_metrics,
    reaggregate,
    splice_sections,
)
from moelab.experiments.registry import get_experiment
from moelab.experiments.results import OLD_STEPS_RULE, compare_arms, verdict_rule
from moelab.experiments.stats import bh_adjust

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs" / "results" / "reproduce").rglob("results.json"))


def _rows(c):
    return c["per_layer"] if "per_layer" in c else [c]


def test_there_are_committed_pages():
    assert len(PAGES) >= 12


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.parent.relative_to(ROOT)))
def test_committed_page_carries_bh_and_matches_its_per_seed_values(page):
    doc = json.loads(page.read_text())
    rows = [r for c in doc["claims"] for r in _rows(c)]
    assert rows and all("p_bh" in r for r in rows)
    ps = [r["p_value"] for r in rows]
    want = bh_adjust([math.nan if p is None else p for p in ps])
    for r, w in zip(rows, want, strict=True):
        assert (r["p_bh"] is None and math.isnan(w)) or r["p_bh"] == pytest.approx(w)
    md = (page.parent / "results.md").read_text()
    assert "| p (BH) |" in md and "Benjamini-Hochberg, over the" in md
    # the claims follow from the stored per-seed values under today's rules
    old = old_steps_metrics(doc)
    exp = as_stored(get_experiment(doc["experiment"]["name"]), doc, old)
    again = compare_arms(exp, [dict(a) for a in doc["arms"]])
    for old, new in zip(doc["claims"], again, strict=True):
        assert old["text"] == new["text"]
        for ro, rn in zip(_rows(old), _rows(new), strict=True):
            assert ro["verdict"] == rn["verdict"]
            for k in ("mean", "ci_low", "ci_high", "p_value", "p_bh"):
                if ro[k] is None:
                    assert not math.isfinite(rn[k])
                else:
                    assert rn[k] == pytest.approx(ro[k], rel=1e-9)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.parent.relative_to(ROOT)))
def test_committed_page_states_its_rules_and_seeds_from_its_runs(page):
    """The rule text in results.json is today's (or says the page keeps the old
    steps-to-target rule, as its targets section does), and the seeds and base config lines
    are generated from the runs the page holds (an analysis-only page names its sources)."""
    doc = json.loads(page.read_text())
    md = (page.parent / "results.md").read_text()
    old = old_steps_metrics(doc)
    exp = as_stored(get_experiment(doc["experiment"]["name"]), doc, old)
    assert doc["verdict_rule"] == verdict_rule(exp, old_steps=bool(old))
    if old:
        targets = md.split(": targets and censoring", 1)[1].split("\n## ", 1)[0]
        assert OLD_STEPS_RULE in targets
    seeds = sorted({int(s) for a in doc["arms"] for s in a["seeds"]})
    assert f"seeds: {len(seeds)} ({seeds[0]}..{seeds[-1]})" in md
    if exp.sources:
        assert "- Base config: none of its own (trains nothing); the runs analysed are those " \
            f"of {exp.sources[0]}" in md


def test_splice_replaces_generated_sections_and_keeps_the_rest():
    old = "# t\n\n## Results\nold r\n\n## Claims\nold c\n\n## Provenance\nx\n\nhand note\n"
    new = "# t\n\n## Results\nnew r\n\n## Extra\ne\n\n## Claims\nnew c\n\n## Provenance\ny\n"
    out = splice_sections(old, new, ["Results", "Claims", "Extra"])
    assert out == ("# t\n\n## Results\nnew r\n\n## Extra\ne\n\n## Claims\nnew c\n\n"
                   "## Provenance\nx\n\nhand note\n")


def test_reaggregate_adds_bh_to_an_old_page(tmp_path):
    """A page written with today's code, then stripped of BH as the old pages were: the
    re-aggregation puts back exactly the same p_bh, keeps a hand note, says what it did."""
    from test_experiments_dmoe import _run

    from moelab.experiments.results import aggregate, write_results

    exp = get_experiment("default-moe-lr")
    runs = []
    for i, arm in enumerate(a.name for a in exp.arms):
        for s in range(3):
            v = 2.0 + 0.01 * i + 0.003 * s * (i % 3)
            runs.append(_run(tmp_path / "runs", exp.name, arm, s, [(100, v)], v))
    res = aggregate(exp, runs)
    meta = {"profile": "full", "seeds": 3, "command": "c", "torch": "t", "python": "p",
            "moelab": "m", "machine": "x", "finished": "then", "wall_s": 1.0, "n_run": 24,
            "n_skipped": 0, "jobs": 2, "overrides": []}
    out = tmp_path / "page"
    write_results(out, exp, res, meta)
    want = [c["p_bh"] for c in json.loads((out / "results.json").read_text())["claims"]]
    doc = json.loads((out / "results.json").read_text())
    for c in doc["claims"]:
        del c["p_bh"]
    (out / "results.json").write_text(json.dumps(doc))
    md = (out / "results.md").read_text()
    (out / "results.md").write_text(md.replace("| p (BH) ", "") + "\nHand note.\n")
    for _ in range(2):
        reaggregate(out, "python -m moelab.experiments.reaggregate page", when="now")
    got = json.loads((out / "results.json").read_text())
    assert [c["p_bh"] for c in got["claims"]] == pytest.approx(want)
    assert got["meta"]["reaggregated"]["when"] == "now"
    text = (out / "results.md").read_text()
    assert "| p (BH) |" in text and text.rstrip().endswith("Hand note.")
    assert text.count("- Re-aggregated now") == 1
    # a stored number that does not follow from the per-seed values is refused
    got["claims"][0]["mean"] += 1.0
    (out / "results.json").write_text(json.dumps(got))
    with pytest.raises(ValueError, match="mean differ"):
        reaggregate(out)
