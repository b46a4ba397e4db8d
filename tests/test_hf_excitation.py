"""moelab.hf.Excitation on tiny Hugging Face MoE models."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import SPECS, tiny_model, token_batch  # noqa: E402

from moelab.hf import Excitation, patch  # noqa: E402
from moelab.methods.default_moe import DefaultMoEConfig  # noqa: E402
from moelab.methods.momentum import MomentumConfig  # noqa: E402


def _routers(model):
    return [m for m in model.modules() if type(m).__name__.endswith(("TopKRouter", "TopkRouter"))]


@pytest.mark.parametrize("family", list(SPECS))
def test_counts_equal_router_bincount_skipping_eval_and_recompute(family):
    model = tiny_model(family).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    patch(model, momentum=MomentumConfig("heavy_ball"))
    exc = Excitation(torch.optim.SGD(model.parameters(), lr=0.0), model, strategy="zero_sum")
    routers = _routers(model)
    assert len(exc.group_names) == len(routers) >= 1
    want = [torch.zeros(r.num_experts) for r in routers]

    def record(i):
        def hook(m, a, out):
            if m.training and torch._C._current_graph_task_id() == -1:
                want[i].add_(torch.bincount(out[2].reshape(-1), minlength=m.num_experts))
        return hook

    for i, r in enumerate(routers):
        r.register_forward_hook(record(i))
    for seed in (1, 2):  # two micro-batches, each with a checkpoint recompute in backward
        ids = token_batch(seed=seed)
        model(ids, labels=ids).loss.backward()
    model.eval()
    model(token_batch(seed=3))  # not counted
    model.train()
    exc.step()
    for name, w in zip(exc.group_names, want, strict=True):
        assert torch.equal(exc.last_counts[name].cpu().float(), w)
        assert w.sum().item() == 2 * 14 * routers[0].top_k


def test_group_parameters_are_hf_expert_weights():
    model = tiny_model("gpt_oss")
    exc = Excitation(torch.optim.SGD(model.parameters(), lr=0.1), model)
    experts = model.model.layers[0].mlp.experts
    params = exc._group_params(exc._groups[0])
    assert {id(p) for p in params} == {id(p) for p in experts.parameters()}


def test_zero_sum_leaves_an_unused_expert_still():
    """zero_sum with gamma=1: Φ_k = E * u_k, so an expert without tokens does not move while
    the bare optimizer would move it (weight decay)."""
    model = tiny_model("mixtral", num_local_experts=8, num_experts_per_tok=1).train()
    patch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    exc = Excitation(opt, model, strategy="zero_sum")
    ids = token_batch(batch=1, seq=3)
    model(ids, labels=ids).loss.backward()
    experts = model.model.layers[0].mlp.experts
    before = experts.down_proj.detach().clone()
    exc.step()
    counts = exc.last_counts[exc.group_names[0]]
    unused = (counts == 0).nonzero().flatten().tolist()
    used = (counts > 0).nonzero().flatten().tolist()
    assert unused and used
    delta = (experts.down_proj.detach() - before).abs().flatten(1).amax(1)
    assert all(delta[e] == 0 for e in unused) and all(delta[e] > 0 for e in used)


def test_twenty_step_fine_tune_lowers_the_loss():
    torch.manual_seed(0)
    model = tiny_model("qwen2_moe").train()
    patch(model, default_moe=DefaultMoEConfig(), momentum=MomentumConfig("heavy_ball"))
    opt = Excitation(torch.optim.AdamW(model.parameters(), lr=3e-3), model)
    ids = token_batch(batch=4, seq=12)
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert any((phi != 1).any() for phi in opt.last_multipliers.values())


def test_core_excitation_points_to_the_hf_one():
    from moelab.methods.excitation import Excitation as CoreExcitation

    model = patch(tiny_model("mixtral"))
    with pytest.raises(ValueError, match="moelab.hf.Excitation"):
        CoreExcitation(torch.optim.SGD(model.parameters(), lr=0.1), model)
