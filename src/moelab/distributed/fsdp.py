"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for moelab models: ``train.parallel = "fsdp"``.

Layout of a world of W ranks with ``expert_parallel = P`` (:func:`build_mesh`): a 2-D
DeviceMesh of shape [W/P, P] with dims ``("dp_shard_mod_ep", "ep")``. Rank r sits at
(r // P, r % P), so dim "ep" is the expert-parallel group of ``moelab.distributed.ddp_ep`` (P
consecutive ranks: one copy of the experts, tokens exchanged by all-to-all) and dim
"dp_shard_mod_ep" the W/P ranks holding the same experts. Its flattening, "dp_shard", is all
W ranks.

:func:`shard_model` (torchtitan's order: expert parallel, then ``fully_shard`` per block, then
the root):

* expert weights, with P > 1: each rank's E/P experts become a DTensor on dim "ep"
  (``Shard(0)``: the global [E, ...] tensor, what a checkpoint holds), then ``fully_shard``
  of the layer's experts over "dp_shard_mod_ep" splits each rank's experts again over their
  W/P replicas. Their gradients are summed over the replicas and divided by W (what
  ``moelab.distributed.ddp_ep.sync_expert_grads`` does under DDP), so they equal one process's.
  With P = 1 the experts are ordinary parameters of their block;
* every block (a moelab model's ``blocks``, a Hugging Face model's decoder layers): one FSDP
  unit over "dp_shard" (every parameter's dim 0 split over all W ranks, all-gathered before
  the block runs and freed after, gradients reduce-scattered and averaged over the ranks);
* the root (embeddings, final norm, head, MomentumSMoE's learnable mu/gamma): one more unit.

Buffers (Default MoE's EMA) are not sharded: every rank updates its copy from statistics
summed over all ranks (the layers' ``stats_reducer``), so the copies stay equal, as under DDP.
With ``train.precision = "bf16"`` the block and expert units compute with bf16 parameters and
every unit reduces gradients in fp32 (``MixedPrecisionPolicy``); the sharded parameters and the
optimizer state stay fp32. The numerics are one GPU's under bf16 autocast: no unit casts its
inputs (:func:`mixed_precision`), so the residual stream, MomentumSMoE's state and the routing
weights keep their dtype; the root unit (embeddings, final norm, head, learnable mu/gamma) and
each router (a unit of its own, except in a compiled block) keep fp32 parameters, so the
stream starts in fp32 and the router and Default MoE compute in fp32; the blocks' bf16
parameters are what autocast would cast them to. The cost: the root's all-gather moves fp32
(twice the bytes of bf16). With ``train.grad_accum`` > 1 only the last micro-batch
reduce-scatters (``set_requires_gradient_sync``, in ``moelab.train.trainer``); each block
prefetches the next block's all-gathers (``set_modules_to_forward_prefetch``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from moelab.distributed.ddp_ep import ParallelContext

__all__ = ["DP_REPLICA", "DP_SHARD", "EP", "Meshes", "build_mesh", "mixed_precision", "reshard",
           "shard_model"]

#: DeviceMesh dim names: the ranks holding the same experts, the expert-parallel group, and
#: the flattening of both (all ranks).
DP_REPLICA, EP, DP_SHARD = "dp_shard_mod_ep", "ep", "dp_shard"


@dataclass(frozen=True)
class Meshes:
    """The DeviceMeshes of a run: ``root`` [W/P, P] (dims "dp_shard_mod_ep", "ep") and
    ``dp_shard``, its flattening (all W ranks). ``meshes[name]`` is the 1-D mesh of a dim."""

    root: DeviceMesh
    dp_shard: DeviceMesh

    def __getitem__(self, name: str) -> DeviceMesh:
        return self.dp_shard if name == DP_SHARD else self.root[name]


def build_mesh(world_size: int, expert_parallel: int, device_type: str) -> Meshes:
    """The [W/P, P] DeviceMesh of this module's docstring over the default process group
    (collective: every rank calls it, in the same order), with the flattened "dp_shard"."""
    from torch.distributed.device_mesh import init_device_mesh

    p = expert_parallel
    if world_size % p:
        raise ValueError(f"train.expert_parallel={p} is invalid: need a divisor of the world "
                         f"size {world_size}")
    root = init_device_mesh(device_type, (world_size // p, p), mesh_dim_names=(DP_REPLICA, EP))
    return Meshes(root, root[(DP_REPLICA, EP)]._flatten(DP_SHARD))


def mixed_precision(precision: str, keep_fp32: bool = False) -> object:
    """FSDP2's MixedPrecisionPolicy for a run's resolved ``precision``: bf16 parameters in
    compute and fp32 gradient reduction for "bf16" (``keep_fp32``: fp32 parameters, for the
    routers); the parameters' own dtype otherwise. Never ``cast_forward_inputs``: FSDP2 would
    cast every floating tensor of a unit's arguments, recursing into dataclasses and
    NamedTuples (the residual stream, MomentumSMoE's state, the dispatch plan's routing
    weights), where one-GPU autocast keeps them fp32; the model casts what it computes in
    bf16 itself (autocast runs around the forward under FSDP too)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=None if keep_fp32 else torch.bfloat16,
                                    reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy(cast_forward_inputs=False)


def _distribute_experts(model: nn.Module, ctx: ParallelContext, mp_policy: object,
                        gloo: bool) -> None:
    """Expert parallel under FSDP: each ``ExpertParallelExperts``'s local weights as DTensors
    on dim "ep" (global [E, ...]), then one FSDP unit per layer's experts over the replicas,
    with gradients summed and divided by the world size."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    from moelab.distributed.ddp_ep import ExpertParallelExperts

    mesh = ctx.mesh
    for module in [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]:
        local = module.local
        for name in ("w_in", "w_out"):
            weight = getattr(local, name)
            dt = DTensor.from_local(weight.detach(), mesh[EP], [Shard(0)], run_check=False)
            setattr(local, name, nn.Parameter(dt, requires_grad=weight.requires_grad))
        fully_shard(module, mesh=mesh[DP_REPLICA], mp_policy=mp_policy)
        module.set_gradient_divide_factor(float(ctx.world_size))
        # the divide factor is a PREMUL_SUM reduce-scatter, which gloo lacks: sum, then
        # divide. Not with one replica: FSDP then copies instead of reducing and would
        # divide twice (torch 2.13)
        if gloo and ctx.world_size > ctx.expert_parallel:
            module.set_force_sum_reduction_for_comms(True)


def shard_model(model: nn.Module, ctx: ParallelContext, precision: str = "fp32") -> nn.Module:
    """Apply FSDP2 to ``model`` in place (experts are already split over the expert-parallel
    ranks by ``moelab.distributed.ddp_ep.shard_experts``; steps: module docstring). Returns
    ``model``, now also an ``FSDPModule``: the module to train, evaluate and checkpoint."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from moelab.models import model_blocks

    if ctx.mesh is None:
        raise ValueError("shard_model needs a ParallelContext with a mesh (build_mesh)")
    blocks, _ = model_blocks(model)
    if not blocks:
        raise ValueError(f"train.parallel='fsdp': {type(model).__name__} has no blocks to shard "
                         "(need a moelab model's `blocks` or an HF model's decoder layers)")
    mp_policy = mixed_precision(precision)
    gloo = dist.get_backend() == "gloo"
    if ctx.expert_parallel > 1:
        _distribute_experts(model, ctx, mp_policy, gloo)
    fp32 = mixed_precision(precision, keep_fp32=True)
    for block in blocks:
        # fp32 router weights, as under one-GPU autocast; not inside a compiled block (FSDP's
        # hooks of a nested unit would break its graph: there the router computes in fp32 from
        # the bf16-gathered weights)
        compiled = getattr(block, "_compiled_call_impl", None) is not None
        for router in [] if compiled else _routers(block):
            fully_shard(router, mesh=ctx.mesh[DP_SHARD], mp_policy=fp32)
        fully_shard(block, mesh=ctx.mesh[DP_SHARD], mp_policy=mp_policy)
    # the root in fp32: the embedding starts the residual stream in fp32 (as one GPU's
    # autocast, which leaves lookups alone), the head still computes in bf16 under autocast
    fully_shard(model, mesh=ctx.mesh[DP_SHARD], mp_policy=fp32)
    _prefetch(blocks)
    return model


def _routers(block: nn.Module) -> list[nn.Module]:
    """The routers (with parameters) of the MoE layers in ``block``."""
    from moelab.moe.layer import MoELayer

    return [m.router for m in block.modules()
            if isinstance(m, MoELayer) and any(True for _ in m.router.parameters())]


def _prefetch(blocks: list[nn.Module]) -> None:
    """Explicit forward prefetch (as torchtitan does for MoE): when block i starts its
    forward, FSDP already issues the all-gathers of block i+1 and of its nested units (the
    expert-parallel experts: the largest all-gathers; the routers), instead of waiting for the
    CPU to reach them."""
    from torch.distributed.fsdp import FSDPModule

    for block, following in zip(blocks, blocks[1:], strict=False):
        units = [m for m in following.modules() if isinstance(m, FSDPModule)]
        block.set_modules_to_forward_prefetch(units)


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters FSDP keeps after a forward that had no backward (an
    evaluation: the root unit keeps its parameters gathered after its forward until the
    backward, and ``parameters()`` would give the gathered tensors, not the optimizer's). A
    no-op for a model without FSDP."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()
