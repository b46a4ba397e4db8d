"""The core MoE layer against a naive loop reference, router losses, capacity, errors."""

import copy
import math
import warnings

import pytest
import torch
from reference import grads, make_layer, naive_moe

import moelab.moe.expert_loop as expert_loop_module
from moelab.methods.default_moe import DefaultMoEConfig
from moelab.moe import (
    MoEConfig,
    MoELayer,
    load_balance_loss,
    plan_dispatch,
    router_z_loss,
)
from moelab.moe.dispatch import grouped_mm_supported, resolve_backend
from moelab.moe.expert_loop import plan_chunks

HAS_GROUPED = grouped_mm_supported("cpu", torch.float32, 8, 16)
BACKENDS = ["loop", "padded", pytest.param("grouped_mm", marks=pytest.mark.skipif(
    not HAS_GROUPED, reason="this torch has no CPU grouped_mm"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_experts,top_k,d_model,activation", [
    (4, 1, 8, "swiglu"), (4, 4, 8, "swiglu"), (8, 2, 16, "gelu"), (6, 3, 12, "swiglu"),
    (1, 1, 8, "gelu"),
])
def test_matches_naive_reference_fp32(backend, n_experts, top_k, d_model, activation):
    layer = make_layer(n_experts=n_experts, top_k=top_k, d_model=d_model, d_ff=8,
                       activation=activation, dispatch=backend)
    x = torch.randn(2, 7, d_model, requires_grad=True)
    g = torch.randn(2, 7, d_model)
    y_fast = layer(x).y
    y_ref = naive_moe(layer, x.reshape(-1, d_model)).view_as(x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(layer, x, y_fast, g), grads(layer, x, y_ref, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_matches_naive_reference_fp64_loop(normalize):
    layer = make_layer(n_experts=5, top_k=2, normalize_topk=normalize).double()
    x = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(9, 8, dtype=torch.float64)
    y_fast, y_ref = layer(x).y, naive_moe(layer, x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(layer, x, y_fast, g), grads(layer, x, y_ref, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_gradcheck_fp64(activation):
    layer = make_layer(n_experts=3, top_k=2, d_model=4, d_ff=3, activation=activation,
                       aux_loss_coef=0.5, z_loss_coef=0.1).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    def f(x, w_router, w_in, w_out):
        out = torch.func.functional_call(
            layer, {"router.weight": w_router, "experts.w_in": w_in, "experts.w_out": w_out},
            (x,))
        return out.y, out.losses.total

    params = [p.detach().clone().requires_grad_() for p in
              (layer.router.weight, layer.experts.w_in, layer.experts.w_out)]
    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.skipif(not HAS_GROUPED, reason="this torch has no CPU grouped_mm")
def test_bf16_grouped_close_to_fp32_reference(monkeypatch):
    """The bf16 grouped-GEMM path really runs (the loop is made to fail) and matches the fp32
    reference on the same bf16-rounded weights and inputs."""
    import moelab.moe.experts as experts_module

    layer16 = make_layer(n_experts=4, top_k=2, d_model=16, d_ff=8,
                         dispatch="grouped_mm").bfloat16()
    try:
        resolve_backend("grouped_mm", "cpu", torch.bfloat16, layer16.experts.w_in)
    except RuntimeError as e:
        pytest.skip(f"no bf16 grouped GEMM on this CPU build: {e}")

    def no_loop(*args, **kwargs):
        raise AssertionError("the expert loop ran instead of the grouped path")

    monkeypatch.setattr(experts_module, "expert_loop", no_loop)
    x = torch.randn(12, 16).bfloat16()
    y = layer16(x).y
    assert y.dtype == torch.bfloat16
    # same routing: the router runs in fp32 on bf16-rounded inputs and weights
    ref = naive_moe(copy.deepcopy(layer16).float(), x.float())
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    assert (y.float() - ref).abs().max() > 0  # really computed in bf16, not in fp32


def test_auto_picks_the_loop_on_cpu_and_grouped_mm_elsewhere(monkeypatch, recwarn):
    import moelab.moe.dispatch as dispatch

    w = make_layer(d_ff=8).experts.w_in
    assert resolve_backend("auto", "cpu", torch.float32, w) == "loop"
    assert not recwarn.list  # the loop is the CPU default, not a fallback
    monkeypatch.setattr(dispatch, "grouped_mm_supported", lambda *args: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the policy, not a GPU's
    assert resolve_backend("auto", "cuda", torch.bfloat16, w) == "grouped_mm"
    assert resolve_backend("grouped_mm", "cpu", torch.float32, w) == "grouped_mm"
    # fp32 / tf32 on CUDA: torch's grouped GEMM would read offs on the host per GEMM
    assert resolve_backend("auto", "cuda", torch.float32, w) == "loop"
    assert not recwarn.list  # a policy, not a fallback
    monkeypatch.setattr(dispatch, "grouped_mm_supported", lambda *args: False)
    dispatch._warn_loop_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="falls back to a per-expert loop"):
        assert resolve_backend("auto", "cuda", torch.bfloat16, w) == "loop"
    with pytest.raises(RuntimeError, match="dispatch='grouped_mm' is not supported"):
        resolve_backend("grouped_mm", "cuda", torch.float32, w)


def test_neuron_level_experts_match_reference():
    layer = make_layer(n_experts=16, top_k=4, d_ff=1, activation="gelu")
    x = torch.randn(9, 8, requires_grad=True)
    g = torch.randn(9, 8)
    y_fast, y_ref = layer(x).y, naive_moe(layer, x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(layer, x, y_fast, g), grads(layer, x, y_ref, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_grouped_mm_backend_rejects_unsupported_dtype():
    layer = make_layer(dispatch="grouped_mm").double()
    with pytest.raises(RuntimeError, match="dispatch='grouped_mm' is not supported"):
        layer(torch.randn(3, 8, dtype=torch.float64))


def test_load_balance_loss_is_one_when_balanced_and_larger_when_skewed():
    probs = torch.full((4, 4), 0.25)
    ids = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])  # every expert chosen twice
    assert load_balance_loss(probs, ids).item() == pytest.approx(1.0)
    skew_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 4)
    skew_ids = torch.tensor([[0, 1]] * 4)
    # E/(T*K) * sum n_i p_i = 4/8 * (4*0.7 + 4*0.1) = 1.6
    assert load_balance_loss(skew_probs, skew_ids).item() == pytest.approx(1.6)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_losses_returned_with_coefficients():
    layer = make_layer(aux_loss_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(6, 8)
    out = layer(x)
    routing = layer.router(x)
    assert out.losses.load_balance.item() == pytest.approx(
        load_balance_loss(routing.probs, routing.topk_ids).item())
    assert out.losses.z_loss.item() == pytest.approx(router_z_loss(routing.logits).item())
    assert out.losses.total.item() == pytest.approx(
        0.01 * out.losses.load_balance.item() + 0.001 * out.losses.z_loss.item())


def test_capacity_drops_exactly_the_assignments_over_capacity():
    layer = make_layer(n_experts=2, top_k=1, capacity_factor=1.0)
    with torch.no_grad():  # every token prefers expert 0
        layer.router.weight.copy_(torch.tensor([[1.0] * 8, [-1.0] * 8]))
    x = torch.rand(6, 8) + 0.1
    y = layer(x).y
    # capacity = ceil(1.0 * 6 * 1 / 2) = 3: tokens 0-2 kept, 3-5 dropped (zero output)
    assert torch.all(y[3:] == 0) and torch.all(y[:3].abs().sum(-1) > 0)
    ref = naive_moe(layer, x[:3])
    torch.testing.assert_close(y[:3], ref)
    assert layer.last_stats.dropped_frac.item() == pytest.approx(0.5)
    assert layer.last_stats.tokens_per_expert.tolist() == [6.0, 0.0]


def test_capacity_prefers_first_choices():
    ids = torch.tensor([[0, 1], [0, 1], [1, 0]])  # expert 0: first choice of t0,t1; 2nd of t2
    plan = plan_dispatch(ids, torch.full((3, 2), 0.5), n_experts=2, capacity=2)
    assert int(plan.n_dropped) == 2
    # every assignment stays in the plan, in dispatch order: expert 0 keeps the first choices
    # of t0, t1 and drops t2's second choice; expert 1 keeps t2's first choice, then t0's
    # second choice, and drops t1's (weight 0, keep False)
    rows = list(zip(plan.expert_ids.tolist(), plan.token_idx.tolist(), strict=True))
    assert rows == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 0), (1, 1)]
    assert plan.keep.tolist() == [True, True, False, True, True, False]
    assert plan.weights.tolist() == [0.5, 0.5, 0.0, 0.5, 0.5, 0.0]
    assert plan.kept_counts.tolist() == [2, 2] and plan.routed_counts.tolist() == [3, 3]
    assert plan.offsets.tolist() == [3, 6]


def test_routing_stats_are_computed_only_when_read(monkeypatch):
    layer = make_layer(n_experts=4, top_k=2, d_ff=8)
    calls = []
    compute = layer._stats
    monkeypatch.setattr(layer, "_stats", lambda *a: calls.append(1) or compute(*a))
    xs = [torch.randn(6, 8), torch.randn(9, 8), torch.randn(5, 8)]
    assert layer.last_stats is None
    for x in xs:
        layer(x)
    assert calls == []  # three training forwards, no statistics computed
    stats = layer.last_stats
    assert layer.last_stats is stats and calls == [1]  # computed once, then cached
    fresh = make_layer(n_experts=4, top_k=2, d_ff=8)
    fresh(xs[-1])  # the statistics are the last forward's
    assert stats.n_tokens == 5 and torch.equal(stats.mean_prob, fresh.last_stats.mean_prob)
    layer(xs[0])
    assert layer.last_stats.n_tokens == 6 and calls == [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_stats_recorded_and_detached(backend):
    layer = make_layer(n_experts=4, top_k=2, d_ff=8, dispatch=backend)
    layer.track_out_norm = True
    x = torch.randn(10, 8)
    layer(x)
    stats = layer.last_stats
    routing = layer.router(x)
    counts = torch.bincount(routing.topk_ids.reshape(-1), minlength=4).float()
    assert torch.equal(stats.tokens_per_expert, counts)
    torch.testing.assert_close(stats.mean_prob, routing.probs.mean(0))
    ent = -(routing.probs * routing.probs.log()).sum(-1).mean()
    assert stats.entropy.item() == pytest.approx(ent.item(), rel=1e-5)
    assert not stats.mean_prob.requires_grad and stats.n_tokens == 10
    from reference import expert_forward
    for e in range(4):
        rows = [t for t in range(10) if e in routing.topk_ids[t].tolist()]
        if rows:
            norm = torch.stack([expert_forward(layer, e, x[t]).norm() for t in rows]).mean()
            assert stats.expert_out_norm[e].item() == pytest.approx(norm.item(), rel=1e-4)
        else:
            assert math.isnan(stats.expert_out_norm[e].item())


@pytest.mark.parametrize("kw,field", [
    (dict(top_k=5), "top_k"), (dict(top_k=0), "top_k"), (dict(n_experts=0), "n_experts"),
    (dict(d_model=-1), "d_model"), (dict(d_ff=0), "d_ff"), (dict(activation="relu"),
                                                            "activation"),
    (dict(capacity_factor=0.0), "capacity_factor"), (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
    (dict(dispatch="triton"), "dispatch"),
])
def test_bad_config_names_field(kw, field):
    base = dict(d_model=8, n_experts=4, top_k=2, d_ff=6)
    with pytest.raises(ValueError, match=field):
        MoEConfig(**{**base, **kw})


def test_plan_chunks_hand_computed():
    # budget 4 rows: empty experts join the current chunk; an expert over budget stands alone
    assert plan_chunks([3, 0, 2, 5, 0, 1], 4) == [
        (0, 3, 0, 2), (3, 5, 2, 3), (5, 10, 3, 5), (10, 11, 5, 6)]
    assert plan_chunks([0, 0], 4) == [(0, 0, 0, 2)]
    assert plan_chunks([2, 2], 1) == [(0, 2, 0, 1), (2, 4, 1, 2)]


def test_add_sorted_per_expert_hand_computed():
    """Rows contiguous by expert (counts 2, 0, 1): weighted sums added onto what is there,
    the empty expert untouched; 16-bit rows accumulate in fp32."""
    from moelab.moe.dispatch import add_sorted_per_expert_

    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    w = torch.tensor([0.5, 2.0, -1.0])
    sums = torch.ones(3, 2)
    add_sorted_per_expert_(sums, rows, [2, 0, 1], w)
    want = torch.tensor([[1 + 0.5 + 6.0, 1 + 1.0 + 8.0], [1.0, 1.0], [1 - 5.0, 1 - 6.0]])
    assert torch.equal(sums, want)
    sums16 = torch.zeros(3, 2)
    add_sorted_per_expert_(sums16, rows.bfloat16(), [2, 0, 1], w)
    assert sums16.dtype == torch.float32 and torch.equal(sums16, want - 1)


@pytest.mark.parametrize("chunk_bytes", [1, 200, 1 << 20])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("d_ff", [
    5,  # unaligned rows: a matmul per expert
    pytest.param(8, marks=pytest.mark.skipif(not HAS_GROUPED, reason="no CPU grouped_mm")),
])
def test_loop_chunks_match_naive_reference(monkeypatch, chunk_bytes, activation, d_ff):
    """Chunks of one expert each (1 byte), a few experts each (200) and all experts (1 MiB),
    with experts that receive no rows, in output and every gradient; with grouped GEMMs per
    chunk (aligned d_ff=8) and with per-expert matmuls (d_ff=5)."""
    monkeypatch.setattr(expert_loop_module, "CHUNK_BYTES", chunk_bytes)
    layer = make_layer(n_experts=12, top_k=2, d_ff=d_ff, activation=activation,
                       dispatch="loop")
    x = torch.randn(5, 8, requires_grad=True)
    g = torch.randn(5, 8)
    grouped = expert_loop_module._grouped_mm_runs(x, layer.experts.w_in, layer.experts.w_out)
    assert grouped == (d_ff == 8)
    assert (layer.router(x).topk_ids.reshape(-1).bincount(minlength=12) == 0).any()
    y_fast, y_ref = layer(x).y, naive_moe(layer, x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(layer, x, y_fast, g), grads(layer, x, y_ref, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not HAS_GROUPED, reason="this torch has no CPU grouped_mm")
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_loop_and_grouped_paths_agree_on_everything(monkeypatch, capacity_factor):
    """Default MoE sums (the EMA after a step), expert output norms, capacity drops, output
    and every gradient: the fused loop (6-row chunks of 1-2 experts) equals the grouped path."""
    monkeypatch.setattr(expert_loop_module, "CHUNK_BYTES", 3 * 4 * 4 * 8)
    results = []
    for backend in ("loop", "grouped_mm"):
        layer = make_layer(n_experts=8, top_k=2, d_ff=8, dispatch=backend,
                           capacity_factor=capacity_factor,
                           default_moe=DefaultMoEConfig(beta=0.5))
        layer.track_out_norm = True
        torch.manual_seed(1)
        x = torch.randn(16, 8, requires_grad=True)
        y = layer(x).y
        results.append((y, *grads(layer, x, y, torch.ones_like(y)),
                        layer.method.ema.clone(), layer.last_stats.expert_out_norm,
                        layer.last_stats.dropped_frac))
    assert results[0][-1].item() == results[1][-1].item()
    if capacity_factor is not None:
        assert results[0][-1].item() > 0
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kw", [
    dict(), dict(capacity_factor=0.75), dict(activation="gelu", capacity_factor=1.5),
    dict(routing="expert_choice", capacity_factor=0.75)], ids=str)
def test_padded_path_equals_the_reference_path_on_everything(precision, kw):
    """Output, every gradient (x, router, w_in, w_out), Default MoE's per-expert sums (its EMA
    after a step), expert output norms and drops: the padded path (E*C slots, two batched
    matmuls) equals the grouped path in fp32 and the loop under bf16 autocast."""
    reference = "grouped_mm" if precision == "fp32" and HAS_GROUPED else "loop"
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=2e-2)
    results = []
    for backend in (reference, "padded"):
        layer = make_layer(n_experts=8, top_k=2, d_ff=8, dispatch=backend,
                           default_moe=DefaultMoEConfig(beta=0.5), **kw)
        layer.track_out_norm = True
        torch.manual_seed(1)
        x = torch.randn(16, 8, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = layer(x).y
        assert y.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        results.append((y.float(), *grads(layer, x, y.float(), torch.ones(16, 8)),
                        layer.method.ema.clone(), layer.last_stats.expert_out_norm,
                        layer.last_stats.dropped_frac))
    if "capacity_factor" in kw and "routing" not in kw and kw["capacity_factor"] < 1:
        assert results[1][-1].item() > 0  # some assignments were dropped
    assert results[0][-1].item() == results[1][-1].item()
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, equal_nan=True, **tol)


def test_padded_layout_hand_computed():
    """3 experts, capacity 2: expert 0 has rows 0-2 (row 2 dropped), expert 1 none, expert 2
    rows 3-4; slots [0, 1 | pad, pad | 3, 4], tokens of the padding slots = T."""
    from moelab.moe.dispatch import combine_slots, gather_slots, padded_layout, take_slots

    ids = torch.tensor([[0], [0], [2], [0], [2]])  # T=5, K=1
    plan = plan_dispatch(ids, torch.full((5, 1), 0.5), 3, capacity=2)
    assert plan.slots == 2 and plan.token_idx.tolist() == [0, 1, 3, 2, 4]
    layout = padded_layout(plan, 5)
    assert layout.rows_S.tolist() == [0, 1, 5, 5, 3, 4]
    assert layout.token_S.tolist() == [0, 1, 5, 5, 2, 4]
    assert take_slots(torch.arange(5.0), layout.rows_S, -1).tolist() == [0, 1, -1, -1, 3, 4]
    x = torch.arange(10.0).view(5, 2) + 1
    x_S = gather_slots(x, layout.token_S)
    assert x_S.tolist() == [[1, 2], [3, 4], [0, 0], [0, 0], [5, 6], [9, 10]]
    # token 3 was dropped: it gets nothing back
    assert combine_slots(x_S, layout.token_S, 5).tolist() == [[1, 2], [3, 4], [5, 6], [0, 0],
                                                              [9, 10]]
    assert plan_dispatch(ids, torch.ones(5, 1), 3).slots is None  # dropless: no bound
    assert plan_dispatch(ids, torch.ones(5, 1), 3, padded=True).slots == 5  # T


def test_padded_dispatch_errors_and_auto_choice(monkeypatch):
    import moelab.moe.dispatch as dispatch

    w = make_layer(d_ff=8).experts.w_in
    with pytest.raises(ValueError, match="dispatch='padded' needs a plan with static slots"):
        resolve_backend("padded", "cpu", torch.float32, w)
    assert resolve_backend("padded", "cpu", torch.float32, w, slots=4) == "padded"
    assert resolve_backend("auto", "cpu", torch.float32, w, slots=4) == "loop"  # no sync there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the policy, not a GPU's
    monkeypatch.setattr(dispatch, "grouped_mm_supported", lambda *args: True)
    assert resolve_backend("auto", "cuda", torch.float32, w, slots=4) == "padded"
    assert resolve_backend("auto", "cuda", torch.float32, w) == "loop"  # dropless: one read
    assert resolve_backend("auto", "cuda", torch.bfloat16, w, slots=4) == "grouped_mm"
    monkeypatch.setattr(dispatch, "grouped_mm_supported", lambda *args: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no loop fallback warning: padded needs no grouped GEMM
        assert resolve_backend("auto", "cuda", torch.bfloat16, w, slots=4) == "padded"
    assert dispatch.compiled_backend("auto", "cuda", torch.float32, 4) == "padded"
    assert dispatch.compiled_backend("auto", "cuda", torch.float32, None) == "grouped_mm"
    assert dispatch.compiled_backend("auto", "cuda", torch.bfloat16, 4) == "grouped_mm"
    assert dispatch.compiled_backend("auto", "cpu", torch.float32, 4) == "grouped_mm"
    assert dispatch.compiled_backend("padded", "cpu", torch.float32, 4) == "padded"


def test_loop_saves_the_input_only_when_w_in_needs_a_gradient():
    """With the router and w_in frozen, nothing needs x itself in backward: the caller may
    modify it in place after the forward, and x's gradient is still right."""
    layer = make_layer(d_ff=8, dispatch="loop")
    layer.router.weight.requires_grad_(False)
    layer.experts.w_in.requires_grad_(False)
    x = torch.randn(6, 8, requires_grad=True)
    g = torch.randn(6, 8)
    (grad_ref,) = torch.autograd.grad(naive_moe(layer, x), x, g)
    h = x * 1
    y = layer(h).y
    h.add_(1.0)
    y.backward(g)
    torch.testing.assert_close(x.grad, grad_ref, rtol=1e-5, atol=1e-6)


def test_bad_input_errors():
    layer = make_layer()
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(8))
    with pytest.raises(ValueError, match="no tokens"):
        layer(torch.randn(2, 0, 8))


@pytest.mark.skipif(not HAS_GROUPED, reason="this torch has no CPU grouped_mm")
def test_probe_under_no_grad_inference_mode_or_autocast_does_not_disable_grouped_mm():
    grouped_mm_supported.cache_clear()
    state = torch.random.get_rng_state()
    with torch.inference_mode():
        assert grouped_mm_supported("cpu", torch.float32, 8, 16)
    grouped_mm_supported.cache_clear()
    with torch.no_grad():
        assert grouped_mm_supported("cpu", torch.float32, 8, 16)
    grouped_mm_supported.cache_clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 probe result would not match
        assert grouped_mm_supported("cpu", torch.float32, 8, 16)
    assert torch.equal(state, torch.random.get_rng_state())  # probing draws no random numbers


def test_moe_package_imports_no_method():
    """``moe/`` is method-free: importing it loads no ``moelab.methods`` module."""
    import subprocess
    import sys

    code = ("import sys, moelab.moe; "
            "print(sorted(m for m in sys.modules if m.startswith('moelab.methods')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "padded"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_layer_method_seam_gets_weighted_expert_sums(backend, capacity_factor):
    """A LayerMethod asking for sums with an arbitrary [N] row weight gets
    sums_ED[e] = sum_{n -> e} w[n] * expert_e(x_n) and weight_E[e] = sum_{n -> e} w[n] over the
    kept rows (checked against the reference experts), and its forward's output is the
    layer's; eval forwards ask for nothing."""
    from reference import expert_forward

    from moelab.moe import LayerMethod

    class Probe(LayerMethod):
        def row_weight(self, routing, plan):
            self.plan = plan
            self.w_N = torch.rand(plan.expert_ids.shape[0])
            return self.w_N

        def forward(self, y_TD, routing, sums):
            self.sums = sums
            return 2.0 * y_TD

    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, n_experts=4, top_k=2, d_ff=8, aux_loss_coef=0.0,
                    dispatch=backend, capacity_factor=capacity_factor)
    probe = Probe()
    layer = MoELayer(cfg, method=probe)
    x = torch.randn(10, 8)
    y = layer(x).y
    plain = MoELayer(cfg)
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(y, 2.0 * plain(x).y)
    plan, w_N = probe.plan, probe.w_N
    want_ED, want_E = torch.zeros(4, 8), torch.zeros(4)
    with torch.no_grad():
        for n in range(w_N.shape[0]):
            if plan.keep is not None and not plan.keep[n]:
                continue  # dropped by capacity
            e, t = int(plan.expert_ids[n]), int(plan.token_idx[n])
            want_ED[e] += w_N[n] * expert_forward(layer, e, x[t])
            want_E[e] += w_N[n]
    torch.testing.assert_close(probe.sums.sums_ED, want_ED, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probe.sums.weight_E, want_E)
    layer.eval()
    layer(x)
    assert probe.sums is None
