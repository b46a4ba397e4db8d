"""Before/after of the fused head split + RoPE (``moelab.models.blocks._SplitHeadsRope``).

"plain" is the path it replaced: permute and unbind q, k, v, then ``Rotary.forward`` on q and
k (a chunk, four products, a concatenation each). Both are timed interleaved in one run:
the attention sub-layer alone (forward + backward of SDPA on the split heads) and the whole
training step of the default-size LM (forward + loss + backward + AdamW), where the plain
arm's attention modules are switched to the old path. Outputs are bit-identical (tests).

    python -m benchmarks.attention                  # CPU fp32, 2 threads
    python -m benchmarks.attention --threads 1
"""

from __future__ import annotations

import argparse
import platform
import sys
import types

import torch
import torch.nn.functional as F

from benchmarks.common import time_interleaved, write_result
from moelab.models.blocks import Rotary, SelfAttention, _SplitHeadsRope


def plain_split_rope(qkv: torch.Tensor, rope: Rotary):
    """The replaced path: qkv [B, S, 3, H, hd] -> q, k, v [B, H, S, hd] (q, k rotated)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return rope(q), rope(k), v


def _plain_forward(self: SelfAttention, x_BSD: torch.Tensor) -> torch.Tensor:
    b, s, d = x_BSD.shape
    qkv = self.qkv(x_BSD).view(b, s, 3, self.n_heads, d // self.n_heads)
    q, k, v = plain_split_rope(qkv, self.rope)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
    return self.proj(y.transpose(1, 2).reshape(b, s, d))


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.train_step import SIZES, _batch, moelab_model, moelab_step

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = SIZES["default"]
    hd = shape.d_model // shape.heads
    rope = Rotary(hd, shape.seq)
    cos, sin = rope.tables(shape.seq, torch.float32)
    x = torch.randn(shape.batch, shape.seq, 3, shape.heads, hd, requires_grad=True)

    def sublayer(split):
        def step() -> None:
            q, k, v = split(x)
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            x.grad = None
        return step

    fns = {"sublayer_plain": sublayer(lambda t: plain_split_rope(t, rope)),
           "sublayer_fused": sublayer(lambda t: _SplitHeadsRope.apply(t, cos, sin))}
    inp, target = _batch(shape, 0)
    for name in ("plain", "fused"):
        torch.manual_seed(0)
        model = moelab_model(shape)
        if name == "plain":
            for module in model.modules():
                if isinstance(module, SelfAttention):
                    module.forward = types.MethodType(_plain_forward, module)
        fns[f"step_{name}"] = moelab_step(
            model, torch.optim.AdamW(model.parameters(), lr=1e-4), inp, target)
    times = time_interleaved(fns, reps=args.reps)
    result = {"command": "python -m benchmarks.attention " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "settings": vars(args), "torch": torch.__version__,
              "machine": platform.platform(),
              "ms": {k: v * 1e3 for k, v in times.items()},
              "ratio_fused_to_plain": {
                  "sublayer": times["sublayer_fused"] / times["sublayer_plain"],
                  "step": times["step_fused"] / times["step_plain"]}}
    for k, v in result["ms"].items():
        print(f"{k:16s} {v:8.2f} ms")
    for k, v in result["ratio_fused_to_plain"].items():
        print(f"fused / plain, {k}: {v:.3f}")
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
