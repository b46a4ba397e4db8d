"""Cost of the Excitation optimizer wrapper against the bare base optimizer (AdamW).

Contenders: bare AdamW, and Excitation(AdamW) with each strategy (zero_sum, positive_sum,
negative_sum and the ablations inverted/random/global on zero_sum's multipliers), every one on
its own copy of the model. Two models:
  (a) layer: one MoELayer, D=512, E=64, top-8, d_ff=256 (SwiGLU), 2048 tokens;
  (b) lm: moelab.models.MoETransformerLM with ModelConfig defaults (4 blocks, D=128, E=8,
      top-2, d_ff=256; embeddings, attention, norms as the non-expert params), vocab 256,
      8 x 256 = 2048 tokens; if moelab.models is missing, a stack of 4 MoELayers with dense
      projections between them.
Measured, as ratios to bare AdamW in one interleaved run (benchmarks.common.time_interleaved):
  - opt step: ``step()`` alone on fixed gradients (Excitation gets one forward's counts);
  - train step: zero_grad + forward + backward + step;
  - snapshot: bytes of the transient copy of the expert parameters (the only extra memory;
    on CUDA also the measured peak allocation of a step over bare AdamW's).

    python -m benchmarks.excitation          # CPU fp32, 2 threads
    python -m benchmarks.excitation --device cuda
"""

from __future__ import annotations

import argparse
import copy
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import time_interleaved
from moelab.methods.excitation import Excitation
from moelab.moe import MoEConfig, MoELayer

STRATEGIES = ("zero_sum", "positive_sum", "negative_sum", "inverted", "random", "global")


class MoEStack(nn.Module):
    """Fallback LM-like model: embedding -> [dense proj + MoELayer] x L -> head."""

    def __init__(self, vocab: int = 256, d_model: int = 128, n_layers: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        self.proj = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_layers))
        self.moe = nn.ModuleList(
            MoELayer(MoEConfig(d_model=d_model, n_experts=8, top_k=2, d_ff=256))
            for _ in range(n_layers))
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        aux = h.new_zeros(())
        for proj, moe in zip(self.proj, self.moe, strict=True):
            h = h + proj(h)
            out = moe(h)
            h, aux = h + out.y, aux + out.losses.total
        return self.head(h), aux


def build_case(case: str, device: str, tokens: int):
    """(model, input, loss_fn(model, input) -> scalar, description)."""
    if case == "layer":
        torch.manual_seed(0)
        model = MoELayer(MoEConfig(d_model=512, n_experts=64, top_k=8, d_ff=256))
        x = torch.randn(tokens, 512, device=device)
        return model.to(device), x, _layer_loss, "MoELayer D=512 E=64 K=8 F=256"
    vocab, seq = 256, 256
    try:
        from moelab.models import ModelConfig, MoETransformerLM
    except ImportError:
        torch.manual_seed(0)
        model, desc = MoEStack(vocab), "MoEStack (4 x MoELayer D=128 E=8 K=2 F=256)"

        def loss_fn(m, idx):
            logits, aux = m(idx)
            return F.cross_entropy(logits.flatten(0, 1), idx.flatten()) + aux
    else:
        torch.manual_seed(0)
        cfg = ModelConfig()
        model = MoETransformerLM(cfg, vocab_size=vocab)
        desc = (f"MoETransformerLM defaults (L={cfg.n_layers} D={cfg.d_model} "
                f"E={cfg.n_experts} K={cfg.top_k} F={cfg.d_ff})")

        def loss_fn(m, idx):
            out = m(idx)
            return F.cross_entropy(out.logits.flatten(0, 1), idx.flatten()) + out.aux_loss
    idx = torch.randint(0, vocab, (tokens // seq, seq), device=device)
    return model.to(device), idx, loss_fn, desc


def _layer_loss(m: MoELayer, x: torch.Tensor) -> torch.Tensor:
    out = m(x)
    return out.y.square().mean() + out.losses.total


def make_opt(model: nn.Module, strategy: str | None) -> torch.optim.Optimizer | Excitation:
    """Bare AdamW, or AdamW with Excitation attached (the Excitation object steps it)."""
    base = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    return base if strategy is None else Excitation(base, model, strategy=strategy)


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer | Excitation
                ) -> tuple[int, int, int]:
    """(parameter bytes, expert parameter bytes, parameter + grad + optimizer-state bytes)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = sum(p.numel() * p.element_size() for m in model.modules()
                  if isinstance(m, MoELayer) for p in m.experts.parameters())
    states = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                 if torch.is_tensor(v))
    return params, experts, 2 * params + states


def cuda_peak_extra(fn: Callable[[], None]) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_case(case: str, device: str, tokens: int, reps: int) -> list[str]:
    model0, x, loss_fn, desc = build_case(case, device, tokens)
    names = ["adamw"] + [f"exc_{s}" for s in STRATEGIES]
    models = {n: copy.deepcopy(model0) for n in names}
    opts = {n: make_opt(models[n], None if n == "adamw" else n[4:]) for n in names}

    def train_step(n: str) -> Callable[[], None]:
        def fn() -> None:
            opts[n].zero_grad(set_to_none=True)
            loss_fn(models[n], x).backward()
            opts[n].step()
        return fn

    # one forward/backward per contender: gradients (kept fixed) and the counts it produced
    counts: dict[str, dict[str, torch.Tensor]] = {}
    for n in names:
        train_step(n)()  # also creates the AdamW state
        if isinstance(opts[n], Excitation):
            counts[n] = {k: v.clone() for k, v in opts[n].last_counts.items()}
        loss_fn(models[n], x).backward()

    def opt_step(n: str) -> Callable[[], None]:
        opt = opts[n]

        def fn() -> None:
            for name, c in counts.get(n, {}).items():
                opt.record_counts(name, c)
            opt.step()
        return fn

    t_opt = time_interleaved({n: opt_step(n) for n in names}, reps=reps)
    t_train = time_interleaved({n: train_step(n) for n in names}, reps=max(reps // 2, 5))
    p_bytes, e_bytes, total_bytes = state_bytes(models["adamw"], opts["adamw"])
    snap = {n: getattr(opts[n], "last_snapshot_bytes", 0) for n in names}
    peak = {}
    if device == "cuda":
        peak = {n: cuda_peak_extra(opt_step(n)) for n in names}
    lines = [f"\n### ({case}) {desc}: {p_bytes / 2**20:.1f} MiB params "
             f"({e_bytes / 2**20:.1f} MiB expert), {tokens} tokens, {device}\n",
             "| optimizer | opt step ms | opt step / AdamW | train step ms | "
             "train step / AdamW | snapshot MiB | snapshot / params | "
             "snapshot / (params+grads+Adam state) |"
             + (" CUDA peak extra MiB |" if peak else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if peak else "")]
    for n in names:
        row = (f"| {n} | {t_opt[n] * 1e3:.2f} | {t_opt[n] / t_opt['adamw']:.3f} | "
               f"{t_train[n] * 1e3:.1f} | {t_train[n] / t_train['adamw']:.3f} | "
               f"{snap[n] / 2**20:.1f} | {snap[n] / p_bytes:.3f} | {snap[n] / total_bytes:.3f} |")
        if peak:
            row += f" {(peak[n] - peak['adamw']) / 2**20:.1f} |"
        lines.append(row)
    print("\n".join(lines), flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--cases", default="layer,lm")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = (torch.cuda.get_device_name() if args.device == "cuda"
           else platform.processor() or platform.machine())
    print(f"# python -m benchmarks.excitation --device {args.device} --tokens {args.tokens} "
          f"--threads {args.threads} --reps {args.reps} --cases {args.cases}\n"
          f"# torch {torch.__version__}, {dev}, fp32, AdamW(wd=0.1), medians of interleaved "
          "reps, ratios from the same run")
    for case in args.cases.split(","):
        run_case(case, args.device, args.tokens, args.reps)


if __name__ == "__main__":
    main()
