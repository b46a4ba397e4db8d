"""Expert MLPs with weights stored batched over experts.

Weights: ``w_in`` [E, D, F] (GELU) or [E, D, 2F] (SwiGLU: gate then up, fused so one GEMM
computes both), ``w_out`` [E, F, D]. Expert e's parameters are the slices ``w_in[e]``,
``w_out[e]``.

The routing weight of each row is folded into the hidden activation (``act(h) * w`` before the
down projection, which equals ``w * expert(x)`` because the down projection is linear and has no
bias), so no [N, D] product is ever allocated — on CPU, fresh large allocations (page faults)
cost more than the arithmetic.

Three paths compute the same thing (``MoEConfig.dispatch``):

* "grouped_mm": gather the rows, two grouped GEMMs, combine; the default for bf16 on sm90+
  GPUs, and under ``torch.compile`` (no data-dependent shapes, no host sync in bf16);
* "loop" (``moe.expert_loop``): the experts run chunk by chunk, fused with the gather and
  combine; the default on CPU, and for dropless fp32 / tf32 on CUDA;
* "padded": every expert gets C static slots (``DispatchPlan.slots``: the capacity, M under
  expert choice, T for dropless Top-K), the rows are gathered into an [E*C, D] buffer (padding
  slots zero, routing weight 0), two ``torch.bmm`` over [E, C, ·], and the slots are added
  back into [T, D]. No host read, static shapes (it traces under ``torch.compile``). It
  computes E*C rows instead of the T*K routed ones: capacity_factor x the grouped path's
  FLOPs with a capacity, E/K x dropless, and [E, C, D] / [E, C, 2F] buffers. The default for
  fp32 / tf32 on CUDA with a capacity (or expert choice), eager and compiled.

Host syncs on CUDA, per precision ("auto"): bf16 on sm90 / sm100 runs torch's grouped kernel,
with no host read at all. fp32 and tf32 have no grouped kernel in torch (its fallback reads
``offs`` on the host for every GEMM: six syncs per layer and step, forward and backward). With
static slots they take the padded path: no host read. Dropless they take the loop, which reads
the per-expert row counts ONCE per layer forward (one ``.tolist()``; one more when activation
checkpointing recomputes the layer) and reuses them for both GEMMs and the whole backward: one
host sync per layer and forward, plus one matmul launch per expert and GEMM (6E per layer and
step) — cheaper than the padded path's E/K x FLOPs; ``dispatch="padded"`` buys sync-freedom at
that price. Under ``torch.compile`` fp32 / tf32 take the padded path with static slots, else
torch's grouped GEMM (through the custom op ``moelab::grouped_mm``, a host sync per GEMM): the
loop's host list cannot be traced.

Precision: the GEMMs run in ``moe.amp.compute_dtype`` of the input (the autocast dtype
under ``torch.autocast``, else the input's dtype), with the weights cast to it; the per-expert
sums handed to methods are fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from moelab.moe.activations import ACTIVATIONS, activation_backward, activation_forward, row_dot
from moelab.moe.amp import autocast_off, compute_dtype
from moelab.moe.dispatch import (
    DispatchPlan,
    combine,
    combine_slots,
    compiled_backend,
    gather_slots,
    grouped_linear,
    padded_layout,
    raw_output_norms,
    resolve_backend,
    segment_sum,
    take_slots,
)
from moelab.moe.dtensor import local
from moelab.moe.expert_loop import expert_loop


class ExpertsOutput(NamedTuple):
    """y_TD: [T, D] each token's weighted sum of its kept experts' outputs.
    sums_ED: [E, D] fp32 detached ``sum_{n -> e} row_weight_N[n] * expert_e(x_n)`` (None
        unless a row weight was given; see ``moe.layer.ExpertSums``).
    out_norm_sums_E: [E] fp32 detached sums of raw expert-output norms (None unless requested).
    """

    y_TD: Tensor
    sums_ED: Tensor | None
    out_norm_sums_E: Tensor | None


class _ScaledActivation(torch.autograd.Function):
    """out[n] = act(h[n]) * scale[n], plus optional per-expert sums of the unscaled act(h).

    h: [N, 2F] (swiglu: gate | up) or [N, F] (gelu), rows grouped by expert (counts: [E]);
    scale: [N]. The sums ([E, F] fp32, no grad) are ``sum_{n: expert n = e} row_weight[n] *
    act(h[n])`` when ``row_weight`` is given (a segmented reduction over the grouped rows).
    """

    @staticmethod
    def forward(ctx, h, scale, activation, counts, row_weight):
        act = activation_forward(h, activation)
        sums = h.new_zeros(0)
        if row_weight is not None:
            sums = segment_sum(act, counts, row_weight)
        ctx.activation = activation
        ctx.save_for_backward(h, scale)
        ctx.mark_non_differentiable(sums)
        return act.mul_(scale.unsqueeze(1)), sums

    @staticmethod
    def backward(ctx, grad_out, _grad_sums):
        h, scale = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_h, act = activation_backward(h, grad_out * scale.unsqueeze(1), ctx.activation)
        grad_scale = row_dot(grad_out, act).to(scale.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_scale, None, None, None


#: Largest transient fp32 copy of w_out slices made by :func:`project_sums` (bytes).
PROJECT_CHUNK_BYTES = 16 << 20


def project_sums(act_sums_EF: Tensor, w_out_EFD: Tensor) -> Tensor:
    """[E, D] fp32 ``act_sums_EF[e] @ w_out_EFD[e]``. An fp32 w_out is used as is; a 16-bit one
    (bf16 weights, FSDP's bf16 parameters) is widened to fp32 a few experts at a time (at most
    ``PROJECT_CHUNK_BYTES`` at once), not copied whole per layer and forward."""
    if w_out_EFD.dtype == torch.float32:
        return torch.bmm(act_sums_EF.unsqueeze(1), w_out_EFD).squeeze(1)
    n_experts, d_ff, d_model = w_out_EFD.shape
    step = max(1, PROJECT_CHUNK_BYTES // (4 * d_ff * d_model))
    out = act_sums_EF.new_empty(n_experts, d_model)
    for e0 in range(0, n_experts, step):
        e1 = min(e0 + step, n_experts)
        torch.bmm(act_sums_EF[e0:e1].unsqueeze(1), w_out_EFD[e0:e1].float(),
                  out=out[e0:e1].unsqueeze(1))
    return out


class Experts(nn.Module):
    """E independent MLP experts applied to the token rows the router assigned them."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, activation: str = "swiglu",
                 backend: str = "auto") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
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

    def forward(self, x_TD: Tensor, plan: DispatchPlan, row_weight_N: Tensor | None = None,
                track_out_norm: bool = False) -> ExpertsOutput:
        """Gather, run and combine: ``y_TD[t] = sum_{n: token n = t} plan.weights[n] *
        expert_{e(n)}(x_TD[t])`` over the kept assignments of ``plan``.

        x_TD: [T, D]. With ``row_weight_N`` ([N]), also returns the per-expert output sums
        ``sums_ED[e] = sum_{n -> e} row_weight_N[n] * expert_e(x_n)``; with
        ``track_out_norm``, the per-expert sums of ``|expert_e(x_n)|`` (see ExpertsOutput).
        y_TD has the compute dtype (module docstring).
        """
        dtype = compute_dtype(x_TD)
        w_in, w_out = self.weights()
        with autocast_off(x_TD.device.type):
            x_TD = x_TD.to(dtype)
            if torch.compiler.is_compiling():  # the probe must not run under tracing
                backend = compiled_backend(self.backend, x_TD.device.type, dtype, plan.slots)
            else:
                backend = resolve_backend(self.backend, x_TD.device.type, dtype, w_in, w_out,
                                          plan.slots)
            path = {"loop": self._loop, "padded": self._padded}.get(backend, self._grouped)
            y_TD, act_sums_EF, norm_sums_E = path(x_TD, w_in, w_out, plan, row_weight_N,
                                                  track_out_norm)
            sums_ED = None
            if row_weight_N is not None:
                # the down projection is linear: sum_n w_n act_n @ W_out = (sum_n w_n act_n) @ W_out
                sums_ED = project_sums(act_sums_EF, w_out.detach())
        return ExpertsOutput(y_TD, sums_ED, norm_sums_E if track_out_norm else None)

    def weights(self) -> tuple[Tensor, Tensor]:
        """``(w_in, w_out)`` as plain tensors: a DTensor parameter (expert parallel under FSDP,
        ``moelab.distributed.fsdp``: sharded over the expert-parallel ranks) gives its local
        experts."""
        return local(self.w_in), local(self.w_out)

    def _loop(self, x_TD: Tensor, w_in: Tensor, w_out: Tensor, plan: DispatchPlan,
              row_weight_N: Tensor | None, track_out_norm: bool
              ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The loop path (``moe.expert_loop``), after the layer's one host read of the expert
        sizes (none when expert parallel read them already). With a capacity, only the kept
        rows run: a stable sort puts them first (the dropped ones are the last rows of each
        expert), and the loop stops after them."""
        weights, token_idx, expert_ids = plan.weights, plan.token_idx, plan.expert_ids
        if plan.keep is None:
            counts = (list(plan.host_counts) if plan.host_counts is not None
                      else plan.routed_counts.tolist())
        else:
            counts = plan.kept_counts.tolist()
            kept = torch.sort(plan.keep.logical_not().to(torch.int8), stable=True
                              ).indices[:sum(counts)]
            weights, token_idx, expert_ids = weights[kept], token_idx[kept], expert_ids[kept]
            if row_weight_N is not None:
                row_weight_N = row_weight_N[kept]
        return expert_loop(x_TD, w_in, w_out, weights, token_idx, expert_ids, counts,
                           self.activation, row_weight_N, track_out_norm)

    def _grouped(self, x_TD: Tensor, w_in: Tensor, w_out: Tensor, plan: DispatchPlan,
                 row_weight_N: Tensor | None, track_out_norm: bool
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The grouped-GEMM path: [N, D] rows gathered, two grouped GEMMs, index_add back."""
        x_ND = x_TD.index_select(0, plan.token_idx)
        h = grouped_linear(x_ND, w_in, plan)
        act, act_sums_EF = _ScaledActivation.apply(
            h, plan.weights.to(h.dtype), self.activation, plan.routed_counts, row_weight_N)
        out_ND = grouped_linear(act, w_out, plan)
        norm_sums_E = None
        if track_out_norm:
            with torch.no_grad():
                norm_sums_E = segment_sum(raw_output_norms(out_ND, plan.weights),
                                          plan.routed_counts)
        return combine(out_ND, plan, x_TD.shape[0]), act_sums_EF, norm_sums_E

    def _padded(self, x_TD: Tensor, w_in: Tensor, w_out: Tensor, plan: DispatchPlan,
                row_weight_N: Tensor | None, track_out_norm: bool
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The padded path: the token rows gathered into E*C slots (``plan.slots``; padding
        slots zero, with routing weight 0), two batched matmuls (:func:`padded_mlp`), the
        slots added back into [T, D]. No host read, every shape static."""
        layout = padded_layout(plan, x_TD.shape[0])
        weight_S = take_slots(plan.weights, layout.rows_S)
        row_weight_S = (None if row_weight_N is None
                        else take_slots(row_weight_N, layout.rows_S))
        out_SD, act_sums_EF = padded_mlp(gather_slots(x_TD, layout.token_S), w_in, w_out,
                                         weight_S, self.activation, row_weight_S)
        norm_sums_E = None
        if track_out_norm:
            with torch.no_grad():
                norm_sums_E = raw_output_norms(out_SD, weight_S).view(w_in.shape[0], -1).sum(1)
        return combine_slots(out_SD, layout.token_S, x_TD.shape[0]), act_sums_EF, norm_sums_E


def padded_mlp(x_SD: Tensor, w_in: Tensor, w_out: Tensor, scale_S: Tensor, activation: str,
               row_weight_S: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Expert e on its slots ``x_SD[e*C:(e+1)*C]`` (S = E*C rows, E = ``w_in.shape[0]``) as two
    batched matmuls over [E, C, ·], in x's dtype, each row's output scaled by ``scale_S``
    ([S], folded into the activation). A zero row gives a zero output and contributes
    nothing to any weight gradient (no bias). Returns (out_SD [S, D], act_sums_EF: [E, F] fp32
    ``sum_{s of e} row_weight_S[s] * act(h_s)`` when ``row_weight_S`` is given, else empty)."""
    n_experts = w_in.shape[0]
    h = torch.bmm(x_SD.view(n_experts, -1, x_SD.shape[1]), w_in.to(x_SD.dtype))
    slots = h.shape[1]
    counts = torch.full((n_experts,), slots, dtype=torch.long, device=x_SD.device)
    act, act_sums_EF = _ScaledActivation.apply(h.flatten(0, 1), scale_S.to(h.dtype), activation,
                                               counts, row_weight_S)
    out = torch.bmm(act.view(n_experts, slots, -1), w_out.to(act.dtype))
    return out.flatten(0, 1), act_sums_EF
