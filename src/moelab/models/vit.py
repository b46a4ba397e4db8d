"""Vision transformer classifier with MoE FFNs (V-MoE layout with ``moe_every=2``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moelab.models.blocks import (
    INIT_STD,
    ModelOutput,
    MoEModel,
    RMSNorm,
    SelfAttention,
    require_float_input,
)
from moelab.models.config import ModelConfig


class MoEViT(MoEModel):
    """Patch embedding (conv, stride = ``cfg.patch_size``) + learned position embedding,
    pre-norm (RMSNorm) blocks with bidirectional attention, MoE FFN at
    ``cfg.moe_block_indices()``, final norm, mean-pool (or CLS token, ``cfg.pool="cls"``) and a
    linear head.

    forward(images [B, C, H, W] float, (C, H, W) = image_shape) ->
    ModelOutput(logits [B, n_classes], aux_loss, moe_losses). H and W must be multiples of
    ``patch_size`` (e.g. 28x28x1 or 32x32x3 with patch 4).
    """

    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, int, int],
                 n_classes: int) -> None:
        super().__init__(cfg)
        if (not isinstance(image_shape, (tuple, list)) or len(image_shape) != 3
                or not all(isinstance(s, int) and s >= 1 for s in image_shape)):
            raise ValueError(f"image_shape={image_shape!r} is invalid: need (C, H, W) ints")
        c, height, width = image_shape
        p = cfg.patch_size
        if height % p or width % p:
            g = math.gcd(height, width)
            fits = ", ".join(str(d) for d in range(1, g + 1) if g % d == 0)
            raise ValueError(f"model.patch_size={p} is invalid for {height}x{width} images "
                             f"(C, H, W = {tuple(image_shape)}): it must divide H and W; "
                             f"choose one of {fits}")
        if not isinstance(n_classes, int) or n_classes < 1:
            raise ValueError(f"n_classes={n_classes!r} is invalid: need a positive int")
        self.image_shape = tuple(image_shape)
        self.n_classes = n_classes
        n_tokens = (height // p) * (width // p) + (cfg.pool == "cls")
        self.patch_embed = nn.Conv2d(c, cfg.d_model, kernel_size=p, stride=p)
        self.pos_emb = nn.Parameter(torch.randn(1, n_tokens, cfg.d_model) * INIT_STD)
        self.cls_token = (nn.Parameter(torch.zeros(1, 1, cfg.d_model))
                          if cfg.pool == "cls" else None)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        out_std = INIT_STD / (2 * cfg.n_layers) ** 0.5
        self._build_blocks(lambda: SelfAttention(cfg.d_model, cfg.n_heads, causal=False,
                                                 rope=None, dropout=cfg.dropout,
                                                 out_std=out_std))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, n_classes)

    def forward(self, images: Tensor) -> ModelOutput:
        require_float_input(images, "images")
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images shape={tuple(images.shape)} is invalid: need "
                             f"[B, {', '.join(map(str, self.image_shape))}] (image_shape)")
        h = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, D]
        if self.cls_token is not None:
            h = torch.cat((self.cls_token.expand(h.shape[0], -1, -1), h), dim=1)
        h = self.drop(h + self.pos_emb)
        h, aux, losses = self._run_blocks(h)
        h = self.norm(h)
        pooled = h[:, 0] if self.cls_token is not None else h.mean(dim=1)
        return ModelOutput(self.head(pooled), aux, losses)
