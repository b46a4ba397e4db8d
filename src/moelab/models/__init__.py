"""moelab models: transformer LM, ViT classifier and MLP classifier, all built on one MoELayer
and one block code path (``Block``), with the MomentumSMoE combine rule from ``cfg.momentum``.

    model = build_model(ModelConfig(kind="lm", ...), vocab_size=256)
    out = model(idx_BS)            # ModelOutput(logits, aux_loss, moe_losses)
    loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten()) + out.aux_loss
"""

from __future__ import annotations

import math

from torch import nn

from moelab.models.blocks import Block, DenseSwiGLU, ModelOutput, MoEModel, RMSNorm
from moelab.models.config import ModelConfig
from moelab.models.lm import MoETransformerLM
from moelab.models.mlp import MoEMLP
from moelab.models.vit import MoEViT

__all__ = [
    "Block", "DenseSwiGLU", "MoEMLP", "MoEModel", "MoETransformerLM", "MoEViT", "ModelConfig",
    "ModelOutput", "RMSNorm", "build_model", "model_blocks",
]


def build_model(cfg: ModelConfig, *, vocab_size: int | None = None,
                image_shape: tuple[int, ...] | None = None,
                n_classes: int | None = None) -> nn.Module:
    """The model ``cfg.kind`` names.

    "lm" and "hf" need ``vocab_size``; "vit" needs ``image_shape=(C, H, W)`` and ``n_classes``;
    "mlp" needs ``image_shape`` (any input shape; d_input = its product) and ``n_classes``.
    """
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg={cfg!r} is invalid: need a moelab.models.ModelConfig")

    def need(name: str, value: object) -> None:
        if value is None:
            raise ValueError(f"{name}=None is invalid: build_model(kind={cfg.kind!r}) needs "
                             f"{name}")

    if cfg.kind == "lm":
        need("vocab_size", vocab_size)
        return MoETransformerLM(cfg, vocab_size)
    if cfg.kind == "hf":
        need("vocab_size", vocab_size)
        from moelab.hf.model import build_hf_lm  # imports transformers only here

        return build_hf_lm(cfg, vocab_size)
    need("image_shape", image_shape)
    need("n_classes", n_classes)
    if cfg.kind == "vit":
        return MoEViT(cfg, tuple(image_shape), n_classes)
    return MoEMLP(cfg, math.prod(image_shape), n_classes)


def model_blocks(model: nn.Module) -> tuple[list[nn.Module], bool]:
    """The repeated blocks of ``model`` and whether they are moelab's own: a moelab model's
    ``blocks``, or the decoder layers of a Hugging Face model (``moelab.hf``); empty if it has
    neither."""
    blocks = getattr(model, "blocks", None)
    if blocks is not None:
        return list(blocks), True
    hf = getattr(model, "hf", model)
    layers = getattr(getattr(hf, "model", None), "layers", None)
    return (list(layers) if layers is not None else []), False
