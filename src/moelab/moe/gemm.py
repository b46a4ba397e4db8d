"""Grouped GEMM: rows contiguous by expert times each expert's matrix, in one call.

:func:`grouped_mm` is ``torch._grouped_mm`` (``F.grouped_mm`` where it exists), traceable by
``torch.compile`` in every dtype: torch's own meta function accepts only bf16, so under tracing
other dtypes go through the custom op ``moelab::grouped_mm`` (same kernel, an opaque node for
the compiler, with its own fake implementation and backward). :func:`grouped_mm_supported`
probes once, outside any tracing, whether the installed torch runs it for a device / dtype /
shape.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GROUPED_MM", "grouped_mm", "grouped_mm_supported"]

#: torch's grouped GEMM (None in torch builds without one).
GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """``a [N, I] x b [G, I, O] -> [N, O]`` (rows of group g: ``offs[g-1]:offs[g]``), or
    ``a [I, N] x b [N, O] -> [G, I, O]`` (the weight-gradient form). ``offs``: [G] int32."""
    if torch.compiler.is_compiling() and a.dtype != torch.bfloat16 and _TRACEABLE:
        return torch.ops.moelab.grouped_mm(a, b, offs)
    return GROUPED_MM(a, b, offs=offs)


def _grouped_mm_impl(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return GROUPED_MM(a, b, offs=offs)


def output_strides(shape: tuple[int, ...], dtype: torch.dtype, device_type: str
                   ) -> tuple[int, ...]:
    """The strides of grouped GEMM's output of ``shape``: on CUDA the rows are padded to a
    multiple of 16 bytes (as ``torch._grouped_mm``'s CUDA kernel and its meta function
    allocate them); elsewhere contiguous."""
    last = shape[-1]
    if device_type == "cuda":
        align = max(1, 16 // dtype.itemsize)
        last = -(-last // align) * align
    return (shape[1] * last, last, 1) if len(shape) == 3 else (last, 1)


def _grouped_mm_fake(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    shape = (a.shape[0], b.shape[2]) if b.dim() == 3 else (offs.shape[0], a.shape[0], b.shape[1])
    return a.new_empty_strided(shape, output_strides(shape, a.dtype, a.device.type))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202 - torch.library signature
    a, b, offs = ctx.saved_tensors
    if b.dim() != 3:
        raise NotImplementedError("moelab::grouped_mm backward: only the [N, I] x [G, I, O] form")
    grad = grad.contiguous()
    grad_a = torch.ops.moelab.grouped_mm(grad, b.transpose(1, 2), offs) \
        if ctx.needs_input_grad[0] else None
    grad_b = torch.ops.moelab.grouped_mm(a.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_TRACEABLE = False
if GROUPED_MM is not None and hasattr(torch.library, "custom_op"):
    _op = torch.library.custom_op("moelab::grouped_mm", _grouped_mm_impl, mutates_args=())
    _op.register_fake(_grouped_mm_fake)
    _op.register_autograd(_backward, setup_context=_setup_context)
    _TRACEABLE = True


@functools.cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype, d_in: int, d_out: int) -> bool:
    """Probe once whether grouped GEMM (forward and backward) runs for this case. Never call
    it under ``torch.compile`` tracing (``moelab.distributed.wrap`` probes before compiling)."""
    if GROUPED_MM is None:
        return False
    try:
        # Identity saved-tensor hooks shadow any outer ones (activation checkpointing), so a
        # probe inside a checkpointed first forward leaves nothing for its recompute check;
        # autocast off, or a probe under autocast would compare a bf16 result to fp32 and
        # cache False for good.
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device_type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return _probe(device_type, dtype, d_in, d_out)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _probe(device_type: str, dtype: torch.dtype, d_in: int, d_out: int) -> bool:
    """Tiny grouped GEMM, forward and backward, checked against two plain matmuls (fixed
    values, so probing never consumes the global random stream)."""
    kw = dict(device=device_type, dtype=dtype)
    x = torch.linspace(-1, 1, 5 * d_in, **kw).view(5, d_in).requires_grad_()
    w = torch.linspace(1, -1, 2 * d_in * d_out, **kw).view(2, d_in, d_out).requires_grad_()
    offs = torch.tensor([2, 5], device=device_type, dtype=torch.int32)
    y = GROUPED_MM(x, w, offs=offs)
    y.backward(torch.ones_like(y))
    ref = torch.cat([x[:2] @ w[0], x[2:] @ w[1]])
    return bool(torch.allclose(y, ref, rtol=1e-2, atol=1e-2))
