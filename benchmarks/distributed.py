"""Expert parallelism on CPU (gloo): all-to-all volume and step time, 2 ranks against 1.

One MoELayer (D=512, E=64, top-8, d_ff=256, SwiGLU, fp32), forward + backward on a fixed global
batch of tokens; every rank uses 1 thread. Contenders, each in its own set of processes:
  - 1 rank, 1 thread, all tokens (the reference);
  - 1 rank, 2 threads, all tokens (the same two cores used by one process);
  - 2 ranks data parallel (experts replicated; gradients all-reduced as DDP would, one bucket);
  - 2 ranks expert parallel (32 experts each; tokens exchanged with uneven all_to_all_single).
Reported: median step time (rank 0, after a barrier), the ratio to the 1-rank/1-thread
reference, and the all-to-all volume per step per rank (rows sent to the other rank, x there
and y back, forward and backward: 4 * rows * D * 4 bytes).

    python -m benchmarks.distributed            # tokens=4096
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelab.distributed.ddp_ep import (
    enable_global_stats,
    expert_parameters,
    make_context,
    shard_experts,
    sync_expert_grads,
)
from moelab.moe import MoEConfig, MoELayer

CFG = dict(d_model=512, n_experts=64, top_k=8, d_ff=256)


def _step_fn(layer: MoELayer, x: torch.Tensor, grad: torch.Tensor, ctx, mode: str):
    experts = expert_parameters(layer)
    others = [p for p in layer.parameters() if all(p is not q for q in experts)]

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        (out.y * grad).sum().add(out.losses.total).backward()
        if mode == "dp":
            flat = torch.cat([p.grad.reshape(-1) for p in layer.parameters()])
            dist.all_reduce(flat)
        elif mode == "ep":
            flat = torch.cat([p.grad.reshape(-1) for p in others])
            dist.all_reduce(flat)
            sync_expert_grads(experts, ctx)

    return step


def _worker(rank: int, world: int, init_file: str, mode: str, threads: int, tokens: int,
            reps: int, out_file: str) -> None:
    torch.set_num_threads(threads)
    ctx = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
        ctx = make_context(2 if mode == "ep" else 1)
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**CFG, aux_loss_coef=0.01))
    if ctx is not None:
        layer = copy.deepcopy(layer)
        shard_experts(layer, ctx)
        enable_global_stats(layer)
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(tokens, CFG["d_model"], generator=g)
    grad_all = torch.randn(tokens, CFG["d_model"], generator=g)
    per = tokens // world
    x, grad = x_all[rank * per:(rank + 1) * per], grad_all[rank * per:(rank + 1) * per]
    step = _step_fn(layer, x, grad, ctx, mode)
    times = []
    for i in range(reps + 3):
        if ctx is not None:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        if ctx is not None:
            dist.barrier()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    sent_rows = 0
    if mode == "ep":
        splits = layer.experts.last_send_splits
        sent_rows = sum(n for j, n in enumerate(splits) if j != ctx.ep_rank)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({"s": statistics.median(times), "sent_rows": sent_rows}, f)
    if ctx is not None:
        dist.destroy_process_group()


def measure(mode: str, world: int, threads: int, tokens: int, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        args = (world, os.path.join(tmp, "pg"), mode, threads, tokens, reps, out)
        if world == 1:
            _worker(0, *args)
        else:
            mp.spawn(_worker, args=args, nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="global batch, tokens")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, gloo, "
          f"fp32, global tokens={args.tokens}, {CFG}")
    runs = {
        "1 rank x 1 thread": ("single", 1, 1),
        "1 rank x 2 threads": ("single", 1, 2),
        "2 ranks DP x 1 thread": ("dp", 2, 1),
        "2 ranks EP x 1 thread": ("ep", 2, 1),
    }
    res = {name: measure(mode, world, thr, args.tokens, args.reps)
           for name, (mode, world, thr) in runs.items()}
    ref = res["1 rank x 1 thread"]["s"]
    for name, r in res.items():
        row = {"setup": name, "step_ms": round(r["s"] * 1e3, 1),
               "vs_1rank_1thread": round(r["s"] / ref, 3)}
        if r["sent_rows"]:
            row["a2a_rows_sent_per_rank"] = r["sent_rows"]
            row["a2a_MiB_per_step_per_rank"] = round(
                4 * r["sent_rows"] * CFG["d_model"] * 4 / 2**20, 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
