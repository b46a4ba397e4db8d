"""Model configuration: one dataclass for the LM, the ViT and the MLP models."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from moelab.methods.default_moe import DefaultMoEConfig
from moelab.methods.momentum import MomentumConfig
from moelab.moe.config import MoEConfig
from moelab.validation import require

MODEL_KINDS = ("lm", "vit", "mlp", "hf")
NORM_POSITIONS = ("pre", "post", "post_double")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a moelab model.

    kind: "lm" (MoETransformerLM), "vit" (MoEViT), "mlp" (MoEMLP) or "hf" (a Hugging Face
        MoE causal LM from ``hf_path``, patched by ``moelab.hf``; needs ``moelab[hf]``).
    hf_path: kind "hf": a checkpoint directory (fine-tune it) or a config.json (random init).
        The architecture fields above do not apply; default_moe, momentum,
        activation_checkpointing and moe.dispatch do.
    d_model, n_layers, n_heads: width, number of blocks, attention heads (lm/vit).
    moe_every: every ``moe_every``-th block has an MoE FFN, the others a dense FFN (1 = all;
        2 = every other, the V-MoE layout, counting so that the last block is MoE).
    first_dense: force block 0 to a dense FFN.  d_ff_dense: dense FFN width (default 4*d_model).
    moe: the MoE layer's settings (``[model.moe]``, a ``MoEConfig`` without d_model: the
        model's d_model is used).
    default_moe: Default MoE (``[model.default_moe]``), plugged into every MoE layer; None = off.
    max_seq_len: longest sequence (lm).  tie_embeddings: share input and output embeddings.
    patch_size, pool ("mean" | "cls"): ViT settings.
    skip_connections: residual connections in MoEMLP blocks (off for the Excitation paper's
        deep-MoE experiment).
    dropout: dropout probability.  activation_checkpointing: recompute blocks in backward.
    momentum: the MomentumSMoE combine rule across MoE layers.
    norm_position: "pre" (``h + F(LN(h))``, the default), "post" (``LN(h + F(h))``, the
        single-LN reading of the official MomentumSMoE code) or "post_double" (post, with the
        MoE sub-layer of the official code: ``LN(h + LN_in(h + update))``); lm, vit and mlp.
    """

    kind: str = "lm"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    moe_every: int = 1
    first_dense: bool = False
    d_ff_dense: int | None = None
    moe: MoEConfig = field(default_factory=MoEConfig)
    default_moe: DefaultMoEConfig | None = None
    max_seq_len: int = 256
    tie_embeddings: bool = True
    patch_size: int = 4
    pool: str = "mean"
    skip_connections: bool = True
    dropout: float = 0.0
    activation_checkpointing: bool = False
    momentum: MomentumConfig = field(default_factory=MomentumConfig)
    hf_path: str | None = None
    norm_position: str = "pre"

    def __post_init__(self) -> None:
        require(self.norm_position in NORM_POSITIONS, "norm_position", self.norm_position,
                f"choose one of {NORM_POSITIONS}")
        require(self.norm_position == "pre" or self.kind != "hf", "norm_position",
                self.norm_position, "a Hugging Face model keeps its own block form")
        require(self.kind in MODEL_KINDS, "kind", self.kind,
                 f"choose one of {MODEL_KINDS}")
        require((self.kind == "hf") == (self.hf_path is not None), "hf_path", self.hf_path,
                "set it exactly when model.kind='hf' (a HF checkpoint dir or config.json)")
        for name in ("d_model", "n_layers", "n_heads", "moe_every", "max_seq_len", "patch_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value,
                     "need a positive int")
        if self.kind != "mlp":
            require(self.d_model % self.n_heads == 0, "n_heads", self.n_heads,
                     f"must divide d_model={self.d_model}")
        if self.d_ff_dense is not None:
            require(self.d_ff_dense >= 1, "d_ff_dense", self.d_ff_dense, "need >= 1")
        require(self.pool in ("mean", "cls"), "pool", self.pool, "choose 'mean' or 'cls'")
        require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "need 0 <= p < 1")
        require(isinstance(self.moe, MoEConfig), "moe", self.moe, "need a MoEConfig")
        require(self.moe.d_model in (None, self.d_model), "moe.d_model", self.moe.d_model,
                f"leave it unset (the model's d_model={self.d_model} is used)")
        if self.moe.routing == "expert_choice":
            require(self.kind != "hf", "moe.routing", self.moe.routing,
                    "a Hugging Face model keeps its own Top-K router; use routing='top_k'")
            require(self.kind != "lm" or self.moe.choice_group == "position",
                    "moe.choice_group", self.moe.choice_group,
                    "a causal LM needs choice_group='position' (batch-wide expert choice lets "
                    "later tokens decide which experts earlier tokens get)")
        require(self.default_moe is None or isinstance(self.default_moe, DefaultMoEConfig),
                "default_moe", self.default_moe, "need a DefaultMoEConfig or None")
        n_moe = len(self.moe_block_indices())
        require(n_moe >= 1, "moe_every", self.moe_every, "leaves no MoE block")
        if self.momentum.rule == "adam":
            require(self.momentum.adam_layers <= n_moe, "momentum.adam_layers",
                     self.momentum.adam_layers, f"need <= number of MoE layers ({n_moe})")
        require(self.skip_connections or self.kind == "mlp", "skip_connections",
                 self.skip_connections, "only the mlp model can drop its residual connections")
        require(self.skip_connections or self.momentum.rule == "none",
                 "skip_connections", self.skip_connections,
                 f"momentum rule {self.momentum.rule!r} updates a residual stream; "
                 "use skip_connections=True or momentum rule 'none'")

    def moe_config(self) -> MoEConfig:
        """The MoEConfig of every MoE block (``moe`` with the model's d_model)."""
        return dataclasses.replace(self.moe, d_model=self.d_model)

    def moe_block_indices(self) -> list[int]:
        """Indices of the blocks whose FFN is an MoE layer."""
        return [i for i in range(self.n_layers)
                if (self.n_layers - 1 - i) % self.moe_every == 0
                and not (self.first_dense and i == 0)]
