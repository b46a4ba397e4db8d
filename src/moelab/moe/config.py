"""Configuration dataclasses of the MoE layer."""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATIONS = ("swiglu", "gelu")
DISPATCH_BACKENDS = ("auto", "grouped_mm", "loop")


def _require(cond: bool, field: str, value: object, what: str) -> None:
    if not cond:
        raise ValueError(f"{field}={value!r} is invalid: {what}")


@dataclass(frozen=True)
class DefaultMoEConfig:
    """Default MoE (Panda et al. 2025): EMA "default" outputs for the experts a token skipped.

    beta: EMA decay of the per-expert default output, 0 < beta < 1.
    scored: weight each routed token's output by its router probability in the EMA's batch mean.
    bias_correction: divide the EMA by 1 - beta**n (n = updates seen by that expert).
    straight_through: the default term carries the router gradient but adds nothing to the
        forward value (``y + d - d.detach()``).
    """

    beta: float = 0.9
    scored: bool = False
    bias_correction: bool = False
    straight_through: bool = False

    def __post_init__(self) -> None:
        _require(0.0 < self.beta < 1.0, "default_moe.beta", self.beta, "need 0 < beta < 1")


@dataclass(frozen=True)
class MoEConfig:
    """Everything that defines one sparse MoE layer.

    d_model: model width D.  n_experts: E.  top_k: K experts per token (1 <= K <= E).
    d_ff: hidden width F of each expert.  activation: "swiglu" or "gelu".
    normalize_topk: renormalise the K routing weights to sum to 1 (Mixtral); off keeps the raw
        softmax probabilities (Switch / Default MoE paper).
    capacity_factor: None for dropless; otherwise each expert keeps at most
        ceil(capacity_factor * T * K / E) assignments per forward and drops the rest.
    aux_loss_coef, z_loss_coef: weights of the load-balancing loss and the router z-loss in
        ``MoELosses.total``.
    default_moe: a DefaultMoEConfig to switch Default MoE on, None for plain top-K.
    dispatch: "auto" (the chunked expert loop on CPU; grouped GEMM on other devices when the
        installed torch supports it, else the loop), "grouped_mm" (error if unsupported) or
        "loop" (see ``moe.expert_loop``).
    """

    d_model: int
    n_experts: int
    top_k: int
    d_ff: int
    activation: str = "swiglu"
    normalize_topk: bool = False
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    default_moe: DefaultMoEConfig | None = None
    dispatch: str = "auto"

    def __post_init__(self) -> None:
        for name in ("d_model", "n_experts", "d_ff"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, value, "need a positive int")
        _require(isinstance(self.top_k, int) and self.top_k >= 1, "top_k", self.top_k,
                 "need top_k >= 1")
        _require(self.top_k <= self.n_experts, "top_k", self.top_k,
                 f"need top_k <= n_experts ({self.n_experts})")
        _require(self.activation in ACTIVATIONS, "activation", self.activation,
                 f"choose one of {ACTIVATIONS}")
        _require(self.dispatch in DISPATCH_BACKENDS, "dispatch", self.dispatch,
                 f"choose one of {DISPATCH_BACKENDS}")
        if self.capacity_factor is not None:
            _require(self.capacity_factor > 0, "capacity_factor", self.capacity_factor,
                     "need > 0 (or None for dropless)")
        _require(self.aux_loss_coef >= 0, "aux_loss_coef", self.aux_loss_coef, "need >= 0")
        _require(self.z_loss_coef >= 0, "z_loss_coef", self.z_loss_coef, "need >= 0")
        if self.default_moe is not None and not isinstance(self.default_moe, DefaultMoEConfig):
            raise ValueError(
                f"default_moe={self.default_moe!r} is invalid: need a DefaultMoEConfig or None"
            )
