"""Configuration dataclasses of the MoE layer."""

from __future__ import annotations

from dataclasses import dataclass

from moelab.moe.activations import ACTIVATIONS
from moelab.validation import require

DISPATCH_BACKENDS = ("auto", "grouped_mm", "loop", "padded")
ROUTINGS = ("top_k", "expert_choice")
CHOICE_GROUPS = ("batch", "position")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class MoEConfig:
    """Everything that defines one sparse MoE layer (method-free: methods plug into the
    layer's seam, see ``MoELayer``).

    d_model: model width D (required by ``MoELayer``; inside a ``ModelConfig`` leave it unset:
        the model's ``d_model`` is used).  n_experts: E.  top_k: K experts per token (1 <= K <= E).
    d_ff: hidden width F of each expert.  activation: "swiglu" or "gelu".
    normalize_topk: renormalise the K routing weights to sum to 1 (Mixtral); off keeps the raw
        softmax probabilities (Switch / Default MoE paper).
    capacity_factor: top_k routing: None for dropless; otherwise each expert keeps at most
        ceil(capacity_factor * T * K / E) assignments per forward and drops the rest.
        expert_choice routing: required; each expert takes its top
        min(G, ceil(capacity_factor * G * K / E)) tokens of every choice group of G tokens.
    routing: "top_k" (each token picks its K experts) or "expert_choice" (each expert picks
        its tokens by router probability, Zhou et al. 2022; K only sets the capacity; see
        ``moe.router.ExpertChoiceRouter``).
    choice_group: expert_choice only: which tokens an expert chooses among. "batch": all T
        tokens of the forward (leaks the future in a causal LM: a later token can change
        whether an earlier one is picked); "position": the B tokens at the same sequence
        position of a [B, S, D] input (causal: position s sees only positions <= s of the
        batch's sequences).
    aux_loss_coef, z_loss_coef: weights of the load-balancing loss and the router z-loss in
        ``MoELosses.total``.
    dispatch: "auto" (the chunked expert loop on CPU; grouped GEMM for bf16 on CUDA when the
        installed torch supports it, else the loop; for fp32 / tf32 on CUDA the padded path
        when a capacity is set, else the loop; see ``moe.dispatch.resolve_backend``),
        "grouped_mm" (error if unsupported), "loop" (see ``moe.expert_loop``) or "padded"
        (every expert gets a fixed number of slots, the capacity or, dropless, T (M under
        expert choice): two batched matmuls, no host read; capacity_factor x the FLOPs of
        the grouped path with a capacity, E/K x dropless; see ``moe.experts``).
    """

    d_model: int | None = None
    n_experts: int = 8
    top_k: int = 2
    d_ff: int = 256
    activation: str = "swiglu"
    normalize_topk: bool = False
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    dispatch: str = "auto"
    routing: str = "top_k"
    choice_group: str = "batch"

    def __post_init__(self) -> None:
        if self.d_model is not None:
            require(_is_int(self.d_model) and self.d_model >= 1, "d_model", self.d_model,
                    "need a positive int (or leave it unset inside a model config)")
        for name in ("n_experts", "d_ff"):
            value = getattr(self, name)
            require(_is_int(value) and value >= 1, name, value, "need a positive int")
        require(_is_int(self.top_k) and self.top_k >= 1, "top_k", self.top_k,
                 "need top_k >= 1")
        require(self.top_k <= self.n_experts, "top_k", self.top_k,
                 f"need top_k <= n_experts ({self.n_experts})")
        require(self.activation in ACTIVATIONS, "activation", self.activation,
                 f"choose one of {ACTIVATIONS}")
        require(self.dispatch in DISPATCH_BACKENDS, "dispatch", self.dispatch,
                 f"choose one of {DISPATCH_BACKENDS}")
        if self.capacity_factor is not None:
            require(self.capacity_factor > 0, "capacity_factor", self.capacity_factor,
                     "need > 0 (or None for dropless)")
        require(self.routing in ROUTINGS, "routing", self.routing, f"choose one of {ROUTINGS}")
        require(self.choice_group in CHOICE_GROUPS, "choice_group", self.choice_group,
                f"choose one of {CHOICE_GROUPS}")
        if self.routing == "expert_choice":
            require(self.capacity_factor is not None, "capacity_factor", self.capacity_factor,
                    "expert_choice routing needs a capacity factor c > 0 (e.g. 1.0): each "
                    "expert takes ceil(c*G*K/E) tokens of a group of G")
            require(not self.normalize_topk, "normalize_topk", self.normalize_topk,
                    "applies to top_k routing only (expert choice combines raw probabilities)")
        else:
            require(self.choice_group == "batch", "choice_group", self.choice_group,
                    "applies to routing='expert_choice' only")
        require(self.aux_loss_coef >= 0, "aux_loss_coef", self.aux_loss_coef, "need >= 0")
        require(self.z_loss_coef >= 0, "z_loss_coef", self.z_loss_coef, "need >= 0")
