"""MomentumSMoE family (moelab.methods.momentum) inside the moelab models."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from reference import model_config
from torch import nn

from moelab.data import ByteTokenizer, LMBatcher, load_text_dataset
from moelab.methods.default_moe import DefaultMoEConfig
from moelab.methods.momentum import (
    AdamSMoE,
    CombineRule,
    HeavyBall,
    MomentumConfig,
    RobustMomentum,
    build_combine_rule,
    robust_coefficients,
)
from moelab.models import ModelConfig, build_model
from moelab.moe import MoELosses, MoEOutput

pytestmark = pytest.mark.usefixtures("one_thread")

V = 64
ALL_RULES = {
    "none": MomentumConfig(),
    "heavy_ball": MomentumConfig(rule="heavy_ball", mu=0.7, gamma=1.0),
    "adam": MomentumConfig(rule="adam"),
    "adam_bc_2layers": MomentumConfig(rule="adam", adam_bias_correction=True, adam_layers=2),
    "robust": MomentumConfig(rule="robust"),
    "heavy_ball_learnable": MomentumConfig(rule="heavy_ball", learnable=True),
    "adam_learnable": MomentumConfig(rule="adam", learnable=True),
}


def cfg_for(kind: str, momentum: MomentumConfig | None = None, **kw) -> ModelConfig:
    base = dict(d_model=32, n_heads=4, n_experts=4, top_k=2, d_ff=16, max_seq_len=32)
    base.update({"lm": dict(n_layers=3), "vit": dict(n_layers=6, moe_every=2, patch_size=4),
                 "mlp": dict(n_layers=3)}[kind])
    return model_config(kind=kind, momentum=momentum or MomentumConfig(), **{**base, **kw})


def model_and_batch(kind: str, cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(123)
    if kind == "lm":
        model = build_model(cfg, vocab_size=V)
        return model, torch.randint(0, V, (2, 12), generator=g), torch.randint(0, V, (2, 12),
                                                                               generator=g)
    if kind == "vit":
        model = build_model(cfg, image_shape=(1, 8, 8), n_classes=3)
        return model, torch.randn(3, 1, 8, 8, generator=g), torch.tensor([0, 1, 2])
    model = build_model(cfg, image_shape=(7,), n_classes=3)
    return model, torch.randn(5, 7, generator=g), torch.tensor([0, 1, 2, 1, 0])


def loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out.logits.flatten(0, -2), y.flatten()) + out.aux_loss
    loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()
                                 if p.grad is not None}


# --- neutral settings are exactly the baseline ------------------------------------------------

@pytest.mark.parametrize("kind", ["lm", "vit", "mlp"])
@pytest.mark.parametrize("neutral", [
    HeavyBall(mu=0.0, gamma=1.0),
    RobustMomentum(alpha=0.0, beta=1.0, eps=0.0),
    MomentumConfig(rule="heavy_ball", mu=0.0, gamma=1.0),
], ids=["heavy_ball", "robust", "heavy_ball_config"])
def test_neutral_settings_equal_baseline(kind, neutral):
    base_model, x, y = model_and_batch(kind, cfg_for(kind, aux_loss_coef=0.1))
    if isinstance(neutral, MomentumConfig):
        model, _, _ = model_and_batch(kind, cfg_for(kind, neutral, aux_loss_coef=0.1))
    else:
        model, _, _ = model_and_batch(kind, cfg_for(kind, aux_loss_coef=0.1))
        model.combine_rule = neutral
    assert type(base_model.combine_rule) is CombineRule
    assert type(model.combine_rule) is not CombineRule
    logits_a, grads_a = loss_and_grads(base_model, x, y)
    logits_b, grads_b = loss_and_grads(model, x, y)
    assert torch.equal(logits_a, logits_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    # and a non-neutral setting does change the output
    model.combine_rule = HeavyBall(mu=0.5, gamma=1.0)
    assert not torch.allclose(model(x).logits, logits_a)


# --- hand-computed recurrence with fake MoE outputs ---------------------------------------------

F_CONST = (0.5, -1.5, 2.0)  # the fake output of MoE layer 0, 1, 2 (same for every token/coord)
MU, GAMMA, B1, B2, EPS = 0.6, 0.8, 0.9, 0.999, 1e-8


def hand_updates(rule: str, adam_layers: int = 1, bias_correction: bool = False,
                 mus=(MU,) * 3, gammas=(GAMMA,) * 3, robust=(0.04, 0.96, 0.125)):
    """Per MoE layer: (residual update added by the block, look-ahead added to its input)."""
    out = []
    p = m = v = 0.0
    for i, f in enumerate(F_CONST):
        if rule == "none":
            out.append((f, 0.0))
        elif rule == "heavy_ball":
            p = f + mus[i] * p
            out.append((gammas[i] * p, 0.0))
        elif rule == "robust":
            alpha, beta, eps = robust
            look = eps * beta * p
            p = f + alpha * p
            out.append((beta * p, look))
        elif rule == "adam":
            p = f + mus[i] * p  # the heavy-ball buffer, filled by Adam layers too
            if i < adam_layers:
                m = B1 * m + (1 - B1) * f
                v = B2 * v + (1 - B2) * f * f
                mh, vh = m, v
                if bias_correction:
                    mh, vh = m / (1 - B1 ** (i + 1)), v / (1 - B2 ** (i + 1))
                out.append((gammas[i] * mh / math.sqrt(vh + EPS), 0.0))
            else:
                out.append((gammas[i] * p, 0.0))
    return out


def fake_moe(layer, const, inputs):
    def forward(x):
        inputs.append(x.detach().clone())
        zero = x.new_zeros(())
        return MoEOutput(torch.full_like(x, const), MoELosses(zero, zero, zero))
    layer.forward = forward


@pytest.mark.parametrize(("rule", "make", "kw"), [
    ("none", lambda n: CombineRule(), {}),
    ("heavy_ball", lambda n: HeavyBall(MU, GAMMA), {}),
    ("heavy_ball", lambda n: HeavyBall(0.0, 1.0, n_layers=n, learnable=True),
     dict(mus=(0.1, 0.3, 0.6), gammas=(0.5, 1.5, 2.0))),
    ("robust", lambda n: RobustMomentum(0.04, 0.96, 0.125), {}),
    ("robust", lambda n: RobustMomentum.from_kappa_rho(1.25, 0.2),
     dict(robust=(0.04, 0.96, 0.2**3 / (0.25 * 0.64 * 1.2)))),
    ("adam", lambda n: AdamSMoE(MU, GAMMA, B1, B2, EPS, adam_layers=1), {}),
    ("adam", lambda n: AdamSMoE(MU, GAMMA, B1, B2, EPS, adam_layers=2), dict(adam_layers=2)),
    ("adam", lambda n: AdamSMoE(MU, GAMMA, B1, B2, EPS, adam_layers=1, bias_correction=True),
     dict(bias_correction=True)),
    ("adam", lambda n: AdamSMoE(MU, GAMMA, B1, B2, EPS, adam_layers=3, bias_correction=True),
     dict(adam_layers=3, bias_correction=True)),
], ids=["none", "heavy_ball", "heavy_ball_per_layer", "robust", "robust_kappa_rho", "adam",
        "adam_2layers", "adam_bias_correction", "adam_all_layers_bc"])
def test_recurrence_matches_hand_computation(rule, make, kw):
    # MLP: 5 blocks, MoE at 0, 2, 4; the dense blocks (1, 3) are stubbed to add zero, so the
    # state must pass through them unchanged for the hand computation to hold.
    cfg = cfg_for("mlp", n_layers=5, moe_every=2, d_model=6)
    model, x, _ = model_and_batch("mlp", cfg)
    rule_module = make(3)
    if rule_module.__class__ is HeavyBall and rule_module.learnable:
        with torch.no_grad():
            rule_module.mu.copy_(torch.tensor(kw["mus"]))
            rule_module.gamma.copy_(torch.tensor(kw["gammas"]))
    model.combine_rule = rule_module
    inputs: list[torch.Tensor] = []
    for layer, const in zip(model.moe_layers(), F_CONST, strict=True):
        fake_moe(layer, const, inputs)
    for i in (1, 3):
        model.blocks[i].ffn.forward = torch.zeros_like
    final = []
    model.norm.register_forward_pre_hook(lambda mod, args: final.append(args[0].detach()))
    with torch.no_grad():
        model(x)
        h = model.in_proj(x)
        for (update, look), block in zip(hand_updates(rule, **kw), (0, 2, 4), strict=True):
            expected_input = model.blocks[block].norm2(h) + look
            torch.testing.assert_close(inputs[block // 2], expected_input, rtol=0, atol=1e-6)
            h = h + update
    torch.testing.assert_close(final[0], h, rtol=0, atol=1e-6)


def test_adam_first_step_size():
    # The official AdamSMoE has no bias correction: its first update is ~3.16 * gamma * sign(f).
    rule = AdamSMoE()
    f = torch.tensor([[0.3, -2.0, 1.0]])
    h, _ = rule.combine(torch.zeros_like(f), f, rule.init_state(f), 0)
    torch.testing.assert_close(h, 0.1 / math.sqrt(1e-3) * f.sign(), rtol=1e-3, atol=0)
    rule_bc = AdamSMoE(bias_correction=True)
    h, _ = rule_bc.combine(torch.zeros_like(f), f, rule_bc.init_state(f), 0)
    torch.testing.assert_close(h, f.sign(), rtol=1e-3, atol=0)


# --- coefficients and validation --------------------------------------------------------------

def test_robust_coefficients():
    alpha, beta, eps = robust_coefficients(1.25, 0.2)
    assert alpha == pytest.approx(0.04, abs=1e-12)
    assert beta == pytest.approx(0.96, abs=1e-12)
    assert eps == pytest.approx(0.041666666666666664, abs=1e-12)
    rule = build_combine_rule(MomentumConfig(rule="robust", kappa=1.25, rho=0.2), 4)
    assert isinstance(rule, RobustMomentum)
    assert (rule.alpha, rule.beta, rule.eps) == pytest.approx((0.04, 0.96, 1 / 24))
    a, b, e = robust_coefficients(2.0, 0.5)  # rho at its bound 1 - 1/kappa
    assert (a, b, e) == pytest.approx((0.25, 0.75, 1 / 3))


@pytest.mark.parametrize(("kw", "field"), [
    (dict(mu=1.0), "^mu="),
    (dict(mu=-0.1), "^mu="),
    (dict(gamma=0.0), "^gamma="),
    (dict(gamma=-1.0), "^gamma="),
    (dict(kappa=1.0), "^kappa="),
    (dict(rho=0.0), "^rho="),
    (dict(kappa=1.25, rho=0.21), "^rho="),
    (dict(rule="adam", adam_layers=0), "^adam_layers="),
    (dict(rule="robust", learnable=True), "^learnable="),
    (dict(rule="nesterov"), "^rule="),
])
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        MomentumConfig(**kw)


def test_validation_against_the_model():
    with pytest.raises(ValueError, match="momentum.adam_layers"):
        ModelConfig(kind="lm", n_layers=4, moe_every=2,
                    momentum=MomentumConfig(rule="adam", adam_layers=3))
    ModelConfig(kind="lm", n_layers=4, moe_every=2,
                momentum=MomentumConfig(rule="adam", adam_layers=2))
    with pytest.raises(ValueError, match="^adam_layers="):
        build_combine_rule(MomentumConfig(rule="adam", adam_layers=3), 2)
    with pytest.raises(ValueError, match="^rho="):
        RobustMomentum.from_kappa_rho(1.25, 0.3)
    with pytest.raises(ValueError, match="skip_connections"):
        ModelConfig(kind="mlp", skip_connections=False,
                    momentum=MomentumConfig(rule="heavy_ball"))
    with pytest.raises(ValueError, match="n_layers"):
        HeavyBall(learnable=True)


# --- gradients --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ALL_RULES))
def test_gradcheck_float64(name):
    # Tiny 3-layer MoE MLP, all float64 (loop dispatch; the router runs in fp64 for fp64
    # input), through the router, experts, norms, combine rule and the state flow, with
    # activation checkpointing on. Top-K choices do not flip under the tiny perturbations.
    cfg = cfg_for("mlp", ALL_RULES[name], d_model=4, d_ff=3, dispatch="loop",
                  activation_checkpointing=True, aux_loss_coef=0.1)
    torch.manual_seed(0)
    model = build_model(cfg, image_shape=(5,), n_classes=3).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: model(x).logits, (x,))
    assert torch.autograd.gradcheck(lambda x: model(x).aux_loss, (x,))
    if getattr(model.combine_rule, "learnable", False):
        rule = model.combine_rule
        mu, gamma = rule.mu.detach().double(), rule.gamma.detach().double()

        def with_params(mu, gamma):
            out = torch.func.functional_call(model, {"combine_rule.mu": mu,
                                                     "combine_rule.gamma": gamma}, (x,))
            return out.logits

        assert torch.autograd.gradcheck(with_params, (mu.requires_grad_(),
                                                      gamma.requires_grad_()))


@pytest.mark.parametrize("rule", ["heavy_ball", "adam"])
def test_learnable_mu_gamma_get_gradients(rule):
    cfg = cfg_for("lm", MomentumConfig(rule=rule, learnable=True), n_layers=4)
    model, x, y = model_and_batch("lm", cfg)
    params = dict(model.named_parameters())
    assert params["combine_rule.mu"].shape == (4,) and params["combine_rule.gamma"].shape == (4,)
    torch.testing.assert_close(params["combine_rule.mu"], torch.full((4,), 0.7))
    loss_and_grads(model, x, y)
    mu_grad, gamma_grad = params["combine_rule.mu"].grad, params["combine_rule.gamma"].grad
    assert torch.all(gamma_grad != 0)
    assert mu_grad[0] == 0  # the buffer is zero at the first MoE layer
    assert torch.all(mu_grad[1:] != 0)


# --- composition: Default MoE, capacity dropping, activation checkpointing ---------------------

@pytest.mark.parametrize("name", ["heavy_ball", "adam", "robust", "heavy_ball_learnable"])
@pytest.mark.parametrize("kind", ["lm", "vit"])
def test_composes_with_default_moe_capacity_and_checkpointing(name, kind):
    cfg = cfg_for(kind, ALL_RULES[name], default_moe=DefaultMoEConfig(beta=0.5),
                  capacity_factor=0.75, dropout=0.1)
    results, models = [], []
    for ckpt in (False, True):
        model, x, y = model_and_batch(kind, dataclasses.replace(
            cfg, activation_checkpointing=ckpt))
        for _ in range(2):  # the second step uses the EMA filled by the first
            torch.manual_seed(7)
            logits, grads = loss_and_grads(model, x, y)
        results.append((logits, grads))
        models.append(model)
    (logits_a, grads_a), (logits_b, grads_b) = results
    assert torch.equal(logits_a, logits_b)
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n
    for la, lb in zip(models[0].moe_layers(), models[1].moe_layers(), strict=True):
        assert la.last_stats.dropped_frac > 0
        assert torch.equal(la.method.n_updates, lb.method.n_updates)
        assert int(la.method.n_updates.max()) == 2  # one EMA update per training forward
        assert torch.equal(la.method.ema, lb.method.ema)


def test_state_is_never_stored_on_modules():
    cfg = cfg_for("vit", ALL_RULES["adam"])
    model, x, _ = model_and_batch("vit", cfg)
    model(x)

    def holds_tensor(value) -> bool:
        if isinstance(value, torch.Tensor):
            return True
        if isinstance(value, (tuple, list)):
            return any(holds_tensor(v) for v in value)
        if isinstance(value, dict):
            return any(holds_tensor(v) for v in value.values())
        return False

    # allowed: parameters, buffers, submodules, and an MoE layer's detached routing
    # statistics of its last forward (not state that carries across layers)
    allowed = ("_parameters", "_buffers", "_modules", "_stats_inputs", "_last_stats")
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr not in allowed:
                assert not holds_tensor(value), f"{name}.{attr}"


# --- training on real text --------------------------------------------------------------------

@pytest.fixture(scope="module")
def shakespeare_bytes() -> torch.Tensor:
    text = load_text_dataset("shakespeare").train[:200_000]
    return ByteTokenizer().encode(text)


@pytest.mark.parametrize("name", ["none", "heavy_ball", "adam", "robust",
                                  "heavy_ball_learnable"])
def test_each_rule_trains_a_tiny_lm_on_shakespeare(name, shakespeare_bytes):
    torch.manual_seed(0)
    cfg = model_config(kind="lm", d_model=32, n_layers=3, n_heads=4, n_experts=4, top_k=2,
                       d_ff=32, max_seq_len=32, momentum=ALL_RULES[name])
    model = build_model(cfg, vocab_size=256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = LMBatcher(shakespeare_bytes, batch_size=8, seq_len=32, seed=0)
    losses = []
    for _ in range(30):
        x, y = batches.next_batch()
        out = model(x)
        loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        (loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert first > 5.0  # ~ln(256) at init
    assert last < 3.8, losses  # a model that learns nothing stays near 5.5


def test_rules_are_modules_of_the_model():
    # learnable mu/gamma are model parameters (they reach the optimizer and the state_dict)
    cfg = cfg_for("lm", ALL_RULES["heavy_ball_learnable"])
    model, _, _ = model_and_batch("lm", cfg)
    assert isinstance(model.combine_rule, nn.Module)
    assert "combine_rule.mu" in model.state_dict()
    plain, _, _ = model_and_batch("lm", cfg_for("lm", ALL_RULES["heavy_ball"]))
    assert not any(n.startswith("combine_rule") for n, _ in plain.named_parameters())


# --- the post-norm block form (model.norm_position = "post") ------------------------------------

@pytest.mark.parametrize("form", ["post", "post_double"])
@pytest.mark.parametrize("kind", ["lm", "vit", "mlp"])
@pytest.mark.parametrize("neutral", [
    MomentumConfig(rule="heavy_ball", mu=0.0, gamma=1.0),
    RobustMomentum(alpha=0.0, beta=1.0, eps=0.0),
], ids=["heavy_ball", "robust"])
def test_post_norm_neutral_settings_equal_baseline(kind, neutral, form):
    cfg = cfg_for(kind, aux_loss_coef=0.1, norm_position=form)
    base_model, x, y = model_and_batch(kind, cfg)
    if isinstance(neutral, MomentumConfig):
        model, _, _ = model_and_batch(kind, dataclasses.replace(cfg, momentum=neutral))
    else:
        model, _, _ = model_and_batch(kind, cfg)
        model.combine_rule = neutral
    logits_a, grads_a = loss_and_grads(base_model, x, y)
    logits_b, grads_b = loss_and_grads(model, x, y)
    assert torch.equal(logits_a, logits_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    # post differs from pre with the same weights
    pre, _, _ = model_and_batch(kind, dataclasses.replace(cfg, norm_position="pre"))
    with torch.no_grad():
        assert not torch.allclose(pre(x).logits, logits_a)


@pytest.mark.parametrize("form", ["post", "post_double"])
@pytest.mark.parametrize("kind", ["lm", "vit", "mlp"])
@pytest.mark.parametrize("rule", ["heavy_ball", "adam", "robust"])
def test_post_norm_every_rule_trains(kind, rule, form):
    cfg = cfg_for(kind, MomentumConfig(rule=rule), norm_position=form)
    model, x, y = model_and_batch(kind, cfg)
    logits, grads = loss_and_grads(model, x, y)
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "router" in n or "gate" in n)


def _rms(v: list[float]) -> list[float]:
    s = math.sqrt(sum(a * a for a in v) / len(v) + 1e-6)
    return [a / s for a in v]


@pytest.mark.parametrize("form", ["post", "post_double"])
@pytest.mark.parametrize("rule", ["heavy_ball", "robust", "adam"])
def test_post_norm_recurrence_matches_hand_computation(rule, form):
    # 3 MoE blocks (MLP, no attention) in fp64, fake MoE outputs f_i = c_i * (1, 2, -1, 0.5):
    # h_{i+1} = RMSNorm(h_i + update_i) (post_double: RMSNorm(h_i + RMSNorm(h_i + update_i))),
    # the MoE input is h_i (+ robust look-ahead), computed
    # here with plain Python floats.
    d = 4
    cfg = cfg_for("mlp", MomentumConfig(), n_layers=3, d_model=d, norm_position=form)
    model, x, _ = model_and_batch("mlp", cfg)
    model = model.double()
    model.combine_rule = {"heavy_ball": HeavyBall(MU, GAMMA),
                          "robust": RobustMomentum(0.04, 0.96, 0.125),
                          "adam": AdamSMoE(MU, GAMMA, B1, B2, EPS, adam_layers=1)}[rule]
    direction = (1.0, 2.0, -1.0, 0.5)
    inputs: list[torch.Tensor] = []
    for layer, c in zip(model.moe_layers(), F_CONST, strict=True):
        def forward(xin, c=c):
            inputs.append(xin.detach().clone())
            zero = xin.new_zeros(())
            return MoEOutput(xin.new_tensor([c * a for a in direction]).expand_as(xin),
                             MoELosses(zero, zero, zero))
        layer.forward = forward
    final = []
    model.norm.register_forward_pre_hook(lambda mod, args: final.append(args[0].detach()))
    xd = x.double()
    with torch.no_grad():
        model(xd)
        h0 = model.in_proj(xd)[0].tolist()
    # the hand computation, token 0, every coordinate
    h, p, m, v = h0, [0.0] * d, [0.0] * d, [0.0] * d
    for i, c in enumerate(F_CONST):
        f = [c * a for a in direction]
        look = [0.125 * 0.96 * pj for pj in p] if rule == "robust" else [0.0] * d
        torch.testing.assert_close(inputs[i][0], torch.tensor(
            [hj + lj for hj, lj in zip(h, look, strict=True)], dtype=torch.float64),
            rtol=0, atol=1e-12)
        if rule == "heavy_ball":
            p = [fj + MU * pj for fj, pj in zip(f, p, strict=True)]
            upd = [GAMMA * pj for pj in p]
        elif rule == "robust":
            p = [fj + 0.04 * pj for fj, pj in zip(f, p, strict=True)]
            upd = [0.96 * pj for pj in p]
        else:
            p = [fj + MU * pj for fj, pj in zip(f, p, strict=True)]
            if i == 0:
                m = [(1 - B1) * fj for fj in f]
                v = [(1 - B2) * fj * fj for fj in f]
                upd = [GAMMA * mj / math.sqrt(vj + EPS) for mj, vj in zip(m, v, strict=True)]
            else:
                upd = [GAMMA * pj for pj in p]
        y = [hj + uj for hj, uj in zip(h, upd, strict=True)]
        if form == "post_double":  # LN2(h + LN_in(h + update)); norm weights are 1 at init
            y = [hj + yj for hj, yj in zip(h, _rms(y), strict=True)]
        h = _rms(y)
    torch.testing.assert_close(final[0][0], torch.tensor(h, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_norm_position_validation():
    with pytest.raises(ValueError, match="^norm_position="):
        cfg_for("lm", norm_position="sandwich")
