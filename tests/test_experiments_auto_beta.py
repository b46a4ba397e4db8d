"""default-moe-auto-beta (issue 40): a pseudo-arm picked on validation, non-inferiority
claims with a margin, the definition, and the quick profile end to end."""

import json
import math
from pathlib import Path

import pytest
import scipy.stats as st

from moelab.experiments import Arm, Claim, Experiment, Metric, Profile
from moelab.experiments.results import aggregate, render_markdown
from moelab.experiments.runner import RunOutcome, RunSpec

PPL = Metric.final("ppl", label="test perplexity")
META = {"profile": "full", "seeds": 3, "command": "x", "torch": "t", "python": "p",
        "moelab": "m", "machine": "c", "invocation_wall_s": 1.0, "runs_wall_s": 1.0,
        "aggregate_wall_s": 0.0, "invocation_experiments": ["ni"], "n_run": 12,
        "n_skipped": 0, "jobs": 1, "finished": "now"}


def _run(root: Path, arm: str, seed: int, val: float, test: float) -> RunOutcome:
    d = root / f"{arm}-{seed}"
    d.mkdir(parents=True)
    rec = {"kind": "final", "step": 10, "val_ppl": val, "test_ppl": test}
    (d / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    return RunOutcome(RunSpec("ni", arm, seed, None, "default", (), str(d)), "done")


def _exp(margin: float = 0.01) -> Experiment:
    return Experiment(
        name="ni", claim="c", paper="p", base="default",
        arms=(Arm("a"), Arm("worse"), Arm("b1"), Arm("b2")),
        claims=(Claim("a", "best", "lower", margin=margin, text="a no worse than best"),
                Claim("worse", "best", "lower", margin=margin, text="worse no worse"),
                Claim("a", "b2", "lower", text="a beats b2")),
        metrics=(PPL,), picks={"best": ("b1", "b2")},
        profiles={"quick": Profile(), "full": Profile()}, image_datasets=())


B1 = [10.0, 10.2, 10.1]


def _outcomes(root: Path) -> list[RunOutcome]:
    out = []
    for s in range(3):
        # b1: the better validation, b2 the better test: the pick must not read test
        out.append(_run(root, "b1", s, val=9.0, test=B1[s]))
        out.append(_run(root, "b2", s, val=9.5, test=B1[s] - 0.5))
        out.append(_run(root, "a", s, val=9.9, test=B1[s] + [0.05, 0.03, 0.04][s]))
        out.append(_run(root, "worse", s, val=9.9, test=B1[s] + [0.30, 0.25, 0.35][s]))
    return out


def test_pick_on_validation_and_noninferiority_by_hand(tmp_path):
    exp = _exp()
    res = aggregate(exp, _outcomes(tmp_path))
    best = next(a for a in res["arms"] if a["arm"] == "best")
    assert best["picked"]["arm"] == "b1"
    assert [v["mean"] for v in best["picked"]["validation"]] == pytest.approx([9.0, 9.5])
    assert best["metrics"]["test_ppl"]["per_seed"] == {"0": 10.0, "1": 10.2, "2": 10.1}
    assert "vs_first" not in best
    ni, bad, sup = res["claims"]
    bound = 0.01 * 10.1
    half = st.t.ppf(0.975, 2) * 0.01 / math.sqrt(3)  # differences 0.05, 0.03, 0.04: sd 0.01
    assert ni["bound"] == pytest.approx(bound)
    assert (ni["mean"], ni["ci_low"], ni["ci_high"]) == pytest.approx(
        (0.04, 0.04 - half, 0.04 + half))
    t = (0.04 - bound) / (0.01 / math.sqrt(3))
    assert ni["p_value"] == pytest.approx(2 * st.t.cdf(t, 2))
    assert ni["verdict"] == "supported"  # the whole CI below the bound
    assert bad["verdict"] == "contradicted"  # 0.30 +- 0.12: above the bound entirely
    assert sup["verdict"] == "contradicted" and "bound" not in sup  # a plain claim
    md = render_markdown(exp, res, META)
    assert "(bound: Δ < +0.1010)" in md and "## Picked on validation" in md
    assert "| best | **b1** | 9.0000 ± 0.0000 | 3 |" in md
    assert "= **b1** (best mean validation of b1, b2)" in md


def test_margin_zero_is_the_plain_claim(tmp_path):
    res = aggregate(_exp(margin=0.0), _outcomes(tmp_path))
    ni = res["claims"][0]
    assert ni["verdict"] == "contradicted" and "bound" not in ni  # a is worse than b1


def test_bad_picks_and_margins_rejected():
    with pytest.raises(ValueError, match="margin"):
        Claim("a", "b", "lower", margin=1.5)
    with pytest.raises(ValueError, match="pick 'best' needs"):
        Experiment(name="x", claim="c", paper="p", arms=(Arm("a"), Arm("b")),
                   metrics=(PPL,), picks={"best": ("b", "zz")},
                   profiles={"quick": Profile(), "full": Profile()})


def test_definition_has_the_issue_settings():
    from moelab.experiments.default_moe import AUTO_BETA, BETAS
    from moelab.experiments.runner import plan_runs, resolve_config

    specs = plan_runs(AUTO_BETA, "full", 5, Path("/nonexistent"), None)
    assert len(specs) == 14 * 5
    cfg = {s.arm: resolve_config(s) for s in specs if s.seed == 0}
    tok = cfg["tokens-32c4"].model
    assert (tok.d_model, tok.n_layers, tok.moe.n_experts, tok.moe.top_k, tok.moe.d_ff) == (
        64, 2, 32, 4, 32)
    assert tok.default_moe.beta == "tokens" and tok.default_moe.horizon is None
    assert cfg["warmup-8c1"].model.default_moe.beta == "warmup"
    assert cfg["topk-8c1"].model.default_moe is None
    assert cfg["b0.999-8c1"].model.moe.d_ff == 128
    assert AUTO_BETA.picks["best-fixed-8c1"] == tuple(f"b{b:g}-8c1" for b in BETAS)
    ni = [c for c in AUTO_BETA.claims if c.margin]
    assert len(AUTO_BETA.claims) == 12 and len(ni) == 4
    assert all(c.margin == 0.005 and c.baseline.startswith("best-fixed") for c in ni)
    gpu = AUTO_BETA.at("gpu")
    assert {a.name for a in gpu.arms} == {a.name for a in AUTO_BETA.arms}


def test_quick_profile_end_to_end(tmp_path):
    from moelab.experiments.suite import reproduce

    name = "default-moe-auto-beta"
    (md,) = reproduce([name], profile="quick", out=tmp_path, jobs=1, threads=1,
                      fashion_dir=None, progress=False, command=["moelab", "reproduce", name])
    res = json.loads((md.parent / "results.json").read_text())
    assert res["failed"] == [] and len(res["claims"]) == 12
    assert all(c["verdict"] == "not enough runs" for c in res["claims"])  # one seed
    picked = {a["arm"]: a["picked"]["arm"] for a in res["arms"] if "picked" in a}
    assert set(picked) == {"best-fixed-8c1", "best-fixed-32c4"}
    assert all(v.startswith("b") for v in picked.values())


def test_summary_names_the_baseline_of_an_arm_claimed_against_several():
    from moelab.experiments.summary import survivors

    row = {"verdict": "supported", "p_bh": 0.01}
    doc = {"claims": [{"arm": "x/t", "baseline": "x/best", "metric": "m", **row},
                      {"arm": "x/t", "baseline": "x/topk", "metric": "m", **row},
                      {"arm": "x/u", "baseline": "x/topk", "metric": "m", **row}]}
    assert survivors(doc)["supported"] == ["t vs best", "t vs topk", "u"]
