"""Checkpoints: RNG capture, per-rank files, atomic save, safe loading for resume.

A checkpoint is the dict ``Trainer.state_dict()`` returns (model, optimizer with Excitation's
state, batcher, RNG states, step counters, the open log window, the config text, the parallel
layout). Rank 0 writes ``RUN/ckpt.pt``; with expert parallelism every other rank r writes its
own experts to ``RUN/ckpt.rank<r>.pt``; plain data-parallel ranks > 0 write nothing (rank 0's
file holds everything). Under FSDP (``train.parallel = "fsdp"``) the model and optimizer
tensors go to a DCP directory every rank writes its shards to, and ``ckpt.pt`` names it
(``moelab.runs.sharded_checkpoint``).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moelab.moe.dtensor import local
from moelab.runs.directory import CHECKPOINT

__all__ = [
    "CKPT_VERSION", "CheckpointError", "capture_rng", "check_finite", "check_parallel",
    "check_version", "load_checkpoint", "load_for_resume", "rank_checkpoint_path",
    "restore_rng", "save_atomic",
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


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (unreadable, truncated, foreign, untrusted)."""


# What ``torch.load(weights_only=True)`` must accept beyond tensors and plain containers: the
# numpy RNG state (``np.random.get_state()``: a uint32 ndarray) in ``state["rng"]["numpy"]``.
def _numpy_globals() -> list[Any]:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    allowed: list[Any] = [multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed.append(dtypes.UInt32DType)
    return allowed


_FIX = ("restore it from a copy, or start the run again (`moelab train --config "
        "RUN/config.toml --out NEW_DIR`)")


def requested_globals(path: Path) -> list[str] | None:
    """The Python objects the pickle data of ``path`` asks to import (GLOBAL, STACK_GLOBAL,
    INST), read with ``pickletools`` without executing anything; None if the data does not
    parse as a pickle stream (corruption). A torch zip file is read through its data.pkl."""
    import io
    import pickletools

    data = path.read_bytes()
    if zipfile.is_zipfile(io.BytesIO(data)):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(member) if member else b""
        except (zipfile.BadZipFile, OSError, KeyError):
            return None
    stream, names, strings, parsed = io.BytesIO(data), [], [], False
    while stream.tell() < len(data):  # a legacy torch file holds several pickles
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except (ValueError, EOFError, UnicodeDecodeError):
            break  # the rest is not pickle data (legacy tensor bytes, or damage)
        parsed = True
    return list(dict.fromkeys(names)) if parsed else None


def _clip(text: str, limit: int = 120) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary, marked with "..."."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 3].rsplit(" ", 1)[0].rstrip(" .,;:")
    return cut + "..."


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A moelab checkpoint loaded with ``torch.load(weights_only=True)``: tensors, plain
    Python values and the numpy RNG array only, so a crafted file cannot run code.

    Raises CheckpointError (one line naming ``path`` and what to do) for a missing, empty,
    truncated, random or foreign file, and for one that asks for anything else to be built.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (a save was cut short?); {_FIX}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = " ".join(str(e).split())
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        names = [found.group(1).rstrip(".")] if found else requested_globals(path)
        if names:  # a well-formed pickle that names a Python object to build: unsafe
            raise CheckpointError(
                f"checkpoint {path} asks to build {', '.join(names[:3])}, which moelab "
                "refuses to load (a moelab checkpoint holds only tensors, numbers and strings; "
                "loading it could run code): do not use this file unless you know where it "
                "came from") from None
        # bytes that do not even parse as a pickle stream (an unknown opcode, ...) asked for
        # nothing: that is damage, not an attack
        detail = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", msg)
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a checkpoint: its data is not a valid pickle "
            f"stream ({_clip(detail.group(1) if detail else msg)}); this is damage, not an "
            f"unsafe file; {_FIX}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError, zipfile.BadZipFile, MemoryError,
            OverflowError) as e:
        # what torch.load raises on a truncated zip, random bytes or a cut pickle stream
        msg = _clip(" ".join(str(e).split()) or type(e).__name__)
        raise CheckpointError(f"checkpoint {path} is unreadable: truncated, corrupt or not "
                              f"a torch file ({msg}); {_FIX}") from None
    if not isinstance(state, dict) or "step" not in state or not (
            "model" in state or "shards" in state):
        keys = sorted(map(str, state))[:6] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} is not a moelab checkpoint (has {keys}, "
                              "needs 'version', 'step', 'model', ...); point moelab at a run "
                              "directory written by `moelab train`")
    check_version(state, path)
    return state


def check_version(state: dict[str, Any], path: Path | str = "checkpoint") -> None:
    if state.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')!r} is not "
                              f"supported (need {CKPT_VERSION})")


def check_finite(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point model tensors in ``state`` that hold NaN or inf (of a
    DTensor, in this rank's shard)."""
    return [k for k, v in state.get("model", {}).items()
            if torch.is_tensor(v) and v.is_floating_point()
            and not bool(torch.isfinite(local(v)).all())]


def check_parallel(state: dict[str, Any], world_size: int, expert_parallel: int) -> None:
    """Raise if ``state`` comes from an expert-parallel run of another layout (a sharded
    checkpoint, ``moelab.runs.sharded_checkpoint``, loads at any layout)."""
    if "shards" in state:
        return
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
    main_state = load_checkpoint(main_path, device)
    if "shards" in main_state:  # every rank reads ckpt.pt, then its shards (sharded_ckpt.load)
        return main_state
    check_parallel(main_state, world_size, expert_parallel)
    state = main_state if own == main_path else load_checkpoint(own, device)
    if distributed:
        torn = torch.tensor([float(state["step"] != main_state["step"])], device=device)
        dist.all_reduce(torn)
        if float(torn) > 0:
            raise ValueError(f"cannot {verb} {run_dir}: the per-rank checkpoint files are "
                             "from different steps (a save was interrupted)")
    return state
