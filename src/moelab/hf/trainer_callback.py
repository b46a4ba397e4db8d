"""moelab's methods inside ``transformers.Trainer`` (and TRL's trainers, which are Trainers).

    model = AutoModelForCausalLM.from_pretrained(DIR)
    moelab.hf.patch(model, default_moe=DefaultMoEConfig(), momentum=MomentumConfig("heavy_ball"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    exc = moelab.hf.Excitation(opt, model, strategy="positive_sum")     # hooks onto opt
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, sched))
    MoelabCallback(exc).attach(trainer)
    trainer.train()

The patched model and the hooked optimizer need nothing else on one process: the Trainer
calls ``optimizer.step()`` (through accelerate's wrapper), whose hooks apply Φ; Default MoE and
MomentumSMoE live in the forward. The callback adds what several ranks need and what is worth
logging:

* ``on_train_begin`` under torch.distributed (accelerate's DDP, FSDP on GPUs): every MoE layer
  sums its routing counts and Default MoE statistics over the ranks (``stats_reducer``) and
  Excitation sums its counts (``all_reduce_counts``), so Ê and Φ are the global batch's and
  equal on every rank;
* ``on_log``: each logged record gains ``moe/<block>/phi_min``, ``phi_max`` (Excitation's last
  multipliers), ``moe/<block>/default_ema_norm`` (mean ‖Ê_e‖) and, when learnable,
  ``moe/momentum_mu_<i>`` / ``moe/momentum_gamma_<i>``, in the record kept in
  ``trainer.state.log_history`` and for the reporting callbacks (TensorBoard, W&B) that run after
  it; :meth:`MoelabCallback.attach` puts it first, so all of them see the values.

This module imports ``transformers``; ``moelab.hf`` imports it only when ``MoelabCallback`` is
asked for.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from moelab.moe.dtensor import full

__all__ = ["MoelabCallback", "routing_logs"]


def routing_logs(model: nn.Module, excitation: Any = None) -> dict[str, float]:
    """The per-block numbers ``MoelabCallback.on_log`` adds (see the module docstring) for a
    model patched by ``moelab.hf.patch`` and an optional ``moelab.hf.Excitation``."""
    from moelab.hf.patch import MOMENTUM_ATTR, patched_blocks

    out: dict[str, float] = {}
    for name, phi in (excitation.last_multipliers if excitation is not None else {}).items():
        out[f"moe/{name}/phi_min"] = float(phi.min())
        out[f"moe/{name}/phi_max"] = float(phi.max())
    for name, block in patched_blocks(model):
        method = getattr(block.moelab, "method", None) if block.moelab is not None else None
        if method is not None and hasattr(method, "value"):
            out[f"moe/{name}/default_ema_norm"] = float(method.value().norm(dim=1).mean())
    rule = model._modules.get(MOMENTUM_ATTR)
    if getattr(rule, "learnable", False):
        for what in ("mu", "gamma"):
            values = full(getattr(rule, what).detach()).float().cpu().tolist()
            out.update({f"moe/momentum_{what}_{i}": v for i, v in enumerate(values)})
    return out


class MoelabCallback(TrainerCallback):
    """See the module docstring. ``excitation``: the ``moelab.hf.Excitation`` hooked onto the
    Trainer's optimizer (None: no Excitation)."""

    def __init__(self, excitation: Any = None) -> None:
        self.excitation = excitation

    def attach(self, trainer: Any) -> MoelabCallback:
        """Put this callback first in ``trainer``'s callbacks (before the reporting ones, so
        they log its values); returns it."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    @staticmethod
    def _unwrapped(model: nn.Module) -> nn.Module:
        while hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module  # DDP / accelerate wrappers
        return model

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        from moelab.distributed.ddp_ep import enable_global_stats
        from moelab.hf.patch import patched_blocks

        if model is None or not patched_blocks(self._unwrapped(model)):
            raise ValueError("MoelabCallback: the Trainer's model is not patched by "
                             "moelab.hf.patch (patch it before building the Trainer)")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            model = self._unwrapped(model)
            enable_global_stats(model)
            if self.excitation is not None:
                self.excitation.all_reduce_counts = True

    @torch.no_grad()
    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               model: nn.Module | None = None, **kwargs: Any) -> None:
        if logs is None or model is None:
            return
        values = routing_logs(self._unwrapped(model), self.excitation)
        logs.update(values)
        if state.log_history:  # the record Trainer.log appended just before calling on_log
            state.log_history[-1].update(values)
