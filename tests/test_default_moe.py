"""Default MoE: EMA defaults, the dense router gradient, and its invariants."""

import pytest
import torch
from reference import expert_forward, naive_moe
from torch.utils.checkpoint import checkpoint

from moelab.methods.default_moe import DefaultMoEConfig, default_moe_layer
from moelab.moe import MoEConfig, MoELayer


def make_pair(seed=0, beta=0.9, **kw):
    """A plain top-K layer and a Default MoE layer with the same weights."""
    base = dict(d_model=8, n_experts=4, top_k=1, d_ff=8, aux_loss_coef=0.0)
    base.update(kw)
    torch.manual_seed(seed)
    plain = MoELayer(MoEConfig(**base))
    dflt = default_moe_layer(MoEConfig(**base), DefaultMoEConfig(beta=beta))
    dflt.load_state_dict(plain.state_dict(), strict=False)
    return plain, dflt


def batch_means(layer, x, scored=False):
    """Per-expert mean (or prob-weighted mean) of the raw expert outputs, naively."""
    routing = layer.router(x)
    means = {}
    for e in range(layer.cfg.n_experts):
        rows = [t for t in range(x.shape[0]) if e in routing.topk_ids[t].tolist()]
        if not rows:
            continue
        outs = torch.stack([expert_forward(layer, e, x[t]) for t in rows])
        w = routing.probs[rows, e] if scored else torch.ones(len(rows))
        means[e] = (w[:, None] * outs).sum(0) / w.sum()
    return means


@pytest.mark.parametrize("scored", [False, True])
def test_ema_after_two_steps_and_output_hand_computed(scored):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, n_experts=4, top_k=2, d_ff=8, aux_loss_coef=0.0)
    layer = default_moe_layer(cfg, DefaultMoEConfig(beta=0.8, scored=scored))
    expected = torch.zeros(4, 8)
    with torch.no_grad():
        for step in range(2):
            x = torch.randn(6, 8) + step
            for e, mean in batch_means(layer, x, scored).items():
                expected[e] = 0.8 * expected[e] + 0.2 * mean
            y = layer(x).y
            torch.testing.assert_close(layer.method.ema, expected, rtol=1e-5, atol=1e-6)
            # the update happens before Ê is used in the same step
            torch.testing.assert_close(y, naive_moe(layer, x, expected), rtol=1e-5, atol=1e-6)
    assert layer.method.n_updates.sum() > 0


def test_router_gradient_is_the_dense_formula_and_expert_grads_unchanged():
    plain, dflt = make_pair(n_experts=4, top_k=1)
    with torch.no_grad():
        dflt.method.ema.copy_(torch.randn(4, 8))
    dflt.eval()  # keep Ê fixed so the naive formula uses the same defaults
    plain.eval()
    x = torch.randn(10, 8)
    g = torch.randn(10, 8)
    params = [dflt.router.weight, dflt.experts.w_in, dflt.experts.w_out]
    fast = torch.autograd.grad(dflt(x).y, params, g)
    naive = torch.autograd.grad(naive_moe(dflt, x, dflt.method.ema), params, g)
    for a, b in zip(fast, naive, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    p_params = [plain.router.weight, plain.experts.w_in, plain.experts.w_out]
    plain_grads = torch.autograd.grad(plain(x).y, p_params, g)
    # experts only learn from their own tokens: identical to plain top-K
    assert torch.equal(fast[1], plain_grads[1]) and torch.equal(fast[2], plain_grads[2])
    # the router gradient differs: non-selected experts now get a signal
    assert not torch.allclose(fast[0], plain_grads[0])


def test_router_gets_gradient_for_every_expert_logit():
    """Through the real layer: with renormalised top-2 weights, plain top-K gives the router
    rows of never-chosen experts zero gradient (analytically; fp32 rounding of the
    renormalisation leaves ~1e-7); Default MoE gives every row a real one."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, n_experts=8, top_k=2, d_ff=8, normalize_topk=True,
                    aux_loss_coef=0.0)
    plain = MoELayer(cfg)
    dflt = default_moe_layer(cfg, DefaultMoEConfig(beta=0.9))
    dflt.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        dflt.method.ema.copy_(torch.randn(8, 8))
    x = torch.randn(3, 8)  # 3 tokens x 2 choices: at least 2 of the 8 experts go unchosen
    g = torch.randn(3, 8)
    for layer in (plain, dflt):
        (layer(x).y * g).sum().backward()
    unchosen = plain.last_stats.tokens_per_expert == 0
    assert unchosen.sum() >= 2
    assert torch.equal(dflt.last_stats.tokens_per_expert, plain.last_stats.tokens_per_expert)
    row_grad_plain = plain.router.weight.grad.abs().sum(1)
    row_grad_dflt = dflt.router.weight.grad.abs().sum(1)
    scale = row_grad_plain[~unchosen].min()
    assert scale > 1e-3
    assert torch.all(row_grad_plain[unchosen] < 1e-4 * scale)
    assert torch.all(row_grad_dflt[unchosen] > 1e-2 * scale)


def test_experts_without_tokens_keep_their_default():
    _, dflt = make_pair(n_experts=4, top_k=1, beta=0.5)
    with torch.no_grad():
        dflt.router.weight.copy_(torch.tensor([[1.0] * 8, [-1.0] * 8, [0.0] * 8, [0.0] * 8]))
        dflt.method.ema.fill_(3.0)
    x = torch.rand(6, 8) + 0.5  # all prefer expert 0
    dflt(x)
    assert torch.all(dflt.method.ema[1:] == 3.0)
    assert not torch.all(dflt.method.ema[0] == 3.0)
    assert dflt.method.n_updates.tolist() == [1, 0, 0, 0]


def test_eval_does_not_change_default_but_uses_it():
    plain, dflt = make_pair()
    dflt(torch.randn(6, 8))
    snapshot = dflt.method.ema.clone()
    dflt.eval()
    plain.eval()
    x = torch.randn(6, 8)
    y = dflt(x).y
    assert torch.equal(dflt.method.ema, snapshot)
    assert not torch.allclose(y, plain(x).y)


def test_state_dict_round_trip_keeps_default():
    _, dflt = make_pair()
    dflt(torch.randn(6, 8))
    _, other = make_pair(seed=1)
    other.load_state_dict(dflt.state_dict())
    assert torch.equal(other.method.ema, dflt.method.ema)
    assert torch.equal(other.method.n_updates, dflt.method.n_updates)


def test_zero_default_is_bit_identical_to_plain_layer():
    plain, dflt = make_pair(top_k=2)
    plain.eval()
    dflt.eval()  # Ê stays at its zero init
    x = torch.randn(7, 8, requires_grad=True)
    y_plain, y_dflt = plain(x).y, dflt(x).y
    assert torch.equal(y_plain, y_dflt)
    assert "method.ema" not in plain.state_dict()


def test_checkpoint_recompute_updates_ema_once():
    _, ref = make_pair(beta=0.5)
    _, ckpt = make_pair(beta=0.5)
    x = torch.randn(6, 8, requires_grad=True)
    ref(x).y.sum().backward()
    checkpoint(lambda t: ckpt(t).y, x, use_reentrant=False).sum().backward()
    assert torch.equal(ckpt.method.ema, ref.method.ema)
    assert torch.equal(ckpt.method.n_updates, ref.method.n_updates)
    torch.testing.assert_close(ckpt.router.weight.grad, ref.router.weight.grad)


def test_straight_through_keeps_forward_value_and_dense_router_gradient():
    torch.manual_seed(0)
    base = dict(d_model=8, n_experts=4, top_k=1, d_ff=8, aux_loss_coef=0.0)
    st = default_moe_layer(MoEConfig(**base), DefaultMoEConfig(straight_through=True))
    full = default_moe_layer(MoEConfig(**base), DefaultMoEConfig())
    plain = MoELayer(MoEConfig(**base))
    full.load_state_dict(st.state_dict())
    plain.load_state_dict(st.state_dict(), strict=False)
    for layer in (st, full, plain):
        layer.eval()
    with torch.no_grad():
        st.method.ema.copy_(torch.randn(4, 8))
        full.method.ema.copy_(st.method.ema)
    x = torch.randn(5, 8)
    y_st = st(x).y
    torch.testing.assert_close(y_st, plain(x).y)
    g = torch.randn(5, 8)
    grad_st, = torch.autograd.grad(st(x).y, st.router.weight, g)
    grad_full, = torch.autograd.grad(full(x).y, full.router.weight, g)
    torch.testing.assert_close(grad_st, grad_full)


def test_bias_correction_divides_by_one_minus_beta_power():
    """Two training forwards with batch means m1, m2 (computed here per expert from the
    reference experts): the corrected default is m1 after one update and
    (beta(1-beta) m1 + (1-beta) m2) / (1 - beta^2) after two; the eval output uses it."""
    torch.manual_seed(0)
    beta = 0.9
    cfg = MoEConfig(d_model=8, n_experts=3, top_k=1, d_ff=8, aux_loss_coef=0.0)
    layer = default_moe_layer(cfg, DefaultMoEConfig(beta=beta, bias_correction=True))
    xs = [torch.randn(12, 8), torch.randn(12, 8)]
    means = []  # per batch: {expert: mean raw output over its tokens}
    with torch.no_grad():
        for x in xs:
            ids = layer.router(x).topk_ids[:, 0].tolist()
            means.append({e: torch.stack([expert_forward(layer, e, x[t])
                                          for t in range(len(ids)) if ids[t] == e]).mean(0)
                          for e in set(ids)})
    for x in xs:
        layer(x)
    expected = torch.zeros(3, 8)
    for e in range(3):
        m1, m2 = means[0].get(e), means[1].get(e)
        if m1 is not None and m2 is not None:
            expected[e] = (beta * (1 - beta) * m1 + (1 - beta) * m2) / (1 - beta**2)
        elif m1 is not None or m2 is not None:
            expected[e] = m1 if m1 is not None else m2
    assert sum(e in means[0] and e in means[1] for e in range(3)) >= 1
    torch.testing.assert_close(layer.method.value(), expected, rtol=1e-5, atol=1e-6)
    layer.eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).y, naive_moe(layer, x, expected), rtol=1e-5,
                                   atol=1e-6)


def test_bad_beta_rejected():
    for beta in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="beta"):
            DefaultMoEConfig(beta=beta)


def test_bf16_layer_keeps_fp32_default_and_trains():
    """``layer.bfloat16()`` casts the experts but keeps Ê in fp32; forward, backward and the
    EMA update run, and Ê matches the fp32 layer fed the same bf16-rounded weights."""
    _, dflt = make_pair(top_k=2, beta=0.5)
    ref = default_moe_layer(dflt.cfg, dflt.method.cfg)
    dflt.bfloat16()
    ref.load_state_dict({k: v.float() for k, v in dflt.state_dict().items()})
    assert dflt.method.ema.dtype == torch.float32
    x = torch.randn(10, 8)
    y = dflt(x.bfloat16()).y
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and dflt.experts.w_in.grad.dtype == torch.bfloat16
    ref(x.bfloat16().float())
    ema = dflt.method.ema
    assert ema.abs().sum() > 0
    torch.testing.assert_close(ema, ref.method.ema, rtol=5e-2, atol=2e-2)
    y2 = dflt(x.bfloat16()).y  # the default term (fp32 Ê) now contributes, in bf16
    assert y2.dtype == torch.bfloat16
