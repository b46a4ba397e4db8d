"""Sharded checkpoints of FSDP runs (``train.parallel = "fsdp"``) with
``torch.distributed.checkpoint`` (DCP): every rank writes its own shards, and any number of
ranks (one process included) reads them back, each taking the parts its sharding needs.

A run directory holds::

    ckpt.pt                    rank 0's small file (``moelab.runs.checkpoint``): step, batcher, RNG,
                               log window, config, Excitation's entry of the optimizer state,
                               and ``shards``: the DCP directory below. The commit record.
    ckpt.shards/step-000006/   DCP: ``model`` (``Module.state_dict``: DTensor shards of the
                               parameters, the replicated buffers such as Default MoE's EMA)
                               and ``optimizer`` (state and param groups keyed by parameter
                               name, as ``get_optimizer_state_dict`` gives), ``.metadata``

Keys are the one-process model's names: an expert-parallel layer's ``experts.local.w_in`` is
stored as ``experts.w_in``, its global [E, ...] DTensor, so a checkpoint written at one world
size and expert-parallel degree loads at another, or on one process.

Atomic: a save writes a fresh step directory; DCP ends with a collective after which rank 0
writes ``.metadata``; only then does rank 0 replace ``ckpt.pt`` (``save_atomic``: a rename) to
name it, and delete the older step directories. A save cut short (a killed rank) leaves
``ckpt.pt`` naming the previous, complete directory.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from moelab.runs.checkpoint import CheckpointError, save_atomic
from moelab.runs.directory import CHECKPOINT

__all__ = ["SHARDS", "apply", "full_state", "is_sharded", "load", "one_process_layout", "save",
           "tensor_state"]

#: The directory of the step directories, inside the run directory.
SHARDS = "ckpt.shards"
_TENSORS = ("model", "optimizer")


def is_sharded(state: dict[str, Any]) -> bool:
    """Whether ``state`` (a loaded ``ckpt.pt``) keeps its tensors in a DCP directory."""
    return "shards" in state


def canonical_key(key: str) -> str:
    """The one-process name of a parameter (expert-parallel experts lose ``local.``)."""
    return key.replace(".experts.local.", ".experts.")


def _renamed(tensors: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """``{"model": ..., "optimizer": ...}`` with every parameter name passed through ``fn``:
    new dicts holding the same tensors (DCP loads into them in place)."""
    out: dict[str, Any] = {"model": {fn(k): v for k, v in tensors["model"].items()}}
    osd = tensors["optimizer"]
    out["optimizer"] = {
        "state": {fn(k): v for k, v in osd["state"].items()},
        "param_groups": [{**g, "params": [fn(k) for k in g["params"]]}
                         for g in osd["param_groups"]]}
    return out


def tensor_state(model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """``{"model", "optimizer", "optimizer_extra"}`` of this rank: the model's state dict (DTensor
    shards under FSDP), the optimizer's state and param groups keyed by parameter name (the
    format of ``get_optimizer_state_dict``) and its other entries (Excitation's).

    Built from ``optimizer.state_dict()`` directly: ``get_optimizer_state_dict`` would first
    take a zero step of an optimizer without state (SGD), running Excitation's hooks."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"the optimizer holds {len(missing)} parameters that are not the "
                         "model's: a sharded checkpoint keys them by the model's names")
    key = {i: names[id(p)] for i, p in enumerate(params)}
    sd = optimizer.state_dict()
    optim = {"state": {key[i]: v for i, v in sd["state"].items()},
             "param_groups": [{**g, "params": [key[i] for i in g["params"]]}
                              for g in sd["param_groups"]]}
    extra = {k: v for k, v in sd.items() if k not in ("state", "param_groups")}
    return {"model": model.state_dict(), "optimizer": optim, "optimizer_extra": extra}


def save(state: dict[str, Any], run_dir: Path, *, is_main: bool) -> None:
    """Write ``state`` (``Checkpointer.state`` of a sharded run: its ``model`` and
    ``optimizer`` from :func:`tensor_state`) as this module describes. Collective: every rank
    calls it; under torch.distributed, rank 0 alone writes ``ckpt.pt``. On one process (an
    FSDP run started or resumed without torchrun) the same files, all of one rank."""
    import torch.distributed.checkpoint as dcp

    distributed = dist.is_available() and dist.is_initialized()
    rel = f"{SHARDS}/step-{int(state['step']):06d}"
    target = run_dir / rel
    if is_main and target.exists():  # left by a save that was cut short
        shutil.rmtree(target)
    if distributed:
        dist.barrier()
    dcp.save(_renamed({k: state[k] for k in _TENSORS}, canonical_key), checkpoint_id=target,
             no_dist=not distributed)
    if is_main:
        main = {k: v for k, v in state.items() if k not in _TENSORS}
        main["shards"] = rel
        save_atomic(main, run_dir / CHECKPOINT)
        for old in (run_dir / SHARDS).iterdir():
            if old.name != target.name:
                shutil.rmtree(old, ignore_errors=True)


def load(run_dir: Path, state: dict[str, Any], model: nn.Module,
         optimizer: Optimizer) -> dict[str, Any]:
    """``state`` (a sharded run's ``ckpt.pt``) with ``model`` and ``optimizer`` read from its
    DCP directory, shaped as this process's ``model`` and ``optimizer`` are sharded (any world
    size, one process too). Collective under torch.distributed. Hand the result to
    :func:`apply`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    path = run_dir / state["shards"]
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{run_dir / CHECKPOINT} names the sharded checkpoint {path}, "
                              "which is missing or incomplete (no .metadata); restore the run "
                              "directory from a copy, or start the run again")
    template = {"model": model.state_dict(),
                "optimizer": get_optimizer_state_dict(model, optimizer)}
    local_name = {canonical_key(k): k for k in template["model"]}
    local_name.update({canonical_key(n): n for n, _ in model.named_parameters()})
    stored = _renamed(template, canonical_key)
    alone = not (dist.is_available() and dist.is_initialized())
    dcp.load(stored, checkpoint_id=path, no_dist=alone)  # tensors in place, others replaced
    return {**state, **_renamed(stored, local_name.__getitem__)}


def apply(model: nn.Module, optimizer: Optimizer, state: dict[str, Any]) -> None:
    """Load :func:`load`'s ``model`` and ``optimizer`` into ``model`` and ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def full_state(run_dir: Path) -> dict[str, Any]:
    """A sharded run's whole checkpoint on this process, without building its model: the
    ``ckpt.pt`` entries, ``model`` as full tensors by one-process parameter name, and
    ``optimizer`` (its state by parameter name, full tensors). Needs memory for all of it;
    not collective."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from moelab.runs.checkpoint import load_checkpoint

    state = load_checkpoint(run_dir / CHECKPOINT)
    if not is_sharded(state):
        raise ValueError(f"{run_dir / CHECKPOINT} is not a sharded checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(run_dir / state["shards"], Path(tmp) / "full.pt")
        tensors = torch.load(Path(tmp) / "full.pt", weights_only=False)
    return {**state, **tensors}


def one_process_layout(cfg: Any, run_dir: Path) -> dict[str, int]:
    """``{"expert_parallel": 1}`` for a process without torchrun resuming (or evaluating) a
    run of ``cfg`` with expert parallelism whose ``ckpt.pt`` is sharded: one process holds
    every expert, and the checkpoint loads at any layout. Empty otherwise (a single-file
    expert-parallel checkpoint keeps its error: it needs its world size)."""
    from moelab.runs.checkpoint import load_checkpoint
    from moelab.distributed.ddp_ep import world_size_from_env

    alone = not (dist.is_available() and dist.is_initialized()) and world_size_from_env() == 1
    path = Path(run_dir) / CHECKPOINT
    if not alone or cfg.train.expert_parallel == 1 or not path.is_file():
        return {}
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return {}  # the resume itself reports it
    return {"expert_parallel": 1} if is_sharded(state) else {}
