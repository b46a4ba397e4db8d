"""Default MoE (Panda et al., "Dense Backpropagation Improves Training for Sparse
Mixture-of-Experts", 2025).

Every expert i keeps a default output Ê_i [D], an EMA of its own recent outputs. A token adds
``sum_{i not in TopK} probs[t, i] * Ê_i`` to its sparse output, so the router gets a gradient for
all E probabilities while each expert still only sees its own tokens. Ê is a constant for
autograd.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # imported lazily: moelab.moe imports this module
    from moelab.moe.config import DefaultMoEConfig
    from moelab.moe.dispatch import DispatchPlan


class DefaultExpertOutputs(nn.Module):
    """Holds Ê ([E, D] fp32 buffer ``ema``) and computes the default term.

    EMA update, per expert i that received tokens this forward (others keep their Ê_i):
        plain:  m_i = mean_{t -> i} E_i(x_t)
        scored: m_i = sum_{t -> i} p_ti E_i(x_t) / sum_{t -> i} p_ti   (p = router prob)
        Ê_i <- beta * Ê_i + (1 - beta) * m_i
    With ``bias_correction`` the value used is Ê_i / (1 - beta**n_i), n_i = updates of expert i.
    """

    def __init__(self, n_experts: int, d_model: int, cfg: DefaultMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("ema", torch.zeros(n_experts, d_model))
        self.register_buffer("n_updates", torch.zeros(n_experts, dtype=torch.long))

    def _apply(self, fn, recurse=True):
        """Module casts (``.bfloat16()``, ``.half()``) keep Ê in fp32: an EMA with beta near 1
        in a 16-bit float would round most updates away. Device moves and fp64 apply."""
        super()._apply(fn, recurse)
        if self.ema.dtype in (torch.bfloat16, torch.float16):
            self.ema = self.ema.float()
        return self

    def row_weights(self, probs_TE: Tensor, plan: DispatchPlan) -> Tensor:
        """Weight of each dispatched row [N] in the batch mean: its router probability
        (scored), or an empty tensor meaning "all ones" (plain)."""
        if not self.cfg.scored:
            return probs_TE.new_zeros(0)
        return probs_TE.detach()[plan.token_idx, plan.expert_ids]

    def row_mass(self, row_weights_N: Tensor, plan: DispatchPlan) -> Tensor:
        """Total weight per expert [E] fp32: the denominators of the batch means."""
        if row_weights_N.numel() == 0:
            return plan.kept_counts.float()
        mass_E = torch.zeros(self.ema.shape[0], device=row_weights_N.device)
        return mass_E.index_add_(0, plan.expert_ids, row_weights_N.float())

    @torch.no_grad()
    def update(self, sums_ED: Tensor, mass_E: Tensor) -> None:
        """One EMA step from this forward's per-expert weighted output sums [E, D] and weight
        totals [E] (token counts for the plain variant). Under data parallelism the layer
        passes both summed over the ranks (``MoELayer.stats_reducer``), so every rank holds the
        same Ê."""
        seen_E = mass_E > 0
        mean_ED = sums_ED / mass_E.clamp_min(torch.finfo(torch.float).tiny).unsqueeze(1)
        beta = self.cfg.beta
        updated = beta * self.ema + (1.0 - beta) * mean_ED
        self.ema.copy_(torch.where(seen_E.unsqueeze(1), updated, self.ema))
        self.n_updates += seen_E.long()

    def value(self) -> Tensor:
        """Ê as used in the forward: [E, D] fp32 (bias-corrected if configured)."""
        if not self.cfg.bias_correction:
            return self.ema.clone()
        correction = 1.0 - self.cfg.beta ** self.n_updates.double()
        return torch.where(self.n_updates.unsqueeze(1) > 0,
                           self.ema / correction.float().clamp_min(1e-12).unsqueeze(1),
                           self.ema)

    def term(self, probs_TE: Tensor, topk_ids_TK: Tensor, dtype: torch.dtype) -> Tensor:
        """``sum_{i not in TopK(t)} probs[t, i] * Ê_i`` as [T, D] in ``dtype``, computed as
        (probs with the chosen entries zeroed) @ Ê — no [T, E, D] tensor."""
        skipped_TE = probs_TE.scatter(1, topk_ids_TK, 0.0)
        default_TD = (skipped_TE @ self.value().to(skipped_TE.dtype)).to(dtype)
        if self.cfg.straight_through:
            return default_TD - default_TD.detach()
        return default_TD
