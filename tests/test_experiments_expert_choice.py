"""The momentum-expert-choice experiments: their configs, and the quick profile end to end."""

from __future__ import annotations

import json

from moelab.experiments import expert_choice as X
from moelab.experiments.registry import EXPERIMENTS
from moelab.experiments.runner import plan_runs, resolve_config
from moelab.experiments.suite import reproduce


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
    assert "supported (momentum's gain differs" in md
    # BH over (0.01, 0.04, 0.5, 0.02): 0.04, 0.0533, 0.5, 0.04
    assert "| c0 | 0.01 | 0.04 |" in md and "| c1 | 0.04 | 0.0533 |" in md
    assert "| c2 | 0.5 | 0.5 |" in md and "two-sided, no direction predicted) | 0.02 | 0.04 |" in md


def test_quick_profiles_run(tmp_path):
    reproduce(["momentum-expert-choice", "momentum-expert-choice-lm"], profile="quick",
              out=tmp_path, jobs=1, threads=1, fashion_dir=None, progress=False,
              command=["moelab", "reproduce"])
    for name in ("momentum-expert-choice", "momentum-expert-choice-lm"):
        doc = json.loads((tmp_path / name / "results.json").read_text())
        assert doc["failed"] == [] and len(doc["claims"]) == 3
        assert [e["name"] for e in doc["factorial"]["metrics"][doc["claims"][0]["metric"]]
                ][:3] == ["ec", "mom", "ec × mom"]
        md = (tmp_path / name / "results.md").read_text()
        assert "## Pre-set claim 4: the ec × mom interaction" in md
        ec_run = tmp_path / name / "runs" / doc["arms"][1]["run_dirs"]["0"].split("/")[-1]
        evals = [json.loads(line) for line in (ec_run / "metrics.jsonl").read_text().splitlines()
                 if '"layers"' in line]
        for layer in evals[-1]["layers"]:  # expert choice: every expert takes the same load
            assert layer["gini"] == 0.0 and layer["dropped_frac"] == 0.0
            assert layer["experts_per_token"] == 2.0 and 0.0 <= layer["unpicked_frac"] < 1.0
