"""Whole training step of moelab's LM against Hugging Face's ``MixtralForCausalLM`` of the same
shape and exactly the same parameter count.

One step = forward + cross-entropy (+ router load-balancing loss, coefficient 0.01, on both) +
backward + AdamW step, on the same token batch. Both models: pre-RMSNorm blocks, SDPA causal
attention with RoPE, no biases, tied input/output embeddings, SwiGLU experts with top-K
weights renormalised (Mixtral's routing); HF's experts run its ``grouped_mm`` implementation,
moelab's its default dispatch (the chunked expert loop on CPU). The parameter counts are
checked equal before timing, and with one model's weights copied into the other both give the
same logits (tests/test_benchmark_helpers.py); only the balance-loss formulas differ (HF pools
the layers' tokens before multiplying the fractions, moelab sums per-layer losses), at the
same cost. Reported per size: median step time of interleaved repetitions
(``benchmarks.common.time_interleaved``), the moelab / HF ratio, tokens per second, and the
peak bytes one step allocates (activations, gradients, temporaries; parameters and the AdamW
state are equal and excluded).

    python -m benchmarks.train_step                     # the three sizes below, CPU fp32
    python -m benchmarks.train_step --sizes default     # one size
    python -m benchmarks.train_step --sweep             # step time vs d_model and vs E
    python -m benchmarks.train_step --methods           # moelab only: each method's overhead
    python -m benchmarks.train_step --quick             # tiny smoke run (numbers meaningless)
    python -m benchmarks.train_step --profile 3 --sizes default   # moelab's top ops, 3 steps
    python -m benchmarks.train_step --device cuda --precision bf16 [--compile] \
        --sizes gpu620m olmoe                           # the GPU recipe: see below

The recipe (``--device``, ``--precision``, ``--compile``) is the same for both libraries:
fp32 weights and AdamW state (fused AdamW on CUDA), the forward and loss under
``torch.autocast(bfloat16)`` for ``--precision bf16`` (TF32 matmuls for ``tf32``), and with
``--compile`` every block compiled (moelab:
``moelab.distributed.wrap.compile_blocks``, fullgraph; HF: each decoder layer's
``Module.compile()``). On CUDA each row also gives the model FLOP utilisation:
``MFU = tokens/s * flops_per_token / peak``, with
``flops_per_token = 6 * N_active + 12 * layers * d_model * seq`` (N_active: the parameters one
token's matmuls use, i.e. every non-expert weight but the embedding lookup, K of the E experts
per layer, and the tied output head; the second term is causal attention's score and value
products, forward and backward, counted in full as in PaLM's formula), and ``peak`` the bf16
throughput of a dense 8192^3 ``torch.mm`` measured in the same run.
Everything runs inside ``moelab train``'s runtime settings for the device and precision
(``benchmarks.common.train_settings``: ``train.deterministic=auto``, off on CUDA, on on CPU).

``--methods`` times moelab's LM at each size with the methods off, each method alone (Default
MoE, heavy-ball MomentumSMoE, Excitation positive_sum on the AdamW) and all three together,
on the same weights and batch, and reports each arm's step-time and peak-memory ratio to
methods off (the overhead targets: Default MoE <= 3%, momentum <= 2%, Excitation <= 5%).

Sizes (name: d_model, layers, heads, experts top-K, expert width F, batch x seq, vocab):
    default: 128, 4, 4, 8 top-2, 256, 32 x 128, 256   (``moelab train``'s built-in LM)
    medium:  512, 4, 8, 32 top-4, 512, 8 x 256, 256
    wide:   1024, 4, 16, 64 top-8, 256, 4 x 256, 256
    gpu620m: 1024, 8, 16, 8 top-2, 2816, 8 x 1024, 32000   (620 M parameters, 205 M active)
    olmoe:  2048, 4, 16, 64 top-8, 1024, 8 x 1024, 50304   (OLMoE-like, 1.78 B parameters)
Needs the ``bench`` extra (``transformers>=5``).
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.common import step_peak_bytes, time_interleaved, train_settings, write_result


@dataclass(frozen=True)
class Shape:
    """One model + batch shape of the comparison."""

    d_model: int
    layers: int
    heads: int
    experts: int
    top_k: int
    d_ff: int
    batch: int
    seq: int
    vocab: int = 256

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


SIZES = {
    "default": Shape(128, 4, 4, 8, 2, 256, 32, 128),
    "medium": Shape(512, 4, 8, 32, 4, 512, 8, 256),
    "wide": Shape(1024, 4, 16, 64, 8, 256, 4, 256),
    "quick": Shape(32, 2, 2, 4, 2, 32, 2, 16),
}
#: the GPU shapes (too big to build on a CPU in tests; their sizes are checked on "meta")
GPU_SIZES = {
    "gpu620m": Shape(1024, 8, 16, 8, 2, 2816, 8, 1024, vocab=32000),
    "olmoe": Shape(2048, 4, 16, 64, 8, 1024, 8, 1024, vocab=50304),
}
ALL_SIZES = {**SIZES, **GPU_SIZES}
CPU_SIZES = ("default", "medium", "wide")


@dataclass(frozen=True)
class Recipe:
    """How both libraries train: device, precision (``moelab.train.precision``), compiled blocks."""

    device: str = "cpu"
    precision: str = "fp32"
    compile: bool = False
    backend: str = "inductor"  # of torch.compile ("aot_eager" for CPU smoke runs)

    def autocast(self):
        from moelab.train.precision import autocast

        return autocast(self.precision, torch.device(self.device))

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=1e-4,
                                 fused=torch.device(self.device).type == "cuda")


def active_params(s: Shape) -> int:
    """Parameters one token's matmuls use (tied output head once, embedding lookup not, K of
    E experts): the N of ``6 N`` in ``flops_per_token``."""
    attn = 4 * s.d_model ** 2
    router = s.d_model * s.experts
    experts = s.top_k * 3 * s.d_model * s.d_ff  # SwiGLU: [D, 2F] + [F, D] per expert
    return s.layers * (attn + router + experts) + s.d_model * s.vocab


def flops_per_token(s: Shape) -> float:
    """Training FLOPs per token: ``6 * N_active + 12 * layers * d_model * seq``."""
    return 6.0 * active_params(s) + 12.0 * s.layers * s.d_model * s.seq


def dense_peak_flops(device: str, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                     reps: int = 20) -> float:
    """FLOP/s of a dense ``n^3`` matmul in ``dtype`` on ``device`` (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    secs = time_interleaved({"mm": lambda: torch.mm(a, b)}, reps=reps, warmup=3)["mm"]
    return 2.0 * n ** 3 / secs

# --sweep: d_model grows at E=8 top-2 (F = 2 * d_model), then E grows at d_model 256
# (top-K = E/4, F = 256); 8 x 128 tokens per step throughout.
SWEEP = ([Shape(d, 2, max(1, d // 64), 8, 2, 2 * d, 8, 128) for d in (128, 256, 512, 1024)]
         + [Shape(256, 2, 4, e, e // 4, 256, 8, 128) for e in (8, 32, 64, 128)])


#: --methods arms: (Default MoE on, momentum rule, Excitation strategy or None)
METHOD_ARMS = {
    "off": (False, "none", None),
    "default_moe": (True, "none", None),
    "heavy_ball": (False, "heavy_ball", None),
    "excitation": (False, "none", "positive_sum"),
    "all_three": (True, "heavy_ball", "positive_sum"),
}


def moelab_model(s: Shape, default_moe: bool = False, momentum: str = "none"
                 ) -> torch.nn.Module:
    from moelab.methods.default_moe import DefaultMoEConfig
    from moelab.methods.momentum import MomentumConfig
    from moelab.models import ModelConfig, MoETransformerLM
    from moelab.moe import MoEConfig

    cfg = ModelConfig(d_model=s.d_model, n_layers=s.layers, n_heads=s.heads,
                      max_seq_len=s.seq, tie_embeddings=True,
                      moe=MoEConfig(n_experts=s.experts, top_k=s.top_k, d_ff=s.d_ff,
                                    normalize_topk=True, aux_loss_coef=0.01),
                      default_moe=DefaultMoEConfig() if default_moe else None,
                      momentum=MomentumConfig(momentum))
    return MoETransformerLM(cfg, s.vocab).train()


def hf_model(s: Shape) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=s.vocab, hidden_size=s.d_model, intermediate_size=s.d_ff,
                           num_hidden_layers=s.layers, num_attention_heads=s.heads,
                           num_key_value_heads=s.heads, num_local_experts=s.experts,
                           num_experts_per_tok=s.top_k, max_position_embeddings=s.seq,
                           tie_word_embeddings=True, output_router_logits=True,
                           router_aux_loss_coef=0.01, attn_implementation="sdpa",
                           rms_norm_eps=1e-6,  # moelab's RMSNorm eps and RoPE base
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config._experts_implementation = "grouped_mm"
    return MixtralForCausalLM(config).train()


def copy_moelab_weights_to_hf(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Load moelab LM ``ours``'s weights into the HF Mixtral ``theirs`` of the same shape, so
    both compute the same logits (checked in the tests: the comparison is of one function)."""
    hf = theirs.model
    with torch.no_grad():
        hf.embed_tokens.weight.copy_(ours.tok_emb.weight)
        hf.norm.weight.copy_(ours.norm.weight)
        for block, layer in zip(ours.blocks, hf.layers, strict=True):
            q, k, v = block.attn.qkv.weight.chunk(3, dim=0)
            for proj, w in ((layer.self_attn.q_proj, q), (layer.self_attn.k_proj, k),
                            (layer.self_attn.v_proj, v), (layer.self_attn.o_proj,
                                                          block.attn.proj.weight)):
                proj.weight.copy_(w)
            layer.input_layernorm.weight.copy_(block.norm1.weight)
            layer.post_attention_layernorm.weight.copy_(block.norm2.weight)
            layer.mlp.gate.weight.copy_(block.ffn.router.weight)
            layer.mlp.experts.gate_up_proj.copy_(block.ffn.experts.w_in.transpose(1, 2))
            layer.mlp.experts.down_proj.copy_(block.ffn.experts.w_out.transpose(1, 2))


def n_params(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _batch(s: Shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, s.vocab, (s.batch, s.seq + 1),
                        generator=torch.Generator().manual_seed(seed + 1))
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def moelab_step(model: torch.nn.Module, opt, inp: torch.Tensor, target: torch.Tensor,
                recipe: Recipe = Recipe()):
    """One moelab training step closure (``opt``: an optimizer or an Excitation wrapper)."""

    def loss() -> torch.Tensor:
        with recipe.autocast():
            out = model(inp)
            return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(),
                                   target.reshape(-1)) + out.aux_loss

    def step() -> None:
        loss().backward()  # the logits are freed before the optimizer step, as in HF's arm
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def prepare_moelab(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """``model`` on the recipe's device, its blocks compiled if asked."""
    from moelab.distributed import wrap as parallel

    model.to(recipe.device)
    if recipe.compile:
        backend, parallel.COMPILE_BACKEND = parallel.COMPILE_BACKEND, recipe.backend
        try:
            parallel.compile_blocks(model, "bf16" if recipe.precision == "bf16" else "fp32")
        finally:
            parallel.COMPILE_BACKEND = backend
    return model


def prepare_hf(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """``model`` on the recipe's device, each decoder layer compiled if asked."""
    model.to(recipe.device)
    if recipe.compile:
        for layer in model.model.layers:
            layer.compile(backend=recipe.backend)
    return model


def method_step_fns(s: Shape, seed: int, recipe: Recipe = Recipe()) -> dict:
    """Step closures of moelab's LM for each of ``METHOD_ARMS``, same weights and batch."""
    from moelab.methods.excitation import Excitation

    inp, target = (t.to(recipe.device) for t in _batch(s, seed))
    fns = {}
    for name, (dmoe, rule, strategy) in METHOD_ARMS.items():
        torch.manual_seed(seed)
        model = prepare_moelab(moelab_model(s, default_moe=dmoe, momentum=rule), recipe)
        opt = recipe.optimizer(model)
        if strategy is not None:
            opt = Excitation(opt, model, strategy=strategy)
        fns[name] = moelab_step(model, opt, inp, target, recipe)
    return fns


def measure_methods(s: Shape, reps: int, seed: int, memory: bool,
                    recipe: Recipe = Recipe()) -> dict:
    """Step time (and peak step memory) of each method arm, and its ratio to methods off."""
    fns = method_step_fns(s, seed, recipe)
    times = time_interleaved(fns, reps=reps, warmup=2)
    row = {"shape": vars(s) | {"tokens": s.tokens},
           "step_ms": {k: v * 1e3 for k, v in times.items()},
           "time_ratio": {k: v / times["off"] for k, v in times.items()}}
    if memory:
        peaks = {k: step_peak_bytes(fn) for k, fn in fns.items()}
        row["peak_mib"] = {k: v / 2**20 for k, v in peaks.items()}
        row["memory_ratio"] = {k: v / peaks["off"] for k, v in peaks.items()}
    return row


def step_fns(s: Shape, seed: int, recipe: Recipe = Recipe()) -> tuple[dict, dict]:
    """The two step closures on one shared batch, and each model's parameter count."""
    torch.manual_seed(seed)
    ours, theirs = moelab_model(s), hf_model(s)
    counts = {"moelab": n_params(ours), "hf_mixtral": n_params(theirs)}
    if counts["moelab"] != counts["hf_mixtral"]:
        raise RuntimeError(f"parameter counts differ at {s}: {counts}; the comparison needs "
                           "models of exactly the same size")
    ours, theirs = prepare_moelab(ours, recipe), prepare_hf(theirs, recipe)
    inp, target = (t.to(recipe.device) for t in _batch(s, seed))
    ours_step = moelab_step(ours, recipe.optimizer(ours), inp, target, recipe)
    opt_theirs = recipe.optimizer(theirs)

    def theirs_step() -> None:
        with recipe.autocast():
            loss = theirs(inp, labels=inp).loss
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    return {"moelab": ours_step, "hf_mixtral": theirs_step}, counts


def measure(s: Shape, reps: int, seed: int, memory: bool, recipe: Recipe = Recipe(),
            peak_flops: float | None = None) -> dict:
    """Times (and optionally peak step memory) of both models at shape ``s``; with
    ``peak_flops`` also each one's MFU."""
    fns, counts = step_fns(s, seed, recipe)
    times = time_interleaved(fns, reps=reps, warmup=2)
    row = {"shape": vars(s) | {"tokens": s.tokens}, "params": counts["moelab"],
           "active_params": active_params(s), "recipe": vars(recipe),
           "step_ms": {k: v * 1e3 for k, v in times.items()},
           "ratio": times["moelab"] / times["hf_mixtral"],
           "tokens_per_s": {k: s.tokens / v for k, v in times.items()}}
    if peak_flops:
        row["mfu"] = {k: s.tokens / v * flops_per_token(s) / peak_flops
                      for k, v in times.items()}
    if memory:
        peaks = {k: step_peak_bytes(fn) for k, fn in fns.items()}
        row["peak_mib"] = {k: v / 2**20 for k, v in peaks.items()}
        row["peak_ratio"] = peaks["moelab"] / peaks["hf_mixtral"]
    return row


def _print_row(name: str, r: dict) -> None:
    ms, tps = r["step_ms"], r["tokens_per_s"]
    line = (f"{name:>8s} {r['params'] / 1e6:7.2f}M  moelab {ms['moelab']:8.1f} ms "
            f"({tps['moelab']:7.0f} tok/s)  HF {ms['hf_mixtral']:8.1f} ms "
            f"({tps['hf_mixtral']:7.0f} tok/s)  ratio {r['ratio']:.3f}")
    if "mfu" in r:
        line += f"  MFU {r['mfu']['moelab']:.1%} / {r['mfu']['hf_mixtral']:.1%}"
    if "peak_mib" in r:
        pk = r["peak_mib"]
        line += (f"  peak {pk['moelab']:7.1f} / {pk['hf_mixtral']:7.1f} MiB"
                 f" ({r['peak_ratio']:.3f})")
    print(line, flush=True)


def _print_methods(name: str, r: dict) -> None:
    print(f"{name}: methods off {r['step_ms']['off']:.1f} ms/step", flush=True)
    for arm in METHOD_ARMS:
        line = f"  {arm:12s} step x{r['time_ratio'][arm]:.3f}"
        if "memory_ratio" in r:
            line += f"  peak {r['peak_mib'][arm]:7.1f} MiB x{r['memory_ratio'][arm]:.3f}"
        print(line, flush=True)


def profile_moelab(s: Shape, steps: int, seed: int, top: int = 15) -> str:
    """The profiler's table of moelab's ``steps`` training steps at shape ``s`` (after two
    warm-up steps): the ``top`` ops by self CPU time, with call counts."""
    from torch.profiler import ProfilerActivity, profile

    fns, _ = step_fns(s, seed)
    step = fns["moelab"]
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top,
                                     max_name_column_width=48)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(CPU_SIZES),
                   choices=[k for k in ALL_SIZES if k != "quick"])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                   help="the recipe of both libraries (see the module docstring)")
    p.add_argument("--compile", action="store_true", help="compile every block of both")
    p.add_argument("--sweep", action="store_true",
                   help="time the step over growing d_model and E instead of --sizes")
    p.add_argument("--methods", action="store_true",
                   help="time moelab's LM with each method and all three vs methods off")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory profile")
    p.add_argument("--quick", action="store_true", help="one tiny size, 2 reps (smoke test)")
    p.add_argument("--out", help="also write the result as JSON here")
    p.add_argument("--profile", type=int, metavar="STEPS", default=0,
                   help="instead of timing: print the top ops of STEPS moelab steps per size")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe(args.device, args.precision, args.compile)
    with train_settings(args.device, args.precision):  # as `moelab train` runs
        return _run(args, argv, recipe)


def _run(args: argparse.Namespace, argv: list[str] | None, recipe: Recipe) -> dict:
    if args.profile:
        for name in args.sizes:
            print(f"{name}: {args.profile} moelab steps, {args.threads} threads")
            print(profile_moelab(ALL_SIZES[name], args.profile, args.seed), flush=True)
        return {}
    if args.quick:
        shapes, args.reps = {"quick": SIZES["quick"]}, 2
    elif args.sweep:
        shapes = {f"s{i}": s for i, s in enumerate(SWEEP)}
    else:
        shapes = {name: ALL_SIZES[name] for name in args.sizes}
    peak = dense_peak_flops(recipe.device) if recipe.device.startswith("cuda") else None
    rows = {}
    for name, shape in shapes.items():
        if args.methods:
            rows[name] = measure_methods(shape, args.reps, args.seed, not args.no_memory,
                                         recipe)
            _print_methods(name, rows[name])
        else:
            rows[name] = measure(shape, args.reps, args.seed, not args.no_memory, recipe,
                                 peak)
            _print_row(name, rows[name])
    result = {"command": "python -m benchmarks.train_step " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "settings": vars(args), "torch": torch.__version__,
              "machine": platform.platform(), "dense_bf16_peak_flops": peak, "rows": rows}
    if recipe.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
