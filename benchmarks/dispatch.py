"""Forward+backward time of moelab's MoELayer against Hugging Face's MoE block and a dense FFN.

Contenders, per E/K in {8/2, 32/4, 64/8} at fixed active FLOPs (K * d_ff = const):
  - moelab: MoELayer with its default dispatch (on CPU the fused per-expert loop), plain top-K
    and with Default MoE; moelab_grouped_path: the same layer with dispatch="grouped_mm"
    (gather -> grouped GEMM over all rows -> index_add; the CUDA default);
  - hf_eager: transformers' OlmoeSparseMoeBlock, eager experts (one-hot mask, loop over experts,
    where, index_add) — the "one-hot loop";
  - hf_grouped_mm: the same block with experts_implementation="grouped_mm";
  - dense: a SwiGLU FFN of width K * d_ff, the same active FLOPs (the practical limit).
Ratios are against dense (and moelab vs hf_eager), all measured in one interleaved run.

    python -m benchmarks.dispatch            # CPU fp32, 2 threads, 2048 tokens, D=512, K*F=2048
    python -m benchmarks.dispatch --device cuda --dtype bf16 --gpu-shapes   # the GPU table

``--gpu-shapes``: the layer alone on four shapes (D, E/K, F) = (2048, 8/2, 5632),
(2048, 64/8, 1024), (2048, 128/8, 768), (1024, 32/4, 512), 16384 tokens, weights and
activations in ``--dtype``; each contender's achieved TFLOP/s (forward + backward =
``18 * T * K * D * F`` FLOPs for SwiGLU experts), moelab's share of the dense FFN's, and the
moelab / HF grouped_mm time ratio.
Needs the ``bench`` extra (transformers>=5) for the HF rows; without it they are skipped.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import fwd_bwd, saved_tensor_bytes, time_interleaved, train_settings
from moelab.methods.default_moe import default_moe_layer
from moelab.moe import MoEConfig, MoELayer


class DenseSwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


def hf_block(d_model: int, n_experts: int, top_k: int, d_ff: int, impl: str) -> nn.Module | None:
    try:
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    except ImportError:
        return None
    cfg = OlmoeConfig(hidden_size=d_model, intermediate_size=d_ff, num_experts=n_experts,
                      num_experts_per_tok=top_k, experts_implementation=impl)
    block = OlmoeSparseMoeBlock(cfg)
    for p in block.parameters():
        nn.init.normal_(p, std=0.02)
    return block


def run(tokens: int, d_model: int, active_ff: int, reps: int) -> list[dict]:
    rows = []
    for n_experts, top_k in ((8, 2), (32, 4), (64, 8)):
        d_ff = active_ff // top_k
        torch.manual_seed(0)
        x = torch.randn(1, tokens, d_model, requires_grad=True)
        grad = torch.randn(1, tokens, d_model)
        base = MoEConfig(d_model=d_model, n_experts=n_experts, top_k=top_k, d_ff=d_ff,
                         aux_loss_coef=0.0)
        moe = MoELayer(base)
        dmoe = default_moe_layer(base)
        dmoe.load_state_dict(moe.state_dict(), strict=False)
        grouped = MoELayer(MoEConfig(**{**base.__dict__, "dispatch": "grouped_mm"}))
        grouped.load_state_dict(moe.state_dict())
        dense = DenseSwiGLU(d_model, active_ff)
        fns = {
            "dense": fwd_bwd(dense, x, grad),
            "moelab": fwd_bwd(moe, x, grad, lambda o: o.y),
            "moelab_default_moe": fwd_bwd(dmoe, x, grad, lambda o: o.y),
            "moelab_grouped_path": fwd_bwd(grouped, x, grad, lambda o: o.y),
        }
        for impl in ("eager", "grouped_mm"):
            block = hf_block(d_model, n_experts, top_k, d_ff, impl)
            if block is not None:
                fns[f"hf_{impl}"] = fwd_bwd(block, x, grad)
        secs = time_interleaved(fns, reps=reps)
        mem_plain = saved_tensor_bytes(lambda m=moe, x=x: m(x).y)
        mem_default = saved_tensor_bytes(lambda m=dmoe, x=x: m(x).y)
        mem_grouped = saved_tensor_bytes(lambda m=grouped, x=x: m(x).y)
        mem_dense = saved_tensor_bytes(lambda m=dense, x=x: m(x))
        row = {"E/K": f"{n_experts}/{top_k}", "d_ff": d_ff,
               **{f"{k}_ms": round(v * 1e3, 2) for k, v in secs.items()},
               **{f"{k}/dense": round(v / secs["dense"], 3) for k, v in secs.items()
                  if k != "dense"},
               "default_moe/plain_time": round(secs["moelab_default_moe"] / secs["moelab"], 3),
               "default_moe/plain_saved_bytes": round(mem_default / mem_plain, 4),
               "saved_MiB": {"moelab": round(mem_plain / 2**20, 1),
                             "moelab_grouped_path": round(mem_grouped / 2**20, 1),
                             "dense": round(mem_dense / 2**20, 1)}}
        if "hf_eager" in secs:
            row["moelab/hf_eager"] = round(secs["moelab"] / secs["hf_eager"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


#: (d_model, n_experts, top_k, d_ff) of --gpu-shapes
GPU_SHAPES = ((2048, 8, 2, 5632), (2048, 64, 8, 1024), (2048, 128, 8, 768), (1024, 32, 4, 512))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layer_table(shapes, tokens: int, reps: int, device: str, dtype: torch.dtype) -> list[dict]:
    """moelab's layer (its default dispatch on ``device``), with Default MoE, HF's grouped_mm
    block and a dense SwiGLU FFN of the same active FLOPs, forward + backward, in ``dtype``:
    time and achieved TFLOP/s of each."""
    rows = []
    for d_model, n_experts, top_k, d_ff in shapes:
        torch.manual_seed(0)
        kw = {"device": device, "dtype": dtype}
        x = torch.randn(1, tokens, d_model, requires_grad=True, **kw)
        grad = torch.randn(1, tokens, d_model, **kw)
        cfg = MoEConfig(d_model=d_model, n_experts=n_experts, top_k=top_k, d_ff=d_ff,
                        aux_loss_coef=0.0)
        moe = MoELayer(cfg).to(**kw)
        dmoe = default_moe_layer(cfg).to(**kw)
        dmoe.load_state_dict(moe.state_dict(), strict=False)
        fns = {"dense": fwd_bwd(DenseSwiGLU(d_model, top_k * d_ff).to(**kw), x, grad),
               "moelab": fwd_bwd(moe, x, grad, lambda o: o.y),
               "moelab_default_moe": fwd_bwd(dmoe.train(), x, grad, lambda o: o.y)}
        block = hf_block(d_model, n_experts, top_k, d_ff, "grouped_mm")
        if block is not None:
            fns["hf_grouped_mm"] = fwd_bwd(block.to(**kw), x, grad)
        secs = time_interleaved(fns, reps=reps)
        flops = 18.0 * tokens * top_k * d_model * d_ff
        row = {"d_model": d_model, "E/K": f"{n_experts}/{top_k}", "d_ff": d_ff,
               "tokens": tokens, "dtype": str(dtype).removeprefix("torch."),
               "ms": {k: round(v * 1e3, 3) for k, v in secs.items()},
               "tflops": {k: round(flops / v / 1e12, 1) for k, v in secs.items()},
               "moelab/dense_flops": round(secs["dense"] / secs["moelab"], 3)}
        if "hf_grouped_mm" in secs:
            row["moelab/hf_time"] = round(secs["moelab"] / secs["hf_grouped_mm"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=None,
                    help="default 2048 (16384 with --gpu-shapes)")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--active-ff", type=int, default=2048, help="K * d_ff")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--gpu-shapes", action="store_true", help="the four GPU shapes (docstring)")
    args = ap.parse_args()
    if args.gpu_shapes:
        print(f"# torch {torch.__version__}, {args.device}, {args.dtype}")
        with train_settings(args.device, args.dtype):  # as `moelab train` runs
            layer_table(GPU_SHAPES, args.tokens or 16384, args.reps, args.device,
                        DTYPES[args.dtype])
        return
    args.tokens = args.tokens or 2048
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, fp32, tokens={args.tokens}, D={args.d_model}, "
          f"K*F={args.active_ff}")
    run(args.tokens, args.d_model, args.active_ff, args.reps)


if __name__ == "__main__":
    main()
