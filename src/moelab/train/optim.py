"""The optimizer of a run (``[optim]``): AdamW / Adam / SGD over two parameter groups (weight
decay on matrices only), Excitation hooked onto it when configured, and the learning-rate
schedule.

    opt, exc = build_optimizer(model, cfg.optim, all_reduce_counts=False)
    lr = set_lr(opt, cfg.optim, step, cfg.train.steps)       # before each step
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from moelab.config import OptimConfig

__all__ = ["build_optimizer", "set_lr"]


def build_optimizer(model: nn.Module, ocfg: OptimConfig, *, all_reduce_counts: bool,
                    device: torch.device | None = None) -> tuple[torch.optim.Optimizer, Any]:
    """``(optimizer, excitation)`` for ``model``'s trainable parameters. Parameters with two
    or more dimensions get ``weight_decay``, the others none. The optimizer is torch's fused
    implementation when ``optim.fused`` says so (None: when ``device`` is CUDA); a fused
    optimizer skips a step on the device when ``optimizer.found_inf`` is set (what
    ``Trainer.train_step`` uses to avoid host syncs). ``excitation`` is None unless
    ``optim.excitation`` is set; then it is hooked onto the optimizer (its step applies Φ, its
    state_dict carries Excitation's state), found by the model itself when it knows how
    (``build_excitation``: ``moelab.hf``), and ``all_reduce_counts`` makes its utilization the
    global batch's (data parallel)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": ocfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = ocfg.fused if ocfg.fused is not None else (
        device is not None and device.type == "cuda")
    kw = {"fused": True} if fused else {}
    opt: torch.optim.Optimizer
    if ocfg.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=ocfg.lr, betas=ocfg.betas, eps=ocfg.eps, **kw)
    elif ocfg.name == "adam":
        opt = torch.optim.Adam(groups, lr=ocfg.lr, betas=ocfg.betas, eps=ocfg.eps, **kw)
    else:
        opt = torch.optim.SGD(groups, lr=ocfg.lr, momentum=ocfg.momentum,
                              nesterov=ocfg.nesterov and ocfg.momentum > 0, **kw)
    for g in opt.param_groups:
        g["initial_lr"] = ocfg.lr
    excitation = None
    if ocfg.excitation is not None:
        from moelab.methods.excitation import Excitation

        build = getattr(model, "build_excitation", None)  # models finding their own experts
        excitation = (build(opt, ocfg.excitation) if build is not None
                      else Excitation(opt, model, config=ocfg.excitation))
        excitation.all_reduce_counts = all_reduce_counts
    return opt, excitation


def set_lr(optimizer: torch.optim.Optimizer, ocfg: OptimConfig, step: int, total: int
           ) -> float:
    """Set every group's lr to the schedule's value for 0-based step ``step`` of ``total``;
    returns it."""
    lr = ocfg.lr * ocfg.lr_factor(step, total)
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr
