"""What differs between the Hugging Face MoE families moelab patches.

Every supported sparse block holds a router module (returns ``(logits [T, E], weights [T, K],
indices [T, K])``) and an experts module; the families differ in where the block sits in the
decoder layer, how router probabilities are defined (for Default MoE's dense term and the
routing statistics), shared experts added after the routed ones, and the expert layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def _softmax(block: nn.Module, logits_TE: Tensor) -> Tensor:
    return torch.softmax(logits_TE.float(), dim=-1)


def _sigmoid(block: nn.Module, logits_TE: Tensor) -> Tensor:
    return torch.sigmoid(logits_TE.float())


def _qwen2_shared(block: nn.Module, x_TD: Tensor, y_TD: Tensor) -> Tensor:
    """Qwen2-MoE: ``y + sigmoid(shared_gate(x)) * shared_expert(x)`` (HF's order of ops)."""
    shared = block.shared_expert(x_TD)
    shared = torch.sigmoid(block.shared_expert_gate(x_TD)) * shared
    return y_TD + shared


def _deepseek_shared(block: nn.Module, x_TD: Tensor, y_TD: Tensor) -> Tensor:
    return y_TD + block.shared_experts(x_TD)


@dataclass(frozen=True)
class Family:
    """One HF MoE family.

    name: short name.  block: class name of its sparse MoE block.  router: the block's router
    attribute.  probs: ``(block, logits [T, E]) -> [T, E]`` fp32 router probabilities (what
    Default MoE weights the skipped experts' defaults by).  shared: adds the block's shared
    experts to the routed output ``(block, x_TD, y_TD) -> y_TD`` (None: no shared experts).
    moelab_experts: moelab's experts can run on this family's expert weights (SwiGLU,
    ``gate_up_proj [E, 2F, D]`` gate rows then up, ``down_proj [E, D, F]``, no biases); False:
    only ``dispatch="hf"`` (HF's own experts), so no Default MoE.  jitter: the block multiplies
    its input by uniform noise in training (Mixtral's ``router_jitter_noise``).
    tuple_output: the block returns ``(y, router_scores)`` instead of y (GPT-OSS).
    """

    name: str
    block: str
    router: str
    probs: Callable[[nn.Module, Tensor], Tensor]
    shared: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None
    moelab_experts: bool = True
    jitter: bool = False
    tuple_output: bool = False


FAMILIES: dict[str, Family] = {f.block: f for f in (
    Family("mixtral", "MixtralSparseMoeBlock", "gate", _softmax, jitter=True),
    Family("olmoe", "OlmoeSparseMoeBlock", "gate", _softmax),
    Family("qwen2_moe", "Qwen2MoeSparseMoeBlock", "gate", _softmax, _qwen2_shared),
    Family("qwen3_moe", "Qwen3MoeSparseMoeBlock", "gate", _softmax),
    Family("granitemoe", "GraniteMoeMoE", "router", _softmax),
    Family("deepseek_v3", "DeepseekV3MoE", "gate", _sigmoid, _deepseek_shared),
    Family("gpt_oss", "GptOssMLP", "router", _softmax, moelab_experts=False, tuple_output=True),
)}
