"""Where the MoE layer's time goes on CPU, against the dense SwiGLU FFN of the same active FLOPs.

For each E/K in {8/2, 32/4, 64/8} (2048 tokens, D=512, K*F=2048, fp32, fwd+bwd):
  - gemm_ratio: the six per-expert GEMMs of a step (forward, input and weight gradients), each
    written into preallocated outputs, over the dense FFN's six GEMMs — the matmul floor;
  - mm_share: the share of the layer step's CPU time inside ``aten::mm`` (torch.profiler);
  - gather_combine_share: the share in ``index_select`` + ``index_add_`` (scatter_add);
  - faulted_MiB: minor page faults per step (MiB of 4 KiB pages), for moelab's default CPU
    dispatch, its grouped path (``dispatch="grouped_mm"``) and dense;
  - with ``--chunk-sweep``: moelab step time / dense for several ``expert_loop.CHUNK_BYTES``.

    python -m benchmarks.dispatch_profile [--chunk-sweep]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import profile

import moelab.moe.expert_loop as expert_loop
from benchmarks.common import fwd_bwd, time_interleaved
from benchmarks.dispatch import DenseSwiGLU
from moelab.moe import MoEConfig, MoELayer

TOKENS, D_MODEL, ACTIVE_FF = 2048, 512, 2048
SIZES = ((8, 2), (32, 4), (64, 8))


def _median_ms(fn: Callable[[], object], reps: int = 10) -> float:
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def gemm_ratio(n_experts: int, top_k: int) -> float:
    """Per-expert GEMMs of one step (even split of rows) over the dense FFN's GEMMs."""
    d, f, n = D_MODEL, ACTIVE_FF // top_k, TOKENS * top_k // n_experts
    rows = n * n_experts
    x, h, a, dy = (torch.randn(rows, c) for c in (d, 2 * f, f, d))
    w_in, w_out = torch.randn(n_experts, d, 2 * f), torch.randn(n_experts, f, d)
    g_in, g_out, out = torch.empty_like(w_in), torch.empty_like(w_out), torch.empty(rows, d)
    sl = [slice(e * n, (e + 1) * n) for e in range(n_experts)]

    def experts() -> None:
        for e, s in enumerate(sl):
            torch.mm(x[s], w_in[e], out=h[s])
            torch.mm(a[s], w_out[e], out=out[s])
            torch.mm(dy[s], w_out[e].t(), out=a[s])
            torch.mm(h[s], w_in[e].t(), out=out[s])
            torch.mm(x[s].t(), h[s], out=g_in[e])
            torch.mm(a[s].t(), dy[s], out=g_out[e])

    xd, hd, ad, dyd = (torch.randn(TOKENS, c) for c in (d, 2 * ACTIVE_FF, ACTIVE_FF, d))
    w1, w2 = torch.randn(d, 2 * ACTIVE_FF), torch.randn(ACTIVE_FF, d)
    g1, g2, od = torch.empty_like(w1), torch.empty_like(w2), torch.empty(TOKENS, d)

    def dense() -> None:
        torch.mm(xd, w1, out=hd)
        torch.mm(ad, w2, out=od)
        torch.mm(dyd, w2.t(), out=ad)
        torch.mm(hd, w1.t(), out=od)
        torch.mm(xd.t(), hd, out=g1)
        torch.mm(ad.t(), dyd, out=g2)

    return _median_ms(experts) / _median_ms(dense)


def faulted_mib(step: Callable[[], None], reps: int = 6) -> float:
    """Median MiB of minor page faults per call of ``step`` (after two warm-up calls)."""
    step()
    step()
    counts = []
    for _ in range(reps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(counts) * 4 / 1024


def op_shares(step: Callable[[], None]) -> dict[str, float]:
    """Shares of the step's self CPU time in matmuls and in gather/combine ops."""
    step()
    with profile() as prof:
        for _ in range(3):
            step()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    gather = sum(self_us.get(k, 0.0) for k in ("aten::index_select", "aten::index_add_",
                                                "aten::scatter_add_"))
    return {"mm_share": round(self_us.get("aten::mm", 0.0) / total, 3),
            "gather_combine_share": round(gather / total, 3)}


def run(chunk_sweep: bool) -> None:
    for n_experts, top_k in SIZES:
        torch.manual_seed(0)
        x = torch.randn(1, TOKENS, D_MODEL, requires_grad=True)
        grad = torch.randn(1, TOKENS, D_MODEL)
        cfg = dict(d_model=D_MODEL, n_experts=n_experts, top_k=top_k,
                   d_ff=ACTIVE_FF // top_k, aux_loss_coef=0.0)
        moe = MoELayer(MoEConfig(**cfg))
        grouped = MoELayer(MoEConfig(**cfg, dispatch="grouped_mm"))
        grouped.load_state_dict(moe.state_dict())
        steps = {"moelab": fwd_bwd(moe, x, grad, lambda o: o.y),
                 "moelab_grouped_path": fwd_bwd(grouped, x, grad, lambda o: o.y),
                 "dense": fwd_bwd(DenseSwiGLU(D_MODEL, ACTIVE_FF), x, grad)}
        row = {"E/K": f"{n_experts}/{top_k}", "gemm_ratio": round(gemm_ratio(n_experts, top_k), 3),
               **op_shares(steps["moelab"]),
               "faulted_MiB": {k: round(faulted_mib(s)) for k, s in steps.items()}}
        if chunk_sweep:
            fns = {"dense": steps["dense"]}
            for mib in (1, 2, 4, 8, 16):
                def with_chunk(mib: int = mib, step: Callable[[], None] = steps["moelab"]
                               ) -> None:
                    expert_loop.CHUNK_BYTES = mib << 20
                    step()
                fns[f"{mib}MiB"] = with_chunk
            default = expert_loop.CHUNK_BYTES
            secs = time_interleaved(fns, reps=10)
            expert_loop.CHUNK_BYTES = default
            row["chunk_sweep/dense"] = {k: round(v / secs["dense"], 3) for k, v in secs.items()
                                        if k != "dense"}
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk-sweep", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} threads, fp32, tokens={TOKENS}, "
          f"D={D_MODEL}, K*F={ACTIVE_FF}")
    run(args.chunk_sweep)


if __name__ == "__main__":
    main()
