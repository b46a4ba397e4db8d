"""From a built model to the model that trains: the one place that decides where and how the
model runs (torchtitan's ``parallelize_fn`` is the pattern).

:func:`wrap_model` applies, in this order:

1. **device**: ``model.to(device)``;
2. **expert sharding** (expert parallel, ``train.expert_parallel`` > 1 under torchrun): each
   MoE layer keeps its rank's experts and exchanges token rows by all-to-all
   (``moelab.distributed.shard_experts``);
3. **global statistics** (any world size > 1): every MoE layer sums its routing counts and
   Default MoE's statistics over the ranks, so the balance loss and Ê are the global batch's;
4. **data parallel**: DDP over the non-expert parameters (the sharded experts' gradients are
   reduced by ``moelab.distributed.sync_expert_grads`` after backward).

Where the scale-phase steps plug in (same function, same order as torchtitan): a precision
policy after 3 (autocast settings, or FSDP2's ``MixedPrecisionPolicy``), ``torch.compile`` per
block after that, and FSDP2 (``fully_shard`` per block) in place of DDP in 4.

:func:`init_parallel` resolves ``train.device`` and joins the process group under torchrun;
``moelab.distributed`` keeps the collectives themselves; :func:`runtime_settings` holds the
process-wide torch settings of a run while it trains or evaluates.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from moelab import distributed as mdist

if TYPE_CHECKING:
    from moelab.config import TrainConfig

__all__ = ["init_parallel", "resolve_device", "runtime_settings", "wrap_model"]


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device: "auto" is CUDA when available, else CPU; a device
    that is not available here raises ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} is invalid: CUDA is not available here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"train.device={name!r} is invalid: MPS is not available here")
    return dev


def init_parallel(tcfg: TrainConfig, global_batch: int
                  ) -> tuple[mdist.ParallelContext | None, torch.device]:
    """This process's ParallelContext and device. One process (no torchrun): ``(None,
    device)``. Under torchrun: the process group is initialised (``train.dist_backend``), the
    device becomes ``cuda:LOCAL_RANK`` on CUDA, and ``global_batch`` (``data.batch_size``) must
    split evenly over the ranks."""
    device = resolve_device(tcfg.device)
    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else mdist.world_size_from_env()
    if world == 1:
        if tcfg.expert_parallel > 1:
            raise ValueError(f"train.expert_parallel={tcfg.expert_parallel} is invalid on "
                             "one process: launch with `torchrun --nproc_per_node N` "
                             "(N a multiple of expert_parallel)")
        return None, device
    ctx = mdist.init_distributed(tcfg.expert_parallel, device.type, tcfg.dist_backend)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    if global_batch % ctx.world_size:
        raise ValueError(f"data.batch_size={global_batch} is invalid: the global batch must "
                         f"split evenly over the {ctx.world_size} ranks")
    return ctx, device


def wrap_model(model: nn.Module, ctx: mdist.ParallelContext | None, device: torch.device
               ) -> tuple[nn.Module, list[nn.Parameter]]:
    """Prepare ``model`` (in place) for training and return ``(train_model, expert_params)``:
    ``train_model`` is what the training step calls (``model`` itself on one process, its DDP
    wrapper under torchrun); ``expert_params`` are the expert-parallel shards whose gradients
    the step reduces itself (empty without expert parallelism). ``model`` stays the module to
    evaluate, checkpoint and hand to the optimizer. Steps and their order: module docstring."""
    model.to(device)
    if ctx is None:
        return model, []
    mdist.shard_experts(model, ctx)
    mdist.enable_global_stats(model)
    expert_params = mdist.expert_parameters(model)
    return mdist.wrap_ddp(model, ctx), expert_params


@contextlib.contextmanager
def runtime_settings(tcfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """``train.threads`` (torch's CPU thread count, 0: unchanged) and
    ``train.deterministic`` (``torch.use_deterministic_algorithms``, warn-only; on CUDA with
    cuBLAS's deterministic workspace) for the duration of the block; the previous settings
    are restored afterwards, so a run leaves no global state behind."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if tcfg.threads > 0:
            torch.set_num_threads(tcfg.threads)
        if tcfg.deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        if tcfg.threads > 0:
            torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
