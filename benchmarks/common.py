"""Shared timing and memory helpers for the benchmarks (run by hand, not in CI).

Timings are medians of interleaved repetitions, so every contender sees the same machine noise;
results are reported as ratios measured in one run.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def train_settings(device: str, precision: str) -> Iterator[None]:
    """What ``moelab train`` holds while it trains on ``device`` in ``precision``: its
    ``runtime_settings`` with the run defaults (``train.deterministic=auto``: on for CPU, off
    for CUDA; the TF32 switches), so a benchmark times what a run runs."""
    import torch

    from moelab.config import TrainConfig
    from moelab.distributed.wrap import runtime_settings

    dev = torch.device(device)
    with runtime_settings(TrainConfig(device=dev.type), dev, precision):
        yield


def time_interleaved(fns: dict[str, Callable[[], None]], reps: int = 20,
                     warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each fn, calling them round-robin ``reps`` times."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def saved_tensor_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves for backward while running ``fn`` — the
    activation memory a training step holds at its peak (parameters not counted)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor,
            output: Callable[[object], torch.Tensor] = lambda o: o) -> Callable[[], None]:
    """A closure running forward + backward of ``module`` on ``x`` with upstream ``grad``."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        output(module(x)).backward(grad)

    return step


def step_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak bytes allocated by one call of ``fn`` above what existed when it started (CPU or
    CUDA; for a training step: activations, gradients and temporaries, not the parameters or
    an optimizer state created before). Read off the profiler's memory timeline (a private
    torch API, ``torch.profiler._memory_profiler``; benchmarks only), so call ``fn`` once
    before to create lazily allocated state."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def write_result(result: dict, path: str | None) -> None:
    """Write a benchmark's result dict as indented JSON to ``path`` (no-op for None)."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump(result, f, indent=2)
