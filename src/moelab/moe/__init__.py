"""The sparse MoE layer, method-free apart from the Default MoE option."""

from moelab.moe.config import DefaultMoEConfig, MoEConfig
from moelab.moe.dispatch import DispatchPlan, expert_capacity, plan_dispatch
from moelab.moe.experts import Experts, ExpertsOutput
from moelab.moe.layer import MoELayer, MoELosses, MoEOutput, RoutingStats
from moelab.moe.router import Routing, TopKRouter, load_balance_loss, router_z_loss

__all__ = [
    "DefaultMoEConfig", "DispatchPlan", "Experts", "ExpertsOutput", "MoEConfig", "MoELayer",
    "MoELosses", "MoEOutput", "Routing", "RoutingStats", "TopKRouter", "expert_capacity",
    "load_balance_loss", "plan_dispatch", "router_z_loss",
]
