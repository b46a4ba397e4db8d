"""Model configuration: one dataclass for the LM, the ViT and the MLP models."""

from __future__ import annotations

from dataclasses import dataclass, field

from moelab.moe.config import DefaultMoEConfig, MoEConfig, _require

MOMENTUM_RULES = ("none", "heavy_ball", "adam", "robust")
MODEL_KINDS = ("lm", "vit", "mlp")


@dataclass(frozen=True)
class MomentumConfig:
    """MomentumSMoE family: how each MoE block turns its MoE output into the residual update.

    rule: "none" (baseline), "heavy_ball" (MomentumSMoE), "adam" (AdamSMoE), "robust".
    mu, gamma: heavy-ball momentum and step size.  beta1, beta2, eps: AdamSMoE moments
    (eps inside the square root); adam_layers: how many leading MoE layers use Adam before the
    heavy-ball hand-off; adam_bias_correction: Adam bias correction (off in the official code).
    kappa, rho: robust momentum (Cyrus et al. 2018) condition number and rate.
    learnable: mu and gamma become per-layer scalar parameters initialised to the values above.
    """

    rule: str = "none"
    mu: float = 0.7
    gamma: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    adam_layers: int = 1
    adam_bias_correction: bool = False
    kappa: float = 1.25
    rho: float = 0.2
    learnable: bool = False

    def __post_init__(self) -> None:
        _require(self.rule in MOMENTUM_RULES, "momentum.rule", self.rule,
                 f"choose one of {MOMENTUM_RULES}")
        _require(0.0 <= self.mu < 1.0, "momentum.mu", self.mu, "need 0 <= mu < 1")
        _require(self.gamma > 0.0, "momentum.gamma", self.gamma, "need gamma > 0")
        _require(0.0 < self.beta1 < 1.0, "momentum.beta1", self.beta1, "need 0 < beta1 < 1")
        _require(0.0 < self.beta2 < 1.0, "momentum.beta2", self.beta2, "need 0 < beta2 < 1")
        _require(self.eps > 0.0, "momentum.eps", self.eps, "need eps > 0")
        _require(self.adam_layers >= 1, "momentum.adam_layers", self.adam_layers, "need >= 1")
        _require(self.kappa > 1.0, "momentum.kappa", self.kappa, "need kappa > 1")
        _require(0.0 < self.rho <= 1.0 - 1.0 / self.kappa + 1e-12, "momentum.rho", self.rho,
                 f"need 0 < rho <= 1 - 1/kappa = {1.0 - 1.0 / self.kappa:.6g}")
        _require(not self.learnable or self.rule in ("heavy_ball", "adam"),
                 "momentum.learnable", self.learnable,
                 f"only the heavy_ball and adam rules have mu/gamma to learn (rule={self.rule!r})")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a moelab model.

    kind: "lm" (MoETransformerLM), "vit" (MoEViT) or "mlp" (MoEMLP).
    d_model, n_layers, n_heads: width, number of blocks, attention heads (lm/vit).
    moe_every: every ``moe_every``-th block has an MoE FFN, the others a dense FFN (1 = all;
        2 = every other, the V-MoE layout, counting so that the last block is MoE).
    first_dense: force block 0 to a dense FFN.  d_ff_dense: dense FFN width (default 4*d_model).
    n_experts, top_k, d_ff, activation, normalize_topk, capacity_factor, aux_loss_coef,
    z_loss_coef, dispatch, default_moe: the MoE layer's settings (see ``MoEConfig``).
    max_seq_len: longest sequence (lm).  tie_embeddings: share input and output embeddings.
    patch_size, pool ("mean" | "cls"): ViT settings.
    skip_connections: residual connections in MoEMLP blocks (off for the Excitation paper's
        deep-MoE experiment).
    dropout: dropout probability.  activation_checkpointing: recompute blocks in backward.
    momentum: the MomentumSMoE combine rule across MoE layers.
    """

    kind: str = "lm"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    moe_every: int = 1
    first_dense: bool = False
    d_ff_dense: int | None = None
    n_experts: int = 8
    top_k: int = 2
    d_ff: int = 256
    activation: str = "swiglu"
    normalize_topk: bool = False
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    dispatch: str = "auto"
    default_moe: DefaultMoEConfig | None = None
    max_seq_len: int = 256
    tie_embeddings: bool = True
    patch_size: int = 4
    pool: str = "mean"
    skip_connections: bool = True
    dropout: float = 0.0
    activation_checkpointing: bool = False
    momentum: MomentumConfig = field(default_factory=MomentumConfig)

    def __post_init__(self) -> None:
        _require(self.kind in MODEL_KINDS, "model.kind", self.kind,
                 f"choose one of {MODEL_KINDS}")
        for name in ("d_model", "n_layers", "n_heads", "moe_every", "max_seq_len", "patch_size"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"model.{name}", value,
                     "need a positive int")
        if self.kind != "mlp":
            _require(self.d_model % self.n_heads == 0, "model.n_heads", self.n_heads,
                     f"must divide d_model={self.d_model}")
        if self.d_ff_dense is not None:
            _require(self.d_ff_dense >= 1, "model.d_ff_dense", self.d_ff_dense, "need >= 1")
        _require(self.pool in ("mean", "cls"), "model.pool", self.pool, "choose 'mean' or 'cls'")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "need 0 <= p < 1")
        self.moe_config()  # validates the MoE fields, naming them
        n_moe = len(self.moe_block_indices())
        _require(n_moe >= 1, "model.moe_every", self.moe_every, "leaves no MoE block")
        if self.momentum.rule == "adam":
            _require(self.momentum.adam_layers <= n_moe, "momentum.adam_layers",
                     self.momentum.adam_layers, f"need <= number of MoE layers ({n_moe})")
        _require(self.skip_connections or self.kind == "mlp", "model.skip_connections",
                 self.skip_connections, "only the mlp model can drop its residual connections")
        _require(self.skip_connections or self.momentum.rule == "none",
                 "model.skip_connections", self.skip_connections,
                 f"momentum rule {self.momentum.rule!r} updates a residual stream; "
                 "use skip_connections=True or momentum rule 'none'")

    def moe_config(self) -> MoEConfig:
        """The MoEConfig of every MoE block."""
        return MoEConfig(
            d_model=self.d_model, n_experts=self.n_experts, top_k=self.top_k, d_ff=self.d_ff,
            activation=self.activation, normalize_topk=self.normalize_topk,
            capacity_factor=self.capacity_factor, aux_loss_coef=self.aux_loss_coef,
            z_loss_coef=self.z_loss_coef, default_moe=self.default_moe, dispatch=self.dispatch,
        )

    def moe_block_indices(self) -> list[int]:
        """Indices of the blocks whose FFN is an MoE layer."""
        return [i for i in range(self.n_layers)
                if (self.n_layers - 1 - i) % self.moe_every == 0
                and not (self.first_dense and i == 0)]
