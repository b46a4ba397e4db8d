"""The ``paper`` profiles: the papers' own settings (checked by hand against
moelab.experiments.paper's sources), their GPU-hour estimate, the dry run that plans them for a
cluster, and every one run end to end as its two-step CPU variant (``paper-smoke``)."""

from __future__ import annotations

import json
import shlex

import pytest

from moelab.cli import main
from moelab.experiments import EXPERIMENTS, reproduce
from moelab.experiments.gpu import active_parameters, flops_per_item, run_gpu_hours
from moelab.experiments.paper import substitute
from moelab.experiments.runner import plan_runs, resolve_config
from moelab.experiments.spec import Arm

TRAINING = [n for n, e in EXPERIMENTS.items() if not e.sources]


def test_every_experiment_has_a_paper_profile_and_its_smoke_variant():
    for name, e in EXPERIMENTS.items():
        paper = e.profile("paper")
        smoke = e.profile("paper-smoke")
        assert paper.setting, name  # what the paper says and where the profile departs
        assert (smoke.seeds, smoke.lr_index, smoke.data_dir, smoke.gpus_per_run) == \
            (1, (0,), None, 1)
        if not e.sources:
            assert paper.smoke and smoke.after_arms == paper.smoke, name
            assert paper.data_dir in ("cifar10", "wikitext", "textfile"), name
    with pytest.raises(ValueError, match="choose one of.*paper-smoke"):
        EXPERIMENTS["default-moe-speed"].profile("paper2")


def _configs(name: str, profile: str = "paper", tmp_path=None) -> dict:
    e = EXPERIMENTS[name].at(profile)
    return {s.arm: resolve_config(s) for s in plan_runs(e, profile, 1, tmp_path, None)}


def test_momentum_paper_profile_is_the_official_lm(tmp_path):
    cfgs = _configs("momentum-depth", tmp_path=tmp_path)
    # scripts/smoe-{s,m,l}.sh: (layers, d_model = expert width, seq, batch, steps, warm-up)
    sizes = {(c.model.n_layers, c.model.d_model, c.model.moe.d_ff, c.data.seq_len,
              c.data.batch_size, c.train.steps, c.optim.warmup_steps) for c in cfgs.values()}
    assert sizes == {(3, 128, 128, 256, 96, 60_000, 3000), (6, 352, 352, 512, 48, 80_000, 4000),
                     (12, 512, 512, 1024, 24, 80_000, 5000)}
    one = cfgs["mom-post2-d6"]
    assert (one.model.moe.n_experts, one.model.moe.top_k, one.model.n_heads) == (16, 2, 8)
    assert (one.optim.name, one.optim.lr, one.optim.betas, one.optim.weight_decay,
            one.optim.schedule, one.optim.grad_clip) == ("adam", 7e-4, (0.9, 0.999), 0.0,
                                                         "constant", 0.0)
    assert (one.model.momentum.mu, one.model.momentum.gamma) == (0.7, 1.0)
    assert one.model.norm_position == "post_double"
    # its lr grid replaced by the paper's lr
    ec = _configs("momentum-expert-choice-lm", tmp_path=tmp_path)
    assert {c.optim.lr for c in ec.values()} == {7e-4}


def test_default_moe_paper_profile_is_the_2b_model_on_160b_tokens(tmp_path):
    cfgs = _configs("default-moe-speed", tmp_path=tmp_path)
    widths = {a: (c.model.moe.n_experts, c.model.moe.top_k, c.model.moe.d_ff)
              for a, c in cfgs.items()}
    assert widths == {"base": (8, 1, 2816), "dmoe": (8, 1, 2816), "32c4": (32, 4, 704),
                      "dmoe+32c4": (32, 4, 704)}
    c = cfgs["dmoe"]
    assert (c.model.n_layers, c.model.d_model, c.data.seq_len) == (24, 1024, 2048)
    tokens = c.train.steps * c.data.batch_size * c.train.grad_accum * c.data.seq_len
    assert abs(tokens - 160e9) < 2 * 2048 * 1024  # within one step of 160 B
    assert (c.optim.lr, c.optim.warmup_frac, c.optim.min_lr_ratio) == (3e-4, 0.01, 0.1)
    # the lr experiment's multipliers are of the paper's lr
    lrs = {a: c.optim.lr for a, c in _configs("default-moe-lr", tmp_path=tmp_path).items()}
    assert lrs["topk-x1"] == 3e-4 and lrs["dmoe-x8"] == pytest.approx(2.4e-3)
    # ~2 B parameters (the paper: 1.96 B; ours has a 32 k BPE instead of Llama-3's 128 k)
    total, _ = active_parameters(c)
    assert 1.7e9 < total < 2.1e9


def test_substitute_replaces_overrides_and_refuses_a_stale_map():
    arms = (Arm("a", ("x=1", "y=2"), (0.1,)), Arm("b", ("y=3",)))
    got = substitute(arms, {"y=2": ("y=20", "z=1"), "y=3": ()})
    assert got == (Arm("a", ("x=1", "y=20", "z=1"), (0.1,)), Arm("b", ()))
    with pytest.raises(ValueError, match="appear in no arm"):
        substitute(arms, {"y=9": ()})


def test_the_gpu_hours_estimate_by_hand():
    from moelab.config import load_config

    cfg = load_config("default")
    m = cfg.model
    total, active = active_parameters(cfg)
    d, e, k, f = m.d_model, m.moe.n_experts, m.moe.top_k, m.moe.d_ff
    experts = m.n_layers * e * (2 * d * f + f * d)  # SwiGLU w_in [d, 2f], w_out [f, d]
    assert total - active == experts - experts * k // e
    fpt, unit = flops_per_item(cfg)
    assert unit == "tokens"
    assert fpt == 6 * active + 12 * m.n_layers * d * cfg.data.seq_len
    tokens = cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len
    # at 300 TFLOP/s per GPU, at least 4 ms per step, plus 20 s per run; 2 GPUs: twice
    seconds = max(tokens * fpt / 300e12, cfg.train.steps * 0.004) + 20.0
    assert run_gpu_hours(cfg) == pytest.approx(seconds / 3600)
    seconds2 = max(tokens * fpt / 600e12, cfg.train.steps * 0.004) + 20.0
    assert run_gpu_hours(cfg, gpus=2) == pytest.approx(2 * seconds2 / 3600)


def test_every_paper_profile_plans_in_a_dry_run(tmp_path, capsys):
    assert main(["reproduce", "all", "--profile", "paper", "--dry-run",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in EXPERIMENTS:
        assert f"{name} --profile paper: " in out
    assert "GPU-hours" in out and "moelab launch --nproc-per-node 8 train" in out
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written
    # without --data-dir a real run says what to give
    assert main(["reproduce", "momentum-depth", "--profile", "paper", "--out",
                 str(tmp_path)]) == 2
    assert "give --data-dir" in capsys.readouterr().err


def test_a_run_trained_by_its_dry_run_command_is_collected(tmp_path, capsys):
    """The cluster workflow on CPU: the dry run's command trains one run; reproduce then
    skips it (same config) and trains only the others."""
    out = tmp_path / "out"
    assert main(["reproduce", "default-moe-speed", "--profile", "paper-smoke", "--dry-run",
                 "--out", str(out)]) == 0
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines()
             if ln.strip().startswith("moelab train")]
    assert len(lines) == 4  # 4 arms x 1 seed
    argv = shlex.split(lines[0])[1:]
    assert main([*argv, "--quiet"]) == 0
    paths = reproduce(["default-moe-speed"], profile="paper-smoke", out=out, jobs=1,
                      progress=False)
    res = json.loads((paths[0].parent / "results.json").read_text())
    assert sorted(r["status"] for r in res["runs"]) == ["done", "done", "done", "skipped"]


def test_every_paper_profile_runs_as_its_cpu_smoke_variant(tmp_path):
    paths = reproduce(list(EXPERIMENTS), profile="paper-smoke", out=tmp_path, jobs=2,
                      progress=False, device="cpu")
    assert sorted(p.parent.name for p in paths) == sorted(EXPERIMENTS)
    for p in paths:
        res = json.loads((p.parent / "results.json").read_text())
        assert res["meta"]["profile"] == "paper-smoke"
        assert all(r["status"] in ("done", "skipped") for r in res["runs"]), p
