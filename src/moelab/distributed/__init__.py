"""Training on several processes (launched by torchrun).

    ddp_ep   the process group, DDP, expert parallel (all-to-all), global statistics, grad norm
    fsdp     FSDP2: the dp_shard x ep DeviceMesh, fully_shard per block, expert DTensors
    wrap     a built model -> the model that trains (wrap_model), the device, compile per block,
             the run's global settings

The names of ``ddp_ep`` are exported here too (``from moelab.distributed import
ParallelContext`` works as before the package existed).
"""

from moelab.distributed.ddp_ep import (
    ExpertParallelExperts,
    ParallelContext,
    clip_grad_norm_,
    dtensor_grad_norm,
    enable_global_stats,
    expert_parameters,
    init_distributed,
    make_context,
    shard_experts,
    sync_expert_grads,
    world_size_from_env,
    wrap_ddp,
)

__all__ = ["ExpertParallelExperts", "ParallelContext", "clip_grad_norm_", "dtensor_grad_norm",
           "enable_global_stats", "expert_parameters", "init_distributed", "make_context",
           "shard_experts", "sync_expert_grads", "world_size_from_env", "wrap_ddp"]
