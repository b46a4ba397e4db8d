"""``moelab reproduce`` on a GPU, tested on CPU: the packing planner (how many runs share the
GPU), the device / precision / compile options, and every ``gpu`` profile run end to end as
its two-step CPU smoke variant (``gpu-smoke``)."""

from __future__ import annotations

import json

import pytest

from moelab.experiments import EXPERIMENTS, reproduce
from moelab.experiments import suite as suite_mod
from moelab.experiments.gpu import estimate_minutes, lm_flops_per_token
from moelab.experiments.packing import gpu_jobs
from moelab.experiments.runner import plan_runs, resolve_config
from moelab.runs.directory import read_config

GPU_EXPERIMENTS = [n for n, e in EXPERIMENTS.items() if "gpu" in e.profiles]
GIB = 2**30


def test_the_claim_experiments_have_gpu_profiles():
    assert set(GPU_EXPERIMENTS) >= {"default-moe-speed", "default-moe-lr", "methods-combined",
                                    "momentum-depth", "excitation-foundation"}
    for name in GPU_EXPERIMENTS:
        e = EXPERIMENTS[name]
        gpu, smoke = e.profile("gpu"), e.profile("gpu-smoke")
        assert 0 < gpu.gpu_minutes < 15  # about 10 minutes each (estimates)
        assert smoke.after_arms == gpu.smoke and smoke.seeds == 1 and smoke.lr_index == (0,)
        at = e.at("gpu")
        assert {c.arm for c in at.claims} | {c.baseline for c in at.claims} <= \
            {a.name for a in at.arms} | set(at.picks)  # picks: pseudo-arms picked on val
        assert all(set(cands) <= {a.name for a in at.arms} for cands in at.picks.values())
    with pytest.raises(ValueError, match="choose one of.*gpu-smoke"):
        EXPERIMENTS["default-moe-speed"].profile("gpu2")
    with pytest.raises(ValueError, match="choose one of \\['full', 'paper', 'quick', "
                                         "'paper-smoke'\\]"):
        EXPERIMENTS["default-moe-beta"].profile("gpu")


def test_gpu_profiles_use_the_paper_settings(tmp_path):
    depth = EXPERIMENTS["momentum-depth"].at("gpu")
    cfgs = {s.arm: resolve_config(s) for s in plan_runs(depth, "gpu", 1, tmp_path, None)}
    assert {(c.model.n_layers, c.model.d_model, c.model.moe.d_ff) for c in cfgs.values()} == \
        {(3, 128, 128), (6, 352, 352), (12, 512, 512)}
    one = cfgs["mom-post2-d12"]
    assert one.data.dataset == "docs" and one.data.tokenizer == "bpe" and one.data.seq_len == 512
    assert (one.optim.name, one.optim.lr, one.optim.grad_clip) == ("adam", 7e-4, 0.0)
    assert one.model.norm_position == "post_double" and one.model.momentum.rule == "heavy_ball"
    speed = EXPERIMENTS["default-moe-speed"].at("gpu")
    cfgs = {s.arm: resolve_config(s) for s in plan_runs(speed, "gpu", 1, tmp_path, None)}
    n_params = {a: 6 * (4 * 512**2 + c.model.moe.n_experts * (512 + 3 * 512 * c.model.moe.d_ff))
                + 8192 * 512 for a, c in cfgs.items()}
    assert all(104e6 < n < 106e6 for n in n_params.values())  # ~105 M parameters each
    assert {c.train.precision for c in cfgs.values()} == {"bf16"}
    assert {c.train.compile for c in cfgs.values()} == {True}
    smoke = {s.arm: resolve_config(s) for s in plan_runs(
        EXPERIMENTS["momentum-depth"].at("gpu-smoke"), "gpu-smoke", 1, tmp_path, None)}
    assert {(c.model.n_layers, c.model.d_model, c.data.dataset, c.train.steps)
            for c in smoke.values()} == {(2, 32, "shakespeare", 2)}


def test_the_gpu_time_estimate_by_hand():
    # 6 * (2 * (4*64^2 + 64*4 + 1*3*64*32) + 64*8192) + 12*2*64*512
    fpt = lm_flops_per_token(64, 2, 4, 1, 32)
    assert fpt == 6 * (2 * (16384 + 256 + 6144) + 524288) + 786432
    # 10 runs x 100 steps x 1000 tokens x 1.5e11 FLOPs = 1.5e17 / 1.5e14 = 1000 s, plus
    # 10 x 50 s over 8 workers = 62.5 s: 17.7 min
    assert estimate_minutes([(10, 100, 1000, 1.5e11)]) == 17.7


def test_gpu_jobs_packs_what_fits():
    assert gpu_jobs(10 * GIB, 80 * GIB, cores=16, n_runs=40) == 7  # floor(72 / 10)
    assert gpu_jobs(1 * GIB, 80 * GIB, cores=16, n_runs=40) == 16  # one core per worker
    assert gpu_jobs(1 * GIB, 80 * GIB, cores=16, n_runs=3) == 3
    assert gpu_jobs(100 * GIB, 80 * GIB, cores=16, n_runs=3) == 1  # never fewer than one
    with pytest.raises(ValueError, match="peak_bytes=0"):
        gpu_jobs(0, GIB, 1, 1)


def test_on_a_gpu_jobs_come_from_the_measured_peak(tmp_path, monkeypatch, capsys):
    from moelab.experiments import packing

    specs = plan_runs(EXPERIMENTS["default-moe-speed"].at("gpu"), "gpu", 10, tmp_path, None)
    measured = []
    monkeypatch.setattr(packing, "measure_peak",
                        lambda spec, device: measured.append(spec) or 6 * GIB)
    monkeypatch.setattr(packing, "free_bytes", lambda device: 140 * GIB)
    monkeypatch.setattr(packing, "cpu_cores", lambda: 16)
    assert suite_mod._gpu_jobs(specs, "cuda", progress=True) == 16  # floor(126 / 6) = 21
    assert len(measured) == 1
    assert "one run takes 6.00 GiB on cuda" in capsys.readouterr().err
    monkeypatch.setattr(packing, "free_bytes", lambda device: 30 * GIB)
    assert suite_mod._gpu_jobs(specs, "cuda", progress=False) == 4  # floor(27 / 6)


def test_every_gpu_profile_runs_as_its_cpu_smoke_variant(tmp_path):
    """The whole pipeline of each gpu profile (planning, training, results), shrunk to two
    steps on CPU; --device, --precision and --compile reach every run."""
    paths = reproduce(GPU_EXPERIMENTS, profile="gpu-smoke", out=tmp_path, jobs=2,
                      progress=False, device="cpu", precision="fp32", compile=False)
    assert sorted(p.parent.name for p in paths) == sorted(GPU_EXPERIMENTS)
    for p in paths:
        res = json.loads((p.parent / "results.json").read_text())
        assert res["meta"]["profile"] == "gpu-smoke"
        assert all(r["status"] in ("done", "skipped") for r in res["runs"]), p
    run = next((tmp_path / "momentum-depth" / "runs").iterdir())
    cfg = read_config(run)
    assert (cfg.train.device, cfg.train.precision, cfg.train.compile) == ("cpu", "fp32", False)
