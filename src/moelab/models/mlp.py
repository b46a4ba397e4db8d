"""Small MoE MLP classifier (flattened images or feature vectors)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from moelab.models.blocks import ModelOutput, MoEModel, RMSNorm, require_float_input
from moelab.models.config import ModelConfig


class MoEMLP(MoEModel):
    """Input projection (d_input -> d_model), ``n_layers`` blocks ``norm -> FFN -> combine``
    (MoE at ``cfg.moe_block_indices()``, dense SwiGLU elsewhere), final norm, linear head.

    ``cfg.skip_connections=False`` drops the residual: ``h = FFN(norm(h))`` (the Excitation
    paper's deep-MoE experiment). Neuron-level MoE (each hidden neuron an expert):
    ``d_ff=1, n_experts=H, top_k=K``. Each sample is one token, so the rule's state is [B, D].

    forward(x [B, d_input] or [B, *dims] with prod(dims) = d_input, float) ->
    ModelOutput(logits [B, n_classes], aux_loss, moe_losses).
    """

    def __init__(self, cfg: ModelConfig, d_input: int, n_classes: int) -> None:
        super().__init__(cfg)
        if not isinstance(d_input, int) or d_input < 1:
            raise ValueError(f"d_input={d_input!r} is invalid: need a positive int")
        if not isinstance(n_classes, int) or n_classes < 1:
            raise ValueError(f"n_classes={n_classes!r} is invalid: need a positive int")
        self.d_input, self.n_classes = d_input, n_classes
        self.in_proj = nn.Linear(d_input, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self._build_blocks(lambda: None, residual=cfg.skip_connections)
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, n_classes)

    def forward(self, x: Tensor) -> ModelOutput:
        require_float_input(x, "input")
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.d_input:
            raise ValueError(f"input shape={tuple(x.shape)} is invalid: need [B, {self.d_input}]"
                             f" or [B, *dims] with prod(dims) = d_input={self.d_input}")
        h = self.drop(self.in_proj(x.reshape(x.shape[0], self.d_input)))
        h, aux, losses = self._run_blocks(h)
        return ModelOutput(self.head(self.norm(h)), aux, losses)
