"""Checkpoints: RNG capture, per-rank files, atomic save, safe loading for resume.

A checkpoint is the dict ``Trainer.state_dict()`` returns (model, optimizer with Excitation's
state, batcher, RNG states, step counters, the open log window, the config text, the parallel
layout). Rank 0 writes ``RUN/ckpt.pt``; with expert parallelism every other rank r writes its
own experts to ``RUN/ckpt.rank<r>.pt``; plain data-parallel ranks > 0 write nothing (rank 0's
file holds everything).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moelab.rundir import CHECKPOINT

__all__ = [
    "CKPT_VERSION", "capture_rng", "check_parallel", "check_version", "load_for_resume",
    "rank_checkpoint_path", "restore_rng", "save_atomic",
]

CKPT_VERSION = 1


def capture_rng(device: torch.device) -> dict[str, Any]:
    """The torch, numpy, python (and cuda, on a cuda device) RNG states."""
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
           "python": random.getstate()}
    if torch.cuda.is_available() and device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state_all(rng["cuda"])


def check_version(state: dict[str, Any]) -> None:
    if state.get("version") != CKPT_VERSION:
        raise ValueError(f"checkpoint version {state.get('version')!r} is not supported "
                         f"(need {CKPT_VERSION})")


def check_parallel(state: dict[str, Any], world_size: int, expert_parallel: int) -> None:
    """Raise if ``state`` comes from an expert-parallel run of another layout."""
    saved = state.get("parallel", {"world_size": 1, "expert_parallel": 1})
    if saved["expert_parallel"] > 1 and saved["world_size"] != world_size:
        raise ValueError(
            f"this checkpoint holds experts sharded over {saved['world_size']} ranks "
            f"(expert_parallel={saved['expert_parallel']}); load it under torchrun with "
            f"--nproc_per_node {saved['world_size']} (this process has a world of "
            f"{world_size}); resharding experts to another world size is not supported")
    if expert_parallel != saved["expert_parallel"] and saved["expert_parallel"] > 1:
        raise ValueError(f"checkpoint expert_parallel={saved['expert_parallel']} != "
                         f"train.expert_parallel={expert_parallel}")


def rank_checkpoint_path(run_dir: Path, rank: int, expert_parallel: int) -> Path | None:
    """This rank's checkpoint file: ``ckpt.pt`` (rank 0), ``ckpt.rank<r>.pt`` (rank r > 0 of an
    expert-parallel run), None for ranks > 0 of a data-parallel run."""
    if rank == 0:
        return run_dir / CHECKPOINT
    if expert_parallel > 1:
        return run_dir / f"ckpt.rank{rank}.pt"
    return None


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_for_resume(run_dir: Path, rank: int, world_size: int, expert_parallel: int,
                    device: torch.device, distributed: bool, verb: str = "resume"
                    ) -> dict[str, Any]:
    """This rank's checkpoint of ``run_dir``, checked against rank 0's (same parallel layout;
    under torch.distributed, every rank at the same step, or all raise)."""
    main_path = run_dir / CHECKPOINT
    if not main_path.is_file():
        raise FileNotFoundError(f"cannot {verb} {run_dir}: no {CHECKPOINT} there (the run "
                                "stopped before its first checkpoint)")
    own = rank_checkpoint_path(run_dir, rank, expert_parallel) or main_path
    # weights_only=False: the state holds numpy / python RNG states; only load your own runs
    main_state = torch.load(main_path, map_location=device, weights_only=False)
    check_parallel(main_state, world_size, expert_parallel)
    state = main_state if own == main_path else torch.load(own, map_location=device,
                                                           weights_only=False)
    if distributed:
        torn = torch.tensor([float(state["step"] != main_state["step"])], device=device)
        dist.all_reduce(torn)
        if float(torn) > 0:
            raise ValueError(f"cannot {verb} {run_dir}: the per-rank checkpoint files are "
                             "from different steps (a save was interrupted)")
    return state
