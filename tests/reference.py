"""Slow, obviously-correct references used only by the tests, and the small seeded MoE layer
(+ its gradients) the layer tests build them against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.methods.default_moe import DefaultMoE, DefaultMoEConfig
from moelab.moe import MoEConfig, MoELayer


def make_layer(seed: int = 0, default_moe: DefaultMoEConfig | None = None, **kw) -> MoELayer:
    """A seeded small MoELayer (d_model 8, 4 experts top-2, d_ff 6, no aux loss; ``kw``
    overrides MoEConfig fields), with Default MoE when ``default_moe`` is given."""
    torch.manual_seed(seed)
    base = dict(d_model=8, n_experts=4, top_k=2, d_ff=6, aux_loss_coef=0.0)
    cfg = MoEConfig(**{**base, **kw})
    return MoELayer(cfg, method=None if default_moe is None else DefaultMoE(cfg, default_moe))


def grads(layer: MoELayer, x: Tensor, y: Tensor, g: Tensor) -> tuple[Tensor, ...]:
    """d(y . g) / d(router weight, w_in, w_out, x)."""
    params = [layer.router.weight, layer.experts.w_in, layer.experts.w_out, x]
    return torch.autograd.grad(y, params, g)


def expert_forward(layer: MoELayer, e: int, x_D: Tensor) -> Tensor:
    """Expert e of ``layer`` on one token: [D] -> [D]."""
    experts = layer.experts
    h = x_D @ experts.w_in[e]
    if experts.activation == "swiglu":
        gate, up = h.chunk(2)
        h = F.silu(gate) * up
    else:
        h = F.gelu(h)
    return h @ experts.w_out[e]


def naive_moe(layer: MoELayer, x_TD: Tensor, defaults_ED: Tensor | None = None) -> Tensor:
    """Loop over tokens and their top-K experts; with ``defaults_ED``, add
    ``probs[t, i] * defaults[i]`` for every expert i the token did not select."""
    routing = layer.router(x_TD)
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        chosen = routing.topk_ids[t].tolist()
        for k, e in enumerate(chosen):
            y = y + routing.topk_weights[t, k].to(x_TD.dtype) * expert_forward(layer, e, x_TD[t])
        if defaults_ED is not None:
            for e in range(layer.cfg.n_experts):
                if e not in chosen:
                    y = y + routing.probs[t, e].to(x_TD.dtype) * defaults_ED[e].to(x_TD.dtype)
        rows.append(y)
    return torch.stack(rows)


def model_config(**kw):
    """A ModelConfig from flat keyword arguments (test shorthand): the MoE layer's fields
    (n_experts, top_k, d_ff, ...) go into ``moe=MoEConfig(...)``, the rest to ModelConfig."""
    import dataclasses

    from moelab.models import ModelConfig
    from moelab.moe import MoEConfig

    layer_fields = {f.name for f in dataclasses.fields(MoEConfig)} - {"d_model"}
    moe = {k: kw.pop(k) for k in list(kw) if k in layer_fields}
    return ModelConfig(moe=MoEConfig(**moe), **kw)


def naive_expert_choice(layer: MoELayer, x: Tensor, defaults_ED: Tensor | None = None
                        ) -> Tensor:
    """Expert-choice MoE by loops (Zhou et al. 2022): probs = softmax over experts per token;
    in each choice group (all tokens, or under choice_group="position" the tokens at one
    position of x [B, S, D]) expert e picks the ceil(c*G*K/E) tokens (at most G) with the
    largest probs[:, e]; y[t] = sum over the experts that picked t of probs[t, e] * expert_e(x_t)
    (+ probs[t, i] * defaults[i] for every expert i that did not pick t)."""
    cfg = layer.cfg
    x_TD = x.reshape(-1, cfg.d_model)
    dtype = torch.promote_types(x.dtype, torch.float32)
    probs = torch.softmax(x_TD.to(dtype) @ layer.router.weight.to(dtype).t(), dim=-1)
    n_pos = x.shape[1] if cfg.choice_group == "position" else 1
    groups = [list(range(p, x_TD.shape[0], n_pos)) for p in range(n_pos)]
    picked = [[] for _ in range(x_TD.shape[0])]
    for tokens in groups:
        cap = min(len(tokens), math.ceil(cfg.capacity_factor * len(tokens) * cfg.top_k
                                         / cfg.n_experts))
        for e in range(cfg.n_experts):
            best = sorted(tokens, key=lambda t, e=e: -float(probs[t, e].detach()))[:cap]
            for t in best:
                picked[t].append(e)
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        for e in picked[t]:
            y = y + probs[t, e].to(x.dtype) * expert_forward(layer, e, x_TD[t])
        if defaults_ED is not None:
            for e in range(cfg.n_experts):
                if e not in picked[t]:
                    y = y + probs[t, e].to(x.dtype) * defaults_ED[e].to(x.dtype)
        rows.append(y)
    return torch.stack(rows).view_as(x)
