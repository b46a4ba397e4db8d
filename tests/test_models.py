"""moelab.models: shapes, causality, aux losses, layouts, checkpointing, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from reference import model_config

from moelab.analysis.metrics import norm_ordered_share
from moelab.models import (
    DenseSwiGLU,
    ModelConfig,
    MoEMLP,
    MoETransformerLM,
    MoEViT,
    build_model,
)
from moelab.moe import MoELayer

pytestmark = pytest.mark.usefixtures("one_thread")

V = 64


def lm_cfg(**kw) -> ModelConfig:
    base = dict(kind="lm", d_model=32, n_layers=3, n_heads=4, n_experts=4, top_k=2, d_ff=16,
                max_seq_len=32)
    return model_config(**{**base, **kw})


def vit_cfg(**kw) -> ModelConfig:
    base = dict(kind="vit", d_model=32, n_layers=4, n_heads=4, moe_every=2, n_experts=4,
                top_k=2, d_ff=16, patch_size=4)
    return model_config(**{**base, **kw})


def mlp_cfg(**kw) -> ModelConfig:
    base = dict(kind="mlp", d_model=32, n_layers=3, n_experts=4, top_k=2, d_ff=16)
    return model_config(**{**base, **kw})


def tokens(b: int = 2, s: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(seed))


def test_lm_shapes():
    torch.manual_seed(0)
    model = build_model(lm_cfg(), vocab_size=V)
    assert isinstance(model, MoETransformerLM)
    out = model(tokens())
    assert out.logits.shape == (2, 12, V)
    assert out.aux_loss.shape == ()
    assert len(out.moe_losses) == 3 == len(model.moe_layers())
    assert model.head.weight is model.tok_emb.weight  # tied by default
    untied = build_model(lm_cfg(tie_embeddings=False), vocab_size=V)
    assert untied.head.weight is not untied.tok_emb.weight


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_vit_shapes(image_shape, pool):
    torch.manual_seed(0)
    model = build_model(vit_cfg(pool=pool), image_shape=image_shape, n_classes=10)
    assert isinstance(model, MoEViT)
    out = model(torch.randn(2, *image_shape))
    assert out.logits.shape == (2, 10)
    assert len(out.moe_losses) == 2
    n_patches = (image_shape[1] // 4) * (image_shape[2] // 4)
    assert model.pos_emb.shape[1] == n_patches + (pool == "cls")
    assert model.moe_layers()[0].last_stats.n_tokens == 2 * (n_patches + (pool == "cls"))


def test_mlp_deep_no_skip_shapes_and_no_residual():
    torch.manual_seed(0)
    cfg = mlp_cfg(n_layers=12, skip_connections=False)
    model = build_model(cfg, image_shape=(1, 8, 8), n_classes=10)
    assert isinstance(model, MoEMLP)
    x = torch.randn(5, 1, 8, 8)
    out = model(x)
    assert out.logits.shape == (5, 10) and len(out.moe_losses) == 12
    out.logits.sum().backward()
    assert model.in_proj.weight.grad is not None
    # Without a residual, zero expert outputs in one layer wipe out the input entirely.
    with torch.no_grad():
        model.moe_layers()[5].experts.w_out.zero_()
        logits = model(x).logits
    assert torch.allclose(logits, logits[:1].expand_as(logits))
    torch.manual_seed(0)
    skip = build_model(dataclasses.replace(cfg, skip_connections=True), image_shape=(64,),
                       n_classes=10)
    with torch.no_grad():
        skip.moe_layers()[5].experts.w_out.zero_()
        logits = skip(x).logits
    assert not torch.allclose(logits, logits[:1].expand_as(logits))


def test_mlp_neuron_level_moe():
    torch.manual_seed(0)
    cfg = mlp_cfg(n_layers=2, d_model=16, n_experts=64, top_k=8, d_ff=1, activation="gelu")
    model = build_model(cfg, image_shape=(3, 4, 4), n_classes=10)
    out = model(torch.randn(6, 3, 4, 4))
    assert out.logits.shape == (6, 10)
    for layer in model.moe_layers():
        assert layer.experts.w_in.shape == (64, 16, 1)
        assert layer.experts.w_out.shape == (64, 1, 16)
        assert layer.last_stats.tokens_per_expert.sum() == 6 * 8


def test_lm_is_causal():
    torch.manual_seed(0)
    model = build_model(lm_cfg(), vocab_size=V).eval()
    idx = tokens(2, 16)
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % V
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("kind", ["lm", "vit", "mlp"])
def test_aux_loss_is_sum_of_layer_totals(kind):
    torch.manual_seed(0)
    extra = dict(aux_loss_coef=0.1, z_loss_coef=0.01, n_layers=4)
    if kind == "lm":
        model, x = build_model(lm_cfg(**extra), vocab_size=V), tokens()
    elif kind == "vit":
        model = build_model(vit_cfg(**extra), image_shape=(1, 8, 8), n_classes=3)
        x = torch.randn(2, 1, 8, 8)
    else:
        model, x = build_model(mlp_cfg(**extra), image_shape=(7,), n_classes=3), torch.randn(4, 7)
    out = model(x)
    totals = [ls.total for ls in out.moe_losses]
    assert len(totals) == len(model.moe_layers())
    assert all(t > 0 for t in totals)
    torch.testing.assert_close(out.aux_loss, torch.stack(totals).sum())
    for ls in out.moe_losses:
        torch.testing.assert_close(ls.total, 0.1 * ls.load_balance + 0.01 * ls.z_loss)


@pytest.mark.parametrize(("n_layers", "moe_every", "first_dense", "expected"), [
    (4, 1, False, [0, 1, 2, 3]),
    (4, 2, False, [1, 3]),
    (5, 2, False, [0, 2, 4]),
    (4, 1, True, [1, 2, 3]),
    (6, 3, False, [2, 5]),
])
def test_moe_layouts(n_layers, moe_every, first_dense, expected):
    for cfg, kw in ((lm_cfg, dict(vocab_size=V)), (vit_cfg, dict(image_shape=(1, 8, 8),
                                                                    n_classes=3))):
        model = build_model(cfg(n_layers=n_layers, moe_every=moe_every,
                                first_dense=first_dense), **kw)
        kinds = [type(b.ffn) for b in model.blocks]
        assert [i for i, k in enumerate(kinds) if k is MoELayer] == expected
        assert all(k is DenseSwiGLU for i, k in enumerate(kinds) if i not in expected)
        assert [b.moe_idx for b in model.blocks if b.moe_idx is not None] == list(
            range(len(expected)))
        assert model.moe_layers() == [model.blocks[i].ffn for i in expected]
    dense = build_model(lm_cfg(n_layers=2, moe_every=2, d_ff_dense=24), vocab_size=V)
    assert dense.blocks[0].ffn.w_out.in_features == 24
    assert build_model(lm_cfg(n_layers=2, moe_every=2), vocab_size=V).blocks[0].ffn.w_out \
        .in_features == 4 * 32


def _loss_and_grads(model, x, y):
    out = model(x)
    logits = out.logits.flatten(0, -2)
    loss = F.cross_entropy(logits, y.flatten()) + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("kind", ["lm", "vit", "mlp"])
def test_activation_checkpointing_same_loss_and_grads(kind):
    make = {"lm": (lm_cfg, dict(vocab_size=V)),
            "vit": (vit_cfg, dict(image_shape=(1, 8, 8), n_classes=3)),
            "mlp": (mlp_cfg, dict(image_shape=(7,), n_classes=3))}[kind]
    cfg = make[0](dropout=0.1, aux_loss_coef=0.1)
    if kind == "lm":
        x, y = tokens(), tokens(seed=1)
    elif kind == "vit":
        x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    else:
        x, y = torch.randn(4, 7), torch.tensor([0, 1, 2, 1])
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(cfg, activation_checkpointing=ckpt), **make[1])
        torch.manual_seed(1)  # same dropout masks
        results.append(_loss_and_grads(model, x, y))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_activation_checkpointing_recomputes():
    torch.manual_seed(0)
    model = build_model(lm_cfg(activation_checkpointing=True), vocab_size=V)
    x = tokens()
    n_calls = []
    model.blocks[1].attn.register_forward_hook(lambda *a: n_calls.append(1))
    model(x).logits.sum().backward()
    assert len(n_calls) == 2  # forward + recompute in backward
    n_calls.clear()
    with torch.no_grad():
        model(x)
    assert len(n_calls) == 1


def test_track_out_norm_on_all_layers():
    torch.manual_seed(0)
    model = build_model(vit_cfg(), image_shape=(1, 8, 8), n_classes=3)
    model(torch.randn(3, 1, 8, 8))
    assert all(layer.last_stats.expert_out_norm is None for layer in model.moe_layers())
    model.set_track_out_norm(True)
    model(torch.randn(3, 1, 8, 8))
    for layer in model.moe_layers():
        stats = layer.last_stats
        share, norm = norm_ordered_share(stats.tokens_per_expert, stats.expert_out_norm)
        assert share.shape == (4,) and abs(float(share.sum()) - 1) < 1e-9
    model.set_track_out_norm(False)
    assert not any(layer.track_out_norm for layer in model.moe_layers())


def test_lm_input_errors():
    model = build_model(lm_cfg(max_seq_len=16), vocab_size=V)
    with pytest.raises(ValueError, match="dtype"):
        model(torch.zeros(2, 4))
    with pytest.raises(IndexError):  # torch's own embedding check (CPU); see the debug flag
        model(torch.full((2, 4), V))
    model.check_token_range = True
    with pytest.raises(ValueError, match="range"):
        model(torch.full((2, 4), V))
    with pytest.raises(ValueError, match="range"):
        model(torch.full((2, 4), -1))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(8, dtype=torch.long))
    model(torch.zeros(1, 16, dtype=torch.long))  # the limit itself is fine


def test_image_input_errors():
    vit = build_model(vit_cfg(), image_shape=(3, 8, 8), n_classes=3)
    with pytest.raises(ValueError, match=r"\[B, 3, 8, 8\]"):
        vit(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="dtype"):
        vit(torch.zeros(2, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="patch_size=4"):
        build_model(vit_cfg(), image_shape=(1, 30, 30), n_classes=3)
    mlp = build_model(mlp_cfg(), image_shape=(1, 4, 4), n_classes=3)
    mlp(torch.randn(2, 16))  # flat input is fine too
    with pytest.raises(ValueError, match="d_input=16"):
        mlp(torch.randn(2, 1, 5, 5))


def test_build_model_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(lm_cfg())
    with pytest.raises(ValueError, match="image_shape"):
        build_model(vit_cfg(), n_classes=3)
    with pytest.raises(ValueError, match="n_classes"):
        build_model(mlp_cfg(), image_shape=(4,))
    with pytest.raises(ValueError, match="ModelConfig"):
        build_model({"kind": "lm"}, vocab_size=V)
    with pytest.raises(ValueError, match="skip_connections"):
        lm_cfg(skip_connections=False)
    with pytest.raises(ValueError, match="head_dim"):
        build_model(lm_cfg(d_model=12, n_heads=4), vocab_size=V)


def test_activation_checkpointing_on_the_very_first_forward():
    from moelab.moe.dispatch import grouped_mm_supported

    grouped_mm_supported.cache_clear()  # the backend probe must run inside the checkpoint
    torch.manual_seed(0)
    # shapes no other test uses, so the dispatch backend probe runs inside the checkpoint
    cfg = lm_cfg(d_model=48, n_heads=4, d_ff=40, activation_checkpointing=True)
    model = build_model(cfg, vocab_size=V)
    model(tokens()).logits.sum().backward()


def test_token_range_checked_per_split_or_behind_the_debug_flag():
    from moelab.models.lm import check_token_ids

    check_token_ids(torch.tensor([0, V - 1]), V)
    with pytest.raises(ValueError, match=r"val split token ids range \[0, 64\] is invalid"):
        check_token_ids(torch.tensor([0, V]), V, "val split token ids")
    model = build_model(lm_cfg(), vocab_size=V)
    bad = torch.tensor([[1, V]])
    assert not model.check_token_range  # no per-forward device->host sync by default
    model.check_token_range = True
    with pytest.raises(ValueError, match=r"token ids range \[1, 64\] is invalid"):
        model(bad)
