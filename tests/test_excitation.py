"""Excitation optimizer wrapper: hand-computed multipliers, updates against unwrapped optimizers,
counting (gradient accumulation, checkpoint recompute, eval), ablations, schedulers, resume."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from moelab.methods import excitation as excitation_module
from moelab.methods.excitation import (
    BASE_STRATEGIES,
    STRATEGIES,
    Excitation,
    ExcitationConfig,
    excitation_multipliers,
)
from moelab.moe import MoEConfig, MoELayer


def make_layer(seed=0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    base = dict(d_model=8, n_experts=4, top_k=2, d_ff=6, aux_loss_coef=0.0)
    return MoELayer(MoEConfig(**{**base, **kw}))


class TinyLM(nn.Module):
    """Dense in-projection -> MoELayer (residual) -> dense head: expert and non-expert params."""

    def __init__(self, seed=0, n_layers=1, **kw) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(8, 8)
        self.moes = nn.ModuleList(make_layer(seed + i, **kw) for i in range(n_layers))
        self.head = nn.Linear(8, 3)

    def forward(self, x, layers=None):
        h = self.inp(x)
        for i, moe in enumerate(self.moes):
            if layers is None or i in layers:
                h = h + moe(h).y
        return self.head(h)


def loss_of(model, x, **kw):
    return model(x, **kw).square().mean()


def expert_params(model):
    return {id(p) for m in model.modules() if isinstance(m, MoELayer)
            for p in m.experts.parameters()}


def forced_pair_layer() -> tuple[MoELayer, torch.Tensor]:
    """E=2, K=1 layer and 4 tokens routed 3 to expert 0 and 1 to expert 1: u = (.75, .25)."""
    layer = make_layer(d_model=4, n_experts=2, top_k=1, d_ff=3)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    x = torch.randn(4, 4)
    x[:, 0] = torch.tensor([1.0, 2.0, 0.5, -1.0])
    return layer, x


def unwrapped_copy(model, opt):
    """Deep copies of the model (grads included) and of the wrapped base optimizer, sharing
    the copied parameters."""
    ref_model, ref_opt = copy.deepcopy((model, opt.optimizer))
    for p, r in zip(model.parameters(), ref_model.parameters(), strict=True):
        r.grad = None if p.grad is None else p.grad.clone()
    return ref_model, ref_opt


def clone_params(module):
    return [p.detach().clone() for p in module.parameters()]


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("field,value", [
    ("strategy", "sum"), ("strategy", "ZeroSum"), ("gamma", -0.5), ("gamma", float("nan")),
    ("gamma", float("inf")), ("gamma", "1"), ("seed", 1.5), ("seed", True),
    ("ablation_base", "random"), ("ablation_base", "global"),
])
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}="):
        ExcitationConfig(**{field: value})


def test_config_accepts_every_strategy_and_wrapper_validates():
    for strategy in STRATEGIES:
        assert ExcitationConfig(strategy=strategy, gamma=0.0).strategy == strategy
    layer = make_layer()
    with pytest.raises(ValueError, match="^gamma="):
        Excitation(torch.optim.SGD(layer.parameters(), lr=0.1), layer, gamma=-1.0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Excitation(object(), layer)


# ---------------------------------------------------------------------------- multipliers


def test_multipliers_paper_example():
    counts = torch.tensor([3.0, 1.0])  # u = (.75, .25)
    assert excitation_multipliers(counts, "zero_sum", 1.0).tolist() == [1.5, 0.5]
    assert excitation_multipliers(counts, "positive_sum", 1.0).tolist() == [1.5, 1.0]
    assert excitation_multipliers(counts, "negative_sum", 1.0).tolist() == [1.0, 0.5]
    # γ = 2: u^2 = (9, 1)/16, mean 5/16 -> (1.8, 0.2)
    phi = excitation_multipliers(counts, "zero_sum", 2.0)
    torch.testing.assert_close(phi, torch.tensor([1.8, 0.2], dtype=phi.dtype))


def test_multipliers_zero_count_and_gamma_zero():
    counts = torch.tensor([[2.0, 0.0, 2.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    phi = excitation_multipliers(counts, "zero_sum", 0.5)
    assert phi[0, 1] == 0  # 0^γ = 0 for γ > 0
    assert phi[0].mean().item() == pytest.approx(1.0)
    assert phi[1].tolist() == [1.0] * 4  # a layer without assignments: Φ ≡ 1
    for strategy in STRATEGIES:
        assert excitation_multipliers(counts, strategy, 0.0).tolist() == [[1.0] * 4] * 2
    # large γ does not underflow to 0/0
    phi = excitation_multipliers(torch.tensor([1.0, 1000.0]), "zero_sum", 200.0)
    assert torch.isfinite(phi).all() and phi.tolist() == [0.0, 2.0]


@pytest.mark.parametrize("base", BASE_STRATEGIES)
def test_ablations_keep_multiset_or_mean(base):
    torch.manual_seed(0)
    counts = torch.randperm(6 * 8).view(6, 8).float() + 1  # distinct, so ranks are unique
    counts[0, 3] = 0
    phi_base = excitation_multipliers(counts, base, 1.5)
    inv = excitation_multipliers(counts, "inverted", 1.5, ablation_base=base)
    rnd = excitation_multipliers(counts, "random", 1.5, ablation_base=base,
                                 generator=torch.Generator().manual_seed(1))
    glob = excitation_multipliers(counts, "global", 1.5, ablation_base=base)
    for phi in (inv, rnd):
        torch.testing.assert_close(phi.sort(-1).values, phi_base.sort(-1).values)
    torch.testing.assert_close(glob, phi_base.mean(-1, keepdim=True).expand_as(glob))
    # inverted: the least used expert gets the largest multiplier, and so on
    order = counts.argsort(-1)
    torch.testing.assert_close(inv.gather(-1, order), phi_base.gather(-1, order).flip(-1))
    assert not torch.equal(rnd, phi_base)
    if base == "zero_sum":  # mean Φ_ZS = 1: global zero_sum is the plain optimizer
        torch.testing.assert_close(glob, torch.ones_like(glob))


def test_random_reproducible_from_seed():
    counts = torch.arange(1.0, 9.0).repeat(3, 1)

    def draws(seed, n=3):
        gen = torch.Generator().manual_seed(seed)
        return [excitation_multipliers(counts, "random", 1.0, generator=gen) for _ in range(n)]

    a, b, c = draws(7), draws(7), draws(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert not torch.equal(a[0], a[1])  # a fresh permutation every step


# ---------------------------------------------------------------------------- updates


@pytest.mark.parametrize("strategy,expected", [("zero_sum", [1.5, 0.5]),
                                               ("positive_sum", [1.5, 1.0]),
                                               ("negative_sum", [1.0, 0.5])])
def test_sgd_paper_example_on_moe_layer(strategy, expected):
    layer, x = forced_pair_layer()
    ref = copy.deepcopy(layer)
    lr = 0.1
    opt = Excitation(torch.optim.SGD(layer.parameters(), lr=lr), layer, strategy=strategy)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr)
    for module in (layer, ref):
        module(x).y.square().sum().backward()
    assert layer.last_stats.tokens_per_expert.tolist() == [3.0, 1.0]
    old = {n: p.detach().clone() for n, p in layer.named_parameters()}
    grad = {n: p.grad.clone() for n, p in layer.named_parameters()}
    opt.step()
    ref_opt.step()
    assert opt.last_multipliers["moe"].tolist() == expected
    for name in ("experts.w_in", "experts.w_out"):
        p = dict(layer.named_parameters())[name]
        for k, phi in enumerate(expected):
            torch.testing.assert_close(p[k] - old[name][k], phi * (-lr * grad[name][k]),
                                       rtol=1e-5, atol=1e-7)
    assert torch.equal(layer.router.weight, ref.router.weight)


def test_sgd_batched_group_hand_computed():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 2, 5))
    other = nn.Parameter(torch.randn(4))
    counts = torch.tensor([6.0, 2.0, 0.0])  # u = (.75, .25, 0); mean u^1 = 1/3
    opt = Excitation(torch.optim.SGD([w, other], lr=0.5), strategy="zero_sum")
    opt.add_expert_group(batched_params=[w], token_counts=lambda: counts, name="mine")
    w.grad, other.grad = torch.randn_like(w), torch.randn_like(other)
    w0, o0 = w.detach().clone(), other.detach().clone()
    opt.step()
    phi = [2.25, 0.75, 0.0]
    assert opt.last_multipliers["mine"].tolist() == phi
    for k in range(3):
        torch.testing.assert_close(w[k] - w0[k], phi[k] * -0.5 * w.grad[k])
    assert torch.equal(w[2], w0[2])
    assert torch.equal(other, o0 - 0.5 * other.grad)


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
}


@pytest.mark.parametrize("strategy", ["zero_sum", "positive_sum", "random"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_change_is_phi_times_unwrapped_change(opt_name, strategy):
    """From the same state, each expert slice moves Φ_k times what an unwrapped deep copy of the
    base optimizer moves it; every other parameter moves exactly (torch.equal) as that copy."""
    model = TinyLM(n_layers=2)
    opt = Excitation(OPTIMIZERS[opt_name](model.parameters()), model, strategy=strategy,
                     gamma=1.5)
    experts = {id(p): f"moes.{i}" for i, moe in enumerate(model.moes)
               for p in moe.experts.parameters()}
    for _ in range(3):
        x = torch.randn(2, 5, 8)
        opt.zero_grad()
        loss_of(model, x).backward()
        ref_model, ref_opt = unwrapped_copy(model, opt)
        old = clone_params(model)
        opt.step()
        ref_opt.step()
        for name, moe in zip(["moes.0", "moes.1"], model.moes, strict=True):
            phi = opt.last_multipliers[name]
            assert phi.shape == (4,)
            assert not torch.allclose(phi, torch.ones(4))
            torch.testing.assert_close(opt.last_utilization[name],
                                       moe.last_stats.tokens_per_expert / (10 * 2))
        for p, p0, r in zip(model.parameters(), old, ref_model.parameters(), strict=True):
            if id(p) in experts:
                phi = opt.last_multipliers[experts[id(p)]]
                expected = phi.view(-1, 1, 1) * (r - p0)
                torch.testing.assert_close(p - p0, expected, rtol=1e-4, atol=1e-7)
            else:
                assert torch.equal(p, r), "non-expert parameters must move as unwrapped"


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "sgd_momentum"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gamma_zero_is_bit_identical(opt_name, strategy):
    model = TinyLM()
    ref = copy.deepcopy(model)
    opt = Excitation(OPTIMIZERS[opt_name](model.parameters()), model, strategy=strategy,
                     gamma=0.0)
    ref_opt = OPTIMIZERS[opt_name](ref.parameters())
    for _ in range(4):
        x = torch.randn(2, 5, 8)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_of(m, x).backward()
            o.step()
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, r)


def test_positive_sum_unit_experts_bit_identical_to_unwrapped():
    """Φ = 1 exactly leaves the base optimizer's value untouched (no θ_old + (θ - θ_old))."""
    model = TinyLM()
    opt = Excitation(torch.optim.AdamW(model.parameters(), lr=1e-2), model,
                     strategy="positive_sum")
    loss_of(model, torch.randn(2, 5, 8)).backward()
    ref_model, ref_opt = unwrapped_copy(model, opt)
    opt.step()
    ref_opt.step()
    phi = opt.last_multipliers["moes.0"]
    ones = (phi == 1).nonzero().flatten().tolist()
    assert ones and len(ones) < 4
    moe, ref_moe = model.moes[0].experts, ref_model.moes[0].experts
    for k in ones:
        assert torch.equal(moe.w_in[k], ref_moe.w_in[k])
        assert torch.equal(moe.w_out[k], ref_moe.w_out[k])


@pytest.mark.parametrize("opt_name", ["adamw", "sgd_momentum"])
def test_zero_sum_unused_expert_does_not_move_despite_momentum(opt_name):
    layer = make_layer()
    opt = Excitation(OPTIMIZERS[opt_name](layer.parameters()), layer, strategy="zero_sum")
    layer(torch.randn(32, 8)).y.square().sum().backward()  # step 1: momentum for all experts
    assert (layer.last_stats.tokens_per_expert > 0).all()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():  # x[:, 0] > 0 and w[3] = (-100, 0, ...): expert 3 loses every token
        layer.router.weight[3] = 0.0
        layer.router.weight[3, 0] = -100.0
    x = torch.randn(32, 8)
    x[:, 0] = x[:, 0].abs() + 1.0
    layer(x).y.square().sum().backward()
    assert layer.last_stats.tokens_per_expert[3] == 0
    ref_layer, ref_opt = unwrapped_copy(layer, opt)
    w_in3, w_out3 = layer.experts.w_in[3].clone(), layer.experts.w_out[3].clone()
    opt.step()
    ref_opt.step()
    assert opt.last_multipliers["moe"][3] == 0
    assert torch.equal(layer.experts.w_in[3], w_in3)
    assert torch.equal(layer.experts.w_out[3], w_out3)
    # the unwrapped optimizer does move it (momentum / weight decay), and the router as here
    assert not torch.equal(ref_layer.experts.w_in[3], w_in3)
    assert torch.equal(layer.router.weight, ref_layer.router.weight)


@pytest.mark.parametrize("slice_bytes", [1, 1 << 20])
@pytest.mark.parametrize("strategy", ["zero_sum", "positive_sum", "negative_sum"])
def test_sliced_snapshot_skips_unit_experts_and_matches_unwrapped(monkeypatch, slice_bytes,
                                                                  strategy):
    """The CPU snapshot in expert slices (one expert per slice with slice_bytes=1), experts with
    Φ = 1 not copied: those stay bit-identical to the unwrapped optimizer, an unused expert
    (zero_sum: Φ = 0) does not move at all, the others move Φ_k times the unwrapped change, and
    last_snapshot_bytes counts exactly the experts with Φ != 1."""
    monkeypatch.setattr(excitation_module, "_CPU_SLICE_BYTES", slice_bytes)
    layer = make_layer(n_experts=8)
    opt = Excitation(torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1), layer,
                     strategy=strategy, gamma=1.0)
    layer(torch.randn(32, 8)).y.square().sum().backward()  # step 1: Adam state for all experts
    opt.step()
    with torch.no_grad():  # x[:, 0] > 0 and w[7] = (-100, 0, ...): expert 7 loses every token
        layer.router.weight[7] = 0.0
        layer.router.weight[7, 0] = -100.0
    weights = (layer.experts.w_in, layer.experts.w_out)
    for _ in range(2):
        opt.zero_grad()
        x = torch.randn(32, 8)
        x[:, 0] = x[:, 0].abs() + 1.0
        layer(x).y.square().sum().backward()
        ref_layer, ref_opt = unwrapped_copy(layer, opt)
        old = [w.detach().clone() for w in weights]
        opt.step()
        ref_opt.step()
        phi = opt.last_multipliers["moe"]
        assert phi[7] == (0.0 if strategy != "positive_sum" else 1.0)
        assert (phi == 1).any() != (strategy == "zero_sum")
        assert (phi != 1).sum() >= 2
        refs = (ref_layer.experts.w_in, ref_layer.experts.w_out)
        for w, w0, r in zip(weights, old, refs, strict=True):
            for k in range(8):
                if phi[k] == 1:
                    assert torch.equal(w[k], r[k])
                elif phi[k] == 0:
                    assert torch.equal(w[k], w0[k])
                else:
                    torch.testing.assert_close(w[k] - w0[k], phi[k] * (r[k] - w0[k]),
                                               rtol=1e-4, atol=1e-7)
        moving = int((phi != 1).sum())
        assert opt.last_snapshot_bytes == moving * sum(w[0].numel() * 4 for w in weights)


# ---------------------------------------------------------------------------- counting


def test_gradient_accumulation_sums_counts():
    model = TinyLM()
    opt = Excitation(torch.optim.SGD(model.parameters(), lr=0.1), model, strategy="zero_sum")
    moe = model.moes[0]
    counts = torch.zeros(4)
    for _ in range(2):
        loss_of(model, torch.randn(3, 4, 8)).backward()
        counts += moe.last_stats.tokens_per_expert
    opt.step()
    torch.testing.assert_close(opt.last_counts["moes.0"].float(), counts)
    torch.testing.assert_close(opt.last_utilization["moes.0"], counts / (2 * 12 * 2))
    phi = excitation_multipliers(counts, "zero_sum", 1.0).float()
    torch.testing.assert_close(opt.last_multipliers["moes.0"], phi)
    # reset after the step: the next step sees only its own forward
    opt.zero_grad()
    loss_of(model, torch.randn(3, 4, 8)).backward()
    opt.step()
    torch.testing.assert_close(opt.last_counts["moes.0"].float(), moe.last_stats.tokens_per_expert)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recompute_not_double_counted(use_reentrant):
    layer = make_layer()
    opt = Excitation(torch.optim.SGD(layer.parameters(), lr=0.1), layer, strategy="zero_sum")
    calls = []
    layer.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 6, 8, requires_grad=True)
    with set_checkpoint_early_stop(False):  # so the recompute runs the whole forward
        y = checkpoint(lambda t: layer(t).y, x, use_reentrant=use_reentrant)
        counts = layer.last_stats.tokens_per_expert.clone()
        y.square().sum().backward()
    assert len(calls) == 2  # the forward really ran twice
    opt.step()
    torch.testing.assert_close(opt.last_counts["moe"].float(), counts)
    torch.testing.assert_close(opt.last_utilization["moe"], counts / 24)


def test_eval_forward_not_counted_and_no_forward_layer_gets_phi_one():
    model = TinyLM(n_layers=2)
    opt = Excitation(torch.optim.SGD(model.parameters(), lr=0.1), model, strategy="zero_sum")
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 5, 8))
    model.train()
    x = torch.randn(2, 5, 8)
    loss_of(model, x, layers={0}).backward()
    counts = model.moes[0].last_stats.tokens_per_expert.clone()
    # give the unused layer a gradient so the base optimizer would move it
    for p in model.moes[1].parameters():
        p.grad = torch.randn_like(p)
    ref_model, ref_opt = unwrapped_copy(model, opt)
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(opt.last_utilization["moes.0"], counts / 20)
    assert opt.last_multipliers["moes.1"].tolist() == [1.0] * 4
    for p, r in zip(model.moes[1].parameters(), ref_model.moes[1].parameters(), strict=True):
        assert torch.equal(p, r)


def test_closure_forward_is_counted():
    layer, x = forced_pair_layer()
    opt = Excitation(torch.optim.SGD(layer.parameters(), lr=0.1), layer, strategy="zero_sum")

    def closure():
        opt.zero_grad()
        loss = layer(x).y.square().sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    assert opt.last_multipliers["moe"].tolist() == [1.5, 0.5]


# ---------------------------------------------------------------------------- user MoE


class HandMoE(nn.Module):
    """A user's own top-1 MoE: a linear gate, experts in an nn.ModuleList of nn.Linear."""

    def __init__(self, d=6, n_experts=3) -> None:
        super().__init__()
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(n_experts))
        self.counts = torch.zeros(n_experts)

    def forward(self, x):
        probs = F.softmax(self.gate(x), dim=-1)
        top_p, top_i = probs.max(dim=-1)
        self.counts += torch.bincount(top_i, minlength=len(self.experts))
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = top_i == e
            out[rows] = top_p[rows, None] * expert(x[rows])
        return out


def test_user_module_list_moe():
    torch.manual_seed(0)
    moe = HandMoE()
    with torch.no_grad():  # route by the sign pattern of x[:, 0]: 4 / 2 / 0 tokens
        moe.gate.weight.zero_()
        moe.gate.weight[0, 0], moe.gate.weight[1, 0] = 5.0, -5.0
    ref = copy.deepcopy(moe)
    opt = Excitation(torch.optim.SGD(moe.parameters(), lr=0.2), strategy="zero_sum")
    name = opt.add_expert_group(params_per_expert=[list(e.parameters()) for e in moe.experts],
                                token_counts=lambda: moe.counts, name="hand")
    assert name == "hand" and opt.group_names == ["hand"]
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    x = torch.randn(6, 6)
    x[:, 0] = torch.tensor([1.0, 2.0, 1.5, 0.5, -1.0, -2.0])
    for m in (moe, ref):
        m(x).square().sum().backward()
    assert moe.counts.tolist() == [4.0, 2.0, 0.0]
    old = clone_params(moe)
    grads = [p.grad.clone() for p in moe.parameters()]
    opt.step()
    ref_opt.step()
    phi = [2.0, 1.0, 0.0]  # u = (2/3, 1/3, 0), mean 1/3
    assert opt.last_multipliers["hand"].tolist() == phi
    assert torch.equal(moe.gate.weight, ref.gate.weight)
    named = list(moe.named_parameters())
    for (n, p), p0, g in zip(named, old, grads, strict=True):
        if n.startswith("experts."):
            k = int(n.split(".")[1])
            torch.testing.assert_close(p - p0, phi[k] * -0.2 * g)
    assert torch.equal(moe.experts[2].weight, old[5])
    # expert 1 (Φ = 1) is not copied: the snapshot holds experts 0 and 2
    assert opt.last_snapshot_bytes == sum(p.numel() * 4 for k in (0, 2)
                                          for p in moe.experts[k].parameters())


def test_user_group_with_record_counts():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(2, 3))
    opt = Excitation(torch.optim.SGD([w], lr=1.0), strategy="positive_sum")
    opt.add_expert_group(batched_params=[w], name="mine")
    opt.record_counts("mine", torch.tensor([2, 0]))
    opt.record_counts("mine", torch.tensor([1, 1]))  # summed: (3, 1) -> Φ = (1.5, 1)
    w.grad = torch.ones_like(w)
    w0 = w.detach().clone()
    opt.step()
    assert opt.last_counts["mine"].tolist() == [3.0, 1.0]
    torch.testing.assert_close(w - w0, torch.tensor([[-1.5] * 3, [-1.0] * 3]))
    opt.step()  # reset after the step: no counts -> Φ = 1
    assert opt.last_multipliers["mine"].tolist() == [1.0, 1.0]


def test_add_expert_group_errors():
    layer = make_layer()
    opt = Excitation(torch.optim.SGD(layer.parameters(), lr=0.1), layer)
    w = nn.Parameter(torch.randn(3, 2))
    ones = lambda: torch.ones(3)  # noqa: E731
    with pytest.raises(ValueError, match="params_per_expert and/or batched_params"):
        opt.add_expert_group(token_counts=ones)
    with pytest.raises(ValueError, match="inconsistent expert counts"):
        opt.add_expert_group(batched_params=[w], params_per_expert=[[w]], token_counts=ones)
    with pytest.raises(ValueError, match="already belongs"):
        opt.add_expert_group(batched_params=[layer.experts.w_in], token_counts=ones)
    with pytest.raises(ValueError, match="already used"):
        opt.add_expert_group(batched_params=[w], token_counts=ones, name="moe")


def test_neuron_level_moe_layer():
    """The paper's neuron-level MoE: every hidden neuron an expert (d_ff = 1), top-K fire."""
    layer = make_layer(d_model=8, n_experts=32, top_k=4, d_ff=1, activation="gelu")
    opt = Excitation(torch.optim.SGD(layer.parameters(), lr=0.1), layer, strategy="zero_sum")
    layer(torch.randn(64, 8)).y.square().sum().backward()
    counts = layer.last_stats.tokens_per_expert
    assert counts.sum() == 64 * 4
    old_in, old_out = layer.experts.w_in.detach().clone(), layer.experts.w_out.detach().clone()
    g_in, g_out = layer.experts.w_in.grad.clone(), layer.experts.w_out.grad.clone()
    opt.step()
    phi = opt.last_multipliers["moe"]
    torch.testing.assert_close(phi, excitation_multipliers(counts, "zero_sum").float())
    view = phi.view(-1, 1, 1)
    torch.testing.assert_close(layer.experts.w_in - old_in, view * -0.1 * g_in, atol=1e-6,
                               rtol=1e-5)
    torch.testing.assert_close(layer.experts.w_out - old_out, view * -0.1 * g_out, atol=1e-6,
                               rtol=1e-5)


# ---------------------------------------------------------------------------- optimizer API


def test_lr_schedulers_attach():
    """Schedulers attach to the user's own optimizer; stepping it directly or through the
    Excitation object both apply Φ (the step hooks) without scheduler warnings."""
    model = TinyLM()
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = Excitation(inner, model, strategy="zero_sum")
    lambda_sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: 0.5 ** s)
    cos_sched = torch.optim.lr_scheduler.CosineAnnealingLR(inner, T_max=4)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "optimizer.step() has been overridden"
        for i in range(4):
            opt.zero_grad()
            loss_of(model, torch.randn(2, 3, 8)).backward()
            opt.last_multipliers = {}
            (inner.step if i % 2 else opt.step)()
            assert set(opt.last_multipliers) == set(opt.group_names)  # the hooks ran
            lambda_sched.step()
            cos_sched.step()
            lrs.append(opt.param_groups[0]["lr"])
    assert inner.param_groups[0]["lr"] == lrs[-1]
    assert lrs[0] < 0.5 and lrs[1] < lrs[0] and lrs[2] < lrs[1]


def test_optimizer_protocol_delegates():
    model = TinyLM()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = Excitation(inner, model)
    assert not isinstance(opt, torch.optim.Optimizer)  # attached by hooks, not a subclass
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert opt.defaults is inner.defaults
    loss_of(model, torch.randn(2, 3, 8)).backward()
    opt.step()
    assert len(opt.state) == len(list(model.parameters()))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    extra = nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert inner.param_groups[-1]["params"][0] is extra
    hook_calls = []
    inner.register_step_post_hook(lambda *a: hook_calls.append(1))
    opt.step()
    assert hook_calls == [1]
    with pytest.raises(ValueError, match="already attached"):
        Excitation(inner, model)
    opt.remove_hooks()  # detached: the optimizer is plain again, and may get a new one
    assert "excitation" not in inner.state_dict()
    Excitation(inner, model)


def _train(model, opt, sched, xs):
    for x in xs:
        opt.zero_grad()
        loss_of(model, x).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("strategy", ["random", "positive_sum"])
def test_state_dict_round_trip_resumes_exactly(strategy):
    def build():
        model = TinyLM(n_layers=2)
        opt = Excitation(torch.optim.AdamW(model.parameters(), lr=1e-2), model,
                         strategy=strategy, seed=3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lambda s: 1.0 / (1 + s))
        return model, opt, sched

    torch.manual_seed(1)
    xs = [torch.randn(2, 4, 8) for _ in range(5)]
    model, opt, sched = build()
    _train(model, opt, sched, xs[:2])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    _train(model, opt, sched, xs[2:])
    final_phi = {k: v.clone() for k, v in opt.last_multipliers.items()}

    model2, opt2, sched2 = build()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    # the user's optimizer carries Excitation's state itself (state-dict hooks)
    assert "excitation" in ckpt["opt"] and "excitation" in opt2.optimizer.state_dict()
    _train(model2, opt2, sched2, xs[2:])
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    for name, phi in final_phi.items():
        assert torch.equal(opt2.last_multipliers[name], phi)


def test_random_strategy_generator_state_round_trip():
    layer = make_layer()
    opt = Excitation(torch.optim.SGD(layer.parameters(), lr=0.1), layer, strategy="random")
    x = torch.randn(16, 8)

    def step():
        opt.zero_grad()
        layer(x).y.sum().backward()
        opt.step()
        return opt.last_multipliers["moe"].clone()

    state = copy.deepcopy((layer.state_dict(), opt.state_dict()))
    first = [step() for _ in range(4)]
    layer.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    again = [step() for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert len({tuple(p.tolist()) for p in first}) > 1
