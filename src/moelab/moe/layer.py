"""MoELayer: router + dispatch + experts (+ Default MoE), recording routing statistics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from moelab.methods.default_moe import DefaultExpertOutputs
from moelab.moe.config import MoEConfig
from moelab.moe.dispatch import DispatchPlan, expert_capacity, plan_dispatch
from moelab.moe.experts import Experts
from moelab.moe.router import Routing, TopKRouter, load_balance_loss, router_z_loss


class MoELosses(NamedTuple):
    """load_balance: balance loss (1.0 = perfect balance); z_loss: router z-loss;
    total: ``aux_loss_coef * load_balance + z_loss_coef * z_loss`` — add it to the task loss."""

    load_balance: Tensor
    z_loss: Tensor
    total: Tensor


class MoEOutput(NamedTuple):
    """y: output shaped like the input; losses: the router losses of this forward."""

    y: Tensor
    losses: MoELosses


@dataclass(frozen=True)
class RoutingStats:
    """Detached statistics of one forward (E experts).

    tokens_per_expert: [E] float, top-K assignments per expert chosen by the router.
    mean_prob: [E] mean router probability per expert.  entropy: scalar, mean per-token
    router entropy (nats).  dropped_frac: scalar, share of assignments dropped by capacity.
    n_tokens: T.  expert_out_norm: [E] mean L2 norm of each expert's raw output over its
    tokens (NaN for experts with none), only when ``MoELayer.track_out_norm`` is set.
    """

    tokens_per_expert: Tensor
    mean_prob: Tensor
    entropy: Tensor
    dropped_frac: Tensor
    n_tokens: int
    expert_out_norm: Tensor | None = None


def in_backward_pass() -> bool:
    """True while autograd runs a backward — i.e. an activation-checkpoint recompute."""
    return torch._C._current_graph_task_id() != -1


class MoELayer(nn.Module):
    """Sparse top-K mixture-of-experts feed-forward layer.

    Input [B, S, D] or [T, D]; returns ``MoEOutput(y, losses)`` with y shaped like the input.
    After each forward ``last_stats`` holds the RoutingStats of that forward (not updated by an
    activation-checkpoint recompute). Default MoE's EMA is updated once per training forward.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = TopKRouter(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.normalize_topk)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.d_ff, cfg.activation,
                               cfg.dispatch)
        self.default_moe = (DefaultExpertOutputs(cfg.n_experts, cfg.d_model, cfg.default_moe)
                            if cfg.default_moe is not None else None)
        self.last_stats: RoutingStats | None = None
        #: Record each expert's mean output norm in ``last_stats`` (costs one norm per row).
        self.track_out_norm = False
        #: Data parallelism: sums a tensor over the ranks (``moelab.distributed`` sets it; None
        #: on one process). Training forwards then use the global batch's assignment counts in
        #: the balance loss and the global (sum, mass) in Default MoE's EMA update — one
        #: all-reduce per layer per forward.
        self.stats_reducer: Callable[[Tensor], Tensor] | None = None

    def _check_input(self, x: Tensor) -> None:
        if not torch.is_floating_point(x):
            raise ValueError(f"MoELayer input dtype={x.dtype} is invalid: need a floating dtype")
        if x.dim() not in (2, 3) or x.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"MoELayer input shape={tuple(x.shape)} is invalid: need [B, S, "
                f"{self.cfg.d_model}] or [T, {self.cfg.d_model}] (d_model={self.cfg.d_model})"
            )
        if x.numel() == 0:
            raise ValueError(f"MoELayer input shape={tuple(x.shape)} is invalid: it holds no "
                             "tokens (router statistics and losses need at least one)")

    def forward(self, x: Tensor) -> MoEOutput:
        self._check_input(x)
        cfg = self.cfg
        x_TD = x.reshape(-1, cfg.d_model)
        n_tokens = x_TD.shape[0]
        routing = self.router(x_TD)
        capacity = (None if cfg.capacity_factor is None else
                    expert_capacity(cfg.capacity_factor, n_tokens, cfg.top_k, cfg.n_experts))
        plan = plan_dispatch(routing.topk_ids, routing.topk_weights, cfg.n_experts, capacity)
        first_pass = not in_backward_pass()
        default = self.default_moe
        update_default = default is not None and self.training and first_pass
        row_weights_N = default.row_weights(routing.probs, plan) if update_default else None
        experts_out = self.experts(x_TD, plan, row_weights_N,
                                   track_out_norm=self.track_out_norm and first_pass)
        y_TD, sums_ED = experts_out.y_TD, experts_out.sums_ED
        mass_E = default.row_mass(row_weights_N, plan) if update_default else None
        global_counts = None
        if self.stats_reducer is not None and self.training:
            global_counts, sums_ED, mass_E = self._reduce_stats(plan, n_tokens, sums_ED, mass_E)
        if update_default:
            default.update(sums_ED, mass_E)
        if default is not None:
            y_TD = y_TD + default.term(routing.probs, routing.topk_ids, y_TD.dtype)
        if first_pass:
            self.last_stats = self._stats(routing, plan, experts_out.out_norm_sums_E)
        return MoEOutput(y_TD.view(x.shape), self._losses(routing, global_counts))

    @torch.no_grad()
    def _reduce_stats(self, plan: DispatchPlan, n_tokens: int, sums_ED: Tensor | None,
                      mass_E: Tensor | None
                      ) -> tuple[tuple[Tensor, Tensor], Tensor | None, Tensor | None]:
        """One all-reduce (fp64) of [counts E | tokens 1 | mass E | sums E*D] over the ranks.
        Returns ((global counts [E], global tokens), global sums_ED, global mass_E)."""
        n_experts = self.cfg.n_experts
        parts = [plan.routed_counts.double(), plan.routed_counts.new_full((1,), n_tokens).double()]
        if mass_E is not None and sums_ED is not None:
            parts += [mass_E.double(), sums_ED.double().reshape(-1)]
        flat = self.stats_reducer(torch.cat(parts))
        counts_E, tokens = flat[:n_experts], flat[n_experts]
        if mass_E is not None and sums_ED is not None:
            rest = flat[n_experts + 1:]
            mass_E = rest[:n_experts].float()
            sums_ED = rest[n_experts:].view_as(sums_ED).float()
        return (counts_E, tokens), sums_ED, mass_E

    def _losses(self, routing: Routing,
                global_counts: tuple[Tensor, Tensor] | None = None) -> MoELosses:
        cfg = self.cfg
        zero = routing.logits.new_zeros(())
        balance = (load_balance_loss(routing.probs, routing.topk_ids, *(global_counts or ()))
                   if cfg.aux_loss_coef > 0 else zero)
        z_loss = router_z_loss(routing.logits) if cfg.z_loss_coef > 0 else zero
        return MoELosses(balance, z_loss, cfg.aux_loss_coef * balance + cfg.z_loss_coef * z_loss)

    @torch.no_grad()
    def _stats(self, routing: Routing, plan: DispatchPlan,
               out_norm_sums_E: Tensor | None) -> RoutingStats:
        probs_TE = routing.probs.detach()
        n_tokens = probs_TE.shape[0]
        entropy = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(-1).mean()
        out_norm = None
        if out_norm_sums_E is not None:
            kept_E = plan.kept_counts
            out_norm = torch.where(kept_E > 0, out_norm_sums_E / kept_E.clamp_min(1),
                                   float("nan"))
        total = n_tokens * self.cfg.top_k
        return RoutingStats(
            tokens_per_expert=plan.routed_counts.float(),
            mean_prob=probs_TE.mean(0),
            entropy=entropy,
            dropped_frac=torch.tensor(plan.n_dropped / total),
            n_tokens=n_tokens,
            expert_out_norm=out_norm,
        )
