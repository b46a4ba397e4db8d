"""The routers (Top-K: tokens choose experts; expert choice: experts choose tokens) and the
router losses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.moe.amp import autocast_off


@dataclass(frozen=True)
class ExpertChoice:
    """Which tokens each expert picked (expert-choice routing): M = P * cap slots per expert
    (cap tokens in each of the P choice groups, see ``ExpertChoiceRouter``).

    token_idx_EM: [E, M] int64 token rows picked by each expert (distinct within a group).
    weights_EM: [E, M] fp32 combine weights: the router probability probs[token, e].
    picked_TE: [T, E] bool, True where expert e picked token t.
    """

    token_idx_EM: Tensor
    weights_EM: Tensor
    picked_TE: Tensor


@dataclass(frozen=True)
class Routing:
    """One routing decision.

    logits: [T, E] fp32 router logits.  probs: [T, E] fp32 softmax over all E experts
    (fp64 when the input is fp64).
    topk_ids: [T, K] int64 chosen experts, best first.  topk_weights: [T, K] fp32 combine
    weights (the chosen probabilities, renormalised to sum 1 if ``normalize_topk``).
    Both are None under expert choice, where ``choice`` says which tokens each expert took.
    """

    logits: Tensor
    probs: Tensor
    topk_ids: Tensor | None
    topk_weights: Tensor | None
    choice: ExpertChoice | None = None

    def unchosen_probs(self) -> Tensor:
        """[T, E] ``probs`` with every chosen (token, expert) pair set to 0: the experts a
        token skipped (Top-K) or that did not pick it (expert choice)."""
        if self.choice is not None:
            return self.probs.masked_fill(self.choice.picked_TE, 0.0)
        return self.probs.scatter(1, self.topk_ids, 0.0)


def _router_probs(x_TD: Tensor, weight_ED: Tensor) -> tuple[Tensor, Tensor]:
    """([T, E] logits, [T, E] softmax probs) in fp32 (fp64 for fp64 input), autocast off."""
    dtype = torch.promote_types(x_TD.dtype, torch.float32)
    with autocast_off(x_TD.device.type):
        logits_TE = F.linear(x_TD.to(dtype), weight_ED.to(dtype))
        return logits_TE, torch.softmax(logits_TE, dim=-1)


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
        logits_TE, probs_TE = _router_probs(x_TD, self.weight)
        with autocast_off(x_TD.device.type):
            weights_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.normalize_topk:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return Routing(logits_TE, probs_TE, ids_TK, weights_TK)


def choice_capacity(capacity_factor: float, group_size: int, top_k: int, n_experts: int) -> int:
    """Tokens each expert picks per choice group of ``group_size`` tokens:
    ``min(G, ceil(capacity_factor * G * K / E))`` (at least 1)."""
    return min(group_size, max(1, math.ceil(capacity_factor * group_size * top_k / n_experts)))


class ExpertChoiceRouter(nn.Module):
    """Expert-choice routing (Zhou et al., "Mixture-of-Experts with Expert Choice Routing",
    2022): the same linear + softmax over experts as ``TopKRouter`` (probs[t] sums to 1 over
    the E experts), then each expert e takes the cap tokens with the largest probs[:, e] within
    each choice group (cap = ``choice_capacity``), and combines them with those probabilities.
    Every expert processes exactly cap tokens per group; a token may be picked by 0 to E
    experts.

    Choice groups: the tokens of x_TD [T, D] laid out as [G, P] (token t = g * P + p) with P =
    ``n_positions``; the experts choose among the G tokens of each column p. P = 1: one group
    of all T tokens (batch-wide choice); P = S for a flattened [B, S, D] input: one group per
    sequence position (causal: see ``MoEConfig.choice_group``).
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int,
                 capacity_factor: float) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def forward(self, x_TD: Tensor, n_positions: int = 1) -> Routing:
        """x_TD: [T, D] (T a multiple of ``n_positions``) -> Routing with ``choice`` set."""
        n_tokens, n_experts = x_TD.shape[0], self.n_experts
        if n_tokens % n_positions:
            raise ValueError(f"{n_tokens} tokens do not split into groups of n_positions="
                             f"{n_positions}: pass x as [B, S, D] with S = n_positions")
        group = n_tokens // n_positions
        cap = choice_capacity(self.capacity_factor, group, self.top_k, n_experts)
        logits_TE, probs_TE = _router_probs(x_TD, self.weight)
        with autocast_off(x_TD.device.type):
            scores_GPE = probs_TE.view(group, n_positions, n_experts)
            # [cap, P, E]: the cap best rows g of each (position, expert), best first
            top_w, top_rows = torch.topk(scores_GPE, cap, dim=0)
        positions = torch.arange(n_positions, device=x_TD.device).view(1, -1, 1)
        top_tokens = top_rows * n_positions + positions
        token_idx_EM = top_tokens.permute(2, 1, 0).reshape(n_experts, -1)
        weights_EM = top_w.permute(2, 1, 0).reshape(n_experts, -1)
        experts_EM = torch.arange(n_experts, device=x_TD.device).view(-1, 1).expand_as(
            token_idx_EM)
        picked_TE = torch.zeros(n_tokens, n_experts, dtype=torch.bool, device=x_TD.device)
        picked_TE = picked_TE.index_put((token_idx_EM, experts_EM),
                                        torch.ones((), dtype=torch.bool, device=x_TD.device))
        return Routing(logits_TE, probs_TE, None, None,
                       ExpertChoice(token_idx_EM, weights_EM, picked_TE))


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
