"""Packing several runs onto one GPU (``moelab reproduce --device cuda``).

The runs of these experiments are small: one leaves most of a GPU idle (Python-bound), so
``reproduce`` runs N of them at once in N worker processes on the same GPU. N comes from the
free GPU memory and one run's measured peak (:func:`measure_peak`, a short run in a fresh
process: its CUDA context is part of what it costs), capped by the CPU cores (each worker
needs one to launch kernels) and the number of runs; ``--jobs`` overrides it.

    peak = measure_peak(spec, "cuda")                     # bytes one run holds at its peak
    jobs = gpu_jobs(peak, free_bytes(), cores, n_runs)    # what fits, with a 10% reserve
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

__all__ = ["RESERVE", "free_bytes", "gpu_jobs", "measure_peak"]

#: Share of the free memory left unused (fragmentation, the evaluation's peak, other users).
RESERVE = 0.10


def gpu_jobs(peak_bytes: int, free: int, cores: int, n_runs: int,
             reserve: float = RESERVE) -> int:
    """How many runs of ``peak_bytes`` each fit at once in ``free`` bytes (keeping
    ``reserve`` of it), at most one per CPU core and per run, at least 1."""
    if peak_bytes <= 0:
        raise ValueError(f"peak_bytes={peak_bytes} is invalid: need > 0")
    fit = math.floor(free * (1.0 - reserve) / peak_bytes)
    return max(1, min(fit, cores, n_runs))


def free_bytes(device: str = "cuda") -> int:
    """Free memory on ``device`` now (``torch.cuda.mem_get_info``)."""
    import torch

    return torch.cuda.mem_get_info(torch.device(device))[0]


def _peak_of(spec, device: str, steps: int, free_before: int) -> int:
    """In a fresh worker: ``steps`` training steps of ``spec`` on ``device``; the device
    memory this process took (``free_before``, read by the parent, minus the free memory at
    the end, plus what its allocator had released after the peak): its CUDA context counts."""
    import dataclasses
    import tempfile

    import torch

    from moelab.experiments.runner import resolve_config
    from moelab.train.trainer import Trainer

    cfg = resolve_config(spec)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, device=device, steps=steps, eval_every=0, checkpoint_every=0))
    with tempfile.TemporaryDirectory(prefix="moelab-peak-") as tmp:
        tr = Trainer(cfg, tmp, quiet=True)
        with tr._runtime():
            for _ in range(steps):
                tr.train_step()
        torch.cuda.synchronize(device)
        now = torch.cuda.mem_get_info(torch.device(device))[0]
        below_peak = torch.cuda.max_memory_reserved(device) - torch.cuda.memory_reserved(device)
        return free_before - now + below_peak


def measure_peak(spec, device: str = "cuda", steps: int = 3) -> int:
    """The device memory one run of ``spec`` takes at its peak (its training steps; the
    evaluation holds less), CUDA context included, measured in a fresh process."""
    free_before = free_bytes(device)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
        return ex.submit(_peak_of, spec, device, steps, free_before).result()


def cpu_cores() -> int:
    return os.cpu_count() or 1
