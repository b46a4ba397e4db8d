"""Multi-process training on ``torch.distributed``: data parallel (DDP) and expert parallel (EP).

Launch with ``torchrun``; every rank runs the same program. Layout of a world of W ranks with
``expert_parallel = P`` (P divides W):

* every rank trains on its own shard of each global batch (the batchers' ``shard``), and the
  non-expert parameters are replicated: DDP averages their gradients over all W ranks;
* ranks ``[g*P, (g+1)*P)`` form expert-parallel group g. In every MoE layer each rank of a group
  holds E/P experts (rank r: experts ``[(r % P) * E/P, (r % P + 1) * E/P)``); tokens travel to
  the rank owning their expert and back with a differentiable ``all_to_all_single``: uneven
  splits when dropless (one host read of the split sizes per layer), equal splits of padded
  expert slots when the layer has static slots (a capacity, expert choice or
  ``dispatch="padded"``: no host read) (:class:`ExpertParallelExperts`);
* expert parameters are left out of DDP. The W/P ranks holding the same experts (one per group)
  form a replica group; :func:`sync_expert_grads` sums expert gradients over it and divides by
  W, so every gradient equals the single-process gradient of the whole global batch.

Method state: each MoE layer's ``stats_reducer`` sums the routing counts (global-batch balance
loss) and Default MoE's (sum, mass) over all ranks; Excitation sums its token counts over all
ranks (``all_reduce_counts``); MomentumSMoE acts per token and needs nothing.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.moe.amp import autocast_off, compute_dtype
from moelab.moe.dispatch import (
    DispatchPlan,
    combine,
    combine_slots,
    gather_slots,
    padded_layout,
    segment_sum,
    take_slots,
)
from moelab.moe.dtensor import full, is_dtensor, local
from moelab.moe.experts import Experts, ExpertsOutput, padded_mlp
from moelab.moe.layer import MoELayer, in_backward_pass

__all__ = ["ExpertParallelExperts", "ParallelContext", "clip_grad_norm_", "dtensor_grad_norm",
           "enable_global_stats", "expert_parameters", "init_distributed", "make_context",
           "shard_experts", "sync_expert_grads", "world_size_from_env", "wrap_ddp"]


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits. ``ep_group``: the ranks sharing one copy of the experts (None
    when ``expert_parallel`` = 1); ``replica_group``: the ranks holding the same experts
    (None when there is one replica). ``parallel``: "ddp" or "fsdp" (``train.parallel``);
    ``mesh``: with "fsdp", the DeviceMeshes of ``moelab.distributed.fsdp.build_mesh``."""

    rank: int
    world_size: int
    local_rank: int
    expert_parallel: int
    ep_group: dist.ProcessGroup | None
    replica_group: dist.ProcessGroup | None
    parallel: str = "ddp"
    mesh: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_rank(self) -> int:
        return self.rank % self.expert_parallel


def make_context(expert_parallel: int = 1, local_rank: int | None = None) -> ParallelContext:
    """The context of this rank in the already initialised default process group; creates the
    expert-parallel and replica groups (every rank must call this, in the same order)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: call init_distributed() or "
                           "dist.init_process_group() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(expert_parallel, int) or expert_parallel < 1 or world % expert_parallel:
        raise ValueError(f"expert_parallel={expert_parallel!r} is invalid: need a positive "
                         f"divisor of the world size {world}")
    p = expert_parallel
    ep_group = replica_group = None
    if p > 1:
        for g in range(world // p):  # new_group is collective: all ranks create all groups
            group = dist.new_group(list(range(g * p, (g + 1) * p)))
            if rank // p == g:
                ep_group = group
    if 1 < p < world:
        for i in range(p):
            group = dist.new_group(list(range(i, world, p)))
            if rank % p == i:
                replica_group = group
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return ParallelContext(rank, world, local_rank, p, ep_group, replica_group)


def init_distributed(expert_parallel: int = 1, device_type: str = "cpu",
                     backend: str = "auto") -> ParallelContext:
    """Initialise the default process group from torchrun's environment (``env://``) unless it
    already is, and return this rank's context. backend "auto": nccl for cuda, gloo otherwise."""
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError("no torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, "
                               "MASTER_PORT): launch with `torchrun --nproc_per_node N ...`")
        if backend == "auto":
            backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":  # before nccl binds this process to a device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    ctx = make_context(expert_parallel)
    if device_type == "cuda":  # also when the caller created the process group
        torch.cuda.set_device(ctx.local_rank)
    return ctx


def sum_over(group: dist.ProcessGroup | None) -> Callable[[Tensor], Tensor]:
    """A function summing a tensor over ``group`` in place (None: the default group)."""

    def reduce(t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    return reduce


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with uneven splits; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup | None) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty(sum(in_splits), *grad_out.shape[1:])
        dist.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits,
                               group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup | None) -> Tensor:
    """Differentiable uneven all-to-all of the rows of ``x`` ([sum(in_splits), ...] ->
    [sum(out_splits), ...]); row block j of ``x`` goes to rank j of ``group``."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(nn.Module):
    """A drop-in for ``Experts`` that holds experts ``expert_range`` of E and exchanges rows
    with the other ranks of ``group``, which hold the rest (in rank order).

    Forward (same contract as ``Experts.forward``), two ways:

    * dropless (``plan.slots`` None): token rows gathered in ``plan`` order (grouped by global
      expert id) -> per-expert counts exchanged -> rows sent to their expert's rank -> run by
      the local experts (regrouped by local expert) -> sent back -> scaled by the routing
      weight and combined into [T, D]. Host syncs: one read per layer forward (the exchanged
      counts, ``.tolist()`` once: an uneven all-to-all needs its split sizes on the host; the
      local experts reuse them), none in an activation-checkpoint recompute (it reuses its
      forward's counts);
    * padded (``plan.slots`` = C: a capacity, expert choice or ``dispatch="padded"``): each
      rank sends its E*C slots (``moe.dispatch.padded_layout``; rank j's experts contiguous)
      with equal splits of E/P*C rows, runs its E/P experts as batched matmuls over
      [E/P, P*C, D] (padding rows are zero and give zero), sends them back with equal splits
      and combines its slots. No count exchange and no host read; it moves and computes
      E*C rows per rank instead of the routed ones (C/(T*K/E) times as many).

    The rows travel in the compute dtype (``moe.amp.compute_dtype``: bf16 under autocast).
    Default MoE's per-expert output sums (``sums_ED`` [E, D]) cover this rank's rows for all E
    experts; the layer's ``stats_reducer`` adds the other ranks'.
    """

    def __init__(self, local: Experts, n_experts: int, group: dist.ProcessGroup | None,
                 group_size: int, group_rank: int) -> None:
        super().__init__()
        if local.n_experts * group_size != n_experts:
            raise ValueError(f"{local.n_experts} local experts x {group_size} ranks != "
                             f"n_experts={n_experts}")
        self.local = local
        self.n_experts = n_experts
        self.group, self.group_size = group, group_size
        first = group_rank * local.n_experts
        self.expert_range = range(first, first + local.n_experts)
        #: rows sent to each rank of the group by the last forward (index = group rank)
        self.last_send_splits: list[int] = []
        # the last first-pass forward's (received counts [P, E/P], host counts): what an
        # activation-checkpoint recompute of that forward reuses
        self._counts: tuple[Tensor, list] | None = None

    def _exchange_counts(self, plan: DispatchPlan) -> tuple[Tensor, list]:
        """Rows per (rank, local expert) this rank sends and receives: the received counts
        recv_PE [P, E/P] on the device and ``[send, recv]`` as host lists ([2, P, E/P]) — one
        all-to-all and the layer's one host read. An activation-checkpoint recompute reuses
        those of the forward it recomputes (same routing, so the same counts): no exchange and
        no read."""
        if in_backward_pass() and self._counts is not None:
            return self._counts
        send_PE = plan.routed_counts.view(self.group_size, self.local.n_experts).contiguous()
        recv_PE = torch.empty_like(send_PE)
        dist.all_to_all_single(recv_PE, send_PE, group=self.group)
        self._counts = recv_PE, torch.stack([send_PE, recv_PE]).tolist()
        return self._counts

    def forward(self, x_TD: Tensor, plan: DispatchPlan, row_weight_N: Tensor | None = None,
                track_out_norm: bool = False) -> ExpertsOutput:
        if plan.slots is not None:
            return self._padded(x_TD, plan, row_weight_N, track_out_norm)
        n_local, n_ranks = self.local.n_experts, self.group_size
        recv_PE, counts = self._exchange_counts(plan)
        send_splits = [sum(row) for row in counts[0]]
        recv_splits = [sum(row) for row in counts[1]]
        self.last_send_splits = send_splits
        # the rows travel in the compute dtype (bf16 under autocast), not the fp32 stream's
        x_TD = x_TD.to(compute_dtype(x_TD))
        x_recv = all_to_all(x_TD.index_select(0, plan.token_idx), recv_splits, send_splits,
                            self.group)
        # received rows: by source rank, then by local expert -> regroup by local expert; the
        # local experts' combine through this permutation puts their outputs back in recv order
        ids = torch.arange(n_local, device=x_TD.device).repeat(n_ranks)
        local_ids = torch.repeat_interleave(ids, recv_PE.reshape(-1),
                                            output_size=sum(recv_splits))
        sorted_ids, order = torch.sort(local_ids, stable=True)
        kept = recv_PE.sum(0)
        host_kept = tuple(sum(col) for col in zip(*counts[1], strict=True))
        ones = torch.ones(order.numel(), device=x_TD.device)
        local_plan = DispatchPlan(order, sorted_ids, ones, kept, kept,
                                  torch.cumsum(kept, 0).to(torch.int32), kept.new_zeros(()),
                                  host_counts=host_kept)
        y_recv = self.local(x_recv, local_plan).y_TD
        y_ND = all_to_all(y_recv, send_splits, recv_splits, self.group)
        y_TD = combine(y_ND * plan.weights.to(y_ND.dtype).unsqueeze(1), plan, x_TD.shape[0])
        sums_ED = norm_sums_E = None
        with torch.no_grad():
            rows = y_ND.detach().float()
            if track_out_norm:
                norms = rows.norm(dim=1)
                if plan.keep is not None:  # rows dropped by capacity were computed, not used
                    norms = norms * plan.keep
                norm_sums_E = segment_sum(norms, plan.routed_counts)
            if row_weight_N is not None:
                sums_ED = segment_sum(rows, plan.routed_counts, row_weight_N.float())
        return ExpertsOutput(y_TD, sums_ED, norm_sums_E)

    def _padded(self, x_TD: Tensor, plan: DispatchPlan, row_weight_N: Tensor | None,
                track_out_norm: bool) -> ExpertsOutput:
        """The padded exchange (class docstring): equal splits, static shapes, no host read."""
        n_local, n_ranks, n_slots = self.local.n_experts, self.group_size, plan.slots
        n_tokens, d_model = x_TD.shape
        x_TD = x_TD.to(compute_dtype(x_TD))
        layout = padded_layout(plan, n_tokens)
        splits = [n_local * n_slots] * n_ranks
        self.last_send_splits = splits
        x_recv = all_to_all(gather_slots(x_TD, layout.token_S), splits, splits, self.group)
        # received [P, E/P, C, D] (by source rank) -> [E/P, P*C, D] (by local expert) and back
        x_local = x_recv.view(n_ranks, n_local, n_slots, d_model).transpose(0, 1)
        w_in, w_out = self.local.weights()
        with autocast_off(x_TD.device.type):
            x_local = x_local.reshape(-1, d_model)
            y_local, _ = padded_mlp(x_local, w_in, w_out, x_local.new_ones(x_local.shape[0]),
                                    self.local.activation)
        y_send = y_local.view(n_local, n_ranks, n_slots, d_model).transpose(0, 1)
        y_SD = all_to_all(y_send.reshape(-1, d_model), splits, splits, self.group)
        weight_S = take_slots(plan.weights, layout.rows_S)
        y_TD = combine_slots(y_SD * weight_S.to(y_SD.dtype).unsqueeze(1), layout.token_S,
                             n_tokens)
        sums_ED = norm_sums_E = None
        with torch.no_grad():  # padding slots hold zero rows; dropped rows have no slot
            rows = y_SD.detach().float().view(self.n_experts, n_slots, d_model)
            if track_out_norm:
                norm_sums_E = rows.norm(dim=2).sum(1)
            if row_weight_N is not None:
                row_weight_S = take_slots(row_weight_N.float(), layout.rows_S)
                sums_ED = (rows * row_weight_S.view(self.n_experts, n_slots, 1)).sum(1)
        return ExpertsOutput(y_TD, sums_ED, norm_sums_E)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def shard_experts(model: nn.Module, ctx: ParallelContext) -> None:
    """Keep only this rank's experts in every MoE layer of ``model`` (in place): each layer's
    ``experts`` becomes an :class:`ExpertParallelExperts` holding slices of the full weights,
    so a model built with the same seed on every rank is the single-process model, sharded."""
    p = ctx.expert_parallel
    if p == 1:
        return
    for layer in moe_layers(model):
        full = layer.experts
        if not isinstance(full, Experts):
            raise ValueError("shard_experts: a layer is already sharded")
        if full.n_experts % p:
            raise ValueError(f"expert_parallel={p} is invalid: it must divide n_experts="
                             f"{full.n_experts}")
        n_local = full.n_experts // p
        lo = ctx.ep_rank * n_local
        local = Experts(n_local, full.d_model, full.d_ff, full.activation, full.backend)
        with torch.no_grad():
            local.w_in.copy_(full.w_in[lo:lo + n_local])
            local.w_out.copy_(full.w_out[lo:lo + n_local])
        local.to(full.w_in.device)
        layer.experts = ExpertParallelExperts(local, full.n_experts, ctx.ep_group, p, ctx.ep_rank)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of sharded experts (empty without expert parallelism)."""
    return [p for m in model.modules() if isinstance(m, ExpertParallelExperts)
            for p in m.parameters()]


def enable_global_stats(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Make every MoE layer sum its routing counts and Default MoE statistics over ``group``
    in training forwards (the global batch's balance loss and Ê)."""
    for layer in moe_layers(model):
        layer.stats_reducer = sum_over(group)


def wrap_ddp(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """``DistributedDataParallel`` over the non-expert parameters (sharded experts excluded)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    expert_ids = {id(p) for p in expert_parameters(model)}
    ignored = [name for name, p in model.named_parameters() if id(p) in expert_ids]
    if ignored:
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device_ids = None
    first = next(model.parameters())
    if first.device.type == "cuda":
        device_ids = [first.device.index]
    # the buffers (Default MoE's Ê) stay equal through the layers' reducers: no per-forward sync
    params = inspect.signature(DDP).parameters
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
               else {"broadcast_buffers": False})
    return DDP(model, device_ids=device_ids, **no_sync)


@torch.no_grad()
def sync_expert_grads(params: Iterable[Tensor], ctx: ParallelContext) -> None:
    """Expert gradients -> the single-process gradient of the global batch: sum over the
    replica group, divide by the world size (DDP's average over the non-expert ones)."""
    params = list(params)
    for p in params:  # a shard whose experts got no rows this step: zero gradient, as on one
        if p.grad is None:  # process, and the same all-reduce size on every replica
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    if ctx.replica_group is not None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.replica_group)
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))
    torch._foreach_div_(grads, float(ctx.world_size))


@torch.no_grad()
def clip_grad_norm_(params: list[Tensor], max_norm: float, ctx: ParallelContext | None,
                    expert_params: list[Tensor] | None = None) -> Tensor:
    """Global gradient norm (clipped to ``max_norm`` if > 0), as on one process: the sharded
    expert gradients' squared norms are summed over the expert-parallel group; DTensor
    gradients (FSDP) over their meshes (:func:`dtensor_grad_norm`)."""
    sharded = {id(p) for p in expert_params or ()}
    grads = [p.grad for p in params if p.grad is not None]
    if any(is_dtensor(g) for g in grads):
        total = dtensor_grad_norm(grads)
        if max_norm > 0:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_([local(g) for g in grads], coef)
        return total
    if ctx is None or not sharded or ctx.ep_group is None:
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not grads:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                     for g in grads]))
    replicated = [p.grad for p in params if p.grad is not None and id(p) not in sharded]
    own = [p.grad for p in params if p.grad is not None and id(p) in sharded]

    def sq_norm(gs: list[Tensor]) -> Tensor:
        if not gs:
            return torch.zeros((), device=grads[0].device, dtype=torch.float64)
        return torch.stack([g.double().square().sum() for g in gs]).sum()

    shard_sq = sq_norm(own)
    dist.all_reduce(shard_sq, op=dist.ReduceOp.SUM, group=ctx.ep_group)
    total = (sq_norm(replicated) + shard_sq).sqrt().float()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total


@torch.no_grad()
def dtensor_grad_norm(grads: list[Tensor]) -> Tensor:
    """The L2 norm [] (fp32, on every rank) of gradients that are DTensors, possibly on
    different meshes (FSDP's dense units and its experts): each mesh's norm from its local
    shards, reduced over that mesh (``full_tensor``), then combined."""
    by_mesh: dict[int, list[Tensor]] = {}
    for g in grads:
        by_mesh.setdefault(id(g.device_mesh) if is_dtensor(g) else 0, []).append(g)
    squares = []
    for group in by_mesh.values():
        norm = full(torch.nn.utils.get_total_norm(group, 2.0))
        squares.append(norm.double().square())
    return torch.stack(squares).sum().sqrt().float()
