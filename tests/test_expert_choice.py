"""Expert-choice routing: against a naive loop reference (output and every gradient, both
dispatch paths, fp32/fp64/bf16 autocast, compiled), its hand-computed choices and routing
metrics, causality in an LM, and what each method does on it."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from reference import grads, make_layer, model_config, naive_expert_choice

from moelab.distributed import wrap as parallel
from moelab.methods import excitation as excitation_module
from moelab.methods.default_moe import DefaultMoEConfig
from moelab.methods.excitation import Excitation
from moelab.methods.momentum import AdamSMoE, HeavyBall, MomentumConfig, RobustMomentum
from moelab.models import ModelConfig, build_model
from moelab.moe import MoEConfig, MoELayer, plan_expert_choice
from moelab.moe.dispatch import grouped_mm_supported
from moelab.moe.router import choice_capacity

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_GROUPED = grouped_mm_supported("cpu", torch.float32, 8, 16)
BACKENDS = ["loop", "padded", pytest.param("grouped_mm", marks=pytest.mark.skipif(
    not HAS_GROUPED, reason="this torch has no CPU grouped_mm"))]


def ec_layer(seed=0, default_moe: DefaultMoEConfig | None = None, **kw) -> MoELayer:
    """reference.make_layer with expert choice (capacity factor 1) and d_ff 8."""
    return make_layer(seed, default_moe, **{"d_ff": 8, "routing": "expert_choice",
                                            "capacity_factor": 1.0, **kw})


# --- the layer against the naive reference ----------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", ["batch", "position"])
@pytest.mark.parametrize("capacity_factor,n_experts,top_k,activation", [
    (1.0, 4, 2, "swiglu"), (0.5, 4, 1, "gelu"), (2.0, 6, 2, "swiglu"), (1.25, 3, 3, "gelu"),
])
def test_matches_naive_reference_fp32(backend, group, capacity_factor, n_experts, top_k,
                                      activation):
    layer = ec_layer(n_experts=n_experts, top_k=top_k, capacity_factor=capacity_factor,
                     activation=activation, dispatch=backend, choice_group=group)
    x = torch.randn(5, 6, 8, requires_grad=True)
    g = torch.randn(5, 6, 8)
    y_fast = layer(x).y
    y_ref = naive_expert_choice(layer, x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(layer, x, y_fast, g), grads(layer, x, y_ref, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group", ["batch", "position"])
def test_matches_naive_reference_fp64(group):
    layer = ec_layer(n_experts=5, top_k=2, capacity_factor=0.8, choice_group=group,
                     dispatch="loop").double()
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, 8, dtype=torch.float64)
    y_fast, y_ref = layer(x).y, naive_expert_choice(layer, x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(layer, x, y_fast, g), grads(layer, x, y_ref, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_close_to_fp32_reference(backend):
    layer = ec_layer(d_model=16, d_ff=8, dispatch=backend)
    x = torch.randn(24, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x).y
    assert y.dtype == torch.bfloat16
    ref = naive_expert_choice(layer, x)  # the router runs in fp32 in both: the same picks
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    assert (y.float() - ref).abs().max() > 0  # really computed in bf16
    g = torch.randn(24, 16)
    for a, b in zip(grads(layer, x, y.float(), g), grads(layer, x, ref, g), strict=True):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)


# --- hand-computed choices, plan and metrics ---------------------------------------------------

def two_expert_layer(capacity_factor: float) -> MoELayer:
    """E=2, K=1, D=2, router weight = identity: logits = x, so probs[:, 0] =
    sigmoid(x0 - x1) ranks the tokens for expert 0 and in reverse for expert 1."""
    layer = ec_layer(d_model=2, n_experts=2, top_k=1, capacity_factor=capacity_factor)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    return layer


X4 = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])  # p0 order: t0 > t2 > t1 > t3


def test_choice_capacity_hand_computed():
    assert choice_capacity(1.0, 16, 2, 8) == 4
    assert choice_capacity(1.25, 10, 1, 4) == 4  # ceil(3.125)
    assert choice_capacity(0.01, 10, 1, 4) == 1  # at least one
    assert choice_capacity(4.0, 10, 2, 4) == 10  # at most the group


def test_each_expert_picks_its_top_tokens_hand_computed():
    layer = two_expert_layer(0.5)  # cap = ceil(0.5 * 4 * 1 / 2) = 1
    routing = layer.router(X4)
    assert routing.topk_ids is None and routing.topk_weights is None
    assert routing.choice.token_idx_EM.tolist() == [[0], [3]]
    probs = torch.softmax(X4, -1)
    torch.testing.assert_close(routing.choice.weights_EM, probs[[0, 3], [0, 1]].view(2, 1))
    assert routing.choice.picked_TE.tolist() == [[True, False], [False, False],
                                                 [False, False], [False, True]]
    layer(X4)
    stats = layer.last_stats
    assert stats.tokens_per_expert.tolist() == [1.0, 1.0]
    assert stats.unpicked_frac.item() == 0.5  # t1 and t2: picked by no expert
    assert stats.experts_per_token.item() == 0.5
    assert stats.dropped_frac.item() == 0.0


def test_tokens_can_get_several_experts_hand_computed():
    layer = two_expert_layer(1.5)  # cap = 3: expert 0 takes t0, t2, t1; expert 1 t3, t1, t2
    routing = layer.router(X4)
    assert routing.choice.token_idx_EM.tolist() == [[0, 2, 1], [3, 1, 2]]
    layer(X4)
    assert layer.last_stats.unpicked_frac.item() == 0.0
    assert layer.last_stats.experts_per_token.item() == 1.5  # 6 picks over 4 tokens


def test_position_groups_choose_within_each_position_hand_computed():
    layer = two_expert_layer(0.5)  # groups of B=2 tokens: cap = ceil(0.5 * 2 / 2) = 1
    layer.cfg = dataclasses.replace(layer.cfg, choice_group="position")
    x = X4.view(2, 2, 2)  # t = b*2 + s: position 0 holds t0, t2; position 1 holds t1, t3
    routing = layer.router(x.reshape(4, 2), 2)
    # expert 0: position 0 -> t0 (p0 larger than t2's), position 1 -> t1; expert 1: t2, t3
    assert routing.choice.token_idx_EM.tolist() == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match=r"choice_group='position': need \[B, S, D\]"):
        layer(X4)


def test_plan_groups_rows_by_expert():
    plan = plan_expert_choice(torch.tensor([[3, 0], [1, 3], [2, 0]]),
                              torch.tensor([[0.5, 0.25], [0.75, 0.125], [0.5, 0.5]]))
    assert plan.token_idx.tolist() == [3, 0, 1, 3, 2, 0]
    assert plan.expert_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert plan.weights.tolist() == [0.5, 0.25, 0.75, 0.125, 0.5, 0.5]
    assert plan.routed_counts.tolist() == plan.kept_counts.tolist() == [2, 2, 2]
    assert plan.offsets.tolist() == [2, 4, 6] and plan.keep is None
    assert int(plan.n_dropped) == 0


def test_top_k_metrics_count_tokens_dropped_by_capacity():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, n_experts=4, top_k=2, d_ff=6, capacity_factor=0.25))
    x = torch.randn(32, 8)
    layer(x)
    stats, plan_keep = layer.last_stats, layer._stats_inputs[-1]
    token_idx = layer._stats_inputs[-2]
    kept_T = torch.zeros(32).index_add_(0, token_idx, plan_keep.float())
    assert stats.experts_per_token.item() == pytest.approx(kept_T.mean().item())
    assert stats.experts_per_token.item() == pytest.approx(4 * 4 / 32)  # cap 4 x 4 experts
    assert stats.unpicked_frac.item() == pytest.approx((kept_T == 0).float().mean().item())
    assert stats.unpicked_frac.item() > 0


def test_balance_loss_is_one_and_constant():
    layer = ec_layer(aux_loss_coef=0.5, z_loss_coef=0.1)
    out = layer(torch.randn(10, 8))
    assert out.losses.load_balance.item() == 1.0
    assert not out.losses.load_balance.requires_grad
    torch.testing.assert_close(out.losses.total, 0.5 + 0.1 * out.losses.z_loss)


@pytest.mark.parametrize("kw,field", [
    ({"capacity_factor": None}, "capacity_factor"),
    ({"normalize_topk": True}, "normalize_topk"),
    ({"choice_group": "sequence"}, "choice_group"),
    ({"routing": "token_choice"}, "routing"),
])
def test_bad_config_names_field(kw, field):
    base = dict(d_model=8, routing="expert_choice", capacity_factor=1.0)
    with pytest.raises(ValueError, match=field):
        MoEConfig(**{**base, **kw})
    with pytest.raises(ValueError, match="choice_group"):
        MoEConfig(choice_group="position")  # top_k routing has no choice groups


def test_hf_models_and_batch_wide_lm_choice_are_refused():
    moe = MoEConfig(routing="expert_choice", capacity_factor=1.0)
    with pytest.raises(ValueError, match="moe.choice_group"):
        ModelConfig(kind="lm", moe=moe)
    with pytest.raises(ValueError, match="moe.routing"):
        ModelConfig(kind="hf", hf_path="x/config.json", moe=moe)
    ModelConfig(kind="vit", moe=moe)  # images: batch-wide choice is fine


# --- causality --------------------------------------------------------------------------------

V = 32


def lm(group: str, **kw) -> torch.nn.Module:
    cfg = model_config(kind="lm", d_model=16, n_layers=2, n_heads=2, n_experts=4, top_k=2,
                       d_ff=8, max_seq_len=16, routing="expert_choice", capacity_factor=1.0,
                       choice_group="position", **kw)
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=V)
    for layer in model.moe_layers():  # "batch" cannot be configured for an LM: set it here
        layer.cfg = dataclasses.replace(layer.cfg, choice_group=group)
    return model


def prefix_outputs(model, cut: int = 6):
    """Logits of positions < cut for a batch and for the same batch with every later token
    replaced."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (4, 12), generator=gen)
    x2 = x.clone()
    x2[:, cut:] = torch.randint(0, V, (4, 12 - cut), generator=gen)
    return model(x).logits[:, :cut], model(x2).logits[:, :cut]


def test_batch_wide_expert_choice_leaks_the_future_in_a_causal_lm():
    model = lm("batch").eval()
    with torch.no_grad():
        a, b = prefix_outputs(model)
    assert (a - b).abs().max() > 1e-3  # later tokens changed what earlier tokens got


@pytest.mark.parametrize("training", [False, True])
def test_position_groups_are_causal(training):
    """The configurable LM form (choice_group="position"), as used for training and for the
    perplexity of evaluation: positions < cut do not depend on any later token."""
    model = lm("position", default_moe=DefaultMoEConfig(beta=0.5),
               momentum=MomentumConfig(rule="heavy_ball")).train(training)
    if training:  # Default MoE's EMA would update between the two forwards
        for layer in model.moe_layers():
            layer.method = None
    with torch.no_grad():
        a, b = prefix_outputs(model)
    assert torch.equal(a, b)


# --- compiled ---------------------------------------------------------------------------------

@pytest.mark.parametrize("precision,atol", [("fp32", 2e-5), ("bf16", 2e-2)])
def test_compiled_trains_like_eager(precision, atol):
    torch._dynamo.reset()
    model = lm("position", default_moe=DefaultMoEConfig(beta=0.9, scored=True),
               momentum=MomentumConfig(rule="heavy_ball"))
    compiled = copy.deepcopy(model)
    old = parallel.COMPILE_BACKEND
    parallel.COMPILE_BACKEND = "aot_eager"
    try:
        assert parallel.compile_blocks(compiled) == 2
    finally:
        parallel.COMPILE_BACKEND = old
    models = (model, compiled)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    gen = torch.Generator().manual_seed(1)
    losses = ([], [])
    try:
        for _ in range(2):
            x = torch.randint(0, V, (4, 12), generator=gen)
            for i, (m, opt) in enumerate(zip(models, opts, strict=True)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = m(x)
                    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                           x[:, 1:].flatten()) + out.aux_loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses[i].append(loss.item())
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=atol)
    for (name, a), b in zip(model.state_dict().items(), compiled.state_dict().values(),
                            strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=0, atol=atol, msg=name)


# --- the methods on expert choice -------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_default_moe_adds_the_experts_that_did_not_pick_the_token(backend):
    layer = ec_layer(default_moe=DefaultMoEConfig(beta=0.9), dispatch=backend,
                     capacity_factor=0.75).eval()
    with torch.no_grad():
        layer.method.ema.normal_()
    x = torch.randn(12, 8, requires_grad=True)
    g = torch.randn(12, 8)
    y_fast = layer(x).y
    assert bool((~layer.router(x).choice.picked_TE).any())  # some pairs get the default
    y_ref = naive_expert_choice(layer, x, defaults_ED=layer.method.ema)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(layer, x, y_fast, g), grads(layer, x, y_ref, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_default_moe_ema_is_the_mean_over_the_picked_tokens():
    layer = ec_layer(default_moe=DefaultMoEConfig(beta=0.75))
    x = torch.randn(10, 8)
    layer(x)  # training: one EMA step from zero
    choice = layer.router(x).choice
    from reference import expert_forward

    with torch.no_grad():
        for e in range(4):
            outs = torch.stack([expert_forward(layer, e, x[t])
                                for t in choice.token_idx_EM[e].tolist()])
            torch.testing.assert_close(layer.method.ema[e], 0.25 * outs.mean(0),
                                       rtol=1e-5, atol=1e-6)


def mlp(rule: torch.nn.Module | None = None):
    cfg = model_config(kind="mlp", d_model=8, n_layers=3, n_experts=4, top_k=2, d_ff=6,
                       routing="expert_choice", capacity_factor=1.0, aux_loss_coef=0.0)
    torch.manual_seed(0)
    model = build_model(cfg, image_shape=(5,), n_classes=3)
    if rule is not None:
        model.combine_rule = rule
    return model


MU, GAMMA = 0.6, 0.8


@pytest.mark.parametrize("name", ["heavy_ball", "robust", "adam"])
def test_momentum_rules_act_on_expert_choice_outputs_unchanged(name):
    """The real expert-choice layers, run by hand through each rule's recurrence (the rules
    see only layer outputs, so they are those of Top-K)."""
    rule = {"heavy_ball": HeavyBall(MU, GAMMA), "robust": RobustMomentum(0.04, 0.96, 0.125),
            "adam": AdamSMoE(MU, GAMMA, 0.9, 0.999, 1e-8, adam_layers=1)}[name]
    model = mlp(rule)
    x = torch.randn(6, 5)
    final = []
    model.norm.register_forward_pre_hook(lambda mod, args: final.append(args[0].detach()))
    with torch.no_grad():
        model(x)
        h = model.in_proj(x)
        p = m = v = torch.zeros_like(h)
        for i, block in enumerate(model.blocks):
            look = 0.125 * 0.96 * p if name == "robust" else 0.0
            f = block.ffn(block.norm2(h) + look).y
            if name == "robust":
                p = f + 0.04 * p
                h = h + 0.96 * p
            elif name == "adam" and i == 0:
                p = f + MU * p
                m, v = 0.1 * f, 0.001 * f * f
                h = h + GAMMA * m / torch.sqrt(v + 1e-8)
            else:
                p = f + MU * p
                h = h + GAMMA * p
    torch.testing.assert_close(final[0], h, rtol=0, atol=1e-6)


def test_excitation_is_a_no_op_and_says_so_once():
    excitation_module._warn_expert_choice.cache_clear()
    model, twin = mlp(), mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match="no-op under expert-choice"):
        exc = Excitation(opt, model, strategy="zero_sum", gamma=2.0)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    for m, o in ((model, opt), (twin, twin_opt)):
        for _ in range(2):
            F.cross_entropy(m(x).logits, y).backward()
            o.step()
            o.zero_grad()
    for phi in exc.last_multipliers.values():
        assert torch.equal(phi, torch.ones_like(phi))
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Excitation(torch.optim.SGD(model.parameters(), lr=0.1), model)  # once only


# --- expert parallel (2 gloo ranks) ------------------------------------------------------------

def _ep_expert_choice_worker(rank: int, world: int) -> None:
    """Expert choice is made per rank over the rank's own batch (as capacity is under Top-K);
    the expert-parallel layer must equal one unsharded layer on that batch, and its expert
    gradients the rank average of the unsharded ones."""
    import torch.distributed as dist
    from test_distributed import close

    from moelab.distributed.ddp_ep import (
        enable_global_stats,
        make_context,
        shard_experts,
        sync_expert_grads,
    )

    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, n_experts=8, top_k=2, d_ff=8, routing="expert_choice",
                    capacity_factor=1.0, choice_group="position", aux_loss_coef=0.1,
                    z_loss_coef=0.01)
    ref = MoELayer(cfg)
    layer = copy.deepcopy(ref)
    ctx = make_context(world)
    shard_experts(layer, ctx)
    enable_global_stats(layer)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * world, 5, 8, generator=g)
    upstream = torch.randn(3 * world, 5, 8, generator=g)
    rows = slice(3 * rank, 3 * rank + 3)
    x_ref = x[rows].clone().requires_grad_()
    out = ref(x_ref)
    ((out.y * upstream[rows]).sum() + out.losses.total).backward()
    x_loc = x[rows].clone().requires_grad_()
    o = layer(x_loc)
    ((o.y * upstream[rows]).sum() + o.losses.total).backward()
    close(o.y, out.y, "output")
    close(x_loc.grad, x_ref.grad, "input grad")
    close(layer.router.weight.grad, ref.router.weight.grad, "router grad")
    sync_expert_grads(list(layer.experts.parameters()), ctx)
    n_local = cfg.n_experts // world
    experts = slice(rank * n_local, (rank + 1) * n_local)
    for name in ("w_in", "w_out"):
        want = getattr(ref.experts, name).grad.clone()
        dist.all_reduce(want)
        close(getattr(layer.experts.local, name).grad, want[experts] / world, f"{name} grad")


def test_expert_parallel_expert_choice_matches_the_unsharded_layer(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    from test_distributed import spawn

    spawn(2, tmp_path, _ep_expert_choice_worker)
