"""The run directory: its layout, and reading / writing it (no trainer needed).

    config.toml     the resolved RunConfig; ``moelab train --config RUN/config.toml`` redoes it
    command.txt     the exact command line(s) (one line per start / resume)
    metrics.jsonl   one JSON object per line, ``kind`` = "train" | "eval" | "final":
                    train: step, loss (mean over the log window), aux_loss, lr, grad_norm,
                      tokens_per_s (LM) or images_per_s, elapsed_s (training time so far)
                    eval:  step, split, val_loss + val_ppl (LM) or val_acc, and ``layers``: one
                      dict per MoE layer (depth order) from ``moelab.analysis.metrics.layer_metrics`` on
                      the counts aggregated over the whole evaluation (``track_out_norm`` on),
                      plus ``excitation`` {layer: last multipliers} when Excitation is on
                    final: the last evaluation on the full validation and test splits, params,
                      throughput, training time
    ckpt.pt         rank 0's checkpoint (``moelab.runs.checkpoint``), written atomically: model (MoE
                    buffers included), optimizer (Excitation included), RNG states, batcher,
                    step, the open log window; ``ckpt.rank<r>.pt`` per extra expert-parallel
                    rank

Used by the trainer (writing), ``moelab.analysis.report`` and ``moelab eval`` (reading).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moelab.config import RunConfig, dump_toml, load_config

__all__ = [
    "CHECKPOINT", "COMMAND", "CONFIG", "METRICS", "append_command", "append_metrics",
    "atomic_write_text", "check_fresh_run_dir", "default_run_dir", "read_config",
    "read_metrics", "start_run_dir", "truncate_metrics",
]

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
CHECKPOINT = "ckpt.pt"
COMMAND = "command.txt"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The entries of ``RUN/metrics.jsonl`` (an empty list if there is none)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
    return out


def read_config(run_dir: str | Path, verb: str = "read") -> RunConfig:
    """The RunConfig saved in ``RUN/config.toml``; FileNotFoundError if there is none."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"cannot {verb} {run_dir}: not a moelab run directory "
                                f"(no {CONFIG})")
    return load_config(path)


def default_run_dir(cfg: RunConfig, root: str | Path = "runs") -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>`` (with a numeric suffix if that exists)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{cfg.name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def check_fresh_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path; raises FileExistsError if it already holds a run."""
    d = Path(run_dir)
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"run directory {d} is a file")
    if (d / METRICS).exists() or (d / CHECKPOINT).exists():
        raise FileExistsError(f"run directory {d} already holds a run; resume it with "
                              f"`moelab train --resume {d}` or choose another --out")
    return d


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file, then rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json_safe(x: Any) -> Any:
    """Floats that JSON can hold (NaN/inf become None)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def append_metrics(run_dir: Path, entry: dict[str, Any]) -> None:
    """One line of ``metrics.jsonl`` (NaN/inf written as null)."""
    with open(run_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(_json_safe(entry)) + "\n")


def start_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    """A new run: ``config.toml`` (with a reproduce header) and an empty ``metrics.jsonl``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    header = (f"moelab run config ({cfg.name}), resolved.\n"
              f"Reproduce: moelab train --config {run_dir / CONFIG}")
    atomic_write_text(run_dir / CONFIG, dump_toml(cfg, header=header))
    (run_dir / METRICS).write_text("", encoding="utf-8")


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume: drop what was logged after ``step`` (and any final summary or final
    evaluation, which the resumed run writes again)."""
    kept = [e for e in read_metrics(run_dir)
            if e.get("step", 0) <= step and e.get("kind") != "final" and not e.get("final")]
    atomic_write_text(run_dir / METRICS, "".join(json.dumps(e) + "\n" for e in kept))


def append_command(run_dir: Path, command: Sequence[str]) -> None:
    """One line of ``command.txt``: the command that started or resumed the run."""
    with open(run_dir / COMMAND, "a", encoding="utf-8") as f:
        f.write(shlex.join(command) + "\n")
