"""Top-K softmax router and the router losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.moe.amp import autocast_off


@dataclass(frozen=True)
class Routing:
    """One routing decision.

    logits: [T, E] fp32 router logits.  probs: [T, E] fp32 softmax over all E experts
    (fp64 when the input is fp64).
    topk_ids: [T, K] int64 chosen experts, best first.  topk_weights: [T, K] fp32 combine
    weights (the chosen probabilities, renormalised to sum 1 if ``normalize_topk``).
    """

    logits: Tensor
    probs: Tensor
    topk_ids: Tensor
    topk_weights: Tensor


class TopKRouter(nn.Module):
    """Linear (no bias) -> softmax over all experts in fp32 (fp64 for fp64 input) -> top-K;
    in fp32 under autocast too."""

    def __init__(self, d_model: int, n_experts: int, top_k: int,
                 normalize_topk: bool = False) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.normalize_topk = normalize_topk
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def forward(self, x_TD: Tensor) -> Routing:
        """x_TD: [T, D] -> Routing."""
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with autocast_off(x_TD.device.type):
            logits_TE = F.linear(x_TD.to(dtype), self.weight.to(dtype))
            probs_TE = torch.softmax(logits_TE, dim=-1)
            weights_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.normalize_topk:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return Routing(logits_TE, probs_TE, ids_TK, weights_TK)


def load_balance_loss(probs_TE: Tensor, topk_ids_TK: Tensor,
                      global_counts_E: Tensor | None = None,
                      global_tokens: Tensor | float | None = None) -> Tensor:
    """Switch/GShard balance loss, scaled so that perfect balance scores exactly 1.0.

    ``E / (T*K) * sum_i n_i * mean_t(probs[t, i])`` with n_i the top-K assignments to expert i.
    The counts are constants; the gradient flows through the mean probabilities.

    Data parallelism: pass the counts summed over ranks (``global_counts_E`` [E]) and the
    global token count; the assignment fractions are then the global batch's, and the mean over
    ranks of this loss (and of its gradient, which DDP averages) equals the single-process loss
    of the whole global batch, provided every rank holds the same number of tokens.
    """
    n_tokens, n_experts = probs_TE.shape
    top_k = topk_ids_TK.shape[1]
    if global_counts_E is None:
        from moelab.moe.dispatch import count_per_expert

        counts_E = count_per_expert(torch.sort(topk_ids_TK.reshape(-1))[0], n_experts)
        global_counts_E, global_tokens = counts_E.to(probs_TE.dtype), n_tokens
    if isinstance(global_tokens, Tensor):
        global_tokens = global_tokens.to(probs_TE.dtype)
    scale = n_experts / (global_tokens * top_k)
    return scale * torch.dot(global_counts_E.to(probs_TE.dtype), probs_TE.mean(dim=0))


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss ``mean_t(logsumexp(logits[t])**2)`` (ST-MoE)."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
