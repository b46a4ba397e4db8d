"""Default MoE and MomentumSMoE inside patched Hugging Face MoE models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from hf_tiny import MOELAB_FAMILIES, tiny_model, token_batch  # noqa: E402

from moelab.hf import patch, patched_blocks  # noqa: E402
from moelab.methods.default_moe import DefaultMoEConfig  # noqa: E402
from moelab.methods.momentum import MomentumConfig  # noqa: E402


def _hf_expert(experts, e: int, x_TD: torch.Tensor) -> torch.Tensor:
    """Expert e of a HF experts module, written out: down(silu(gate(x)) * up(x))."""
    gate, up = F.linear(x_TD, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, experts.down_proj[e])


def _capture(model):
    """Record each patched block's input and its router's top-K ids of every forward."""
    seen = []
    for _, block in patched_blocks(model):
        router = block.moelab.router.__dict__["hf_router"]
        block.register_forward_pre_hook(lambda m, a: seen.append(("x", m, a[0].detach())))
        router.register_forward_hook(lambda m, a, out: seen.append(("ids", m, out[2])))
    return seen


# ----------------------------------------------------------------------------- Default MoE

@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_default_moe_gives_skipped_router_logits_a_gradient(family):
    """Both families renormalise the top-K weights, so without Default MoE a skipped expert's
    logit gets no gradient from the task loss (analytically zero; the HF routers take the
    softmax in fp32, which leaves < 1e-8); with it, every one does (> 1e-5)."""
    grads = {}
    for on in (False, True):
        model = tiny_model(family, dtype=torch.float64, output_router_logits=False).train()
        patch(model, default_moe=DefaultMoEConfig(beta=0.5) if on else None)
        if on:  # a nonzero default output: one forward fills the EMA
            model(token_batch(seed=5))
        logits, ids = [], []
        router = patched_blocks(model)[0][1].moelab.router.__dict__["hf_router"]

        def hook(m, a, out, logits=logits, ids=ids):
            out[0].retain_grad()
            logits.append(out[0])
            ids.append(out[2])

        router.register_forward_hook(hook)
        tokens = token_batch()
        model(tokens, labels=tokens).loss.backward()
        skipped = torch.ones_like(logits[0], dtype=torch.bool).scatter(1, ids[0], False)
        # the last position of each sequence has no next-token loss: leave it out
        seq = tokens.shape[1]
        skipped = skipped.view(-1, seq, skipped.shape[1])[:, :-1]
        grad = logits[0].grad.view(-1, seq, skipped.shape[2])[:, :-1]
        grads[on] = grad[skipped].abs()
    assert grads[False].max().item() <= 1e-8
    assert (grads[True] > 1e-5).all(), grads[True]


@pytest.mark.parametrize("family", MOELAB_FAMILIES)
def test_default_moe_ema_equals_hand_computation(family):
    model = tiny_model(family).train()
    beta = 0.75
    patch(model, default_moe=DefaultMoEConfig(beta=beta))
    seen = _capture(model)
    model(token_batch())
    xs = [x for kind, _, x in seen if kind == "x"]
    ids = [i for kind, _, i in seen if kind == "ids"]
    for (_, block), x, ids_TK in zip(patched_blocks(model), xs, ids, strict=True):
        x_TD = x.reshape(-1, x.shape[-1])
        ema = torch.zeros_like(block.moelab.method.ema)
        for e in range(ema.shape[0]):
            rows = (ids_TK == e).any(dim=1)
            if rows.any():
                mean = _hf_expert(block.experts, e, x_TD[rows]).mean(0)
                ema[e] = (1 - beta) * mean
        torch.testing.assert_close(block.moelab.method.ema, ema, atol=1e-6, rtol=1e-5)
        assert ema.abs().sum() > 0


def test_default_moe_eval_leaves_ema_and_it_stays_fp32_under_bf16():
    model = tiny_model("olmoe").train()
    patch(model, default_moe=DefaultMoEConfig())
    model(token_batch())
    methods = [b.moelab.method for _, b in patched_blocks(model)]
    before = [m.ema.clone() for m in methods]
    model.eval()
    model(token_batch(seed=2))
    assert all(torch.equal(m.ema, b) for m, b in zip(methods, before, strict=True))
    model.to(torch.bfloat16).train()
    assert all(m.ema.dtype == torch.float32 for m in methods)
    model(token_batch(seed=3))
    assert all(m.ema.dtype == torch.float32 and not torch.equal(m.ema, b)
               for m, b in zip(methods, before, strict=True))


def test_patching_an_eval_model_keeps_it_in_eval():
    model = tiny_model("mixtral")  # eval mode
    patch(model, default_moe=DefaultMoEConfig())
    assert not any(m.training for m in model.modules())
    model(token_batch())
    assert all(b.moelab.method.n_updates.sum() == 0 for _, b in patched_blocks(model))


def test_default_moe_advances_once_per_step_with_checkpointing():
    model = tiny_model("mixtral").train()
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False})
    patch(model, default_moe=DefaultMoEConfig())
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    ids = token_batch()
    model(ids, labels=ids).loss.backward()
    for _, block in patched_blocks(model):
        n = block.moelab.method.n_updates
        assert n.max().item() == 1 and n.sum().item() >= 2


def test_default_moe_state_dict_keys_unchanged():
    model = tiny_model("deepseek_v3")
    keys = list(model.state_dict())
    patch(model, default_moe=DefaultMoEConfig())
    assert list(model.state_dict()) == keys


# ----------------------------------------------------------------------------- MomentumSMoE

def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                 if p.grad is not None}


NEUTRAL = MomentumConfig("heavy_ball", mu=0.0, gamma=1.0)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_neutral_momentum_bit_equal(family):
    """mu=0, gamma=1: with HF's experts (dispatch='hf') bit-equal to the unpatched model;
    with moelab's experts bit-equal to the patched model without momentum."""
    ref = tiny_model(family).train()
    ids = token_batch()
    pairs = [(ref, patch(copy.deepcopy(ref), momentum=NEUTRAL, dispatch="hf"))]
    if family in MOELAB_FAMILIES:
        pairs.append((patch(copy.deepcopy(ref)), patch(copy.deepcopy(ref), momentum=NEUTRAL)))
    for a, b in pairs:
        (la, ga), (lb, gb) = _grads(a, ids), _grads(b, ids)
        assert torch.equal(la, lb)
        assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)


def _hand_loop(model, ids, mu, gamma):
    """Heavy-ball MomentumSMoE written out over the unpatched HF decoder layers:
    ``p = f + mu*p; h = h' + gamma*p`` in every MoE layer, ``h = h' + mlp`` in dense ones."""
    inner = model.model
    h = inner.embed_tokens(ids)
    seq = ids.shape[1]
    pos = torch.arange(seq).unsqueeze(0)
    pos_emb = inner.rotary_emb(h, pos)
    mask = torch.full((seq, seq), float("-inf"), dtype=h.dtype).triu(1)[None, None]
    p = torch.zeros_like(h)
    for layer in inner.layers:
        a, _ = layer.self_attn(layer.input_layernorm(h), position_embeddings=pos_emb,
                               attention_mask=mask, position_ids=pos)
        h = h + a
        f = layer.mlp(layer.post_attention_layernorm(h))
        if isinstance(f, tuple):
            f = f[0]
        if "MoE" in type(layer.mlp).__name__ or "Moe" in type(layer.mlp).__name__ or \
                type(layer.mlp).__name__ == "GptOssMLP":
            p = f + mu * p
            h = h + gamma * p
        else:
            h = h + f
    return model.lm_head(inner.norm(h))


@pytest.mark.parametrize("dispatch", ["auto", "hf"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_heavy_ball_equals_hand_written_decoder_loop_fp64(family, dispatch):
    if family == "gpt_oss" and dispatch == "auto":
        pytest.skip("GPT-OSS runs HF's experts under auto")
    ref = tiny_model(family, dtype=torch.float64)
    ids = token_batch()
    with torch.no_grad():
        want = _hand_loop(ref, ids, mu=0.7, gamma=0.9)
        model = patch(copy.deepcopy(ref), momentum=MomentumConfig("heavy_ball", mu=0.7,
                                                                  gamma=0.9), dispatch=dispatch)
        got = model(ids).logits
        plain = ref(ids).logits
    assert (got - plain).abs().max().item() > 1e-3  # momentum changes the function
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("rule", ["heavy_ball", "adam", "robust"])
def test_momentum_gradients_equal_with_nonreentrant_checkpointing(rule):
    ref = tiny_model("mixtral", dtype=torch.float64).train()
    cfg = MomentumConfig(rule, learnable=rule == "heavy_ball")
    plain = patch(copy.deepcopy(ref), momentum=cfg)
    ckpt = copy.deepcopy(ref)
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    patch(ckpt, momentum=cfg)
    calls = []
    for _, block in patched_blocks(ckpt):
        block.register_forward_pre_hook(lambda m, a: calls.append(m))
    ids = token_batch()
    (la, ga), (lb, gb) = _grads(plain, ids), _grads(ckpt, ids)
    assert len(calls) == 2 * len(patched_blocks(ckpt))  # forward + checkpoint recompute
    torch.testing.assert_close(la, lb, atol=0, rtol=0)
    assert ga.keys() == gb.keys()
    if rule == "heavy_ball":
        assert "moelab_momentum.mu" in ga and ga["moelab_momentum.mu"].abs().sum() > 0
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=1e-13, rtol=1e-10)


def test_reentrant_checkpointing_refused():
    model = tiny_model("olmoe").train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    patch(model, momentum=MomentumConfig("heavy_ball"))
    with pytest.raises(RuntimeError, match="reentrant"):
        model(token_batch())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_greedy_generation_same_with_and_without_kv_cache(family):
    model = tiny_model(family)
    patch(model, momentum=MomentumConfig("heavy_ball", mu=0.7))
    ids = token_batch(batch=1, seq=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.shape[1] == ids.shape[1] + 6
    assert torch.equal(cached, uncached)
    carriers = {id(m.__dict__["_moelab_carrier"]): m.__dict__["_moelab_carrier"]
                for m in model.modules() if "_moelab_carrier" in m.__dict__}
    assert len(carriers) == 1 and next(iter(carriers.values())).state is None  # nothing kept


def test_learnable_momentum_is_trained_but_not_in_hf_state_dict():
    model = tiny_model("granitemoe")
    keys = list(model.state_dict())
    patch(model, momentum=MomentumConfig("heavy_ball", learnable=True))
    names = [n for n, _ in model.named_parameters()]
    assert "moelab_momentum.mu" in names and "moelab_momentum.gamma" in names
    assert list(model.state_dict()) == keys
