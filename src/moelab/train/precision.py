"""The numeric precision of a run (``train.precision``): one policy, applied in two places.

    "fp32"   exact fp32 matmuls (TF32 off on CUDA)
    "tf32"   fp32 weights and activations, matmuls in TF32 on CUDA (Ampere and newer)
    "bf16"   mixed precision: fp32 weights, gradients and optimizer state; forward (and so the
             backward's matmuls) under ``torch.autocast(dtype=bfloat16)``. The MoE layer's
             expert GEMMs run in bf16 too (``moelab.moe.amp``); the router, softmax,
             top-k, losses and Default MoE's EMA stay fp32
    "auto"   bf16 on a CUDA device that supports it, fp32 elsewhere (CPU results stay
             bit-identical to earlier versions)

:func:`matmul_flags` sets the TF32 switches for the duration of a run (restored afterwards);
:func:`autocast` is the context the forward and the loss run in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["PRECISIONS", "autocast", "matmul_flags", "new_tf32_api", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def resolve_precision(name: str, device: torch.device) -> str:
    """``train.precision`` on ``device``: "auto" becomes "bf16" on a bf16-capable CUDA device,
    else "fp32"; "tf32" needs CUDA and "bf16" a device autocast supports (ValueError
    otherwise)."""
    if name not in PRECISIONS:
        raise ValueError(f"train.precision={name!r} is invalid: choose one of {PRECISIONS}")
    cuda = device.type == "cuda"
    if name == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if name == "tf32" and not cuda:
        raise ValueError(f"train.precision='tf32' is invalid on {device}: TF32 is a CUDA "
                         "matmul mode (use fp32 or bf16)")
    if name == "bf16" and device.type not in ("cuda", "cpu", "mps", "xpu"):
        raise ValueError(f"train.precision='bf16' is invalid on {device}: no bf16 autocast "
                         "there")
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.precision='bf16' is invalid: {torch.cuda.get_device_name()} "
                         "has no bf16 support (use fp32 or tf32)")
    return name


def new_tf32_api() -> bool:
    """Whether this torch has the ``fp32_precision`` switches (torch >= 2.9). Where it has
    them, only they are used: once anything in the process (e.g. Hugging Face's
    ``TrainingArguments(tf32=...)``) has set one, torch raises "mix of the legacy and new
    APIs" on a read of the legacy ``allow_tf32`` flags."""
    return hasattr(torch.backends, "fp32_precision")


def _tf32_knobs() -> tuple[object, ...]:
    """The objects whose ``fp32_precision`` :func:`matmul_flags` sets: cuBLAS matmuls and
    cuDNN convolutions and RNNs."""
    cudnn = torch.backends.cudnn
    return (torch.backends.cuda.matmul, cudnn.conv, cudnn.rnn)


@contextlib.contextmanager
def matmul_flags(precision: str) -> Iterator[None]:
    """TF32 on (``tf32``) or off (every other precision) for CUDA matmuls and cuDNN
    convolutions while the block runs; the previous settings are restored afterwards. On
    torch >= 2.9 through the new ``fp32_precision`` API ("tf32" / "ieee"), on older torch
    through the legacy ``allow_tf32`` flags (:func:`new_tf32_api`)."""
    on = precision == "tf32"
    if new_tf32_api():
        knobs = _tf32_knobs()
        prev = [k.fp32_precision for k in knobs]
        for k in knobs:
            k.fp32_precision = "tf32" if on else "ieee"
        try:
            yield
        finally:
            for k, value in zip(knobs, prev, strict=True):
                k.fp32_precision = value
        return
    prev_flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev_flags


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, torch.bfloat16)`` for "bf16", a no-op otherwise: wrap
    the forward and the loss in it, not the backward."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
