"""Expert activations with hand-written backward, shared by both dispatch paths.

h is the first projection's output: [N, 2F] for SwiGLU (gate | up) or [N, F] for GELU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("swiglu", "gelu")

_SQRT_HALF = 0.5**0.5
_INV_SQRT_2PI = (2 * torch.pi) ** -0.5


def activation_forward(h: Tensor, activation: str) -> Tensor:
    """act(h): [N, F] (a fresh tensor, safe to modify in place)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
    return F.gelu(h)


def activation_backward(h: Tensor, grad_act: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """Given h and d loss / d act(h) ([N, F]), return (d loss / d h, act(h)) — the activation
    is recomputed on the way, from the same intermediates."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        width = gate.shape[1]
        sig = torch.sigmoid(gate)
        silu = gate * sig
        # d silu / d gate = sig * (1 + gate * (1 - sig))
        dsilu = (1.0 - sig).mul_(gate).add_(1.0).mul_(sig)
        if torch.compiler.is_compiling():  # no strided out=: the compiler fuses the concat
            grad_h = torch.cat([dsilu.mul_(up).mul_(grad_act), grad_act * silu], dim=-1)
            return grad_h, silu.mul_(up)
        grad_h = torch.empty_like(h)
        torch.mul(grad_act, silu, out=grad_h[:, width:])
        torch.mul(dsilu.mul_(up), grad_act, out=grad_h[:, :width])
        return grad_h, silu.mul_(up)
    cdf = torch.erf(h * _SQRT_HALF).add_(1.0).mul_(0.5)
    grad_h = torch.exp(h.square() * -0.5).mul_(h).mul_(_INV_SQRT_2PI).add_(cdf).mul_(grad_act)
    return grad_h, cdf.mul_(h)


def row_dot(a_NF: Tensor, b_NF: Tensor) -> Tensor:
    """Per-row dot product: [N, F] x [N, F] -> [N]."""
    n_rows = a_NF.shape[0]
    return torch.bmm(a_NF.reshape(n_rows, 1, -1), b_NF.reshape(n_rows, -1, 1)).view(n_rows)
