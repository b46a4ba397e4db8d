"""Decoder-only MoE transformer language model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.models.blocks import INIT_STD, ModelOutput, MoEModel, RMSNorm, Rotary, SelfAttention
from moelab.models.config import ModelConfig


def check_token_ids(ids: Tensor, vocab_size: int, what: str = "token ids") -> None:
    """Raise ValueError unless every id in ``ids`` is in [0, vocab_size) (syncs with the host
    once: call it per data split, not per step)."""
    if not ids.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(ids.long()))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{what} range [{lo}, {hi}] is invalid: need ids in [0, {vocab_size})")


class MoETransformerLM(MoEModel):
    """Pre-norm (RMSNorm) decoder-only transformer with causal attention and RoPE.

    Blocks at ``cfg.moe_block_indices()`` have an MoE FFN (``cfg.moe_config()``), the others a
    dense SwiGLU of width ``cfg.d_ff_dense`` (default 4*d_model). Embeddings tied to the output
    head if ``cfg.tie_embeddings``. Init: GPT-2 style (normal 0.02; residual output projections
    0.02/sqrt(2*n_layers)); the MoE layers keep their own init.

    forward(idx [B, S] int64 (or int32), S <= max_seq_len, ids in [0, vocab_size)) ->
    ModelOutput(logits [B, S, vocab_size], aux_loss, moe_losses).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__(cfg)
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size!r} is invalid: need a positive int")
        self.vocab_size = vocab_size
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        nn.init.normal_(self.tok_emb.weight, std=INIT_STD)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        rope = Rotary(cfg.d_model // cfg.n_heads, cfg.max_seq_len)
        out_std = INIT_STD / (2 * cfg.n_layers) ** 0.5
        self._build_blocks(lambda: SelfAttention(cfg.d_model, cfg.n_heads, causal=True,
                                                 rope=rope, dropout=cfg.dropout,
                                                 out_std=out_std))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.head.weight, std=INIT_STD)

    #: Check every forward's token ids against the vocabulary (a debug aid: one device->host
    #: sync per forward on a GPU). Off by default: the Trainer checks each data split once
    #: with :func:`check_token_ids`.
    check_token_range: bool = False

    def _check_input(self, idx: Tensor) -> None:
        if not isinstance(idx, Tensor) or idx.dtype not in (torch.int64, torch.int32):
            dtype = getattr(idx, "dtype", type(idx).__name__)
            raise ValueError(f"token ids dtype={dtype} is invalid: need int64 token ids")
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"token ids shape={tuple(idx.shape)} is invalid: need [B, S]")
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} is invalid: longer than "
                             f"max_seq_len={self.cfg.max_seq_len}")
        if self.check_token_range:
            check_token_ids(idx, self.vocab_size)

    def forward(self, idx: Tensor) -> ModelOutput:
        self._check_input(idx)
        h = self.drop(self.tok_emb(idx))
        h, aux, losses = self._run_blocks(h)
        return ModelOutput(self.head(self.norm(h)), aux, losses)
