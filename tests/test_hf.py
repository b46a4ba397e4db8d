"""moelab.hf.patch on tiny random Hugging Face MoE models: with every method off the patched
model computes what the unpatched one does (logits, aux loss, every gradient)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import MOELAB_FAMILIES, SPECS, tiny_model, token_batch  # noqa: E402

from moelab.hf import patch, patched_blocks, unpatch  # noqa: E402
from moelab.methods.default_moe import DefaultMoEConfig  # noqa: E402
from moelab.methods.momentum import MomentumConfig  # noqa: E402

IMPLS = ("eager", "grouped_mm", "batched_mm")


def _run(model, ids):
    """(logits, aux loss or None, {name: grad}) of one training forward/backward."""
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return out.logits.detach(), out.aux_loss, grads


def _max_diffs(a, b):
    (la, xa, ga), (lb, xb, gb) = a, b
    assert ga.keys() == gb.keys()
    aux = 0.0 if xa is None else (xa - xb).abs().item()
    assert (xa is None) == (xb is None)
    grad = max((ga[k].double() - gb[k].double()).abs().max().item() for k in ga)
    return (la.double() - lb.double()).abs().max().item(), aux, grad


def _dispatch(family: str) -> str:
    return "auto" if family in MOELAB_FAMILIES else "hf"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", list(SPECS))
def test_methods_off_equal_unpatched_fp32(family, impl):
    ref = tiny_model(family, experts_implementation=impl).train()
    model = copy.deepcopy(ref)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    patch(model, dispatch=_dispatch(family))
    assert len(patched_blocks(model)) >= 1
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params  # same Parameters, no copies
    ids = token_batch()
    logits, aux, grad = _max_diffs(_run(ref, ids), _run(model, ids))
    assert logits <= 1e-6 and aux <= 1e-6 and grad <= 1e-6, (logits, aux, grad)


@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm", "padded"])
@pytest.mark.parametrize("family", MOELAB_FAMILIES)
def test_each_moelab_dispatch_path_equals_unpatched_fp32(family, dispatch):
    ref = tiny_model(family).train()
    model = patch(copy.deepcopy(ref), dispatch=dispatch)
    assert all(b.moelab.experts.backend == dispatch for _, b in patched_blocks(model))
    logits, aux, grad = _max_diffs(_run(ref, token_batch()), _run(model, token_batch()))
    assert logits <= 1e-6 and aux <= 1e-6 and grad <= 1e-6, (logits, aux, grad)


@pytest.mark.parametrize("family", list(SPECS))
def test_methods_off_equal_unpatched_fp64_eager_exactly(family):
    ref = tiny_model(family, dtype=torch.float64)
    model = patch(copy.deepcopy(ref), dispatch=_dispatch(family))
    ref.train(), model.train()
    ids = token_batch()
    logits, aux, grad = _max_diffs(_run(ref, ids), _run(model, ids))
    # forward values are bit-equal; gradients differ by accumulation order only (~1e-16)
    assert logits == 0.0 and aux == 0.0 and grad <= 1e-15, (logits, aux, grad)


@pytest.mark.parametrize("family", MOELAB_FAMILIES)
def test_dispatch_hf_is_bit_equal(family):
    ref = tiny_model(family).train()
    model = patch(copy.deepcopy(ref), dispatch="hf")
    ids = token_batch()
    assert _max_diffs(_run(ref, ids), _run(model, ids)) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("family", MOELAB_FAMILIES)
def test_bf16_block_within_one_bf16_step(family):
    """bf16: moelab folds the routing weight in before the down projection, HF after, so
    each block output may differ by rounding; checked per block on the same input (a whole
    model can flip a near-tied top-K choice downstream). Tolerance: 2 bf16 steps (2**-7
    relative) of the block output's largest magnitude."""
    ref = tiny_model(family, dtype=torch.bfloat16)
    model = patch(copy.deepcopy(ref))
    ref_blocks = [m for m in ref.modules() if type(m).__name__ in
                  {type(b).__name__ for _, b in patched_blocks(model)}]
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3)).bfloat16()
    for (_, block), ref_block in zip(patched_blocks(model), ref_blocks, strict=True):
        y, y_ref = block(x.clone()), ref_block(x.clone())
        scale = y_ref.abs().max().item()
        assert (y.float() - y_ref.float()).abs().max().item() <= 2 * 2**-7 * scale


@pytest.mark.parametrize("family", list(SPECS))
def test_unpatch_restores_classes_and_parameters(family):
    model = tiny_model(family)
    classes = {n: type(m) for n, m in model.named_modules()}
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    ids = token_batch()
    before = model(ids).logits
    dmoe = DefaultMoEConfig() if family in MOELAB_FAMILIES else None
    patch(model, default_moe=dmoe, momentum=MomentumConfig("heavy_ball"),
          dispatch=_dispatch(family))
    assert not torch.equal(model(ids).logits, before)
    unpatch(model)
    assert list(model.state_dict()) == keys
    assert not any("moelab" in n for n, _ in model.named_modules())
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(p is params[n] for n, p in model.named_parameters())
    assert torch.equal(model(ids).logits, before)
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)


def test_patched_classes_keep_hf_names():
    model = tiny_model("mixtral")
    block_cls = type(model.model.layers[0].mlp)
    patch(model)
    patched_cls = type(model.model.layers[0].mlp)
    assert patched_cls is not block_cls and issubclass(patched_cls, block_cls)
    assert patched_cls.__name__ == block_cls.__name__
    assert patched_cls.__qualname__ == block_cls.__qualname__


def test_errors_name_the_class():
    class DenseNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="DenseNet: no supported MoE block"):
        patch(DenseNet())
    model = tiny_model("gpt_oss")
    with pytest.raises(ValueError, match="GptOssMLP"):
        patch(model, dispatch="loop")
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="dispatch"):
        patch(model, dispatch="fast")
    patch(model)
    with pytest.raises(ValueError, match="already patched"):
        patch(model)


def test_mixtral_router_jitter_is_reproduced():
    """Training-mode jitter draws the same noise as HF's block (same RNG calls, same order)."""
    ref = tiny_model("mixtral", router_jitter_noise=0.1).train()
    model = patch(copy.deepcopy(ref))
    ids = token_batch()
    torch.manual_seed(7)
    a = ref(ids).logits
    torch.manual_seed(7)
    b = model(ids).logits
    torch.manual_seed(8)
    c = model(ids).logits
    assert (a - b).abs().max().item() <= 1e-6
    assert (b - c).abs().max().item() > 1e-4  # the noise is really on
