"""The benchmark helpers measure what they claim (the timings themselves are never asserted)."""

import json

import pytest
import torch

from benchmarks.common import step_peak_bytes


def test_step_peak_bytes_sees_a_transient_allocation():
    def step() -> None:
        a = torch.empty(2**18)  # 1 MiB, freed before b exists
        del a
        b = torch.empty(2**19)  # 2 MiB
        c = torch.empty(2**17)  # 0.5 MiB alongside b: peak 2.5 MiB
        del b, c

    peak = step_peak_bytes(step)
    assert 2.5 * 2**20 <= peak < 2.6 * 2**20


def test_train_step_compares_models_of_equal_size():
    pytest.importorskip("transformers")
    from benchmarks.train_step import SIZES, SWEEP, hf_model, moelab_model, n_params

    for shape in [*SIZES.values(), *SWEEP[:2]]:
        assert n_params(moelab_model(shape)) == n_params(hf_model(shape)), shape


def test_train_step_models_compute_the_same_logits():
    """The benchmark's moelab LM and HF Mixtral are one function: same weights, same logits
    (so the step times compare implementations, not architectures)."""
    pytest.importorskip("transformers")
    from benchmarks.train_step import SIZES, copy_moelab_weights_to_hf, hf_model, moelab_model

    shape = SIZES["quick"]
    torch.manual_seed(0)
    ours, theirs = moelab_model(shape), hf_model(shape)  # fp32: grouped_mm has no fp64
    copy_moelab_weights_to_hf(ours, theirs)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    ref = ours(ids).logits
    got = theirs(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # a wrong mapping (e.g. the gate and up halves swapped) would not pass
    w = theirs.model.layers[0].mlp.experts.gate_up_proj
    with torch.no_grad():
        w.copy_(w.roll(w.shape[1] // 2, dims=1))
    assert not torch.allclose(theirs(ids).logits, ref, atol=1e-4)


def test_train_step_profile_lists_the_step_ops():
    """--profile profiles moelab's step: the expert loop's autograd functions and the matmuls
    appear, with one forward call of the loop per MoE layer and step."""
    pytest.importorskip("transformers")
    from benchmarks.train_step import SIZES, profile_moelab

    table = profile_moelab(SIZES["quick"], steps=2, seed=0, top=200)
    assert "aten::mm" in table
    loop = [line for line in table.splitlines() if line.strip().startswith("_ExpertLoop ")]
    assert loop and loop[0].split()[-1] == str(2 * SIZES["quick"].layers)


def test_compare_revisions_reads_every_number():
    from benchmarks.compare_revisions import numbers, printed_json

    value = {"a": 1, "b": {"c": 2.5, "ok": True, "name": "x"}, "rows": [{"ms": 3}, 4]}
    assert dict(numbers(value)) == {"a": 1.0, "b.c": 2.5, "rows[0].ms": 3.0, "rows[1]": 4.0}
    out = '# header\n{"ms": 1}\nnot json {\n{"ms": 2, "n": [1]}\n{broken\n'
    assert printed_json(out) == [{"ms": 1}, {"ms": 2, "n": [1]}]


def test_compare_revisions_runs_a_command_at_two_revisions(tmp_path):
    """HEAD against this checkout: both run the command in their own tree, interleaved."""
    import shutil
    import subprocess

    from benchmarks.compare_revisions import ROOT, compare

    if shutil.which("git") is None or subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("needs a git checkout")
    import sys

    # 'own': moelab was imported from the checkout the command runs in
    code = ("import json, moelab, pathlib, sys; here = str(pathlib.Path.cwd().resolve()); "
            "own = str(pathlib.Path(moelab.__file__).resolve()).startswith(here); "
            "json.dump({'own': int(own), 'v': 2}, open(sys.argv[1], 'w'))")
    res = compare(("HEAD", "WORKTREE"), [sys.executable, "-c", code, "{out}"], rounds=2)
    assert res["rows"]["v"] == {"before": 2.0, "after": 2.0, "ratio": 1.0}
    assert res["rows"]["own"] == {"before": 1.0, "after": 1.0, "ratio": 1.0}
    assert len(res["samples"]["HEAD"]) == len(res["samples"]["WORKTREE"]) == 2
    assert res["rows"]["wall_s"]["before"] > 0
    assert not [w for w in subprocess.run(["git", "-C", str(ROOT), "worktree", "list"],
                                          capture_output=True, text=True).stdout.splitlines()
                if "moelab-compare-" in w]


def test_gpu_shapes_have_the_documented_sizes():
    """The GPU step table's shapes (built on the meta device: no memory): equal parameter
    counts for moelab and HF Mixtral, 620 M / 205 M active and 1.78 B, and the MFU formula's
    active count equals the model's matmul parameters."""
    pytest.importorskip("transformers")
    from benchmarks.train_step import (
        GPU_SIZES,
        SIZES,
        active_params,
        flops_per_token,
        hf_model,
        moelab_model,
        n_params,
    )

    with torch.device("meta"):
        sizes = {k: (n_params(moelab_model(s)), n_params(hf_model(s)))
                 for k, s in GPU_SIZES.items()}
    assert sizes["gpu620m"][0] == sizes["gpu620m"][1] and 619e6 < sizes["gpu620m"][0] < 621e6
    assert sizes["olmoe"][0] == sizes["olmoe"][1] and 1.77e9 < sizes["olmoe"][0] < 1.79e9
    assert active_params(GPU_SIZES["gpu620m"]) == 204_800_000
    s = SIZES["quick"]
    model = moelab_model(s)
    expert = sum(p.numel() for n, p in model.named_parameters() if "experts" in n)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2)
    assert active_params(s) == matmul - expert + expert * s.top_k // s.experts
    assert flops_per_token(s) == 6 * active_params(s) + 12 * s.layers * s.d_model * s.seq


def test_trainer_run_prints_its_throughput(capsys):
    import json

    from benchmarks.trainer_run import main

    out = main(["--steps", "2", "--set", "model.n_layers=1", "--set", "data.batch_size=4"])
    assert out["steps"] == 2 and out["tokens_per_s"] > 0 and out["final_loss"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out


def test_reproduce_packing_trains_every_run_at_each_jobs(tmp_path):
    """The packing benchmark on CPU (its gpu-smoke profile): each N trains all the runs."""
    from benchmarks.reproduce_packing import main

    out = tmp_path / "packing.json"
    res = main(["--device", "cpu", "--profile", "gpu-smoke", "--experiment", "methods-combined",
                "--runs", "2", "--steps", "2", "--jobs", "1", "2", "--out", str(out)])
    assert [(r["jobs"], r["runs"], r["failed"]) for r in res["rows"]] == [(1, 2, []), (2, 2, [])]
    assert res["auto_jobs"] is None and res["profile"] == "gpu-smoke"
    assert json.loads(out.read_text())["rows"] == res["rows"]
