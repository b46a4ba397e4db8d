"""The "loop" dispatch path: the experts run chunk by chunk, fused with the gather and combine.

Why not one grouped GEMM over all N = T*K rows on CPU: that pipeline (gather -> grouped GEMM ->
activation -> grouped GEMM -> index_add) allocates several [N, D] and [N, 2F] buffers, which at
K = 8 pass the 32 MiB above which glibc maps fresh pages for every allocation, so each step
page-faults 100-280 MB — more than the arithmetic costs (torch's CPU grouped GEMM is itself a
loop of matmuls, so nothing is lost by splitting it). ``expert_loop`` walks the experts in
chunks of at most ``CHUNK_BYTES`` of rows: gather a chunk's token rows, run its experts (one
grouped GEMM per chunk where grouped GEMM runs for the dtype and strides, else a matmul per
expert), apply the activation and the routing weight, and index_add the chunk into the [T, D]
output. Backward walks the same chunks and writes each expert's weight gradient in place
(``torch.mm(out=)``, the transposes folded into BLAS), or, when a single grouped chunk holds
every expert, takes the weight gradients straight from grouped GEMM. Only the pre-activations h
are saved (in chunks), plus the input x when w_in needs a gradient (its rows are gathered again
in backward). Runs on any device and dtype; on CUDA the
one-grouped-GEMM path (``Experts._grouped``) is the default for bf16, and the loop the one for
fp32 / tf32 (``moe.dispatch.resolve_backend``): there it reads nothing on the host beyond the
counts its caller read once (no grouped chunks, whose ``offs`` would be copied from the host).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moelab.moe import dispatch
from moelab.moe.activations import activation_backward, activation_forward, row_dot
from moelab.moe.dispatch import (
    _GROUPED_MM,
    add_per_expert_,
    add_sorted_per_expert_,
    grouped_mm_supported,
    raw_output_norms,
)

#: Largest row buffer of one chunk, in bytes (each chunk holds whole experts, so a single
#: expert with more rows than this makes a bigger chunk).
CHUNK_BYTES = 4 << 20


def plan_chunks(counts_E: list[int], max_rows: int) -> list[tuple[int, int, int, int]]:
    """Split experts (in order) into chunks of at most ``max_rows`` rows, except that an
    expert with more rows than that makes a chunk of its own. Returns ``(row_start, row_end,
    expert_start, expert_end)`` per chunk; experts with no rows join the current chunk, so
    every chunk but a lone all-empty one has rows."""
    chunks = []
    row_start = expert_start = rows = 0
    for e, count in enumerate(counts_E):
        if rows and count and rows + count > max_rows:
            chunks.append((row_start, row_start + rows, expert_start, e))
            row_start, expert_start, rows = row_start + rows, e, 0
        rows += count
    chunks.append((row_start, row_start + rows, expert_start, len(counts_E)))
    return chunks


def _chunk_matmul(a_NI: Tensor, w_CIO: Tensor, counts: list[int], offsets: Tensor | None
                  ) -> Tensor:
    """Rows of one chunk (contiguous by expert) times their expert's matrix: [n, I] x
    [C, I, O] -> [n, O]; one grouped GEMM when ``offsets`` (the chunk's cumulative row ends,
    int32) is given, else a matmul per expert."""
    if offsets is not None:
        return _GROUPED_MM(a_NI, w_CIO, offs=offsets)
    out = a_NI.new_empty(a_NI.shape[0], w_CIO.shape[2])
    row = 0
    for e, count in enumerate(counts):
        if count:
            torch.mm(a_NI[row:row + count], w_CIO[e], out=out[row:row + count])
        row += count
    return out


class _ExpertLoop(torch.autograd.Function):
    """y_TD = index_add over kept assignments n of ``weights[n] * expert_{e(n)}(x[token[n]])``.

    Extra non-differentiable outputs: act_sums_EF (per-expert sums of
    ``row_weight[n] * act(h_n)``, fp32) and norm_sums_E (per-expert sums of the raw expert
    output norms), each empty unless requested.
    """

    @staticmethod
    def forward(ctx, x_TD, w_in, w_out, weights_N, token_idx, expert_ids, counts, activation,
                row_weight_N, track_norms):
        n_tokens, d_model = x_TD.shape
        n_experts, width_in = w_in.shape[0], w_in.shape[2]
        row_bytes = max(d_model, width_in) * x_TD.element_size()
        chunks = plan_chunks(counts, max(1, CHUNK_BYTES // row_bytes))
        y_TD = x_TD.new_zeros(n_tokens, d_model)
        want_sums = row_weight_N is not None
        act_sums = x_TD.new_zeros(n_experts, w_out.shape[1] if want_sums else 0,
                                  dtype=torch.float)
        norm_sums = x_TD.new_zeros(n_experts if track_norms else 0, dtype=torch.float)
        use_grouped = _grouped_mm_runs(x_TD, w_in, w_out)
        saved_h = []
        for r0, r1, e0, e1 in chunks:
            if r0 == r1:
                continue
            idx = token_idx[r0:r1]
            offsets = _chunk_offsets(counts[e0:e1], x_TD.device) if use_grouped else None
            x_rows = x_TD.index_select(0, idx)
            h = _chunk_matmul(x_rows, w_in[e0:e1], counts[e0:e1], offsets)
            act = activation_forward(h, activation)
            if want_sums:
                add_sorted_per_expert_(act_sums[e0:e1], act, counts[e0:e1],
                                       row_weight_N[r0:r1])
            w_rows = weights_N[r0:r1, None]
            act.mul_(w_rows)
            out = _chunk_matmul(act, w_out[e0:e1], counts[e0:e1], offsets)
            if track_norms:
                add_per_expert_(norm_sums, raw_output_norms(out, weights_N[r0:r1]),
                                expert_ids[r0:r1])
            y_TD.index_add_(0, idx, out)
            saved_h.append(h)
        ctx.chunks, ctx.counts, ctx.activation = chunks, counts, activation
        ctx.use_grouped = use_grouped
        # x is needed only for w_in's gradient (not saving it otherwise also frees the caller
        # to modify x in place after the forward)
        ctx.save_for_backward(x_TD if ctx.needs_input_grad[1] else None, w_in, w_out, weights_N,
                              token_idx, *saved_h)
        ctx.mark_non_differentiable(act_sums, norm_sums)
        return y_TD, act_sums, norm_sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_sums, _grad_norms):
        x_TD, w_in, w_out, weights_N, token_idx, *saved_h = ctx.saved_tensors
        counts = ctx.counts
        grad_y = grad_y.contiguous()
        need_x, need_w_in, need_w_out, need_weights = ctx.needs_input_grad[:4]
        grad_x = grad_y.new_zeros(grad_y.shape) if need_x else None
        chunks_with_rows = [c for c in ctx.chunks if c[0] != c[1]]
        # One chunk of grouped GEMMs (holding every expert): its weight-gradient GEMMs are the
        # whole gradients. Otherwise every expert with rows writes its slice; the others
        # (all of them when no rows came) get zeros.
        whole = ctx.use_grouped and len(ctx.chunks) == 1 and len(chunks_with_rows) == 1
        grad_w_in = _empty_weight_grad(w_in, counts) if need_w_in and not whole else None
        grad_w_out = _empty_weight_grad(w_out, counts) if need_w_out and not whole else None
        grad_weights = torch.zeros_like(weights_N) if need_weights else None
        w_in_t, w_out_t = w_in.transpose(1, 2), w_out.transpose(1, 2)
        for (r0, r1, e0, e1), h in zip(chunks_with_rows, saved_h, strict=True):
            idx = token_idx[r0:r1]
            chunk_counts = counts[e0:e1]
            offsets = _chunk_offsets(chunk_counts, h.device) if ctx.use_grouped else None
            grad_rows = grad_y.index_select(0, idx)  # d loss / d out rows [n, D]
            # d loss / d (w * act)
            grad_scaled = _chunk_matmul(grad_rows, w_out_t[e0:e1], chunk_counts, offsets)
            w_rows = weights_N[r0:r1, None]
            grad_h, act = activation_backward(h, grad_scaled * w_rows, ctx.activation)
            if need_weights:
                grad_weights[r0:r1] = row_dot(grad_scaled, act)
            if need_w_out:
                scaled_t = act.mul_(w_rows).t()
                if whole:
                    grad_w_out = _GROUPED_MM(scaled_t, grad_rows, offs=offsets)
                else:
                    _per_expert_mm_weights(scaled_t, grad_rows, grad_w_out, chunk_counts, e0)
            if need_w_in:
                x_rows_t = x_TD.index_select(0, idx).t()
                if whole:
                    grad_w_in = _GROUPED_MM(x_rows_t, grad_h, offs=offsets)
                else:
                    _per_expert_mm_weights(x_rows_t, grad_h, grad_w_in, chunk_counts, e0)
            if need_x:
                grad_x_rows = _chunk_matmul(grad_h, w_in_t[e0:e1], chunk_counts, offsets)
                grad_x.index_add_(0, idx, grad_x_rows)
        return (grad_x, grad_w_in, grad_w_out, grad_weights,
                None, None, None, None, None, None)


def _grouped_mm_runs(x_TD: Tensor, w_in: Tensor, w_out: Tensor) -> bool:
    """Whether the chunks run as grouped GEMMs: on CPU only (each chunk's ``offs`` is built
    from the host counts, which on a GPU would be a host-to-device copy per chunk), when grouped
    GEMM runs for every product of the loop (all row strides aligned)."""
    if dispatch.backend_policy(x_TD.device.type) != "cpu":
        return False
    d_model, width_in, d_ff = w_in.shape[1], w_in.shape[2], w_out.shape[1]
    return (grouped_mm_supported(x_TD.device.type, x_TD.dtype, d_model, width_in)
            and grouped_mm_supported(x_TD.device.type, x_TD.dtype, d_ff, d_model))


def _chunk_offsets(counts: list[int], device: torch.device) -> Tensor:
    """Cumulative row ends of a chunk's experts: the grouped GEMM's ``offs`` (int32)."""
    return torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=device)


def _empty_weight_grad(w_E: Tensor, counts: list[int]) -> Tensor:
    """An uninitialised gradient for w_E, zeroed only at the experts that got no rows (not a
    full zero fill: the per-expert matmuls overwrite the rest; one zero_ per idle expert, not
    an index tensor built from a host list, which on a GPU is a host-to-device copy)."""
    grad = torch.empty_like(w_E)
    for e, count in enumerate(counts):
        if count == 0:
            grad[e].zero_()
    return grad


def _per_expert_mm_weights(a_t: Tensor, b: Tensor, out_E: Tensor, counts: list[int],
                           first_expert: int) -> None:
    """out_E[e] = a_t[:, rows of e] @ b[rows of e] — the weight gradient of each expert."""
    row = 0
    for i, count in enumerate(counts):
        if count:
            torch.mm(a_t[:, row:row + count], b[row:row + count], out=out_E[first_expert + i])
        row += count


def expert_loop(x_TD: Tensor, w_in: Tensor, w_out: Tensor, weights_N: Tensor,
                token_idx: Tensor, expert_ids: Tensor, counts_E: list[int], activation: str,
                row_weight_N: Tensor | None = None, track_norms: bool = False
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Sparse expert MLP over token rows, one expert at a time (see the module docstring).

    x_TD: [T, D] tokens; w_in: [E, D, W]; w_out: [E, F, D]; the N kept assignments, grouped by
    expert: weights_N [N] (routing weights), token_idx [N], expert_ids [N], counts_E (rows per
    expert, a host list summing to N). Returns (y_TD [T, D], act_sums_EF, norm_sums_E): y is
    the weighted sum of each token's expert outputs; act_sums_EF [E, F] (fp32, detached) sums
    ``row_weight_N[n] * act(h_n)`` per expert when ``row_weight_N`` ([N]) is given;
    norm_sums_E [E] (fp32, detached) sums the raw expert-output norms per expert when
    ``track_norms``. Unrequested extras are empty.
    """
    return _ExpertLoop.apply(x_TD, w_in.to(x_TD.dtype), w_out.to(x_TD.dtype),
                             weights_N.to(x_TD.dtype), token_idx, expert_ids, counts_E,
                             activation, row_weight_N, track_norms)
