"""Training step of a Hugging Face Mixtral patched by ``moelab.hf`` against the unpatched one.

One step = forward (with labels and router aux loss) + backward + AdamW step on the same weights
and batch. The unpatched model uses HF's ``grouped_mm`` experts implementation; the patched
arms use moelab's experts (dispatch auto: the chunked expert loop on CPU) with the methods off,
with Default MoE, and with Default MoE + heavy-ball momentum + Excitation. Reported: median
step time per arm (interleaved, see ``benchmarks.common``) and its ratio to the unpatched model.

    python -m benchmarks.hf_step                # CPU fp32, 2 threads, D=256, 4 layers,
                                                # E/K=8/2, F=512, seq 256, batch 4
    python -m benchmarks.hf_step --quick        # a tiny smoke run (numbers meaningless)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys

import torch

from benchmarks.common import time_interleaved


def _model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=args.vocab, hidden_size=args.d_model,
                           intermediate_size=args.d_ff, num_hidden_layers=args.layers,
                           num_attention_heads=max(1, args.d_model // 64),
                           num_key_value_heads=max(1, args.d_model // 64),
                           num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                           output_router_logits=True, router_aux_loss_coef=0.01)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(args.seed)
    return MixtralForCausalLM(config).train()


def main(argv: list[str] | None = None) -> dict:
    import moelab.hf as mh
    from moelab.methods.default_moe import DefaultMoEConfig
    from moelab.methods.momentum import MomentumConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 reps (smoke test)")
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.d_ff, args.layers, args.seq, args.batch, args.reps = 64, 64, 2, 16, 2, 2
    torch.set_num_threads(args.threads)
    base = _model(args)
    arms = {
        "hf_grouped_mm": (base, None),
        "patched_off": (mh.patch(copy.deepcopy(base)), None),
        "patched_default_moe": (mh.patch(copy.deepcopy(base), default_moe=DefaultMoEConfig()),
                                None),
        "patched_all_three": (mh.patch(copy.deepcopy(base), default_moe=DefaultMoEConfig(),
                                       momentum=MomentumConfig("heavy_ball")), "excitation"),
    }
    ids = torch.randint(0, args.vocab, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(args.seed + 1))

    def step_fn(model: torch.nn.Module, excitation: str | None):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if excitation:
            opt = mh.Excitation(opt, model)

        def step() -> None:
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    times = time_interleaved({n: step_fn(m, e) for n, (m, e) in arms.items()}, reps=args.reps)
    result = {
        "command": "python -m benchmarks.hf_step " + " ".join(argv or sys.argv[1:]),
        "settings": vars(args), "torch": torch.__version__, "machine": platform.platform(),
        "step_s": times,
        "ratio_to_hf": {n: t / times["hf_grouped_mm"] for n, t in times.items()},
    }
    for name, t in times.items():
        print(f"{name:22s} {t * 1e3:9.1f} ms/step   x{t / times['hf_grouped_mm']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
