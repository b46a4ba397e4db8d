"""Building blocks shared by every moelab model: norm, attention with RoPE, dense SwiGLU, the
one transformer/MLP block, and the base class that runs a stack of blocks.

There is exactly one block code path (``Block.forward``) for all models and all MomentumSMoE
rules; the rule (``moelab.methods.momentum.CombineRule``) decides the MoE layer's input and how
its output enters the residual stream, and its per-token state is passed from block to block
as an argument (through activation checkpointing too), never stored on a module.

Normalisation: RMSNorm with a learned scale, in all three models; ``ModelConfig.norm_position``
picks pre-norm (the default, our choice) or post-norm (the official MomentumSMoE code's form,
single-LN reading; see docs/METHODS.md).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from moelab.methods.default_moe import DefaultMoE
from moelab.methods.momentum import CombineRule, State, build_combine_rule
from moelab.models.config import ModelConfig
from moelab.moe import MoELayer, MoELosses

INIT_STD = 0.02


def require_float_input(x: object, name: str) -> None:
    """Raise ValueError unless ``x`` is a floating-point tensor (``name``: the argument)."""
    if not isinstance(x, Tensor) or not torch.is_floating_point(x):
        dtype = getattr(x, "dtype", type(x).__name__)
        raise ValueError(f"{name} dtype={dtype} is invalid: need a float tensor")


class ModelOutput(NamedTuple):
    """logits: [B, S, V] (LM) or [B, n_classes]; aux_loss: scalar, the sum over MoE layers of
    ``losses.total`` (add it to the task loss); moe_losses: the MoELosses of each MoE layer,
    in depth order."""

    logits: Tensor
    aux_loss: Tensor
    moe_losses: list[MoELosses]


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim, computed in fp32 at least."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half form) for sequences up to ``max_seq_len``."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} is invalid: RoPE needs an even head dim "
                             "(d_model / n_heads)")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # [S_max, hd/2]
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def tables(self, seq: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin: [seq, hd/2] in ``dtype``."""
        return self.cos[:seq].to(dtype), self.sin[:seq].to(dtype)

    def forward(self, x_BHSd: Tensor) -> Tensor:
        cos, sin = self.tables(x_BHSd.shape[-2], x_BHSd.dtype)
        x1, x2 = x_BHSd.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rotate_into(out1: Tensor, out2: Tensor, a1: Tensor, a2: Tensor, cos: Tensor, sin: Tensor,
                 sign: float) -> None:
    """``out1 = a1*cos - sign*a2*sin``, ``out2 = a2*cos + sign*a1*sin`` written in place (the
    rotation for sign +1, its transpose for -1); the outputs may be strided views. Each
    product is rounded before the sum, as in ``Rotary.forward`` (a fused multiply-add would
    change the last bits)."""
    tmp = torch.mul(a2, sin)
    torch.mul(a1, cos, out=out1)
    (out1.sub_ if sign > 0 else out1.add_)(tmp)
    torch.mul(a1, sin, out=tmp)
    torch.mul(a2, cos, out=out2)
    (out2.add_ if sign > 0 else out2.sub_)(tmp)


class _SplitHeadsRope(torch.autograd.Function):
    """qkv [B, S, 3, H, hd] -> q, k, v each contiguous [B, H, S, hd], RoPE applied to q and k.

    The same values (bit for bit) as permuting, unbinding and calling ``Rotary.forward`` on q
    and k, with fewer passes over memory: one layout copy (v is a slice of it), then the
    rotation written straight into the output halves (no concatenation); backward mirrors
    it. Writing the rotation through the strided [B, S, 3, H, hd] layout was slower
    (measured), so both directions rotate in the contiguous head-major layout and copy once.
    """

    @staticmethod
    def forward(ctx, qkv_BS3Hd: Tensor, cos_Sh: Tensor, sin_Sh: Tensor):
        half = qkv_BS3Hd.shape[-1] // 2
        src = qkv_BS3Hd.permute(2, 0, 3, 1, 4).contiguous()  # [3, B, H, S, hd]; src[2] is v
        qk = src.new_empty(src[:2].shape)
        _rotate_into(qk[..., :half], qk[..., half:], src[:2, ..., :half], src[:2, ..., half:],
                     cos_Sh, sin_Sh, 1.0)
        ctx.save_for_backward(cos_Sh, sin_Sh)
        ctx.shape = qkv_BS3Hd.shape
        return qk[0], qk[1], src[2]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        b, s, _, h, hd = ctx.shape
        half = hd // 2
        grad = cos.new_empty(ctx.shape)  # [B, S, 3, H, hd]
        dst = grad.permute(2, 0, 3, 1, 4)  # its [3, B, H, S, hd] view
        if grad_q is None and grad_k is None:
            dst[:2].zero_()
        else:
            rotated = cos.new_empty(2, b, h, s, hd)  # computed contiguous, copied once
            for i, g in enumerate((grad_q, grad_k)):
                if g is None:
                    rotated[i].zero_()
                else:
                    _rotate_into(rotated[i, ..., :half], rotated[i, ..., half:],
                                 g[..., :half], g[..., half:], cos, sin, -1.0)
            dst[:2].copy_(rotated)
        if grad_v is None:
            dst[2].zero_()
        else:
            dst[2].copy_(grad_v)
        return grad, None, None


class SelfAttention(nn.Module):
    """Multi-head self-attention via ``F.scaled_dot_product_attention``.

    x: [B, S, D] -> [B, S, D]; causal for the LM, bidirectional for the ViT; RoPE optional.
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool, rope: Rotary | None,
                 dropout: float, out_std: float) -> None:
        super().__init__()
        self.n_heads, self.causal, self.rope, self.dropout = n_heads, causal, rope, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=INIT_STD)
        nn.init.normal_(self.proj.weight, std=out_std)

    def forward(self, x_BSD: Tensor) -> Tensor:
        b, s, d = x_BSD.shape
        qkv = self.qkv(x_BSD).view(b, s, 3, self.n_heads, d // self.n_heads)
        if self.rope is not None and not torch.compiler.is_compiling():  # each [B, H, S, hd]
            q, k, v = _SplitHeadsRope.apply(qkv, *self.rope.tables(s, qkv.dtype))
        else:  # compiled: the same values; the compiler fuses the split and the rotation
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            if self.rope is not None:
                q, k = self.rope(q), self.rope(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class DenseSwiGLU(nn.Module):
    """Dense FFN ``W_out(silu(x W_gate) * x W_up)``; [..., D] -> [..., D]."""

    def __init__(self, d_model: int, d_ff: int, out_std: float | None = None) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)
        if out_std is not None:
            nn.init.normal_(self.w_in.weight, std=INIT_STD)
            nn.init.normal_(self.w_out.weight, std=out_std)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


class Block(nn.Module):
    """One block: ``h' = h + Attn(LN1(h))`` (if it has attention), then the FFN sub-layer.

    Dense FFN: ``h' + FFN(LN2(h'))``. MoE FFN (``moe_idx`` = its index among the MoE layers):
    ``f = MoE(rule.moe_input(LN2(h'), state, moe_idx))``, ``h, state = rule.combine(h', f,
    state, moe_idx)``. Without ``residual`` (MoEMLP's deep no-skip variant) the FFN output
    replaces h: ``h = FFN(LN2(h))`` (only with the baseline rule; the config enforces it).

    ``post=True`` (post-norm): ``h' = LN1(h + Attn(h))``; dense ``LN2(h' + FFN(h'))``; MoE
    ``f = MoE(rule.moe_input(h', state, i))``, ``h = LN2(rule.combine(h', f, state, i).h)``
    (so heavy ball gives ``LN2(h' + gamma*p)``); without ``residual``: ``LN2(FFN(h))``.
    ``double=True`` (with ``post``; the official MomentumSMoE code's MoE sub-layer): the MoE
    sub-layer adds its residual twice, ``h = LN2(h' + LN_in(rule.combine(h', f, ...).h))``.
    """

    def __init__(self, d_model: int, ffn: nn.Module, *, attn: nn.Module | None,
                 moe_idx: int | None, residual: bool = True, dropout: float = 0.0,
                 post: bool = False, double: bool = False) -> None:
        super().__init__()
        self.post = post
        self.norm_in = RMSNorm(d_model) if double and moe_idx is not None else None
        self.norm1 = RMSNorm(d_model) if attn is not None else None
        self.attn = attn
        self.norm2 = RMSNorm(d_model)
        self.ffn = ffn
        self.moe_idx = moe_idx
        # read instead of moe_idx where the index does not matter: a compiled block is
        # specialised on every int it reads, a bool is the same for all MoE blocks
        self.is_moe = moe_idx is not None
        self.residual = residual
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        #: recompute this block in backward instead of keeping its activations
        self.activation_checkpointing = False

    def forward(self, h: Tensor, state: State,
                rule: CombineRule) -> tuple[Tensor, State, MoELosses | None]:
        """h: [B, S, D] or [B, D]; state: the rule's state (passed through dense blocks).
        With ``activation_checkpointing`` (and grad enabled) the block keeps only its inputs
        and recomputes the rest in backward (non-reentrant ``torch.utils.checkpoint``)."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, h, state, rule, use_reentrant=False)
        return self._forward(h, state, rule)

    def _forward(self, h: Tensor, state: State,
                 rule: CombineRule) -> tuple[Tensor, State, MoELosses | None]:
        if self.attn is not None:
            h = self.attn_sublayer(h)
        return self.ffn_sublayer(h, state, rule)

    def attn_sublayer(self, h: Tensor) -> Tensor:
        """The attention sub-layer (a block with attention): ``h + Attn(LN1(h))``, or
        ``LN1(h + Attn(h))`` post-norm. [B, S, D] -> [B, S, D]."""
        if self.post:
            return self.norm1(h + self.drop(self.attn(h)))
        return h + self.drop(self.attn(self.norm1(h)))

    def ffn_sublayer(self, h: Tensor, state: State,
                     rule: CombineRule) -> tuple[Tensor, State, MoELosses | None]:
        """The FFN sub-layer from the attention sub-layer's output h' (the block's input when
        it has no attention): ``(h, state, losses)``. Per token: h, state [..., D]."""
        if self.post:
            return self._ffn_post(h, state, rule)
        x = self.norm2(h)
        if not self.is_moe:
            f = self.drop(self.ffn(x))
            return (h + f if self.residual else f), state, None
        i = self.moe_idx if rule.uses_layer_index else 0  # 0: one compiled graph for all
        out = self.ffn(rule.moe_input(x, state, i))
        f = self.drop(out.y)
        if not self.residual:
            return f, state, out.losses
        h, state = rule.combine(h, f, state, i)
        return h, state, out.losses

    def _ffn_post(self, h: Tensor, state: State,
                  rule: CombineRule) -> tuple[Tensor, State, MoELosses | None]:
        if not self.is_moe:
            f = self.drop(self.ffn(h))
            return self.norm2(h + f if self.residual else f), state, None
        i = self.moe_idx if rule.uses_layer_index else 0
        out = self.ffn(rule.moe_input(h, state, i))
        f = self.drop(out.y)
        if not self.residual:
            return self.norm2(f), state, out.losses
        y, state = rule.combine(h, f, state, i)
        if self.norm_in is not None:
            return self.norm2(h + self.norm_in(y)), state, out.losses
        return self.norm2(y), state, out.losses


class MoEModel(nn.Module):
    """Base class: a stack of ``Block``s with MoE FFNs at ``cfg.moe_block_indices()``, the
    combine rule ``self.combine_rule`` (from ``cfg.momentum``) and activation checkpointing
    (per block: ``Block.activation_checkpointing``, so a compiled block holds its own)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"cfg={cfg!r} is invalid: need a moelab.models.ModelConfig")
        self.cfg = cfg

    def _build_blocks(self, make_attn, *, residual: bool = True) -> None:
        """Fill ``self.blocks``; ``make_attn()`` returns a fresh attention module or None."""
        cfg = self.cfg
        moe_idx = cfg.moe_block_indices()
        out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
        blocks = []
        for i in range(cfg.n_layers):
            if i in moe_idx:
                ffn: nn.Module = self._moe_layer()
            else:
                ffn = DenseSwiGLU(cfg.d_model, cfg.d_ff_dense or 4 * cfg.d_model, out_std)
            blocks.append(Block(cfg.d_model, ffn, attn=make_attn(),
                                moe_idx=moe_idx.index(i) if i in moe_idx else None,
                                residual=residual, dropout=cfg.dropout,
                                post=cfg.norm_position != "pre",
                                double=cfg.norm_position == "post_double"))
        for block in blocks:
            block.activation_checkpointing = cfg.activation_checkpointing
        self.blocks = nn.ModuleList(blocks)
        self.combine_rule = build_combine_rule(cfg.momentum, len(moe_idx))

    def _moe_layer(self) -> MoELayer:
        """One MoE FFN: the layer of ``cfg.moe`` with the methods of ``cfg`` plugged in."""
        layer_cfg = self.cfg.moe_config()
        method = (DefaultMoE(layer_cfg, self.cfg.default_moe)
                  if self.cfg.default_moe is not None else None)
        return MoELayer(layer_cfg, method=method)

    def _run_blocks(self, h: Tensor) -> tuple[Tensor, Tensor, list[MoELosses]]:
        """Run every block; returns ``(h, aux_loss, moe_losses)``."""
        rule = self.combine_rule
        state = rule.init_state(h)
        losses: list[MoELosses] = []
        for block in self.blocks:
            h, state, layer_losses = block(h, state, rule)
            if layer_losses is not None:
                losses.append(layer_losses)
        aux = losses[0].total
        for layer_losses in losses[1:]:
            aux = aux + layer_losses.total
        return h, aux, losses

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers, in depth order."""
        return [b.ffn for b in self.blocks if b.moe_idx is not None]

    def set_track_out_norm(self, on: bool = True) -> None:
        """Record each expert's mean output norm in every MoE layer's ``last_stats``
        (``expert_out_norm``, for ``moelab.analysis.metrics.norm_ordered_share``)."""
        for layer in self.moe_layers():
            layer.track_out_norm = on
