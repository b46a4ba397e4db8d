"""Excitation on Hugging Face MoE models: one expert group per sparse MoE block."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from moelab.hf.families import FAMILIES
from moelab.methods.excitation import Excitation as _Excitation
from moelab.methods.excitation import ExcitationConfig
from moelab.moe.dispatch import count_per_expert
from moelab.moe.layer import in_backward_pass

__all__ = ["Excitation"]


class Excitation(_Excitation):
    """``moelab.methods.excitation.Excitation`` attached to ``optimizer`` with one expert group
    per supported sparse MoE block of a ``transformers`` model (patched or not), named by the
    block's module path.

    Group parameters: every parameter of the block's experts module shaped [E, ...]
    (``gate_up_proj``, ``down_proj``, and GPT-OSS's biases): expert k's part is the slice [k].
    They are looked up in that module at every step, so the optimizer may be hooked before the
    model is sharded (``accelerate``'s FSDP2 replaces the parameters by DTensors, and each
    rank then rescales its own rows).
    Counts: a forward hook on the block's HF router adds the counts of its top-K indices [E] after
    every training-mode forward, skipping eval forwards and activation-checkpoint recomputes.
    Other arguments as for the base class (strategy, gamma, seed, ablation_base or config).
    """

    def __init__(self, optimizer: Optimizer, model: nn.Module, strategy: str = "positive_sum",
                 gamma: float = 1.0, seed: int = 0, ablation_base: str = "zero_sum", *,
                 config: ExcitationConfig | None = None) -> None:
        super().__init__(optimizer, None, strategy, gamma, seed, ablation_base, config=config)
        blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ in FAMILIES]
        if not blocks:
            self.remove_hooks()
            raise ValueError(f"{type(model).__name__}: no supported MoE block found (supported "
                             f"blocks: {', '.join(FAMILIES)})")
        for name, block in blocks:
            router = getattr(block, FAMILIES[type(block).__name__].router)
            n_experts = router.num_experts
            params = [p for p in block.experts.parameters()
                      if p.dim() >= 1 and p.shape[0] == n_experts]
            self.add_expert_group(batched_params=params, name=name, n_experts=n_experts,
                                  batched_owner=block.experts)
            self._hook_handles.append(
                router.register_forward_hook(self._router_count_hook(name, n_experts)))

    def _router_count_hook(self, name: str, n_experts: int) -> Callable[..., None]:
        ref = weakref.ref(self)

        def hook(module: nn.Module, _args: Any, output: Any) -> None:
            exc = ref()
            if exc is None or not module.training or in_backward_pass():
                return  # eval forward, or an activation-checkpoint recompute
            ids = output[2].detach().reshape(-1)
            # sorted + binary search: no host sync on a GPU, unlike bincount
            exc.record_counts(name, count_per_expert(torch.sort(ids)[0], n_experts))

        return hook
