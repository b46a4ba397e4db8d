"""Token dispatch: sort the T*K assignments by expert; the grouped-GEMM primitives.

Assignments are flattened choice-major (index ``k*T + t``) and stably sorted by expert id, so
inside an expert the first choices come before the second choices and tokens keep their order.
That order is also the drop priority when a capacity is set.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass(frozen=True)
class DispatchPlan:
    """Where each kept assignment goes. N = number of kept assignments (T*K when dropless).

    token_idx: [N] int64 token row of each assignment, grouped by expert.
    expert_ids: [N] int64 expert of each assignment (non-decreasing).
    weights: [N] fp32 combine weight of each assignment.
    routed_counts: [E] int64 assignments chosen by the router per expert (before dropping).
    kept_counts: [E] int64 assignments kept per expert.
    offsets: [E] int32 cumulative ends of ``kept_counts`` (the grouped-GEMM ``offs``).
    n_dropped: number of assignments dropped by the capacity limit.
    """

    token_idx: Tensor
    expert_ids: Tensor
    weights: Tensor
    routed_counts: Tensor
    kept_counts: Tensor
    offsets: Tensor
    n_dropped: int


def expert_capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """Per-expert slot count ``ceil(capacity_factor * T * K / E)`` (at least 1)."""
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def plan_dispatch(topk_ids_TK: Tensor, topk_weights_TK: Tensor, n_experts: int,
                  capacity: int | None = None) -> DispatchPlan:
    """Group the assignments by expert; keep at most ``capacity`` per expert if given."""
    n_tokens = topk_ids_TK.shape[0]
    flat_ids = topk_ids_TK.t().reshape(-1)
    sorted_ids, order = torch.sort(flat_ids, stable=True)
    routed_counts = torch.bincount(flat_ids, minlength=n_experts)
    weights = topk_weights_TK.t().reshape(-1)[order]
    n_dropped = 0
    kept_counts = routed_counts
    if capacity is not None:
        starts = torch.cumsum(routed_counts, 0) - routed_counts
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[sorted_ids]
        keep = rank_in_expert < capacity
        n_dropped = int(order.numel() - keep.sum())
        if n_dropped:
            order, sorted_ids, weights = order[keep], sorted_ids[keep], weights[keep]
            kept_counts = routed_counts.clamp(max=capacity)
    token_idx = order % n_tokens
    offsets = torch.cumsum(kept_counts, 0).to(torch.int32)
    return DispatchPlan(token_idx, sorted_ids, weights, routed_counts, kept_counts, offsets,
                        n_dropped)


@functools.cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype, d_in: int, d_out: int) -> bool:
    """Probe once whether grouped GEMM (forward and backward) runs for this case."""
    if _GROUPED_MM is None:
        return False
    try:
        # Identity saved-tensor hooks shadow any outer ones (activation checkpointing), so a
        # probe inside a checkpointed first forward leaves nothing for its recompute check;
        # autocast off, or a probe under autocast would compare a bf16 result to fp32 and
        # cache False for good.
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device_type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return _probe_grouped_mm(device_type, dtype, d_in, d_out)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _probe_grouped_mm(device_type: str, dtype: torch.dtype, d_in: int, d_out: int) -> bool:
    """Tiny grouped GEMM, forward and backward, checked against two plain matmuls (fixed
    values, so probing never consumes the global random stream)."""
    kw = dict(device=device_type, dtype=dtype)
    x = torch.linspace(-1, 1, 5 * d_in, **kw).view(5, d_in).requires_grad_()
    w = torch.linspace(1, -1, 2 * d_in * d_out, **kw).view(2, d_in, d_out).requires_grad_()
    offs = torch.tensor([2, 5], device=device_type, dtype=torch.int32)
    y = _GROUPED_MM(x, w, offs=offs)
    y.backward(torch.ones_like(y))
    ref = torch.cat([x[:2] @ w[0], x[2:] @ w[1]])
    return bool(torch.allclose(y, ref, rtol=1e-2, atol=1e-2))


def resolve_backend(requested: str, device_type: str, dtype: torch.dtype, w_EIO: Tensor) -> str:
    """Turn "auto" into "grouped_mm" or "loop"; raise if "grouped_mm" can't run.

    "auto" picks the chunked expert loop on CPU (there torch's grouped GEMM is itself a loop
    of matmuls, and the one-GEMM path's [N, D] buffers page-fault; see ``moe.expert_loop``)
    and grouped GEMM elsewhere when the installed torch runs it for this dtype/device/shape,
    else the loop with a one-time warning.
    """
    if requested == "loop" or (requested == "auto" and device_type == "cpu"):
        return "loop"
    if grouped_mm_supported(device_type, dtype, w_EIO.shape[1], w_EIO.shape[2]):
        return "grouped_mm"
    why = (f"torch {torch.__version__} has no grouped GEMM for dtype={dtype} on "
           f"{device_type} with expert weights of shape {tuple(w_EIO.shape)} (it needs "
           f"fp32/bf16/fp16 and row strides that are multiples of 16 bytes)")
    if requested == "grouped_mm":
        raise RuntimeError(f"dispatch='grouped_mm' is not supported: {why}; "
                           "use dispatch='auto' or 'loop'")
    _warn_loop_fallback(why)
    return "loop"


@functools.cache
def _warn_loop_fallback(why: str) -> None:
    warnings.warn(f"MoE dispatch falls back to a per-expert loop (slower): {why}",
                  RuntimeWarning, stacklevel=3)


def grouped_linear(x_NI: Tensor, w_EIO: Tensor, plan: DispatchPlan) -> Tensor:
    """Rows of expert e (a contiguous slice of x_NI, as laid out by ``plan``) times w_EIO[e],
    as one grouped GEMM. Returns [N, O]."""
    return _GROUPED_MM(x_NI, w_EIO.to(x_NI.dtype), offs=plan.offsets)


def combine(weighted_ND: Tensor, plan: DispatchPlan, n_tokens: int) -> Tensor:
    """Sum each token's (already weighted) expert outputs: [N, D] -> [T, D]."""
    out = weighted_ND.new_zeros(n_tokens, weighted_ND.shape[1])
    return out.index_add_(0, plan.token_idx, weighted_ND)


def per_expert_weight(row_weight_N: Tensor, plan: DispatchPlan, n_experts: int) -> Tensor:
    """[E] fp32 ``sum_{n -> e} row_weight_N[n]`` over the kept rows of ``plan``."""
    weight_E = torch.zeros(n_experts, device=row_weight_N.device, dtype=torch.float)
    return weight_E.index_add_(0, plan.expert_ids, row_weight_N.float())


def add_per_expert_(sums_E: Tensor, rows_N: Tensor, expert_ids_N: Tensor,
                    row_weight_N: Tensor | None = None) -> Tensor:
    """In place: ``sums_E[e] += sum_{n: expert n = e} row_weight_N[n] * rows_N[n]``, added in
    the sums' dtype. rows_N: [N] or [N, X]; row_weight_N: [N], or None for unweighted sums.
    Returns sums_E."""
    if row_weight_N is not None:
        rows_N = rows_N * row_weight_N.view(-1, *([1] * (rows_N.dim() - 1)))
    return sums_E.index_add_(0, expert_ids_N, rows_N.to(sums_E.dtype))


def add_sorted_per_expert_(sums_EX: Tensor, rows_NX: Tensor, counts_E: list[int],
                           row_weight_N: Tensor) -> Tensor:
    """In place: ``sums_EX[e] += sum_{n in expert e's rows} row_weight_N[n] * rows_NX[n]`` for
    rows contiguous by expert (expert e owns the next ``counts_E[e]`` rows). One matrix-vector
    product per expert: no weighted [N, X] copy and no scatter, unlike :func:`add_per_expert_`.
    sums_EX: [E, X] fp32; rows_NX: [N, X]; row_weight_N: [N]. Returns sums_EX."""
    if rows_NX.dtype != sums_EX.dtype:  # accumulate 16-bit rows in fp32, as add_per_expert_
        rows_NX, row_weight_N = rows_NX.to(sums_EX.dtype), row_weight_N.to(sums_EX.dtype)
    row = 0
    for e, count in enumerate(counts_E):
        if count:
            sums_EX[e].addmv_(rows_NX[row:row + count].t(), row_weight_N[row:row + count])
        row += count
    return sums_EX


def raw_output_norms(weighted_ND: Tensor, weights_N: Tensor) -> Tensor:
    """Each row's raw expert-output norm from its weighted output: ``|w_n * expert(x_n)| / w_n``
    ([N] fp32; w_n > 0, a softmax probability)."""
    return weighted_ND.float().norm(dim=1) / weights_N.float().clamp_min(1e-30)
