"""Runner/statistics extensions for issue 15 on hand-made run records: steps to a target
fixed from the baseline arm, divergence as an outcome, factorial effects."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from moelab.experiments import Arm, Claim, Experiment, Metric, Profile
from moelab.experiments.results import aggregate, render_markdown
from moelab.experiments.runner import RunOutcome, RunSpec, execute_run
from moelab.experiments.spec import divergence, factorial_arm_name, factorial_factors
from moelab.experiments.stats import factorial_effects, steps_to_target

PROFILES = {"quick": Profile(), "full": Profile()}


# --------------------------------------------------------------------- steps to target


def test_steps_to_target_interpolates_and_censors():
    curve = [(100, 3.0), (200, 2.0), (300, 1.5)]
    # crossing 1.8 between (200, 2.0) and (300, 1.5): 200 + 0.2 / 0.5 * 100 = 240
    assert steps_to_target(curve, 1.8) == (pytest.approx(240.0), False)
    assert steps_to_target(curve, 1.8, interpolate=False) == (300.0, False)
    assert steps_to_target(curve, 2.0) == (200.0, False)      # exactly at an eval
    assert steps_to_target(curve, 5.0) == (100.0, False)      # first eval, nothing before it
    assert steps_to_target(curve, 1.0) == (300.0, True)       # never: censored at last step
    # a NaN eval never reaches it and is not interpolated from
    assert steps_to_target([(1, 3.0), (2, math.nan), (3, 1.0)], 2.0) == (3.0, False)
    with pytest.raises(ValueError, match="empty"):
        steps_to_target([], 1.0)
    with pytest.raises(ValueError, match="not finite"):
        steps_to_target(curve, math.nan)


def _run(root: Path, exp: str, arm: str, seed: int, evals, final_val=None, status="done",
         first_loss=5.5, lr=None, overrides=(), items=None) -> RunOutcome:
    """A hand-made run: ``evals`` [(step, val_loss)] (the last one is the final evaluation
    when ``final_val`` is given); ``items``: val_items per eval (None: not recorded)."""
    d = root / f"{arm}-{lr}-{seed}"
    d.mkdir(parents=True)
    recs = [{"kind": "train", "step": 10, "loss": first_loss}]
    for i, (s, v) in enumerate(evals):
        r = {"kind": "eval", "step": s, "val_loss": v}
        if items is not None:
            r["val_items"] = items[i]
        if final_val is not None and i == len(evals) - 1:
            r["final"] = True
        recs.append(r)
    if final_val is not None:
        recs.append({"kind": "final", "step": evals[-1][0], "val_loss": final_val,
                     "test_loss": final_val + 0.1})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return RunOutcome(RunSpec(exp, arm, seed, lr, "default", tuple(overrides), str(d)), status)


def _speed_exp(**kw) -> Experiment:
    steps = Metric.steps_to({"topk": "topk", "dmoe": "topk"})
    return Experiment(name="t-speed", claim="", paper="", base="default",
                      arms=(Arm("topk"), Arm("dmoe")),
                      claims=(Claim("dmoe", "topk", "lower"),),
                      metrics=(steps, Metric.final("loss")), profiles=PROFILES,
                      image_datasets=(), **kw)


def _curve(target_step: int, steps: int = 500, every: int = 100) -> list[tuple[int, float]]:
    """A falling validation curve that crosses 2.0 exactly at ``target_step`` (1.0 per
    1000 steps), ending at ``steps``."""
    return [(s, 2.0 + (target_step - s) / 1000) for s in range(every, steps + 1, every)]


def test_delta_vs_base_only_between_arms_sharing_a_target(tmp_path):
    """Speed-like factorial: 'base'/'dmoe' share Top-K 8c1's target, '32c4'/'dmoe+32c4'
    32c4's. The results table compares only the first pair; the sparsity's main effect on
    steps is left out (different targets), its interaction with dmoe kept."""
    arms = tuple(Arm(n) for n in ("base", "dmoe", "32c4", "dmoe+32c4"))
    steps = Metric.steps_to({"base": "base", "dmoe": "base", "32c4": "32c4",
                             "dmoe+32c4": "32c4"})
    exp = Experiment(name="t-sp", claim="", paper="", base="default", arms=arms,
                     claims=(Claim("dmoe", "base", "lower"), Claim("dmoe+32c4", "32c4", "lower")),
                     metrics=(steps, Metric.final("loss")), factors=("dmoe", "32c4"),
                     profiles=PROFILES, image_datasets=())
    cross = {"base": 400, "dmoe": 300, "32c4": 350, "dmoe+32c4": 300}
    runs = [_run(tmp_path, "t-sp", n, s, _curve(c + 10 * s, 500), 2.0 - 0.1 * (n == "32c4"))
            for n, c in cross.items() for s in range(3)]
    res = aggregate(exp, runs)
    by = {a["arm"]: a for a in res["arms"]}
    assert "vs_first" in by["dmoe"] and "vs_first" not in by["32c4"]
    assert "vs_first" not in by["dmoe+32c4"]
    eff = {e["name"] for e in res["factorial"]["metrics"]["steps_to_val_loss"]}
    assert "32c4" not in eff and {"dmoe", "dmoe × 32c4", "additivity gap"} <= eff
    assert "32c4" in {e["name"] for e in res["factorial"]["metrics"]["test_loss"]}
    assert res["factorial"]["omitted"] == {"steps_to_val_loss": ["32c4"]}
    md = render_markdown(exp, res, _META)
    assert "Δ only for arms with the same target as base" in md
    assert "Main effect of 32c4 left out" in md


_META = {"profile": "full", "seeds": 3, "command": "x", "torch": "t", "python": "p",
         "moelab": "m", "machine": "c", "invocation_wall_s": 1.0, "runs_wall_s": 1.0,
         "aggregate_wall_s": 0.0, "invocation_experiments": ["t"], "n_run": 1, "n_skipped": 0,
         "jobs": 1, "finished": "now"}


def test_steps_to_target_needs_a_baseline_for_every_arm():
    with pytest.raises(ValueError, match="baseline arm"):
        Experiment(name="t-bad", claim="", paper="", arms=(Arm("topk"), Arm("dmoe")),
                   metrics=(Metric.steps_to({"dmoe": "topk"}),), profiles=PROFILES)


# -------------------------------------------------------------------------- divergence


def test_divergence_rule_on_records():
    base = [{"kind": "train", "step": 10, "loss": 5.0}]
    assert divergence(base, "diverged") == "stopped at a non-finite loss"
    assert divergence(base) is None                                   # unfinished: not diverged
    assert divergence(base + [{"kind": "final", "val_loss": 4.0}]) is None
    assert "above the initial" in divergence(base + [{"kind": "final", "val_loss": 5.3}])
    # within 5% of the initial loss: did not learn (lr 1e-7), not diverged
    assert divergence(base + [{"kind": "final", "val_loss": 5.2}]) is None
    assert "non-finite" in divergence(base + [{"kind": "final", "val_loss": math.nan}])


def test_divergence_counted_per_arm_and_lr_not_failed(tmp_path):
    exp = Experiment(name="t-lr", claim="", paper="", base="default",
                     arms=(Arm("topk-x1"), Arm("topk-x8")), metrics=(Metric.final("loss"),),
                     claims=(Claim("topk-x8", "topk-x1", "lower"),), profiles=PROFILES,
                     image_datasets=(), report_divergence=True)
    runs = [_run(tmp_path, "t-lr", "topk-x1", s, [(100, 2.0)], 2.0) for s in range(2)]
    runs += [_run(tmp_path, "t-lr", "topk-x8", 0, [(100, 2.0)], status="diverged"),
             _run(tmp_path, "t-lr", "topk-x8", 1, [(100, 6.0)], 6.0, first_loss=5.5)]
    res = aggregate(exp, runs)
    arms = {a["arm"]: a for a in res["arms"]}
    d8 = arms["topk-x8"]["divergence"]
    assert [(x["n"], x["diverged"], x["failed"]) for x in d8] == [(2, 2, 0)]
    assert set(d8[0]["reasons"]) == {"0", "1"}
    assert arms["topk-x1"]["divergence"][0]["diverged"] == 0
    assert res["failed"] == []
    # the NaN-stopped run has no value; the finished-but-diverged one keeps its loss
    assert arms["topk-x8"]["metrics"]["test_loss"]["per_seed"] == {
        "0": None, "1": pytest.approx(6.1)}


def test_nonfinite_run_is_recorded_as_diverged_and_not_retried(tmp_path):
    tiny = ("model.n_layers=1", "model.d_model=16", "model.n_heads=2", "model.max_seq_len=16",
            "data.seq_len=16", "data.batch_size=2", "model.moe.n_experts=2",
            "model.moe.top_k=1", "model.moe.d_ff=8", "train.steps=3", "train.eval_every=0",
            "train.checkpoint_every=0", "train.log_every=1", "data.eval_batches=1",
            "data.final_eval_batches=1", "optim.warmup_steps=0", "optim.grad_clip=0",
            "optim.lr=1e30", "optim.schedule=\"constant\"", "train.threads=1")
    spec = RunSpec("t-div", "topk", 0, None, "default", tiny, str(tmp_path / "r"))
    o = execute_run(spec)
    assert o.status == "diverged", o.error
    assert json.loads((tmp_path / "r" / "reproduce.json").read_text())["status"] == "diverged"
    assert execute_run(spec).status == "diverged"   # skipped, not retrained
    assert o.ok


# -------------------------------------------------------------------------- factorial


def test_factorial_effects_recover_a_known_model():
    factors = ("a", "b", "c")
    offsets = np.random.default_rng(0).normal(size=4)   # one offset per seed, every cell
    cells = {}
    for on in [(), ("a",), ("b",), ("c",), ("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")]:
        x = {f: (1 if f in on else -1) for f in factors}
        # y = 10 + 1.0 x_a + 0.5 x_b + 0 x_c + 0.25 x_a x_b, plus a per-seed offset
        cells[frozenset(on)] = {s: 10 + 1.0 * x["a"] + 0.5 * x["b"] + 0.25 * x["a"] * x["b"]
                                + off for s, off in enumerate(offsets)}
    cells[frozenset()][4] = 1.0          # a seed missing from other cells is left out
    eff = {e.name: e for e in factorial_effects(cells, factors)}
    # 2^k effect = 2 x coefficient
    assert eff["a"].diff.mean == pytest.approx(2.0)
    assert eff["b"].diff.mean == pytest.approx(1.0)
    assert eff["c"].diff.mean == pytest.approx(0.0, abs=1e-12)
    assert eff["a × b"].diff.mean == pytest.approx(0.5)
    assert eff["a × c"].diff.mean == pytest.approx(0.0, abs=1e-12)
    assert eff["a × b × c"].diff.n == 4
    # gains from none: a alone +2 (x_a flips, x_a x_b flips: 2 - 0.5 = 1.5); by hand:
    y = lambda on: 10 + sum(c * (1 if f in on else -1) for f, c in  # noqa: E731
                            (("a", 1.0), ("b", 0.5))) + 0.25 * (1 if ("a" in on) == ("b" in on)
                                                                 else -1)
    gap = (y("abc") - y("")) - sum(y(f) - y("") for f in "abc")
    assert eff["additivity gap"].diff.mean == pytest.approx(gap)
    with pytest.raises(ValueError, match="no cell"):
        factorial_effects({frozenset(): {0: 1.0}}, ("a", "b"))


def test_factorial_arm_names_and_experiment_check(tmp_path):
    f = ("dmoe", "mom", "exc")
    assert factorial_arm_name((), f) == "base"
    assert factorial_arm_name(("exc", "dmoe"), f) == "dmoe+exc"
    assert factorial_factors("dmoe+exc", f) == frozenset({"dmoe", "exc"})
    with pytest.raises(ValueError, match="need exactly the arms"):
        Experiment(name="t-f", claim="", paper="", arms=(Arm("base"), Arm("dmoe")),
                   metrics=(Metric.final("loss"),), profiles=PROFILES, factors=("dmoe", "mom"))
    arms = tuple(Arm(n) for n in ("base", "a", "b", "a+b"))
    exp = Experiment(name="t-f", claim="", paper="", arms=arms, factors=("a", "b"),
                     metrics=(Metric.final("loss"),), profiles=PROFILES, image_datasets=())
    # loss: base 2.0, a 1.8, b 1.9, a+b 1.7 (exactly additive) + seed offset
    vals = {"base": 2.0, "a": 1.8, "b": 1.9, "a+b": 1.7}
    runs = [_run(tmp_path, "t-f", n, s, [(10, v + 0.1 * s)], v + 0.1 * s)
            for n, v in vals.items() for s in range(3)]
    res = aggregate(exp, runs)
    eff = {e["name"]: e for e in res["factorial"]["metrics"]["test_loss"]}
    assert eff["a"]["mean"] == pytest.approx(-0.2)
    assert eff["a × b"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert eff["additivity gap"]["mean"] == pytest.approx(0.0, abs=1e-9)


def test_interaction_plot_is_written_for_a_factorial(tmp_path):
    pytest.importorskip("matplotlib")
    from moelab.experiments.plots import make_plots

    arms = tuple(Arm(n) for n in ("base", "a", "b", "a+b"))
    exp = Experiment(name="t-f", claim="", paper="", arms=arms, factors=("a", "b"),
                     metrics=(Metric.final("loss"),), profiles=PROFILES, image_datasets=())
    runs = [_run(tmp_path / "runs", "t-f", n, s, [(10, 2.0 - 0.1 * i)], 2.0 - 0.1 * i)
            for i, n in enumerate(("base", "a", "b", "a+b")) for s in range(2)]
    paths = make_plots(tmp_path / "out", exp, aggregate(exp, runs))
    assert tmp_path / "out" / "interaction.png" in paths


# ---------------------------------------------------------------- the four definitions


@pytest.mark.parametrize("name", ["default-moe-speed", "default-moe-lr", "default-moe-beta",
                                  "methods-combined"])
def test_quick_profile_end_to_end(tmp_path, name):
    from moelab.experiments.suite import reproduce

    (md,) = reproduce([name], profile="quick", out=tmp_path, jobs=1, threads=1,
                      fashion_dir=None, progress=False, command=["moelab", "reproduce", name])
    res = json.loads((md.parent / "results.json").read_text())
    assert res["failed"] == [] and res["claims"]
    one = name == "default-moe-beta"  # one seed: no verdict
    ok = ("not enough runs",) if one else ("supported", "contradicted", "inconclusive")
    assert all(c["verdict"] in ok for c in res["claims"])
    seeds = [0] if one else [0, 1]
    assert all(a["seeds"] == seeds for a in res["arms"])
    if name in ("default-moe-speed", "methods-combined"):
        eff = res["factorial"]["metrics"][res["experiment"]["metrics"][0]["name"]]
        assert eff[-1]["name"] == "additivity gap" and all(e["n"] == 2 for e in eff)
        assert (md.parent / "interaction.png").is_file()
    if name == "default-moe-speed":
        st = {a["arm"]: a["metrics"]["steps_to_val_loss"] for a in res["arms"]}
        assert st["dmoe"]["target"] == st["base"]["target"] != st["32c4"]["target"]
    if name == "default-moe-lr":
        assert "## Divergence" in md.read_text()


def test_definitions_have_the_issue_settings():
    from moelab.experiments.default_moe import BETA, COMBINED, LR, SPEED
    from moelab.experiments.runner import plan_runs, resolve_config

    def cfg(exp, arm):
        spec = next(s for s in plan_runs(exp, "full", 1, Path("/nonexistent"), None)
                    if s.arm == arm)
        return resolve_config(spec)

    a, b = cfg(SPEED, "base").model, cfg(SPEED, "dmoe+32c4").model
    assert (a.moe.n_experts, a.moe.top_k, a.moe.d_ff, a.default_moe) == (8, 1, 256, None)
    assert (b.moe.n_experts, b.moe.top_k, b.moe.d_ff, b.default_moe.beta) == (32, 4, 64, 0.9)
    # equal active expert parameters: top_k x d_ff
    assert a.moe.top_k * a.moe.d_ff == b.moe.top_k * b.moe.d_ff
    from moelab.experiments.default_moe import BASE_LR as base_lr
    assert [cfg(LR, f"topk-x{m}").optim.lr for m in (1, 2, 4, 8)] == pytest.approx(
        [base_lr * m for m in (1, 2, 4, 8)])
    st = cfg(BETA, "st-32c4").model.default_moe
    assert st.straight_through and st.beta == 0.9 and not st.scored
    assert cfg(BETA, "b0.999s-8c1").model.default_moe.scored
    full = cfg(COMBINED, "dmoe+mom+exc")
    assert full.model.default_moe is not None and full.model.momentum.rule == "heavy_ball"
    assert full.optim.excitation.strategy == "positive_sum"
    none = cfg(COMBINED, "base")
    assert none.model.default_moe is None and none.optim.excitation is None
    assert none.model.momentum is None or none.model.momentum.rule == "none"


def test_one_arm_factory_builds_every_default_moe_arm():
    """dmoe_arm: layout, then Default MoE or Top-K, then extras, in that order (the arms'
    overrides are the same tuples the experiments used before the factory)."""
    from moelab.experiments.default_moe import BETA, COMBINED, LR, SPEED, dmoe_arm

    topk = "model.default_moe=none"
    dm = ("model.default_moe.beta=0.9", "model.default_moe.scored=false",
          "model.default_moe.straight_through=false")
    l32 = ("model.moe.n_experts=32", "model.moe.top_k=4", "model.moe.d_ff=64")
    assert dmoe_arm("x", "32c4").overrides == (*l32, topk)
    assert SPEED.arm("dmoe+32c4").overrides == (*l32, *dm)
    assert LR.arm("dmoe-x4").overrides == (*dm, "optim.lr=0.012")
    assert LR.arm("topk-x2").overrides == (topk, "optim.lr=0.006")
    assert BETA.arm("b0.99s-32c4").overrides == (
        *l32, "model.default_moe.beta=0.99", "model.default_moe.scored=true",
        "model.default_moe.straight_through=false")
    assert COMBINED.arm("mom+exc").overrides == (
        topk, 'model.momentum.rule="heavy_ball"', "model.momentum.mu=0.7",
        "model.momentum.gamma=1.0", 'optim.excitation.strategy="positive_sum"',
        "optim.excitation.gamma=1.0")
    assert COMBINED.arm("dmoe").overrides == dm
