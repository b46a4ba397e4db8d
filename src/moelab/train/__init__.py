"""The training loop and its parts.

    trainer       Trainer (assembles the parts, runs the loop), load_trained
    callbacks     the run's lifecycle at named hooks (signals, run directory, logging, eval,
                  checkpoints)
    optim         optimizer (+ Excitation) and the lr schedule
    evaluation    evaluation batches, loss / ppl / accuracy, per-layer routing metrics
    precision     train.precision: fp32 / tf32 / bf16 autocast
    guard         the non-finite guard;  interrupt: SIGINT/SIGTERM -> stop after the step
    progress      progress lines;  loggers: metrics.jsonl, TensorBoard, W&B

``from moelab.train import Trainer`` (and any other name of ``moelab.train.trainer``) works as
before the package existed; the names resolve lazily, so importing one part (e.g.
``moelab.train.precision``) does not import the Trainer and everything it assembles.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moelab.train.trainer import Trainer, load_trained

__all__ = ["Trainer", "load_trained"]


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a part: `from . import x`
        return importlib.import_module(f"{__name__}.{name}")
    trainer = importlib.import_module("moelab.train.trainer")
    try:
        return getattr(trainer, name)
    except AttributeError:
        raise AttributeError(f"module 'moelab.train' has no attribute {name!r}") from None
