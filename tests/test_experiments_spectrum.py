"""momentum-deep and momentum-spectrum (moelab.experiments.momentum_spectrum): the configs
they resolve to, and their record metrics and depth-trend section on hand-made records."""

from __future__ import annotations

import math

import pytest

from moelab.config import config_to_dict
from moelab.experiments import momentum_spectrum as M
from moelab.experiments.registry import EXPERIMENTS
from moelab.experiments.runner import plan_runs, resolve_config


def test_deep_definition_resolves_to_the_intended_configs(tmp_path):
    deep = EXPERIMENTS["momentum-deep"]
    assert len(deep.arms) == 4 * 2 * 2 and len(deep.claims) == 7 * 4 * 2
    specs = plan_runs(deep, "full", 5, tmp_path, None)
    assert len(specs) == 80
    cfgs = {(s.arm, s.seed): resolve_config(s) for s in specs}
    c = cfgs[("mom-post2-d96", 4)]
    assert (c.model.norm_position, c.model.n_layers, c.model.momentum.rule) == \
        ("post_double", 96, "heavy_ball")
    assert (c.model.momentum.mu, c.model.momentum.gamma) == (0.7, 1.0)
    assert c.model.moe_block_indices() == list(range(96))
    for c in cfgs.values():  # warm-up, clipping and lr the same for every arm
        assert (c.optim.warmup_steps, c.optim.grad_clip, c.optim.lr, c.train.steps) == \
            (M.DEEP_WARMUP, 1.0, 3e-3, M.DEEP_STEPS)
        assert (c.model.d_model, c.model.moe.n_experts, c.model.moe.top_k) == (32, 4, 2)
    assert {c.model.n_layers for c in cfgs.values()} == set(M.DEEP_DEPTHS)
    quick = deep.at("quick")
    assert {a.name for a in quick.arms} == {"smoe-pre-d2", "mom-pre-d2", "smoe-post2-d2",
                                           "mom-post2-d2"}
    gpu = {s.arm: resolve_config(s) for s in plan_runs(deep.at("gpu"), "gpu", 1, tmp_path,
                                                        None)}
    assert {(g.model.d_model, g.data.dataset) for g in gpu.values()} == {(256, "docs")}


def test_spectrum_mid_run_is_the_first_half_of_the_end_run(tmp_path):
    spec = EXPERIMENTS["momentum-spectrum"]
    assert len(spec.arms) == 6 and len(spec.claims) == 3 * 2 * 3
    cfgs = {s.arm: resolve_config(s) for s in plan_runs(spec, "full", 1, tmp_path, None)}
    mid, end = cfgs["mom-mid"], cfgs["mom-end"]
    assert (mid.train.steps, end.train.steps) == (M.SPEC_STEPS // 2, M.SPEC_STEPS)
    assert mid.optim.schedule == "constant" and mid.optim.warmup_steps < mid.train.steps
    dm, de = config_to_dict(mid), config_to_dict(end)
    assert dm["train"].pop("steps") != de["train"].pop("steps")
    dm.pop("name", None), de.pop("name", None)
    assert dm == de  # the same run but for its length
    assert cfgs["adam-end"].model.momentum.rule == "adam"
    assert {c.model.n_layers for c in cfgs.values()} == {M.SPEC_DEPTH}
    init = [c for c in spec.claims if c.metric.endswith("_init")]
    assert {c.arm for c in init} == {"mom-end", "adam-end"}


def _train(losses, norms=None):
    norms = norms or [1.0] * len(losses)
    return [{"kind": "train", "step": i + 1, "loss": v, "grad_norm": g}
            for i, (v, g) in enumerate(zip(losses, norms, strict=True))]


def test_loss_spikes_by_hand():
    flat = [2.0] * 10
    # step 11: 2.6 > 1.25 * 2.0 (a spike); step 12: 2.4 < 2.5 (median still 2.0): not one;
    # step 13: NaN counts; step 14: 3.0 > 2.5 counts
    recs = _train(flat + [2.6, 2.4, float("nan"), 3.0])
    assert M.loss_spikes(recs) == 3.0
    assert M.loss_spikes(recs, warmup=12) == 2.0  # steps <= 12 are warm-up
    assert M.loss_spikes(_train([2.0, 9.0])) == 0.0  # fewer than a window of history
    assert M.loss_spikes([{"kind": "eval"}]) is None


def test_late_grad_norm_by_hand():
    recs = _train([1.0] * 6, [9.0, 9.0, 9.0, 1.0, 2.0, 3.0])
    assert M.late_grad_norm(recs) == pytest.approx(2.0)  # mean of the second half
    assert M.late_grad_norm(_train([1.0, 1.0], [1.0, float("inf")])) is None


def test_depth_trend_slope_by_hand():
    # seed 0: log ratio 0 at depth 12, log(0.9) at 24, log(0.81) at 48: slope log(0.9) per
    # doubling; seed 1: slope 2*log(0.9); mean 1.5*log(0.9) < 0 (gain grows)
    def arm(rule, d, vals):
        return {"arm": M._deep_name(rule, "pre", d),
                "metrics": {"test_ppl": {"per_seed": {str(s): v for s, v in vals.items()}}}}

    arms = []
    for k, d in enumerate((12, 24, 48)):
        arms.append(arm("smoe", d, {0: 10.0, 1: 10.0}))
        arms.append(arm("mom", d, {0: 10.0 * 0.9**k, 1: 10.0 * 0.81**k}))
    lines = M.depth_trend({"arms": arms})
    row = next(line for line in lines if line.startswith("| pre-norm"))
    assert f"{1.5 * math.log(0.9):+.4f}" in row and "12, 24, 48" in row
    # slopes -0.105 and -0.211: t-interval with 1 degree of freedom contains 0
    assert row.endswith("| 2 | inconclusive |")
    post = next(line for line in lines if line.startswith("| official double post-norm"))
    assert "not enough runs" in post


def _page(name: str) -> dict:
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return json.loads((root / "docs" / "results" / "reproduce" / name / "results.json")
                      .read_text(encoding="utf-8"))


def test_readme_figures_match_the_momentum_deep_page():
    from pathlib import Path

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md")
                      .read_text(encoding="utf-8").split())
    doc = _page("momentum-deep")

    def d(arm: str) -> dict:
        (c,) = [c for c in doc["claims"] if c["metric"] == "test_ppl" and c["arm"] == arm]
        return c

    pre48, pre96 = d("mom-pre-d48"), d("mom-pre-d96")
    assert pre48["verdict"] == pre96["verdict"] == "supported"
    assert all(d(f"mom-post2-d{n}")["verdict"] == "contradicted" for n in M.DEEP_DEPTHS)
    want = [f"(−{-pre48['mean']:.2f} and −{-pre96['mean']:.2f})",
            f"from +{d('mom-post2-d12')['mean']:.2f} at 12 to "
            f"+{d('mom-post2-d96')['mean']:.2f} at 96 layers"]
    for w in want:
        assert w in readme, w
    inside_head = [c for c in doc["claims"] if c["metric"] in ("inside", "headroom")]
    assert sum(c["verdict"] == "supported" for c in inside_head) == 15


def test_readme_figure_matches_the_momentum_spectrum_page():
    from pathlib import Path

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md")
                      .read_text(encoding="utf-8").split())
    (end,) = [c for c in _page("momentum-spectrum")["claims"]
              if c["arm"] == "mom-end" and c["metric"] == "radius"]
    assert end["verdict"] == "contradicted"
    assert f"larger with heavy ball (+{end['mean']:.3f}) than with SMoE" in readme
