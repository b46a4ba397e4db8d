"""The fused head split + RoPE of SelfAttention equals the plain permute/unbind/Rotary path
bit for bit, forward and backward, and is a correct derivative (gradcheck)."""

import pytest
import torch

from moelab.models.blocks import Rotary, _SplitHeadsRope


def _reference(qkv, rope):
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return rope(q), rope(k), v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_split_heads_rope_is_bit_exact(dtype):
    torch.manual_seed(0)
    b, s, h, hd = 3, 7, 2, 8
    rope = Rotary(hd, 16)
    qkv = torch.randn(b, s, 3, h, hd, dtype=dtype)
    grads = [torch.randn(b, h, s, hd, dtype=dtype) for _ in range(3)]
    outs = {}
    for name, fn in (("ref", lambda x: _reference(x, rope)),
                     ("fused", lambda x: _SplitHeadsRope.apply(x, *rope.tables(s, dtype)))):
        x = qkv.clone().requires_grad_()
        ys = fn(x)
        torch.autograd.backward(ys, grads)
        outs[name] = ([y.detach() for y in ys], x.grad)
    for got, ref in zip(outs["fused"][0], outs["ref"][0], strict=True):
        assert got.is_contiguous() and torch.equal(got, ref)
    assert torch.equal(outs["fused"][1], outs["ref"][1])


def test_split_heads_rope_gradcheck_and_unused_outputs():
    torch.manual_seed(1)
    b, s, h, hd = 2, 5, 2, 4
    rope = Rotary(hd, 8)
    cos, sin = rope.tables(s, torch.float64)
    x = torch.randn(b, s, 3, h, hd, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _SplitHeadsRope.apply(t, cos, sin), (x,))
    # only k reaches the loss: q's and v's slices of the gradient are exactly zero
    _, k, _ = _SplitHeadsRope.apply(x, cos, sin)
    k.sum().backward()
    assert torch.count_nonzero(x.grad[:, :, 0]) == 0 and torch.count_nonzero(x.grad[:, :, 2]) == 0
    assert torch.count_nonzero(x.grad[:, :, 1]) > 0
