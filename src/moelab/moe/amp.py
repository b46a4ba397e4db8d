"""Mixed precision inside the MoE layer: which dtype the expert GEMMs run in.

Under ``torch.autocast`` (fp32 weights, bf16 compute: the standard mixed-precision recipe) the
expert GEMMs run in the autocast dtype with fp32 accumulation, as ``F.linear`` does: the layer
casts its token rows and expert weights to :func:`compute_dtype` and runs the experts with
autocast off (their inputs already have the dtype; autocast has no rule for grouped GEMM).
The router (logits, softmax, top-k) and Default MoE's EMA and default term stay fp32: they
run inside :func:`autocast_off`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["autocast_dtype", "autocast_off", "compute_dtype"]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on ``device_type`` right now, or None when
    autocast is off there."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    if device_type == "cpu":  # pragma: no cover - torch 2.3
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == "cuda":  # pragma: no cover - torch 2.3
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None  # pragma: no cover


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the expert GEMMs of input ``x`` run in: the autocast dtype of ``x``'s device
    when autocast is on there (for a floating ``x``), else ``x.dtype``."""
    dtype = autocast_dtype(x.device.type)
    return dtype if dtype is not None and x.is_floating_point() else x.dtype


def autocast_off(device_type: str) -> contextlib.AbstractContextManager[None]:
    """A context with autocast disabled on ``device_type`` (a no-op when it is off)."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
