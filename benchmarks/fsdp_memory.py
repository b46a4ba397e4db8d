"""Per-rank memory of parameters, gradients and optimizer state: DDP vs FSDP (``train.parallel``)
at 1, 2 and 4 gloo CPU ranks, counted from the tensors each rank holds (a DTensor's local shard).

The model is mostly experts and attention: a moelab LM with D=256, 4 blocks, every block an MoE
layer of 16 SwiGLU experts (d_ff=256), 4 heads, a byte vocabulary (256, tied embeddings). Each
setup builds it the way the Trainer does (``moelab.distributed.wrap.wrap_model``, then
``moelab.train.optim.build_optimizer``: AdamW, Default MoE and Excitation on), runs one
training step on 4 x 64 random tokens per rank and counts, on every rank:

  params     bytes of the parameters it holds (full copies under DDP, shards under FSDP)
  grads      bytes of their gradients after the backward (before the optimizer step)
  optimizer  bytes of the optimizer state after the step (AdamW's two moments and step)

Reported per setup: the largest rank's numbers and ``params + optimizer`` in MiB, and that sum
as a fraction of DDP's at the same world size. Expert parallel rows (``+ep``) shard the experts
over 2 ranks in both modes.

    python -m benchmarks.fsdp_memory                    # prints one JSON line per setup
    python -m benchmarks.fsdp_memory --json out.json    # and writes them all
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODEL = ["model.d_model=256", "model.n_layers=4", "model.n_heads=4", "model.moe.n_experts=16",
         "model.moe.top_k=2", "model.moe.d_ff=256", "model.moe_every=1", "model.max_seq_len=64",
         "data.seq_len=64",
         "model.default_moe.beta=0.9", "optim.excitation.strategy=zero_sum"]
VOCAB, BATCH, SEQ = 256, 4, 64


def _bytes(tensors) -> int:
    from moelab.moe.dtensor import local

    return sum(local(t).numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def _worker(rank: int, world: int, init_file: str, parallel: str, ep: int, out_file: str) -> None:
    from moelab.config import apply_overrides, config_from_dict, config_to_dict, load_config
    from moelab.distributed import ddp_ep as mdist
    from moelab.distributed.fsdp import build_mesh
    from moelab.distributed.wrap import wrap_model
    from moelab.models import build_model
    from moelab.train.optim import build_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    cfg = config_from_dict(apply_overrides(config_to_dict(load_config("default")), MODEL))
    ctx = mdist.make_context(ep)
    if parallel == "fsdp":
        ctx = dataclasses.replace(ctx, parallel="fsdp", mesh=build_mesh(world, ep, "cpu"))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=VOCAB)
    device = torch.device("cpu")
    train_model, expert_params = wrap_model(model, ctx, device)
    opt, _ = build_optimizer(model, cfg.optim, all_reduce_counts=True, device=device)
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(rank))
    out = train_model(x)
    (torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB), x.reshape(-1))
     + out.aux_loss).backward()
    mdist.sync_expert_grads(expert_params, ctx)
    params = list(model.parameters())
    grads = _bytes(p.grad for p in params if p.grad is not None)
    opt.step()
    optim = _bytes(v for s in opt.state.values() for v in s.values())
    row = {"params": _bytes(params), "grads": grads, "optimizer": optim}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def composition() -> dict[str, float]:
    """The model's parameters by kind, as shares of the total (experts, attention, other)."""
    from moelab.config import apply_overrides, config_from_dict, config_to_dict, load_config
    from moelab.models import build_model

    cfg = config_from_dict(apply_overrides(config_to_dict(load_config("default")), MODEL))
    counts = {"experts": 0, "attention": 0, "other": 0}
    for name, p in build_model(cfg.model, vocab_size=VOCAB).named_parameters():
        kind = "experts" if ".experts." in name else "attention" if ".attn." in name else "other"
        counts[kind] += p.numel()
    total = sum(counts.values())
    return {k: round(v / total, 4) for k, v in counts.items()} | {"total_params": total}


def measure(parallel: str, world: int, ep: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "pg"), parallel, ep, out),
                 nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the rows here")
    args = ap.parse_args()
    setups = [(p, w, 1) for w in (1, 2, 4) for p in ("ddp", "fsdp")]
    setups += [(p, 4, 2) for p in ("ddp", "fsdp")]
    mib = 2**20
    rows, ddp_total = [], {}
    for parallel, world, ep in setups:
        ranks = measure(parallel, world, ep)
        worst = max(ranks, key=lambda r: r["params"] + r["optimizer"])
        total = worst["params"] + worst["optimizer"]
        if parallel == "ddp":
            ddp_total[(world, ep)] = total
        row = {"setup": f"{parallel}{'+ep' + str(ep) if ep > 1 else ''}", "ranks": world,
               "params_MiB": round(worst["params"] / mib, 3),
               "grads_MiB": round(worst["grads"] / mib, 3),
               "optimizer_MiB": round(worst["optimizer"] / mib, 3),
               "params_plus_optimizer_MiB": round(total / mib, 3),
               "vs_ddp_same_ranks": round(total / ddp_total[(world, ep)], 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"torch": torch.__version__, "machine": platform.machine(), "backend": "gloo",
            "model": MODEL, "vocab": VOCAB, "tokens_per_rank": BATCH * SEQ,
            "param_share": composition(), "command": "python -m benchmarks.fsdp_memory"}
    print(json.dumps({"param_share": meta["param_share"]}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
