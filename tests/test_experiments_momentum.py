"""The MomentumSMoE experiment definitions (moelab.experiments.momentum): their configs, the
run-directory metric hook (robustness evaluated after training), and small end-to-end runs."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moelab.experiments import momentum as M
from moelab.experiments.registry import EXPERIMENTS, register
from moelab.experiments.runner import plan_runs, resolve_config
from moelab.experiments.spec import Claim, Profile
from moelab.experiments.suite import reproduce


def test_definitions_resolve_to_the_intended_configs(tmp_path):
    depth = EXPERIMENTS["momentum-depth"]
    assert len(depth.arms) == 4 * 3 * 3 and len(depth.claims) == 3 * 3 * 3
    specs = plan_runs(depth, "full", 3, tmp_path, None)
    assert len(specs) == 108
    cfg = resolve_config(next(s for s in specs if s.arm == "mom-post2-d4"))
    assert (cfg.model.norm_position, cfg.model.n_layers, cfg.model.momentum.rule) == \
        ("post_double", 4, "heavy_ball")
    cfg = resolve_config(next(s for s in specs if s.arm == "adam-post-d8"))
    assert (cfg.model.norm_position, cfg.model.n_layers, cfg.model.momentum.rule) == \
        ("post", 8, "adam")
    assert (cfg.model.momentum.mu, cfg.model.momentum.gamma) == (0.7, 1.0)
    assert cfg.model.moe_block_indices() == list(range(8))
    assert cfg.data.dataset == "shakespeare" and cfg.train.steps == 300
    cfg = resolve_config(next(s for s in specs if s.arm == "smoe-pre-d2"))
    assert (cfg.model.norm_position, cfg.model.n_layers, cfg.model.momentum.rule) == \
        ("pre", 2, "none")
    sens = EXPERIMENTS["momentum-sensitivity"]
    grid = {(resolve_config(s).model.momentum.mu, resolve_config(s).model.momentum.gamma)
            for s in plan_runs(sens, "full", 1, tmp_path, None) if s.arm != "smoe"}
    assert grid == {(m, g) for m in M.MUS for g in M.GAMMAS}
    img = EXPERIMENTS["momentum-robustness-images"]
    cfg = resolve_config(plan_runs(img, "full", 1, tmp_path, None)[1])
    assert cfg.model.kind == "vit" and cfg.model.moe_block_indices() == [1, 3, 5]
    assert EXPERIMENTS["momentum-robustness-text"].sources == ("momentum-depth",)


def test_one_arm_factory_builds_every_momentum_arm():
    """momentum_arm: the form/depth overrides, then rule, mu, gamma (the same tuples the three
    experiments spelled out before the factory)."""
    hb = ('model.momentum.rule="heavy_ball"',)
    assert M.DEPTH.arm("mom-post2-d8").overrides == (
        'model.norm_position="post_double"', "model.n_layers=8", *hb,
        "model.momentum.mu=0.7", "model.momentum.gamma=1.0")
    assert M.DEPTH.arm("robust-pre-d2").overrides == (
        'model.norm_position="pre"', "model.n_layers=2", 'model.momentum.rule="robust"')
    assert M.ROBUSTNESS_IMAGES.arm("mom").overrides == (
        *hb, "model.momentum.mu=0.8", "model.momentum.gamma=1.0")
    assert M.SENSITIVITY.arm("mom-mu0.3-g1.5").overrides == (
        *hb, "model.momentum.mu=0.3", "model.momentum.gamma=1.5")
    assert M.SENSITIVITY.arm("smoe").overrides == ('model.momentum.rule="none"',)


def test_top_norm_share_reads_the_final_eval():
    records = [{"kind": "eval", "final": True, "layers": [
        {"norm_order_share": [0.0, 0.1, 0.2, 0.3, 0.0, 0.1, 0.3, 0.0]},  # zeros: no tokens
        {"norm_order_share": [0.125] * 8}]}]
    # the largest-norm quarter (2 of 8) among the experts that got tokens: 0.1 + 0.3
    assert M.top_norm_share(records) == pytest.approx([0.4, 0.25])
    assert M.top_norm_share([{"kind": "eval", "step": 1}]) is None


@pytest.fixture
def small_depth():
    """momentum-depth cut to two arms at depth 2 (post), and a text-robustness experiment
    reading it: exercises the run-directory metrics through the suite."""
    keep = ("smoe-post-d2", "mom-post-d2")
    depth = dataclasses.replace(
        M.DEPTH, name="t-mom-depth", arms=tuple(a for a in M.DEPTH.arms if a.name in keep),
        claims=(Claim("mom-post-d2", "smoe-post-d2", "lower"),))
    text = dataclasses.replace(
        M.ROBUSTNESS_TEXT, name="t-mom-text", sources=("t-mom-depth",),
        claims=(Claim("mom-post-d2", "smoe-post-d2", "lower", metric="attack_gap",
                      source="t-mom-depth"),),
        profiles={"quick": Profile(seeds=2), "full": Profile()})
    register(depth, replace=True)
    register(text, replace=True)
    yield depth, text
    EXPERIMENTS.pop("t-mom-text", None)
    EXPERIMENTS.pop("t-mom-depth", None)


def test_text_robustness_evaluates_the_source_runs(tmp_path, small_depth):
    reproduce(["t-mom-text"], profile="quick", out=tmp_path, jobs=1, threads=1, seeds=2,
              fashion_dir=None, progress=False, command=["moelab", "reproduce", "t-mom-text"])
    res = json.loads((tmp_path / "t-mom-text" / "results.json").read_text())
    assert res["failed"] == []
    for arm in res["arms"]:
        gaps = arm["metrics"]["attack_gap"]["per_seed"]
        assert set(gaps) == {"0", "1"} and all(isinstance(v, float) for v in gaps.values())
        for seed, run_dir in arm["run_dirs"].items():
            cached = json.loads((tmp_path / "t-mom-depth" / "runs" / run_dir.split("/")[-1] /
                                 "robustness" / "word_swap-v3-r0.025-seed0-b1.json").read_text())
            test_row = next(r for r in cached["rows"] if r["split"] == "test")
            assert gaps[seed] == pytest.approx(test_row["gap_ppl"])
            clean = arm["metrics"]["clean_ppl"]["per_seed"][seed]
            attacked = arm["metrics"]["attacked_ppl"]["per_seed"][seed]
            assert attacked - clean == pytest.approx(gaps[seed])
    assert res["claims"][0]["verdict"] in ("supported", "contradicted", "inconclusive")
    md = (tmp_path / "t-mom-text" / "results.md").read_text()
    words, swapped = cached["rows"][1]["words"], cached["rows"][1]["swapped"]
    assert f"| test | {words} | {swapped} | {swapped / words:.2%} | all 4 |" in md
    # the source trained here gets its own results; a second call only reads it, and leaves
    # them (command, time) as the training call wrote them
    depth_md = tmp_path / "t-mom-depth" / "results.md"
    before = depth_md.stat().st_mtime_ns
    reproduce(["t-mom-text"], profile="quick", out=tmp_path, jobs=1, threads=1, seeds=2,
              fashion_dir=None, progress=False, command=["moelab", "again"])
    assert depth_md.stat().st_mtime_ns == before
    assert "moelab again" in (tmp_path / "t-mom-text" / "results.md").read_text()


def test_image_robustness_and_sensitivity_quick_profiles(tmp_path):
    reproduce(["momentum-robustness-images", "momentum-sensitivity"], profile="quick",
              out=tmp_path, jobs=1, threads=1, fashion_dir=None, progress=False,
              command=["moelab", "reproduce"])
    img = json.loads((tmp_path / "momentum-robustness-images" / "results.json").read_text())
    assert img["failed"] == []
    for arm in img["arms"]:
        err = arm["metrics"]["corruption_err"]["per_seed"]["0"]
        drop = arm["metrics"]["corruption_drop"]["per_seed"]["0"]
        acc = arm["metrics"]["test_acc"]["per_seed"]["0"]
        assert 0.0 <= err <= 1.0 and isinstance(drop, float) and 0.0 <= acc <= 1.0
    # the descriptive tables: accuracy per corruption x severity, and mCE vs SMoE by hand
    md = (tmp_path / "momentum-robustness-images" / "results.md").read_text()
    assert "## Accuracy per corruption and severity" in md
    assert "| gaussian_noise | 5 |" in md and "| impulse_noise | 1 |" in md
    ev = {}
    for arm in img["arms"]:
        run = tmp_path / "momentum-robustness-images" / "runs" / arm["run_dirs"]["0"].split("/")[-1]
        (f,) = (run / "robustness").glob("corrupt-*-b1.json")
        rows = json.loads(f.read_text())["rows"]
        ev[arm["arm"]] = {n: sum(r["err"] for r in rows if r["corruption"] == n)
                          for n in {r["corruption"] for r in rows}}
    mce = sum(ev["mom"][n] / ev["smoe"][n] for n in ev["smoe"]) / len(ev["smoe"])
    mce_table = md.split("## Corruption error relative to smoe")[1].splitlines()
    row = next(line for line in mce_table if line.startswith("| mom | "))
    assert row.endswith(f"| {mce:.3f} | – | 1 |")  # one seed: no spread, no interval
    assert "| smoe | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | – | 1 |" in md
    sens = json.loads((tmp_path / "momentum-sensitivity" / "results.json").read_text())
    assert sens["failed"] == [] and len(sens["arms"]) == 13
    share = sens["arms"][0]["metrics"]["top_norm_share"]["per_seed"]["0"]
    assert len(share) == 2 and all(0.0 <= s <= 1.0 for s in share)
