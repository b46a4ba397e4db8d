"""Default MoE (Panda et al., "Dense Backpropagation Improves Training for Sparse
Mixture-of-Experts", 2025).

Every expert i keeps a default output Ê_i [D], an EMA of its own recent outputs. A token adds
``sum_{i not in TopK} probs[t, i] * Ê_i`` to its sparse output, so the router gets a gradient for
all E probabilities while each expert still only sees its own tokens. Ê is a constant for
autograd.

Plugged into the method-free layer through its seam (``moelab.moe.LayerMethod``)::

    layer = MoELayer(moe_cfg, method=DefaultMoE(moe_cfg, DefaultMoEConfig(beta=0.9)))

Models built from a ``ModelConfig`` do this for every MoE layer when ``default_moe`` is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.moe import DispatchPlan, ExpertSums, LayerMethod, MoEConfig, MoELayer, Routing
from moelab.moe.amp import autocast_off
from moelab.validation import require

__all__ = ["BETA_RULES", "DefaultMoE", "DefaultMoEConfig", "default_moe_layer"]

#: Automatic beta rules (``beta = "<rule>"``) and the default of each one's ``horizon``:
#: "tokens": beta_e = exp(-n_e / horizon), n_e = the (global) weight mass routed to expert e
#:     this step (tokens, plain EMA): a memory of ``horizon`` tokens whatever the sparsity,
#:     batch size or load of the expert (2**14 tokens).
#: "warmup": beta_e = 1 - 1 / min(k_e, horizon), k_e = updates of expert e so far (this one
#:     included): the exact mean of the expert's first ``horizon`` steps, then a memory of
#:     ``horizon`` steps that saw the expert (100 steps).
#: Why these, their defaults and their start: docs/METHODS.md, "Default MoE without tuning β".
BETA_RULES: dict[str, float] = {"tokens": 16384.0, "warmup": 100.0}


@dataclass(frozen=True)
class DefaultMoEConfig:
    """Default MoE settings (``[model.default_moe]``; absent = off).

    beta: EMA decay of the per-expert default output, 0 < beta < 1, or an automatic rule
        ("tokens" or "warmup", see ``BETA_RULES``) that sets each expert's beta every step.
    horizon: the automatic rule's one hyperparameter (None: its default in ``BETA_RULES``):
        tokens for "tokens", steps that saw the expert for "warmup"; only with a rule.
    scored: weight each routed token's output by its router probability in the EMA's batch mean.
    bias_correction: divide the EMA by 1 - beta**n (n = updates seen by that expert).
    straight_through: the default term carries the router gradient but adds nothing to the
        forward value (``y + d - d.detach()``).
    """

    beta: float | str = 0.9
    scored: bool = False
    bias_correction: bool = False
    straight_through: bool = False
    horizon: float | None = None

    def __post_init__(self) -> None:
        rules = tuple(BETA_RULES)
        if isinstance(self.beta, str):
            require(self.beta in BETA_RULES, "beta", self.beta,
                    f"need 0 < beta < 1 or an automatic rule, one of {rules}")
            require(not self.bias_correction, "bias_correction", self.bias_correction,
                    f"needs a fixed beta (beta={self.beta!r} sets its own; 'warmup' is "
                    "unbiased by construction)")
        else:
            require(isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool)
                    and 0.0 < self.beta < 1.0, "beta", self.beta,
                    f"need 0 < beta < 1 or an automatic rule, one of {rules}")
            require(self.horizon is None, "horizon", self.horizon,
                    f"only with an automatic beta {rules}; drop it for a fixed beta")
        require(self.horizon is None or (
            isinstance(self.horizon, (int, float)) and not isinstance(self.horizon, bool)
            and math.isfinite(self.horizon) and self.horizon >= 1), "horizon", self.horizon,
            "need a number >= 1 (tokens for beta='tokens', steps for 'warmup') or none")

    @property
    def rule_horizon(self) -> float | None:
        """The automatic rule's horizon (its default when unset); None for a fixed beta."""
        if not isinstance(self.beta, str):
            return None
        return float(self.horizon) if self.horizon is not None else BETA_RULES[self.beta]


class DefaultMoE(LayerMethod):
    """Holds Ê ([E, D] fp32 buffer ``ema``) and adds the default term to the layer output.

    EMA update, per expert i that received tokens this forward (others keep their Ê_i):
        plain:  m_i = mean_{t -> i} E_i(x_t)
        scored: m_i = sum_{t -> i} p_ti E_i(x_t) / sum_{t -> i} p_ti   (p = router prob)
        Ê_i <- beta_i * Ê_i + (1 - beta_i) * m_i
    beta_i is the fixed beta, or set per expert and step by the automatic rule (``BETA_RULES``)
    from w_i, the expert's weight mass this step (tokens for the plain EMA, summed over the
    ranks), and k_i, its updates so far.
    With ``bias_correction`` the value used is Ê_i / (1 - beta**n_i), n_i = updates of expert i.
    Buffers of the last update, for the logs (not saved): ``beta_E`` [E] each expert's beta
    (1 for an expert that got no tokens: Ê_i unchanged) and ``horizon_E`` [E] its memory in
    tokens, w_i / (1 - beta_i) (kept from its last update while unrouted; 0 before any).
    """

    def __init__(self, layer_cfg: MoEConfig, cfg: DefaultMoEConfig) -> None:
        super().__init__()
        if layer_cfg.d_model is None:
            raise ValueError("layer_cfg.d_model=None is invalid: need the layer's width")
        self.cfg = cfg
        self.register_buffer("ema", torch.zeros(layer_cfg.n_experts, layer_cfg.d_model))
        self.register_buffer("n_updates", torch.zeros(layer_cfg.n_experts, dtype=torch.long))
        self.register_buffer("beta_E", torch.ones(layer_cfg.n_experts), persistent=False)
        self.register_buffer("horizon_E", torch.zeros(layer_cfg.n_experts), persistent=False)

    def _apply(self, fn, recurse=True):
        """Module casts (``.bfloat16()``, ``.half()``) keep Ê in fp32: an EMA with beta near 1
        in a 16-bit float would round most updates away. Device moves and fp64 apply."""
        super()._apply(fn, recurse)
        for name in ("ema", "beta_E", "horizon_E"):
            if getattr(self, name).dtype in (torch.bfloat16, torch.float16):
                setattr(self, name, getattr(self, name).float())
        return self

    def row_weight(self, routing: Routing, plan: DispatchPlan) -> Tensor:
        """Weight [N] of each kept row in the batch mean: its router probability (scored) or
        1 (plain)."""
        if not self.cfg.scored:
            return plan.weights.new_ones(plan.expert_ids.shape[0], dtype=torch.float)
        return routing.probs.detach()[plan.token_idx, plan.expert_ids].float()

    def forward(self, y_TD: Tensor, routing: Routing, sums: ExpertSums | None) -> Tensor:
        """One EMA step from ``sums`` (training forwards), then ``y_TD`` + the default term."""
        if sums is not None:
            self.update(sums.sums_ED, sums.weight_E)
        return self.add_term(y_TD, routing.unchosen_probs())

    @torch.no_grad()
    def update(self, sums_ED: Tensor, mass_E: Tensor) -> None:
        """One EMA step from this forward's per-expert weighted output sums [E, D] and weight
        totals [E] (token counts for the plain variant). Under data parallelism the layer
        passes both summed over the ranks (``MoELayer.stats_reducer``), so every rank holds the
        same Ê."""
        seen_E = mass_E > 0
        mean_ED = sums_ED / mass_E.clamp_min(torch.finfo(torch.float).tiny).unsqueeze(1)
        n_updates = self.n_updates + seen_E.long()
        beta_E, keep_E = self.betas(mass_E, n_updates)
        updated = beta_E.unsqueeze(1) * self.ema + keep_E.unsqueeze(1) * mean_ED
        # new tensors, not in-place updates: a compiled, activation-checkpointed block
        # recomputes its forward from the buffers it read, which must still hold the old Ê
        self.ema = torch.where(seen_E.unsqueeze(1), updated, self.ema)
        self.n_updates = n_updates
        self.beta_E = torch.where(seen_E, beta_E, torch.ones_like(beta_E)).float()
        self.horizon_E = torch.where(seen_E, (mass_E.to(keep_E.dtype) / keep_E).float(),
                                     self.horizon_E)

    def betas(self, mass_E: Tensor, n_updates_E: Tensor) -> tuple[Tensor, Tensor]:
        """(beta [E], 1 - beta [E]) in Ê's dtype for this step's weight mass [E] and update
        counts [E] (this update included); tensors only (no host reads, traceable)."""
        dtype = self.ema.dtype
        horizon = self.cfg.rule_horizon
        if self.cfg.beta == "tokens":
            x_E = mass_E.to(dtype) / horizon
            return torch.exp(-x_E), -torch.expm1(-x_E)  # 1 - beta exact for small n_e
        if self.cfg.beta == "warmup":
            keep_E = 1.0 / n_updates_E.to(dtype).clamp(1.0, horizon)
            return 1.0 - keep_E, keep_E
        beta = float(self.cfg.beta)
        return (mass_E.new_full(mass_E.shape, beta, dtype=dtype),
                mass_E.new_full(mass_E.shape, 1.0 - beta, dtype=dtype))

    def value(self) -> Tensor:
        """Ê as used in the forward: [E, D] fp32 (bias-corrected if configured)."""
        if not self.cfg.bias_correction:
            return self.ema.clone()
        correction = 1.0 - self.cfg.beta ** self.n_updates.double()
        return torch.where(self.n_updates.unsqueeze(1) > 0,
                           self.ema / correction.float().clamp_min(1e-12).unsqueeze(1),
                           self.ema)

    def add_term(self, y_TD: Tensor, skipped_TE: Tensor) -> Tensor:
        """``y_TD + sum_{i not chosen for t} probs[t, i] * Ê_i`` ([T, D], y's dtype), the sum
        computed as ``skipped_TE`` (probs with the chosen entries zeroed,
        ``Routing.unchosen_probs``: Top-K's skipped experts, or under expert choice the experts
        that did not pick t) @ Ê — no [T, E, D] tensor. In fp32
        the add is fused into the matmul (one [T, D] pass less). With ``straight_through`` the
        term adds its router gradient but nothing to the value. Under autocast the term is
        computed in fp32 (probs and Ê are) and added in y's dtype."""
        ema_ED = self.value().to(skipped_TE.dtype)
        if not self.cfg.straight_through and y_TD.dtype == skipped_TE.dtype == torch.float32:
            with autocast_off(y_TD.device.type):
                return torch.addmm(y_TD, skipped_TE, ema_ED)
        with autocast_off(y_TD.device.type):
            default_TD = (skipped_TE @ ema_ED).to(y_TD.dtype)
        if self.cfg.straight_through:
            default_TD = default_TD - default_TD.detach()
        return y_TD + default_TD


def default_moe_layer(layer_cfg: MoEConfig, cfg: DefaultMoEConfig | None = None) -> MoELayer:
    """``MoELayer(layer_cfg)`` with Default MoE plugged in (``cfg`` None: the defaults)."""
    return MoELayer(layer_cfg, method=DefaultMoE(layer_cfg, cfg or DefaultMoEConfig()))
