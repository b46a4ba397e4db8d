"""MoELayer: router -> dispatch plan -> experts -> method terms -> stats -> losses.

The layer is method-free. A training-dynamics method that needs more than the router and the
experts plugs in through one typed seam, :class:`LayerMethod` (Default MoE is the one user:
``moelab.methods.default_moe``): it may ask for per-expert weighted output sums (computed fused
inside the expert kernels, see :class:`ExpertSums`) and adds its term to the layer output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from moelab.moe.config import MoEConfig
from moelab.moe.dispatch import (
    DispatchPlan,
    expert_capacity,
    per_expert_weight,
    plan_dispatch,
    plan_expert_choice,
)
from moelab.moe.experts import Experts
from moelab.moe.router import (
    ExpertChoiceRouter,
    Routing,
    TopKRouter,
    load_balance_loss,
    router_z_loss,
)


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
    unpicked_frac: scalar, share of tokens processed by no expert (none picked them under
    expert choice; all their assignments dropped by capacity under Top-K).
    experts_per_token: scalar, mean number of experts that processed a token (K when dropless
    Top-K; c*K on average under expert choice, varying per token). The layer always sets both.
    """

    tokens_per_expert: Tensor
    mean_prob: Tensor
    entropy: Tensor
    dropped_frac: Tensor
    n_tokens: int
    expert_out_norm: Tensor | None = None
    unpicked_frac: Tensor | None = None
    experts_per_token: Tensor | None = None


class ExpertSums(NamedTuple):
    """Per-expert weighted output sums of one forward (fp32, detached), with N kept rows.

    sums_ED: [E, D] ``sum_{n -> e} row_weight_N[n] * expert_e(x_n)`` (raw expert output, before
        the routing weight).  weight_E: [E] ``sum_{n -> e} row_weight_N[n]``.
    Under data parallelism (``MoELayer.stats_reducer``) both are summed over the ranks.
    """

    sums_ED: Tensor
    weight_E: Tensor


class LayerMethod(nn.Module):
    """The seam through which a method plugs into :class:`MoELayer` (``MoELayer(cfg,
    method=...)``). The base class is a no-op; subclasses override either hook.

    ``row_weight(routing, plan)`` is called on training forwards (not on activation-checkpoint
    recomputes); returning a [N] tensor asks the experts for :class:`ExpertSums` weighted by it,
    None asks for nothing. The sums are computed inside the expert kernels from the hidden
    activation ([E, F] accumulators, one [E, F] x [F, D] product at the end), so no [N, D]
    output copy is kept.
    ``forward(y_TD, routing, sums)`` returns the layer output [T, D]: y_TD plus the method's
    term; ``sums`` is the ExpertSums asked for, or None.
    """

    def row_weight(self, routing: Routing, plan: DispatchPlan) -> Tensor | None:
        return None

    def forward(self, y_TD: Tensor, routing: Routing, sums: ExpertSums | None) -> Tensor:
        return y_TD


def in_backward_pass() -> bool:
    """True while autograd runs a backward — i.e. an activation-checkpoint recompute. Always
    False under ``torch.compile`` tracing: a compiled block's recompute is part of its compiled
    backward and never runs the forward's side effects again (``moelab.distributed.wrap`` compiles
    checkpointed blocks so)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class MoELayer(nn.Module):
    """Sparse mixture-of-experts feed-forward layer: Top-K or expert-choice routing
    (``cfg.routing``).

    Input [B, S, D] or [T, D]; returns ``MoEOutput(y, losses)`` with y shaped like the input.
    After each forward ``last_stats`` holds the RoutingStats of that forward (not updated by an
    activation-checkpoint recompute).

    method: an optional :class:`LayerMethod` (e.g. ``moelab.methods.default_moe.DefaultMoE``)
    that adds its term to the output; held as ``self.method`` (its buffers are in the layer's
    state_dict under ``method.``).
    router, experts: optional replacements for the default ``TopKRouter`` / ``Experts`` (how a
    wrapped model supplies its own router: any module mapping x_TD [T, D] to a ``Routing``, and
    experts that may view someone else's weights; see ``moelab.hf``).
    """

    def __init__(self, cfg: MoEConfig, method: LayerMethod | None = None, *,
                 router: nn.Module | None = None, experts: Experts | None = None) -> None:
        super().__init__()
        if not isinstance(cfg, MoEConfig) or cfg.d_model is None:
            raise ValueError(f"cfg={cfg!r} is invalid: need a MoEConfig with d_model set")
        if method is not None and not isinstance(method, LayerMethod):
            raise ValueError(f"method={method!r} is invalid: need a moelab.moe.LayerMethod")
        self.cfg = cfg
        if experts is not None and not isinstance(experts, Experts):
            raise ValueError(f"experts={experts!r} is invalid: need a moelab.moe.Experts")
        if router is not None:
            self.router = router
        elif cfg.routing == "expert_choice":
            self.router = ExpertChoiceRouter(cfg.d_model, cfg.n_experts, cfg.top_k,
                                             cfg.capacity_factor)
        else:
            self.router = TopKRouter(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.normalize_topk)
        self.experts = experts if experts is not None else Experts(
            cfg.n_experts, cfg.d_model, cfg.d_ff, cfg.activation, cfg.dispatch)
        self.method = method
        # what the last first-pass forward left for ``last_stats`` (computed on first access:
        # training steps that log nothing never pay for the statistics)
        self._stats_inputs: tuple | None = None
        self._last_stats: RoutingStats | None = None
        #: Record each expert's mean output norm in ``last_stats`` (costs one norm per row).
        self.track_out_norm = False
        #: Data parallelism: sums a tensor over the ranks (``moelab.distributed.ddp_ep`` sets
        #: it; None on one process). Training forwards then use the global batch's assignment
        #: counts in the balance loss and the global ExpertSums handed to the method — one
        #: all-reduce per layer per forward.
        self.stats_reducer: Callable[[Tensor], Tensor] | None = None
        # assignments per expert over the training forwards since the last take_counts()
        # (Excitation's utilization; a buffer, so compiled forwards update it in the graph)
        self.register_buffer("_counts", torch.zeros(cfg.n_experts, dtype=torch.long),
                             persistent=False)
        self._counted = False

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
        """x: [B, S, D] or [T, D] -> MoEOutput(y like x, losses)."""
        self._check_input(x)
        cfg = self.cfg
        x_TD = x.reshape(-1, cfg.d_model)
        n_tokens = x_TD.shape[0]
        first_pass = not in_backward_pass()
        if cfg.routing == "expert_choice":
            routing = self.router(x_TD, self._n_positions(x))
            plan = plan_expert_choice(routing.choice.token_idx_EM, routing.choice.weights_EM)
        else:
            routing = self.router(x_TD)
            capacity = (None if cfg.capacity_factor is None else
                        expert_capacity(cfg.capacity_factor, n_tokens, cfg.top_k, cfg.n_experts))
            plan = plan_dispatch(routing.topk_ids, routing.topk_weights, cfg.n_experts, capacity,
                                 padded=cfg.dispatch == "padded")
        row_weight_N = (self.method.row_weight(routing, plan)
                        if self.method is not None and self.training and first_pass else None)
        if row_weight_N is not None and plan.keep is not None:
            row_weight_N = row_weight_N * plan.keep  # the sums cover the kept rows only
        experts_out = self.experts(x_TD, plan, row_weight_N,
                                   track_out_norm=self.track_out_norm and first_pass)
        sums = (None if row_weight_N is None else ExpertSums(
            experts_out.sums_ED, per_expert_weight(row_weight_N, plan, cfg.n_experts)))
        global_counts = (plan.routed_counts, n_tokens)  # the balance loss's assignment counts
        if self.stats_reducer is not None and self.training:
            global_counts, sums = self._reduce_stats(plan, n_tokens, sums)
        y_TD = experts_out.y_TD
        if self.method is not None:
            y_TD = self.method(y_TD, routing, sums)
        if first_pass:
            self._stats_inputs = (routing.probs.detach(), plan.routed_counts, plan.kept_counts,
                                  plan.n_dropped, experts_out.out_norm_sums_E, plan.token_idx,
                                  plan.keep)
            self._last_stats = None
            if self.training:
                self._counts.add_(plan.routed_counts)
                self._counted = True
        return MoEOutput(y_TD.view(x.shape), self._losses(routing, global_counts))

    def _n_positions(self, x: Tensor) -> int:
        """Expert choice: the choice groups' layout (``ExpertChoiceRouter``): S for
        choice_group="position" on a [B, S, D] input, else 1 (one batch-wide group)."""
        if self.cfg.choice_group == "batch":
            return 1
        if x.dim() != 3:
            raise ValueError(f"MoELayer input shape={tuple(x.shape)} is invalid for "
                             "choice_group='position': need [B, S, D] (sequence positions), "
                             "or use choice_group='batch'")
        return x.shape[1]

    def take_counts(self) -> Tensor | None:
        """[E] int64 assignments per expert (before capacity drops) summed over the training
        forwards since the previous call (activation-checkpoint recomputes not counted), then
        reset; None if there was none. Excitation's utilization."""
        if not self._counted:
            return None
        counts = self._counts.clone()
        self._counts.zero_()
        self._counted = False
        return counts

    @property
    def last_stats(self) -> RoutingStats | None:
        """The RoutingStats of the last forward (None before the first), computed when first
        read after that forward."""
        if self._last_stats is None and self._stats_inputs is not None:
            self._last_stats = self._stats(*self._stats_inputs)
        return self._last_stats

    @torch.no_grad()
    def _reduce_stats(self, plan: DispatchPlan, n_tokens: int, sums: ExpertSums | None
                      ) -> tuple[tuple[Tensor, Tensor], ExpertSums | None]:
        """One all-reduce (fp64) of [counts E | tokens 1 | weight E | sums E*D] over the ranks.
        Returns ((global counts [E], global tokens), global ExpertSums or None)."""
        n_experts = self.cfg.n_experts
        parts = [plan.routed_counts.double(), plan.routed_counts.new_full((1,), n_tokens).double()]
        if sums is not None:
            parts += [sums.weight_E.double(), sums.sums_ED.double().reshape(-1)]
        flat = self.stats_reducer(torch.cat(parts))
        counts_E, tokens = flat[:n_experts], flat[n_experts]
        if sums is not None:
            rest = flat[n_experts + 1:]
            sums = ExpertSums(rest[n_experts:].view_as(sums.sums_ED).float(),
                              rest[:n_experts].float())
        return (counts_E, tokens), sums

    def _losses(self, routing: Routing,
                global_counts: tuple[Tensor, Tensor | int] | None = None) -> MoELosses:
        cfg = self.cfg
        zero = routing.logits.new_zeros(())
        if cfg.aux_loss_coef == 0:
            balance = zero
        elif routing.choice is not None:
            # every expert takes the same number of tokens: balanced by construction (the
            # Switch loss would be sum_e mean_t probs = 1 with zero gradient)
            balance = routing.logits.new_ones(())
        else:
            balance = load_balance_loss(routing.probs, routing.topk_ids, *(global_counts or ()))
        z_loss = router_z_loss(routing.logits) if cfg.z_loss_coef > 0 else zero
        return MoELosses(balance, z_loss, cfg.aux_loss_coef * balance + cfg.z_loss_coef * z_loss)

    @torch.no_grad()
    def _stats(self, probs_TE: Tensor, routed_counts_E: Tensor, kept_counts_E: Tensor,
               n_dropped: Tensor, out_norm_sums_E: Tensor | None, token_idx_N: Tensor,
               keep_N: Tensor | None) -> RoutingStats:
        n_tokens = probs_TE.shape[0]
        kept_N = (torch.ones_like(token_idx_N, dtype=torch.float) if keep_N is None
                  else keep_N.float())
        experts_T = kept_N.new_zeros(n_tokens).index_add_(0, token_idx_N, kept_N)
        entropy = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(-1).mean()
        out_norm = None
        if out_norm_sums_E is not None:
            out_norm = torch.where(kept_counts_E > 0,
                                   out_norm_sums_E / kept_counts_E.clamp_min(1), float("nan"))
        total = n_tokens * self.cfg.top_k
        return RoutingStats(
            tokens_per_expert=routed_counts_E.float(),
            mean_prob=probs_TE.mean(0),
            entropy=entropy,
            dropped_frac=n_dropped.float() / total,
            n_tokens=n_tokens,
            expert_out_norm=out_norm,
            unpicked_frac=(experts_T == 0).float().mean(),
            experts_per_token=experts_T.mean(),
        )
