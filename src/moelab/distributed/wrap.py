"""From a built model to the model that trains: the one place that decides where and how the
model runs (torchtitan's ``parallelize_fn`` is the pattern).

:func:`wrap_model` applies, in this order:

1. **device**: ``model.to(device)``;
2. **expert sharding** (expert parallel, ``train.expert_parallel`` > 1 under torchrun): each
   MoE layer keeps its rank's experts and exchanges token rows by all-to-all
   (``moelab.distributed.ddp_ep.shard_experts``);
3. **global statistics** (any world size > 1): every MoE layer sums its routing counts and
   Default MoE's statistics over the ranks, so the balance loss and Ê are the global batch's;
4. **compile** (``train.compile``): ``torch.compile(fullgraph=True)`` of each block in place
   (:func:`compile_blocks`; activation checkpointing lives inside each block, so it is
   compiled with it);
5. **data parallel** (``train.parallel``): "ddp": DDP over the non-expert parameters (the
   sharded experts' gradients are reduced by ``moelab.distributed.ddp_ep.sync_expert_grads`` after
   backward); "fsdp": FSDP2, ``fully_shard`` per block and the root over a 2-D DeviceMesh
   (dp_shard x ep), the experts' DTensors sharded over their replicas, with its
   ``MixedPrecisionPolicy`` under bf16 (``moelab.distributed.fsdp.shard_model``).

The precision policy (``moelab.train.precision``) is not a wrapper: autocast surrounds the forward
in the step, and :func:`runtime_settings` holds the TF32 switches and determinism.

:func:`init_parallel` resolves ``train.device`` and joins the process group under torchrun;
``moelab.distributed.ddp_ep`` keeps the collectives themselves; :func:`runtime_settings` holds the
process-wide torch settings of a run while it trains or evaluates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from moelab.distributed import ddp_ep as mdist
from moelab.train.precision import matmul_flags

if TYPE_CHECKING:
    from moelab.config import TrainConfig

#: The ``torch.compile`` backend of :func:`compile_blocks` (tests on slow CPUs use "aot_eager",
#: which traces the same graphs without generating code).
COMPILE_BACKEND = "inductor"

__all__ = ["COMPILE_BACKEND", "broadcast_from_main", "compile_blocks", "init_parallel",
           "resolve_deterministic", "resolve_device", "runtime_settings", "wrap_model"]


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
    if tcfg.parallel == "fsdp":
        from moelab.distributed.fsdp import build_mesh

        mesh = build_mesh(ctx.world_size, ctx.expert_parallel, device.type)
        ctx = dataclasses.replace(ctx, parallel="fsdp", mesh=mesh)
    if global_batch % ctx.world_size:
        raise ValueError(f"data.batch_size={global_batch} is invalid: the global batch must "
                         f"split evenly over the {ctx.world_size} ranks")
    return ctx, device


def broadcast_from_main(value: Any, ctx: mdist.ParallelContext | None) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object); ``value`` itself on one
    process."""
    if ctx is None:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def wrap_model(model: nn.Module, ctx: mdist.ParallelContext | None, device: torch.device,
               *, compile: bool = False, precision: str = "fp32"
               ) -> tuple[nn.Module, list[nn.Parameter]]:
    """Prepare ``model`` (in place) for training and return ``(train_model, expert_params)``:
    ``train_model`` is what the training step calls (``model`` itself on one process and
    under FSDP, which shards it in place; its DDP wrapper under DDP); ``expert_params`` are
    the expert-parallel shards whose gradients the step reduces itself (empty without expert
    parallelism, and under FSDP, which reduces them). ``model`` stays the module to evaluate,
    checkpoint and hand to the optimizer. ``precision``: the run's resolved precision (what
    compiled experts must support; FSDP's mixed-precision policy). ``ctx.parallel`` picks DDP
    or FSDP. Steps and their order: module docstring."""
    model.to(device)
    expert_params: list[nn.Parameter] = []
    if ctx is not None:
        mdist.shard_experts(model, ctx)
        mdist.enable_global_stats(model)
        expert_params = mdist.expert_parameters(model)
    if compile:
        compile_blocks(model, precision)
    if ctx is None:
        return model, expert_params
    if ctx.parallel == "fsdp":
        from moelab.distributed.fsdp import shard_model

        return shard_model(model, ctx, precision), []
    return mdist.wrap_ddp(model, ctx), expert_params


def compile_blocks(model: nn.Module, precision: str = "fp32") -> int:
    """``torch.compile`` each block of ``model`` in place (``Module.compile``: parameter
    names and state dicts do not change), as torchtitan does; returns how many. moelab's blocks
    compile with ``fullgraph=True`` (a graph break is an error); a Hugging Face model's decoder
    layers without it (transformers' own code breaks the graph, e.g. on a ``ContextVar`` in
    its attention; each break splits a layer into several compiled graphs).

    Inside a block the MoE layers take the grouped-GEMM path (no data-dependent shapes, no
    host sync in bf16), so grouped GEMM must run on the model's device in the precision's
    compute dtype: checked here, outside tracing, with a clear error if not; or the padded
    path (``dispatch="padded"``, or "auto" for fp32 / tf32 on CUDA with static slots: a
    capacity or expert choice; ``moe.dispatch.compiled_backend``), which needs no grouped
    GEMM and never syncs. Activation checkpointing
    inside a compiled block recomputes in the compiled backward and does not run the forward's
    side effects again (Default MoE's EMA and the routing counts update once per step)."""
    from moelab.models import model_blocks
    from moelab.moe import MoELayer
    from moelab.moe.dispatch import compiled_backend
    from moelab.moe.gemm import grouped_mm_supported

    blocks, ours = model_blocks(model)
    if not blocks:
        raise ValueError(f"train.compile: {type(model).__name__} has no blocks to compile "
                         "(need a moelab model's `blocks` or an HF model's decoder layers)")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        if isinstance(layer.experts, mdist.ExpertParallelExperts):
            raise ValueError("train.compile is not supported with train.expert_parallel > 1 "
                             "yet (the dropless all-to-all reads its split sizes on the "
                             "host; the padded exchange's collectives are not traced yet)")
        w_in, w_out = layer.experts.w_in, layer.experts.w_out
        if layer.experts.backend == "loop":
            raise ValueError("train.compile is invalid with model.moe.dispatch='loop' (the "
                             "loop reads expert sizes on the host): use 'auto' or 'grouped_mm'")
        device = w_in.device.type
        static_slots = layer.cfg.capacity_factor is not None or layer.cfg.dispatch == "padded"
        if compiled_backend(layer.experts.backend, device, dtype,
                            1 if static_slots else None) == "padded":
            continue  # batched matmuls: no grouped GEMM needed
        if not (grouped_mm_supported(device, dtype, w_in.shape[1], w_in.shape[2])
                and grouped_mm_supported(device, dtype, w_out.shape[1], w_out.shape[2])):
            raise ValueError(f"train.compile needs grouped GEMM, and torch {torch.__version__} "
                             f"has none for {dtype} on {device} with expert weights of shapes "
                             f"{tuple(w_in.shape)} / {tuple(w_out.shape)} (it needs torch >= "
                             "2.8 and row strides that are multiples of 16 bytes)")
    config = torch._dynamo.config
    config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    # blocks differ in small ints (their MoE layer's index): one graph each, not a fallback
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 2 * len(blocks) + 8))
    for block in blocks:
        block.compile(fullgraph=ours, backend=COMPILE_BACKEND)
    return len(blocks)


def resolve_deterministic(value: bool | str, device: torch.device) -> bool:
    """``train.deterministic`` on ``device``: "auto" is on for CPU (where the deterministic
    algorithms cost nothing measurable and runs repeat to the last digit) and off for CUDA
    and every other device (where they cost speed: sort-based ``index_add_``, math
    attention); true / false as given."""
    if value == "auto":
        return device.type == "cpu"
    if not isinstance(value, bool):
        raise ValueError(f"train.deterministic={value!r} is invalid: use auto, true or false")
    return value


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic algorithms for real while the block runs: an op without a deterministic
    implementation raises (``warn_only=False``), ``torch.empty`` is not NaN-filled
    (``fill_uninitialized_memory`` off: costs time and changes no result of correct code);
    on CUDA, cuBLAS's deterministic workspace (``CUBLAS_WORKSPACE_CONFIG``, if unset) and
    math attention only (flash and memory-efficient attention have non-deterministic
    backwards). Everything is restored afterwards."""
    import torch.utils.deterministic as det

    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), det.fill_uninitialized_memory)
    prev_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    with contextlib.ExitStack() as stack:
        try:
            if device.type == "cuda":
                if prev_env is None:
                    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            torch.use_deterministic_algorithms(True, warn_only=False)
            det.fill_uninitialized_memory = False
            yield
        finally:
            torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
            det.fill_uninitialized_memory = prev[2]
            if prev_env is None:
                os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@contextlib.contextmanager
def runtime_settings(tcfg: TrainConfig, device: torch.device, precision: str = "fp32"
                     ) -> Iterator[None]:
    """``train.threads`` (torch's CPU thread count, 0: unchanged), ``train.deterministic``
    (:func:`resolve_deterministic`; when on, :func:`_deterministic`: real determinism or an
    error, never a warning) and the TF32 switches of ``precision``
    (``moelab.train.precision.matmul_flags``) for the duration of the block; the previous
    settings are restored afterwards, so a run leaves no global state behind. The benchmarks
    time their steps inside it too, so they measure what ``moelab train`` runs."""
    prev_threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        try:
            if tcfg.threads > 0:
                torch.set_num_threads(tcfg.threads)
            if resolve_deterministic(tcfg.deterministic, device):
                stack.enter_context(_deterministic(device))
            stack.enter_context(matmul_flags(precision))
            yield
        finally:
            if tcfg.threads > 0:
                torch.set_num_threads(prev_threads)
