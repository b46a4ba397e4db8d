"""Token dispatch: sort the T*K assignments by expert; the grouped-GEMM primitives.

Assignments are flattened choice-major (index ``k*T + t``) and stably sorted by expert id, so
inside an expert the first choices come before the second choices and tokens keep their order.
That order is also the drop priority when a capacity is set.

The padded layout (:func:`padded_layout`, the "padded" dispatch and padded expert parallel):
every expert gets C static slots (``DispatchPlan.slots``), filled by its rows in plan order;
rows past C (dropped by capacity) get none, unused slots are padding (a zero row).

Nothing here reads a value back from the device (no host sync on a GPU): the per-expert counts
come from the sorted ids by a binary search, and a capacity limit drops assignments by giving
them weight 0 (their rows stay in the plan, so every shape is known without looking at data).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from moelab.moe.gemm import GROUPED_MM, grouped_mm, grouped_mm_supported

_GROUPED_MM = GROUPED_MM  # the name the expert loop and older code use

__all__ = ["DispatchPlan", "PaddedLayout", "backend_policy", "combine", "combine_slots",
           "compiled_backend", "count_per_expert", "expert_capacity", "gather_slots",
           "grouped_linear", "grouped_mm_supported", "grouped_mm_sync_free", "padded_layout",
           "per_expert_weight", "plan_dispatch", "plan_expert_choice", "resolve_backend",
           "segment_sum", "take_slots"]


@dataclass(frozen=True)
class DispatchPlan:
    """Where each assignment goes: all N = T*K of them, grouped by expert.

    token_idx: [N] int64 token row of each assignment, grouped by expert.
    expert_ids: [N] int64 expert of each assignment (non-decreasing).
    weights: [N] fp32 combine weight of each assignment (0 for one dropped by capacity).
    routed_counts: [E] int64 assignments chosen by the router per expert: the rows of each
        expert in this plan.
    kept_counts: [E] int64 assignments kept per expert (``routed_counts`` when dropless).
    offsets: [E] int32 cumulative ends of ``routed_counts`` (the grouped-GEMM ``offs``).
    n_dropped: 0-d int64 tensor, assignments dropped by the capacity limit.
    keep: [N] bool, False for a dropped assignment (None when dropless). A dropped row is
        still computed by its expert, but adds nothing to the output and gets no gradient.
    host_counts: ``routed_counts`` already read on the host (expert parallel reads its
        received counts once per layer and hands them on), or None: the loop path then reads
        them itself, once.
    slots: C, a static bound on the rows an expert runs, known without reading data: the
        capacity when one is set (rows past it are dropped), M under expert choice, T for
        dropless Top-K under ``dispatch="padded"`` (a token picks an expert at most once);
        None otherwise (dropless: sizes only the data knows). The padded path and padded
        expert parallel lay rows out in E*C slots (:func:`padded_layout`).
    """

    token_idx: Tensor
    expert_ids: Tensor
    weights: Tensor
    routed_counts: Tensor
    kept_counts: Tensor
    offsets: Tensor
    n_dropped: Tensor
    keep: Tensor | None = None
    host_counts: tuple[int, ...] | None = None
    slots: int | None = None


def expert_capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """Per-expert slot count ``ceil(capacity_factor * T * K / E)`` (at least 1)."""
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def count_per_expert(sorted_ids_N: Tensor, n_experts: int) -> Tensor:
    """[E] int64 number of entries equal to each expert id in the non-decreasing
    ``sorted_ids_N``, by binary search (no host sync, deterministic, unlike ``bincount`` on a
    GPU)."""
    bounds = torch.arange(n_experts + 1, device=sorted_ids_N.device, dtype=sorted_ids_N.dtype)
    ends = torch.searchsorted(sorted_ids_N, bounds)  # first index >= e
    return ends[1:] - ends[:-1]


def plan_dispatch(topk_ids_TK: Tensor, topk_weights_TK: Tensor, n_experts: int,
                  capacity: int | None = None, padded: bool = False) -> DispatchPlan:
    """Group the assignments by expert; with ``capacity``, keep at most that many per expert
    (the first in dispatch order) and give the others weight 0. ``slots`` is the capacity,
    else T when ``padded`` (the dropless bound), else None."""
    n_tokens = topk_ids_TK.shape[0]
    flat_ids = topk_ids_TK.t().reshape(-1)
    sorted_ids, order = torch.sort(flat_ids, stable=True)
    routed_counts = count_per_expert(sorted_ids, n_experts)
    weights = topk_weights_TK.t().reshape(-1)[order]
    offsets = torch.cumsum(routed_counts, 0)
    kept_counts, keep = routed_counts, None
    n_dropped = routed_counts.new_zeros(())
    if capacity is not None:
        starts = offsets - routed_counts
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[sorted_ids]
        keep = rank_in_expert < capacity
        weights = weights * keep
        kept_counts = routed_counts.clamp(max=capacity)
        n_dropped = order.numel() - kept_counts.sum()
    token_idx = order % n_tokens
    slots = capacity if capacity is not None else (n_tokens if padded else None)
    return DispatchPlan(token_idx, sorted_ids, weights, routed_counts, kept_counts,
                        offsets.to(torch.int32), n_dropped, keep, slots=slots)


def plan_expert_choice(token_idx_EM: Tensor, weights_EM: Tensor) -> DispatchPlan:
    """The plan of expert-choice routing: expert e owns rows ``e*M .. (e+1)*M - 1``, its M
    picked tokens (``token_idx_EM`` [E, M] int64, combine weights ``weights_EM`` [E, M]).
    Nothing is dropped: every row is kept; ``slots`` is M."""
    n_experts, slots = token_idx_EM.shape
    device = token_idx_EM.device
    counts = torch.full((n_experts,), slots, dtype=torch.long, device=device)
    expert_ids = torch.arange(n_experts, device=device).repeat_interleave(slots)
    return DispatchPlan(token_idx_EM.reshape(-1), expert_ids, weights_EM.reshape(-1), counts,
                        counts, torch.cumsum(counts, 0).to(torch.int32), counts.new_zeros(()),
                        slots=slots)


class PaddedLayout(NamedTuple):
    """A plan in padded layout: expert e owns slots ``e*C .. e*C + C - 1`` (C = plan.slots;
    S = E*C slots), filled by its rows in plan order; its rows past C (dropped by capacity)
    get no slot; the unused slots are padding.

    rows_S: [S] int64 plan row held by each slot, N for a padding slot.
    token_S: [S] int64 token row of each slot, T for a padding slot (:func:`gather_slots`
        appends a zero row T to x).
    """

    rows_S: Tensor
    token_S: Tensor


def padded_layout(plan: DispatchPlan, n_tokens: int) -> PaddedLayout:
    """The padded layout of ``plan`` (which must have ``slots``), from device tensors only:
    no host read, static shapes. Row n of expert e goes to slot ``e*C + rank`` (its rank among
    e's rows) when rank < C."""
    n_slots, n_experts = plan.slots, plan.routed_counts.shape[0]
    if n_slots is None:
        raise ValueError("the padded layout needs a plan with static slots (DispatchPlan.slots:"
                         " a capacity, expert choice, or dispatch='padded')")
    n_rows = plan.expert_ids.shape[0]
    arange = torch.arange(n_rows, device=plan.expert_ids.device)
    starts = plan.offsets.long() - plan.routed_counts
    rank = arange - starts[plan.expert_ids]
    # a row without a slot goes to a private spare place past the E*C slots, so every index
    # of the scatter is distinct (deterministic, no write conflicts)
    place = torch.where(rank < n_slots, plan.expert_ids * n_slots + rank,
                        n_experts * n_slots + arange)
    size = n_experts * n_slots
    rows_S = arange.new_full((size + n_rows,), n_rows).index_copy_(0, place, arange)[:size]
    return PaddedLayout(rows_S, take_slots(plan.token_idx, rows_S, n_tokens))


def take_slots(values_N: Tensor, rows_S: Tensor, fill: float = 0) -> Tensor:
    """[S] ``values_N[rows_S]`` ([N] per-row values in slot order), ``fill`` for a padding
    slot (row N); differentiable in ``values_N``."""
    return torch.cat([values_N, values_N.new_full((1,), fill)]).index_select(0, rows_S)


def gather_slots(x_TD: Tensor, token_S: Tensor) -> Tensor:
    """[S, D] the token row of each slot; a zero row for a padding slot (token T)."""
    return torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])]).index_select(0, token_S)


def combine_slots(weighted_SD: Tensor, token_S: Tensor, n_tokens: int) -> Tensor:
    """Sum each token's (already weighted) slot outputs: [S, D] -> [T, D] (the padding slots
    go to a spare row T, dropped). A new tensor, not a view of the [T + 1, D] sum: FSDP2 warns
    when a module returns a view (an in-place op on it would skip its backward hook)."""
    out = weighted_SD.new_zeros(n_tokens + 1, weighted_SD.shape[1])
    return out.index_add_(0, token_S, weighted_SD).narrow_copy(0, 0, n_tokens)


def backend_policy(device_type: str) -> str:
    """The device type whose dispatch policy :func:`resolve_backend` applies to tensors on
    ``device_type``: itself. (The CPU stand-ins for a GPU's host syncs in tests/test_sync_free.py
    replace this function to run CUDA's policy on CPU tensors.)"""
    return device_type


def grouped_mm_sync_free(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM runs on ``device_type`` in ``dtype`` without reading its
    ``offs`` back on the host. On CUDA only bf16 on sm90 / sm100 has a grouped kernel (CUTLASS);
    every other dtype or GPU takes torch's ``_grouped_mm_fallback`` (``offs.cpu()``, then one
    matmul per expert: a host sync per GEMM, six per layer and step). Elsewhere (CPU) there is
    no device to wait for: True."""
    if device_type != "cuda":
        return True
    if dtype != torch.bfloat16:
        return False
    if not torch.cuda.is_available():  # the policy alone (a CPU stand-in)
        return True
    return torch.cuda.get_device_capability()[0] in (9, 10)


def resolve_backend(requested: str, device_type: str, dtype: torch.dtype, w_EIO: Tensor,
                    w_out_EFD: Tensor | None = None, slots: int | None = None) -> str:
    """Turn "auto" into "grouped_mm", "loop" or "padded"; raise if "grouped_mm" can't run, or
    "padded" without ``slots`` (the plan's ``DispatchPlan.slots``).

    "auto" picks the chunked expert loop on CPU (there torch's grouped GEMM is itself a loop
    of matmuls, and the one-GEMM path's [N, D] buffers page-fault; see ``moe.expert_loop``).
    On CUDA for every dtype but bf16 on sm90+ (:func:`grouped_mm_sync_free`: torch's fallback
    would sync on every GEMM) it picks the padded path when the plan has static slots (a
    capacity, expert choice: no host read, capacity_factor x the grouped FLOPs), else the
    loop (it reads the expert sizes once per layer: cheaper than E/K x the FLOPs). Else
    grouped GEMM when the installed torch runs it for this dtype/device and both GEMMs' shapes
    (``w_EIO`` and, if given, ``w_out_EFD``), else the padded path with static slots, else the
    loop with a one-time warning.
    """
    if requested == "padded":
        if slots is None:
            raise ValueError("dispatch='padded' needs a plan with static slots "
                             "(DispatchPlan.slots), as MoELayer builds it")
        return "padded"
    policy = backend_policy(device_type)
    if requested == "auto" and policy != "cpu" and not grouped_mm_sync_free(policy, dtype):
        return "loop" if slots is None else "padded"
    if requested == "loop" or (requested == "auto" and policy == "cpu"):
        return "loop"
    weights = [w for w in (w_EIO, w_out_EFD) if w is not None]
    if all(grouped_mm_supported(device_type, dtype, w.shape[1], w.shape[2]) for w in weights):
        return "grouped_mm"
    shapes = " and ".join(str(tuple(w.shape)) for w in weights)
    why = (f"torch {torch.__version__} has no grouped GEMM for dtype={dtype} on "
           f"{device_type} with expert weights of shape {shapes} (it needs "
           f"fp32/bf16/fp16 and row strides that are multiples of 16 bytes)")
    if requested == "grouped_mm":
        raise RuntimeError(f"dispatch='grouped_mm' is not supported: {why}; "
                           "use dispatch='auto', 'loop' or 'padded'")
    if slots is not None:  # static slots: the padded path needs no grouped GEMM, reads nothing
        return "padded"
    _warn_loop_fallback(why)
    return "loop"


def compiled_backend(requested: str, device_type: str, dtype: torch.dtype,
                     slots: int | None) -> str:
    """The path under ``torch.compile`` (no probe, no host list: never the loop): "padded"
    when requested, or for "auto" with static slots in a dtype whose grouped GEMM syncs (fp32
    / tf32 on CUDA, as :func:`resolve_backend` decides; bf16 is not asked, so no device
    query runs under tracing); else "grouped_mm"."""
    if requested == "padded" or (
            requested == "auto" and slots is not None and dtype != torch.bfloat16
            and not grouped_mm_sync_free(backend_policy(device_type), dtype)):
        return "padded"
    return "grouped_mm"


@functools.cache
def _warn_loop_fallback(why: str) -> None:
    warnings.warn(f"MoE dispatch falls back to a per-expert loop (slower): {why}",
                  RuntimeWarning, stacklevel=3)


def grouped_linear(x_NI: Tensor, w_EIO: Tensor, plan: DispatchPlan) -> Tensor:
    """Rows of expert e (a contiguous slice of x_NI, as laid out by ``plan``) times w_EIO[e],
    as one grouped GEMM in x's dtype. Returns [N, O]."""
    return grouped_mm(x_NI, w_EIO.to(x_NI.dtype), plan.offsets)


def combine(weighted_ND: Tensor, plan: DispatchPlan, n_tokens: int) -> Tensor:
    """Sum each token's (already weighted) expert outputs: [N, D] -> [T, D]."""
    out = weighted_ND.new_zeros(n_tokens, weighted_ND.shape[1])
    return out.index_add_(0, plan.token_idx, weighted_ND)


def per_expert_weight(row_weight_N: Tensor, plan: DispatchPlan, n_experts: int) -> Tensor:
    """[E] fp32 ``sum_{n -> e} row_weight_N[n]`` over the kept rows of ``plan``."""
    return segment_sum(row_weight_N, plan.routed_counts)


def segment_sum(rows_N: Tensor, counts_E: Tensor, row_weight_N: Tensor | None = None
                ) -> Tensor:
    """[E, ...] fp32 ``sum_{n in segment e} row_weight_N[n] * rows_N[n]`` for rows grouped by
    expert (expert e owns the next ``counts_E[e]`` rows: a plan's layout, ``counts_E`` its
    ``routed_counts``, a device tensor). One segmented reduction over the already-grouped rows,
    not an index_add_ of N rows into E slots (which deterministic mode turns into a sort-based
    accumulate); no host read (the segment count is E; ``unsafe`` skips torch's check that the
    lengths sum to N, which reads their sum on the host). rows_N: [N] or [N, X];
    row_weight_N: [N] or None (unweighted)."""
    if row_weight_N is not None:
        rows_N = rows_N * row_weight_N.view(-1, *([1] * (rows_N.dim() - 1)))
    return torch.segment_reduce(rows_N.float(), "sum", lengths=counts_E, axis=0, unsafe=True)


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
    ([N] fp32; w_n > 0, a softmax probability; 0 for a row dropped by capacity, w_n = 0)."""
    return weighted_ND.float().norm(dim=1) / weights_N.float().clamp_min(1e-30)
