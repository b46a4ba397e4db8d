"""The sparse MoE layer, method-free (nothing here imports ``moelab.methods``).

Shape suffixes used in names throughout ``moe/`` (``x_TD``, ``probs_TE``, ``w_in`` [E, D, 2F]):

    T  tokens in the forward (batch * sequence, flattened)
    D  model width (d_model)
    E  experts (n_experts)
    K  experts chosen per token (top_k; under expert choice it only sets the capacity)
    M  tokens each expert picks per forward under expert choice (choice groups x capacity)
    F  expert hidden width (d_ff; SwiGLU's fused first projection is 2F wide)
    N  kept token->expert assignments (T*K when dropless), grouped by expert
    C  experts in one chunk of the CPU expert loop (a slice of E)
    I, O  input / output width of a generic per-expert matmul (D or F, F or D)

Methods plug in through ``LayerMethod`` (see ``moe.layer``).
"""

from moelab.moe.config import MoEConfig
from moelab.moe.dispatch import DispatchPlan, expert_capacity, plan_dispatch, plan_expert_choice
from moelab.moe.experts import Experts, ExpertsOutput
from moelab.moe.layer import ExpertSums, LayerMethod, MoELayer, MoELosses, MoEOutput, RoutingStats
from moelab.moe.router import (
    ExpertChoice,
    ExpertChoiceRouter,
    Routing,
    TopKRouter,
    load_balance_loss,
    router_z_loss,
)

__all__ = [
    "DispatchPlan", "ExpertChoice", "ExpertChoiceRouter", "ExpertSums", "Experts",
    "ExpertsOutput", "LayerMethod", "MoEConfig", "MoELayer", "MoELosses", "MoEOutput",
    "Routing", "RoutingStats", "TopKRouter",
    "expert_capacity", "load_balance_loss", "plan_dispatch", "plan_expert_choice",
    "router_z_loss",
]
