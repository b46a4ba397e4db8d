"""The prepared GPU check: every GPU measurement of moelab in one run of under 8 minutes on one
GPU, written to one JSON file.

    python -m benchmarks.gpu_check                       # on a CUDA machine
    python -m benchmarks.gpu_check --out results.json    # default: $OUT/gpu_check.json, else
                                                         #   docs/results/benchmarks/gpu_check.json
    python -m benchmarks.gpu_check --device cpu --quick  # the CPU smoke run (tests; numbers
                                                         #   meaningless)

Sections (each timed; one that fails records its error and the others still run):

``sync_free``   one bf16 training step of the default LM with fused AdamW under
                ``torch.cuda.set_sync_debug_mode("error")``: no host sync in the step
``cuda_vs_cpu`` per method (plain Top-K, Default MoE, heavy ball, AdamSMoE, robust momentum,
                Excitation, all three): 3 AdamW steps on CPU fp32 and on CUDA fp32 with TF32
                off from the same weights and batches; the largest loss and parameter gaps
``layer``       the MoE layer alone in bf16 at four shapes (``benchmarks.dispatch``'s
                ``--gpu-shapes``): TFLOP/s of moelab, HF grouped_mm and a dense FFN
``step``        the whole training step (``benchmarks.train_step``) at the 620 M and the
                OLMoE-like 1.78 B shapes, moelab vs HF Mixtral in the same recipe (fp32
                weights, bf16 autocast, fused AdamW), eager and compiled: tokens/s, MFU
                against the measured dense bf16 peak, peak memory
``train``       the built-in default ``moelab train`` (600 steps) in bf16: perplexities,
                tokens/s, wall time
``methods``     each method's step-time overhead at the 620 M shape, bf16, compiled (last,
                and skipped when the others took longer than ``--budget-s``)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("sync_free", "cuda_vs_cpu", "layer", "step", "methods", "train")
#: (name, model.default_moe set, momentum rule, Excitation strategy or None)
METHODS = (("plain", False, "none", None), ("default_moe", True, "none", None),
           ("heavy_ball", False, "heavy_ball", None), ("adam", False, "adam", None),
           ("robust", False, "robust", None), ("excitation", False, "none", "positive_sum"),
           ("all_three", True, "heavy_ball", "positive_sum"))


def _section(result: dict, name: str, fn: Callable[[], Any]) -> None:
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        result[name] = {"ok": True, "value": fn()}
    except Exception as e:  # one broken section must not cost the others
        result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc()[-3000:]}
        print(f"   failed: {type(e).__name__}: {e}", flush=True)
    result[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"   {result[name]['seconds']} s", flush=True)


def _tiny_lm(default_moe: bool, rule: str, vocab: int = 256) -> torch.nn.Module:
    from moelab.methods.default_moe import DefaultMoEConfig
    from moelab.methods.momentum import MomentumConfig
    from moelab.models import ModelConfig, build_model
    from moelab.moe import MoEConfig

    cfg = ModelConfig(kind="lm", d_model=64, n_layers=4, n_heads=4,
                      moe=MoEConfig(n_experts=8, top_k=2, d_ff=64),
                      default_moe=DefaultMoEConfig() if default_moe else None,
                      momentum=MomentumConfig(rule=rule))
    return build_model(cfg, vocab_size=vocab)


def _train3(model: torch.nn.Module, strategy: str | None, device: str,
            batches: list[torch.Tensor]) -> tuple[list[float], dict[str, torch.Tensor]]:
    from moelab.methods.excitation import Excitation

    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if strategy is not None:
        Excitation(opt, model, strategy=strategy)
    losses = []
    for x in batches:
        x = x.to(device)
        out = model(x)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()) \
            + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}


def cuda_vs_cpu(device: str = "cuda") -> dict:
    """``device`` fp32 (TF32 off) against CPU fp32, per method."""
    from moelab.train.precision import matmul_flags

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (8, 64), generator=gen) for _ in range(3)]
    out = {}
    with matmul_flags("fp32"):
        for name, dmoe, rule, strategy in METHODS:
            torch.manual_seed(0)
            model = _tiny_lm(dmoe, rule)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            cpu = _train3(model, strategy, "cpu", batches)
            model.load_state_dict(state)
            gpu = _train3(model, strategy, device, batches)
            out[name] = {
                "loss_cpu": cpu[0], "loss_cuda": gpu[0],
                "max_loss_gap": max(abs(a - b) for a, b in zip(cpu[0], gpu[0], strict=True)),
                "max_param_gap": max(float((cpu[1][k].float() - gpu[1][k].float()).abs().max())
                                     for k in cpu[1] if cpu[1][k].is_floating_point())}
            print(f"   {name}: loss gap {out[name]['max_loss_gap']:.2e}, param gap "
                  f"{out[name]['max_param_gap']:.2e}", flush=True)
    return out


def sync_free(device: str, out_dir: Path) -> dict:
    """Trainer steps of the default LM with Default MoE and heavy ball (bf16 on CUDA by
    ``train.precision=auto``, fused AdamW, deterministic algorithms as by default): after two
    warm-up steps, one step and its non-logged bookkeeping with host syncs as errors."""
    import shutil

    from moelab.config import load_config
    from moelab.train.trainer import Trainer

    run = out_dir / "gpu_check_sync_run"
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config("default", [f"train.device={device}", "train.steps=10",
                                  "train.eval_every=0", "train.log_every=100",
                                  "model.default_moe.beta=0.9", "model.momentum.rule=heavy_ball"])
    tr = Trainer(cfg, run, quiet=True)
    tr.fit(max_steps=2)
    step_without_syncs(tr, check=device.startswith("cuda"))
    return {"precision": tr.precision, "fused_optimizer": tr.guard.deferred,
            "deterministic": cfg.train.deterministic, "synced": False}


def step_without_syncs(tr, check: bool = True) -> None:
    """One training step of ``tr`` and its non-logged bookkeeping with CUDA host syncs as
    errors (``check=False``, e.g. on CPU: the same code, unchecked)."""
    with tr._runtime():
        if check:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            result = tr.train_step()
            tr.metrics.post_step(tr, {**result, "time_s": 0.0})
        finally:
            if check:
                torch.cuda.set_sync_debug_mode("default")


def default_train(device: str, quick: bool, out_dir: Path) -> dict:
    """``moelab train`` (the built-in default) in bf16, in a fresh process."""
    run = out_dir / "gpu_check_default_run"
    cmd = [sys.executable, "-m", "moelab", "train", "--out", str(run), "--no-report", "-q",
           "--device", device, "--set", "train.precision=bf16"]
    if quick:
        cmd += ["--set", "train.steps=4", "--set", "train.eval_every=0",
                "--set", "data.final_eval_batches=2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"moelab train failed ({proc.returncode}): {proc.stderr[-1500:]}")
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"final"' in line][-1]
    keep = ("step", "val_ppl", "test_ppl", "tokens_per_s", "train_time_s", "params")
    return {"command": " ".join(cmd[1:]), "wall_s": round(wall, 1),
            **{k: final[k] for k in keep if k in final}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and aot_eager compiles: a smoke run of every section")
    p.add_argument("--out", default=None, help="the JSON file to write")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="skip the methods section if the others took longer than this")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {', '.join(SECTIONS)}")
    args = p.parse_args(argv)
    wanted = set(args.sections.split(","))
    if wanted - set(SECTIONS):
        raise SystemExit(f"gpu_check: unknown sections {sorted(wanted - set(SECTIONS))}")
    from benchmarks import dispatch, train_step

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (use --device cpu --quick for the "
                         "CPU smoke run)")
    out = Path(args.out) if args.out else (
        Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
        else ROOT / "docs" / "results" / "benchmarks" / "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    reps = 2 if args.quick else args.reps
    result: dict[str, Any] = {
        "command": "python -m benchmarks.gpu_check " + " ".join(argv or sys.argv[1:]),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "machine": platform.platform(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        result["transformers"] = None
    t0 = time.perf_counter()

    def section(name: str, fn: Callable[[], Any]) -> None:
        if name in wanted:
            _section(result, name, fn)

    section("sync_free", lambda: sync_free(args.device, out.parent))
    section("cuda_vs_cpu", lambda: cuda_vs_cpu(args.device))
    shapes = [(64, 4, 2, 64)] if args.quick else dispatch.GPU_SHAPES
    tokens = 256 if args.quick else 16384
    section("layer", lambda: dispatch.layer_table(shapes, tokens, reps, args.device,
                                                  torch.bfloat16))
    backend = "aot_eager" if args.quick else "inductor"
    sizes = ["quick"] if args.quick else ["gpu620m", "olmoe"]
    peak = train_step.dense_peak_flops(args.device, n=256 if args.quick else 8192)
    result["dense_bf16_peak_tflops"] = round(peak / 1e12, 1)

    def steps() -> dict:
        rows = {}
        for size in sizes:
            for compiled in (False, True):
                recipe = train_step.Recipe(args.device, "bf16", compiled, backend)
                key = f"{size}{'_compiled' if compiled else ''}"
                rows[key] = train_step.measure(train_step.ALL_SIZES[size], reps, 0, True,
                                               recipe, peak)
                train_step._print_row(key, rows[key])
        return rows

    section("step", steps)
    section("train", lambda: default_train(args.device, args.quick, out.parent))
    methods_size = "quick" if args.quick else "gpu620m"
    if time.perf_counter() - t0 > args.budget_s:  # five more compiles would not fit
        result["methods"] = {"ok": False, "error": f"skipped: past {args.budget_s} s"}
    else:
        section("methods", lambda: train_step.measure_methods(
            train_step.ALL_SIZES[methods_size], reps, 0, False,
            train_step.Recipe(args.device, "bf16", True, backend)))
    result["total_s"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({result['total_s']} s)", flush=True)
    return result


if __name__ == "__main__":
    main()
