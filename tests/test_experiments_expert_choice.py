"""The momentum-expert-choice experiments: their configs and the interaction section."""

from __future__ import annotations

from moelab.experiments import expert_choice as X
from moelab.experiments.registry import EXPERIMENTS
from moelab.experiments.runner import plan_runs, resolve_config


def test_definitions_resolve_to_the_intended_configs(tmp_path):
    for name, kind in (("momentum-expert-choice", "mlp"), ("momentum-expert-choice-lm", "lm")):
        exp = EXPERIMENTS[name]
        assert exp.factors == ("ec", "mom")
        specs = plan_runs(exp, "full", 5, tmp_path, None)
        assert len(specs) == 4 * 5 * 2  # arms x seeds x the lr grid
        got, lrs = {}, {}
        for s in specs:
            cfg = resolve_config(s)
            assert cfg.model.kind == kind and cfg.model.n_layers == 4
            got[s.arm] = (cfg.model.moe.routing, cfg.model.moe.capacity_factor,
                          cfg.model.moe.choice_group, cfg.model.momentum.rule)
            lrs.setdefault(s.arm, set()).add(cfg.optim.lr)
        group = "position" if kind == "lm" else "batch"
        assert got == {
            "base": ("top_k", None, "batch", "none"),
            "ec": ("expert_choice", 1.0, group, "none"),
            "mom": ("top_k", None, "batch", "heavy_ball"),
            "ec+mom": ("expert_choice", 1.0, group, "heavy_ball"),
        }
        assert all(v == set(exp.lr_grid) for v in lrs.values())  # the same tuning budget


def test_interaction_section_adjusts_the_four_p_values():
    res = {"claims": [{"text": f"c{i}", "metric": "test_acc", "p_value": p}
                      for i, p in enumerate((0.01, 0.04, 0.5))],
           "factorial": {"metrics": {"test_acc": [
               {"name": "ec × mom", "mean": 0.02, "ci_low": 0.01, "ci_high": 0.03,
                "n": 5, "p_value": 0.02}]}}}
    md = "\n".join(X.interaction_section(res))
    assert "= +2 percentage points, 95% CI [+1, +3], n = 5, p = 0.02: supported" in md
    # BH over (0.01, 0.04, 0.5, 0.02): 0.04, 0.0533, 0.5, 0.04
    assert "| c0 | 0.01 | 0.04 |" in md and "| c1 | 0.04 | 0.0533 |" in md
    assert "| c2 | 0.5 | 0.5 |" in md and "two-sided, no direction predicted) | 0.02 | 0.04 |" in md


# The quick profiles run end to end in CI with every other experiment's
# (tests/test_experiments.py::test_quick_profile_of_every_experiment_end_to_end).


def test_results_md_figures_match_the_committed_json():
    """The figures docs/RESULTS.md quotes from the two pages, rebuilt from results.json."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = " ".join((root / "docs" / "RESULTS.md").read_text(encoding="utf-8").split())

    def fmt(x: float, spec: str) -> str:
        return format(x, spec).replace("-", "−")

    for name, scale, spec in (("momentum-expert-choice", 100, ".2f"),
                              ("momentum-expert-choice-lm", 1, ".2f")):
        doc = json.loads((root / "docs" / "results" / "reproduce" / name / "results.json")
                         .read_text())
        for a in doc["arms"]:
            s = next(iter(a["metrics"].values()))["summary"]
            assert f"{fmt(scale * s['mean'], spec)}" in text, (name, a["arm"])
            assert f"± {fmt(scale * s['std'], spec)}" in text, (name, a["arm"])
        metric = doc["claims"][0]["metric"]
        inter = next(e for e in doc["factorial"]["metrics"][metric] if e["name"] == "ec × mom")
        for c in [*doc["claims"], inter]:
            lo, hi = fmt(scale * c["ci_low"], "+.2f"), fmt(scale * c["ci_high"], "+.2f")
            assert f"{fmt(scale * c['mean'], '+.2f')} " in text or \
                f"{fmt(scale * c['mean'], '+.2f')} points" in text, (name, c)
            assert f"[{lo}, {hi}]" in text, (name, c, lo, hi)
