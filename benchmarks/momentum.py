"""Cost of the MomentumSMoE combine rules against the baseline SMoE LM, and AdamSMoE's step size.

One training step = forward + cross-entropy (+ aux loss) + backward + AdamW step, on the same
weights and batch for every rule. Reported, from one interleaved run:
  - step time (median) and its ratio to the baseline rule "none", and the time of the rule's
    own ops alone (fwd+bwd, all MoE layers, random inputs) — robust to machine noise;
  - activation memory (bytes autograd saves for backward, ``saved_tensor_bytes``) and its ratio;
  - per MoE layer, at init: RMS of the block's residual update (block output - h') relative to
    RMS(h') — AdamSMoE without bias correction adds ~3.16*gamma*sign(f) in its first layer;
  - with ``--train-steps N``: the mean training loss of the last 10 of N steps on Shakespeare.

    python -m benchmarks.momentum             # CPU fp32, 2 threads, D=256, 4 layers, E/K=8/2,
                                              # seq 256, batch 8
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import saved_tensor_bytes, time_interleaved
from moelab.methods.momentum import CombineRule, MomentumConfig
from moelab.models import ModelConfig, build_model
from moelab.moe import MoEConfig

RULES = {
    "none": MomentumConfig(),
    "heavy_ball": MomentumConfig(rule="heavy_ball", mu=0.7, gamma=1.0),
    "heavy_ball_learnable": MomentumConfig(rule="heavy_ball", mu=0.7, gamma=1.0,
                                           learnable=True),
    "adam": MomentumConfig(rule="adam"),
    "adam_bias_corr": MomentumConfig(rule="adam", adam_bias_correction=True),
    "robust": MomentumConfig(rule="robust", kappa=1.25, rho=0.2),
}
VOCAB = 256


class _Recorder(CombineRule):
    """Wraps a rule and records RMS(update)/RMS(h') per MoE layer."""

    def __init__(self, rule: CombineRule) -> None:
        super().__init__()
        self.rule = rule
        self.ratios: dict[int, float] = {}

    def init_state(self, h):
        return self.rule.init_state(h)

    def moe_input(self, x_norm, state, layer_idx):
        return self.rule.moe_input(x_norm, state, layer_idx)

    def combine(self, h, f, state, layer_idx):
        h_new, state = self.rule.combine(h, f, state, layer_idx)
        rms = lambda t: t.detach().float().pow(2).mean().sqrt()  # noqa: E731
        self.ratios[layer_idx] = float(rms(h_new - h) / rms(h))
        return h_new, state


def make_models(args) -> dict[str, torch.nn.Module]:
    models = {}
    base_state = None
    for name, momentum in RULES.items():
        cfg = ModelConfig(kind="lm", d_model=args.d_model, n_layers=args.n_layers,
                          n_heads=args.n_heads,
                          moe=MoEConfig(n_experts=args.n_experts, top_k=args.top_k,
                                        d_ff=args.d_ff), max_seq_len=args.seq, momentum=momentum,
                          activation_checkpointing=args.checkpointing)
        torch.manual_seed(0)
        model = build_model(cfg, vocab_size=VOCAB)
        if base_state is None:
            base_state = model.state_dict()
        else:  # identical weights; only learnable mu/gamma are extra
            model.load_state_dict(base_state, strict=False)
        models[name] = model
    return models


def train_step(model, opt, x, y):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten()) + out.aux_loss
        loss.backward()
        opt.step()
    return step


def forward_loss(model, x, y):
    def run() -> torch.Tensor:
        out = model(x)
        return F.cross_entropy(out.logits.flatten(0, 1), y.flatten()) + out.aux_loss
    return run


def rule_only(model, shape) -> Callable[[], None]:
    """fwd+bwd of the rule's own ops alone (init_state, moe_input, combine per MoE layer) on
    random [B, S, D] tensors: the part of the step a rule adds, free of the model's noise."""
    rule, n_moe = model.combine_rule, len(model.moe_layers())
    g = torch.Generator().manual_seed(1)
    h0 = torch.randn(*shape, generator=g, requires_grad=True)
    fs = [torch.randn(*shape, generator=g, requires_grad=True) for _ in range(n_moe)]

    def run() -> None:
        h, state = h0, rule.init_state(h0)
        total = 0.0
        for i, f in enumerate(fs):
            total = total + rule.moe_input(h, state, i).sum()
            h, state = rule.combine(h, f, state, i)
        (total + h.sum()).backward()
    return run


def update_sizes(models, x) -> dict[str, dict[int, float]]:
    sizes = {}
    for name, model in models.items():
        rule = model.combine_rule
        rec = _Recorder(rule)
        model.combine_rule = rec
        with torch.no_grad():
            model(x)
        model.combine_rule = rule
        sizes[name] = dict(sorted(rec.ratios.items()))
    return sizes


def short_training(args, steps: int) -> dict[str, float]:
    from moelab.data import ByteTokenizer, LMBatcher, load_text_dataset

    tokens = ByteTokenizer().encode(load_text_dataset("shakespeare").train[:2_000_000])
    final = {}
    for name, model in make_models(args).items():
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
        batches = LMBatcher(tokens, args.batch, args.seq, seed=0)
        losses = []
        for _ in range(steps):
            x, y = batches.next_batch()
            out = model(x)
            loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
            (loss + out.aux_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        final[name] = sum(losses[-10:]) / len(losses[-10:])
        print(f"  trained {name}: last-10 loss {final[name]:.4f}", file=sys.stderr, flush=True)
    return final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--n-experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    models = make_models(args)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (args.batch, args.seq), generator=g)
    y = torch.randint(0, VOCAB, (args.batch, args.seq), generator=g)
    fns = {name: train_step(m, torch.optim.AdamW(m.parameters(), lr=1e-4), x, y)
           for name, m in models.items()}
    secs = time_interleaved(fns, reps=args.reps, warmup=2)
    shape = (args.batch, args.seq, args.d_model)
    rule_secs = time_interleaved({n: rule_only(m, shape) for n, m in models.items()},
                                 reps=5 * args.reps, warmup=3)
    mem = {name: saved_tensor_bytes(forward_loss(m, x, y)) for name, m in models.items()}
    sizes = update_sizes(make_models(args), x)  # fresh init weights
    trained = short_training(args, args.train_steps) if args.train_steps else {}

    print(f"`python -m benchmarks.momentum {' '.join(sys.argv[1:])}`".replace(" `", "`"))
    print(f"\ntorch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, fp32; LM D={args.d_model}, {args.n_layers} layers (all MoE),"
          f" E/K={args.n_experts}/{args.top_k}, d_ff={args.d_ff}, seq {args.seq}, batch "
          f"{args.batch}, checkpointing={args.checkpointing}; median of {args.reps} interleaved "
          "steps (fwd+bwd+AdamW)\n")
    layers = list(next(iter(sizes.values())))
    head = ("| rule | step ms | time / none | rule ops ms | saved MiB | memory / none | "
            + " | ".join(f"upd/h L{i}" for i in layers) + " |"
            + (f" loss@{args.train_steps} |" if trained else ""))
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name in models:
        row = (f"| {name} | {secs[name] * 1e3:.1f} | {secs[name] / secs['none']:.3f} | "
               f"{rule_secs[name] * 1e3:.1f} | "
               f"{mem[name] / 2**20:.1f} | {mem[name] / mem['none']:.3f} | "
               + " | ".join(f"{sizes[name][i]:.2f}" for i in layers) + " |"
               + (f" {trained[name]:.3f} |" if trained else ""))
        print(row)
    print("\nrule ops ms: fwd+bwd of the rule's own tensor ops for all MoE layers alone "
          "(random inputs, no model), the rule's share of a step.\n"
          "upd/h Li: RMS(block output - h') / RMS(h') in MoE layer i at init (same batch).")


if __name__ == "__main__":
    main()
