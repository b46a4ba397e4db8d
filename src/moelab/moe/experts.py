"""Expert MLPs with weights stored batched over experts.

Weights: ``w_in`` [E, D, F] (GELU) or [E, D, 2F] (SwiGLU: gate then up, fused so one grouped
GEMM computes both), ``w_out`` [E, F, D]. Expert e's parameters are the slices ``w_in[e]``,
``w_out[e]``.

The routing weight of each row is folded into the hidden activation (``act(h) * w`` before the
down projection, which equals ``w * expert(x)`` because the down projection is linear and has no
bias). A small fused autograd function does that, so no [N, D] product is ever allocated — on
CPU, fresh large allocations (page faults) cost more than the arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.moe.dispatch import DispatchPlan, grouped_linear

_SQRT_HALF = 0.5**0.5
_INV_SQRT_2PI = (2 * torch.pi) ** -0.5


class _ScaledActivation(torch.autograd.Function):
    """out[n] = act(h[n]) * scale[n], plus optional per-expert sums of the unscaled act(h).

    h: [N, 2F] (swiglu: gate | up) or [N, F] (gelu); scale: [N]. The sums ([E, F], no grad)
    are ``sum_{n: expert n = e} sum_weight[n] * act(h[n])`` when ``sum_weight`` is given.
    """

    @staticmethod
    def forward(ctx, h, scale, activation, expert_ids, sum_weight, n_experts):
        if activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            act = F.silu(gate).mul_(up)
        else:
            act = F.gelu(h)
        sums = h.new_zeros(0)
        if sum_weight is not None:
            rows = act if sum_weight.numel() == 0 else act * sum_weight.unsqueeze(1)
            sums = torch.zeros(n_experts, act.shape[1], device=h.device, dtype=torch.float)
            sums.index_add_(0, expert_ids, rows.float())
        ctx.activation = activation
        ctx.save_for_backward(h, scale)
        ctx.mark_non_differentiable(sums)
        return act.mul_(scale.unsqueeze(1)), sums

    @staticmethod
    def backward(ctx, grad_out, _grad_sums):
        h, scale = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        n_rows = h.shape[0]
        grad_scaled = grad_out * scale.unsqueeze(1)  # d out / d act(h)
        if ctx.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            sig = torch.sigmoid(gate)
            silu = gate * sig
            grad_h = torch.empty_like(h)
            width = gate.shape[1]
            torch.mul(grad_scaled, silu, out=grad_h[:, width:])
            # d silu / d gate = sig * (1 + gate * (1 - sig))
            dsilu = (1.0 - sig).mul_(gate).add_(1.0).mul_(sig)
            torch.mul(dsilu.mul_(up), grad_scaled, out=grad_h[:, :width])
            act = silu.mul_(up)
        else:
            cdf = torch.erf(h * _SQRT_HALF).add_(1.0).mul_(0.5)
            dgelu = torch.exp(h.square() * -0.5).mul_(h).mul_(_INV_SQRT_2PI).add_(cdf)
            grad_h = dgelu.mul_(grad_scaled)
            act = cdf.mul_(h)
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = torch.bmm(grad_out.view(n_rows, 1, -1), act.view(n_rows, -1, 1))
            grad_scale = grad_scale.view(n_rows).to(scale.dtype)
        return grad_h, grad_scale, None, None, None, None


class Experts(nn.Module):
    """E independent MLP experts applied to token rows already grouped by expert."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, activation: str = "swiglu",
                 backend: str = "auto") -> None:
        super().__init__()
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"activation={activation!r} is invalid: choose 'swiglu' or 'gelu'")
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, d_ff
        self.activation = activation
        self.backend = backend
        width_in = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, width_in))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=self.d_model**-0.5)
        nn.init.normal_(self.w_out, std=self.d_ff**-0.5)

    def forward(self, x_ND: Tensor, plan: DispatchPlan,
                sum_weight_N: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Weighted expert outputs for rows grouped by expert.

        x_ND: [N, D] rows in ``plan`` order. Returns ``(out_ND, sums_ED)``: out_ND [N, D] is
        ``plan.weights[n] * expert_{e(n)}(x_n)``; sums_ED ([E, D] fp32, detached) is
        ``sum_{n -> e} sum_weight_N[n] * expert_e(x_n)`` when ``sum_weight_N`` is given (an empty
        tensor means all ones), else None.
        """
        h = grouped_linear(x_ND, self.w_in, plan, self.backend)
        act, act_sums_EF = _ScaledActivation.apply(
            h, plan.weights.to(h.dtype), self.activation, plan.expert_ids, sum_weight_N,
            self.n_experts)
        out = grouped_linear(act, self.w_out, plan, self.backend)
        if sum_weight_N is None:
            return out, None
        # The down projection is linear: sum_n w_n act_n @ W_out = (sum_n w_n act_n) @ W_out.
        sums_ED = torch.bmm(act_sums_EF.unsqueeze(1), self.w_out.detach().float()).squeeze(1)
        return out, sums_ED
