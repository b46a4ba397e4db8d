"""Where the Trainer's metrics go: ``metrics.jsonl`` (always) plus TensorBoard and W&B.

Chosen with ``train.loggers`` (``--set 'train.loggers=["jsonl", "tensorboard", "wandb"]'``).
``jsonl`` is always on (reports, ``moelab eval`` and resume read it); ``tensorboard`` and
``wandb`` need their packages (``pip install 'moelab[tensorboard]'``, ``'moelab[wandb]'``, or
both: ``'moelab[tracking]'``) and neither is imported unless listed.

Every logger receives the Trainer's ``metrics.jsonl`` entries (``kind`` train / eval / final)
and the trackers map them to these names (``i`` = the i-th MoE layer, the ``layer`` of
``metrics.jsonl``; one TensorBoard section per prefix)::

    train/loss  train/aux_loss  train/lr  train/grad_norm  train/tokens_per_s (images_per_s)
    train/elapsed_s                                   every train.log_every steps
    val/loss  val/ppl (LM) or val/acc                 every evaluation
    layer<i>/gini  layer<i>/entropy  layer<i>/entropy_normalized  layer<i>/load_imbalance
    layer<i>/dead_experts  layer<i>/dropped_frac  layer<i>/aux_loss  layer<i>/z_loss
    layer<i>/unpicked_frac  layer<i>/experts_per_token   tokens no expert processed; experts
                                                         per token (the expert-choice measures)
    layer<i>/expert_share           histogram, x = expert id, height = its share of tokens
    layer<i>/excitation_phi         histogram of Φ over the experts (+ _min, _max), Excitation on
    layer<i>/default_moe_ema_norm   histogram of ‖Ê_e‖ over the experts (+ _mean), Default MoE on
    layer<i>/default_moe_beta       per expert (x = expert id): its EMA beta at the last training
    layer<i>/default_moe_horizon    step (1: not routed then) and its memory in tokens, n_e /
                                    (1 - beta_e) (+ _beta_min, _beta_max, _horizon_mean)
    layer<i>/momentum_mu  layer<i>/momentum_gamma     learnable MomentumSMoE only
    final/<key>                     the final summary (val_*, test_*, gini_mean, ...)

Routing metrics come from the evaluation (counts over the whole eval window), so the
``layer<i>`` section updates every ``train.eval_every`` steps and at the end.

TensorBoard events go into the run directory itself (``tensorboard --logdir runs/`` lists
every run by its directory); a resumed run opens a new event file with ``purge_step`` =
checkpoint step + 1, so TensorBoard drops anything logged after the checkpoint by the
interrupted process. W&B runs offline unless ``WANDB_MODE`` says otherwise (``online`` once
you are logged in); its files go to ``RUN/wandb/`` (or ``$WANDB_DIR``), project
``$WANDB_PROJECT`` (default ``moelab``), run name = the run directory's name, group =
``train.tracker_group``; the run id is kept in ``RUN/wandb_id.txt`` so a resume continues
the same W&B run. Only rank 0 logs under torchrun (the Trainer opens loggers there only).
"""

from __future__ import annotations

import math
import numbers
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moelab.config import RunConfig, config_to_dict, dump_toml
from moelab.moe.dtensor import full
from moelab.runs import directory as rundir

__all__ = [
    "LOGGERS", "WANDB_ID", "Histogram", "JsonlLogger", "Logger", "LoggerGroup",
    "TensorBoardLogger", "WandbLogger", "method_summary", "moe_layer_index", "open_loggers",
    "require_backends", "tracker_records",
]

LOGGERS = ("jsonl", "tensorboard", "wandb")
WANDB_ID = "wandb_id.txt"
_INSTALL = {"tensorboard": "pip install 'moelab[tensorboard]' (or: pip install tensorboard)",
            "wandb": "pip install 'moelab[wandb]' (or: pip install wandb)"}


def require_backends(names: tuple[str, ...] | list[str]) -> None:
    """Import the tracker packages named in ``names``; a missing one raises a one-line
    ModuleNotFoundError naming the ``pip install`` to run."""
    for name in names:
        if name == "jsonl":
            continue
        if name not in LOGGERS:
            raise ValueError(f"train.loggers: unknown logger {name!r}; choose from "
                             f"{', '.join(LOGGERS)}")
        try:
            if name == "tensorboard":
                import tensorboard  # noqa: F401
                import torch.utils.tensorboard  # noqa: F401
            else:
                import wandb  # noqa: F401
        except ImportError as e:
            raise ModuleNotFoundError(
                f"train.loggers lists {name!r} but the {name} package is not installed "
                f"({e}); run: {_INSTALL[name]}") from None


# ------------------------------------------------------------------ entry -> tracker records


@dataclass(frozen=True)
class Histogram:
    """One histogram record. ``per_expert``: ``values[e]`` is the height of bucket
    ``[e, e+1)`` (x = expert id); otherwise ``values`` are samples to bin."""

    values: list[float]
    per_expert: bool = False


_LAYER_SCALARS = {"gini": "gini", "entropy": "entropy", "entropy_normalized": "entropy_normalized",
                  "load_imbalance": "load_imbalance", "dead": "dead_experts",
                  "dropped_frac": "dropped_frac", "aux_loss": "aux_loss", "z_loss": "z_loss",
                  "unpicked_frac": "unpicked_frac", "experts_per_token": "experts_per_token"}


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _tag(name: str) -> str:
    return re.sub(r"[^\w./-]", "_", name)


def tracker_records(entry: dict[str, Any], layer_of: dict[str, int] | None = None
                    ) -> tuple[dict[str, float], dict[str, Histogram]]:
    """The scalars and histograms a tracker logs for one ``metrics.jsonl`` entry (names in
    the module docstring). ``layer_of`` maps an Excitation group name (a module path) to its
    MoE layer index; unknown groups log under ``excitation/<name>/``. Non-finite scalars are
    left out (the JSON line has null there)."""
    layer_of = layer_of or {}
    kind = entry.get("kind")
    scalars: dict[str, float] = {}
    hists: dict[str, Histogram] = {}
    if kind == "train":
        for k, v in entry.items():
            if k != "step" and _is_number(v):
                scalars[f"train/{k}"] = float(v)
    elif kind == "eval":
        split = entry.get("split", "val")
        for k, v in entry.items():
            if k.startswith(f"{split}_") and not k.endswith("_items") and _is_number(v):
                scalars[f"{split}/{k[len(split) + 1:]}"] = float(v)
        for row in entry.get("layers", []):
            p = f"layer{row['layer']}"
            for k, name in _LAYER_SCALARS.items():
                if _is_number(row.get(k)):
                    scalars[f"{p}/{name}"] = float(row[k])
            if row.get("share"):
                hists[f"{p}/expert_share"] = Histogram(list(row["share"]), per_expert=True)
        for name, exc in (entry.get("excitation") or {}).items():
            p = f"layer{layer_of[name]}" if name in layer_of else f"excitation/{_tag(name)}"
            hists[f"{p}/excitation_phi"] = Histogram(list(exc["multipliers"]))
            scalars[f"{p}/excitation_phi_min"] = float(exc["min"])
            scalars[f"{p}/excitation_phi_max"] = float(exc["max"])
        for row in entry.get("default_moe") or []:
            p = f"layer{row['layer']}"
            norms = list(row["ema_norm"])
            hists[f"{p}/default_moe_ema_norm"] = Histogram(norms)
            scalars[f"{p}/default_moe_ema_norm_mean"] = sum(norms) / len(norms)
            if row.get("beta") and row.get("horizon"):
                betas, horizons = list(row["beta"]), list(row["horizon"])
                hists[f"{p}/default_moe_beta"] = Histogram(betas, per_expert=True)
                hists[f"{p}/default_moe_horizon"] = Histogram(horizons, per_expert=True)
                scalars[f"{p}/default_moe_beta_min"] = min(betas)
                scalars[f"{p}/default_moe_beta_max"] = max(betas)
                scalars[f"{p}/default_moe_horizon_mean"] = sum(horizons) / len(horizons)
        mom = entry.get("momentum") or {}
        for key in ("mu", "gamma"):
            for i, v in enumerate(mom.get(key, [])):
                scalars[f"layer{i}/momentum_{key}"] = float(v)
    elif kind == "final":
        for k, v in entry.items():
            if k not in ("step", "params", "items_seen") and not k.endswith("_items") \
                    and _is_number(v):
                scalars[f"final/{k}"] = float(v)
    scalars = {k: v for k, v in scalars.items() if math.isfinite(v)}
    return scalars, hists


def moe_layer_index(model: torch.nn.Module) -> dict[str, int]:
    """Module path of each MoE layer -> its index among the MoE layers (depth order); the
    paths are Excitation's group names."""
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    index = {id(m): i for i, m in enumerate(layers)}
    return {path: index[id(m)] for path, m in model.named_modules() if id(m) in index}


@torch.no_grad()
def method_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Method state worth watching, for an eval entry of ``metrics.jsonl``:
    ``default_moe``: [{layer, ema_norm [E], beta [E], horizon [E]}] (‖Ê_e‖ of the EMA as used
    in the forward, bias correction included; each expert's beta and memory in tokens at the
    last training step, ``DefaultMoE.beta_E`` / ``horizon_E``) when Default MoE is on;
    ``momentum``: {mu [L], gamma [L]} when MomentumSMoE's μ/γ are learnable. Empty when
    neither applies."""
    out: dict[str, Any] = {}
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    dm = []
    for i, layer in enumerate(layers):
        method = getattr(layer, "method", None)
        value = getattr(method, "value", None)
        if callable(value):
            row = {"layer": i, "ema_norm": value().float().norm(dim=1).cpu().tolist()}
            if isinstance(getattr(method, "beta_E", None), torch.Tensor):
                row["beta"] = method.beta_E.float().cpu().tolist()
                row["horizon"] = method.horizon_E.float().cpu().tolist()
            dm.append(row)
    if dm:
        out["default_moe"] = dm
    rule = getattr(model, "combine_rule", None)
    if getattr(rule, "learnable", False):
        # under FSDP a DTensor shard: gathered (every rank computes this summary)
        out["momentum"] = {"mu": full(rule.mu.detach()).float().cpu().tolist(),
                           "gamma": full(rule.gamma.detach()).float().cpu().tolist()}
    return out


# ------------------------------------------------------------------ loggers


class Logger:
    """Receives every ``metrics.jsonl`` entry; ``close(failed)`` at the end of ``fit``."""

    def log(self, entry: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        pass


class JsonlLogger(Logger):
    """Appends each entry to ``RUN/metrics.jsonl`` (``moelab.runs.directory``)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def log(self, entry: dict[str, Any]) -> None:
        rundir.append_metrics(self.run_dir, entry)


class _Tracker(Logger):
    def __init__(self, layer_of: dict[str, int]) -> None:
        self.layer_of = layer_of

    def log(self, entry: dict[str, Any]) -> None:
        scalars, hists = tracker_records(entry, self.layer_of)
        if scalars or hists:
            self.write(int(entry["step"]), scalars, hists)

    def write(self, step: int, scalars: dict[str, float], hists: dict[str, Histogram]) -> None:
        raise NotImplementedError


class TensorBoardLogger(_Tracker):
    """Event files in ``log_dir`` via ``torch.utils.tensorboard``; ``resume_step``: the
    checkpoint step a resumed run continues from (later events of the old run are purged)."""

    def __init__(self, log_dir: Path, layer_of: dict[str, int], *, resume_step: int | None,
                 config_text: str | None = None) -> None:
        super().__init__(layer_of)
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge, flush_secs=10)
        if config_text is not None:
            self.writer.add_text("config", "```\n" + config_text + "```", global_step=0)

    def write(self, step: int, scalars: dict[str, float], hists: dict[str, Histogram]) -> None:
        import numpy as np

        w = self.writer
        for tag, v in scalars.items():
            w.add_scalar(tag, v, global_step=step)
        for tag, h in hists.items():
            x = np.asarray(h.values, dtype=np.float64)
            if h.per_expert:
                n = len(x)
                w.add_histogram_raw(tag, min=0.0, max=float(n), num=float(x.sum()),
                                    sum=float((x * (np.arange(n) + 0.5)).sum()),
                                    sum_squares=float((x * (np.arange(n) + 0.5) ** 2).sum()),
                                    bucket_limits=np.arange(1, n + 1, dtype=np.float64).tolist(),
                                    bucket_counts=x.tolist(), global_step=step)
            else:
                w.add_histogram(tag, x, global_step=step)
        w.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbLogger(_Tracker):
    """A W&B run (offline unless ``WANDB_MODE`` is set) whose id lives in ``RUN/wandb_id.txt``."""

    def __init__(self, run_dir: Path, layer_of: dict[str, int], cfg: RunConfig, *,
                 resumed: bool, quiet: bool) -> None:
        super().__init__(layer_of)
        import wandb

        self._wandb = wandb
        id_file = run_dir / WANDB_ID
        if resumed and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = secrets.token_hex(4)  # W&B ids: short, [a-z0-9]
            rundir.atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "moelab"), id=run_id, resume="allow",
            name=run_dir.name, group=cfg.train.tracker_group, config=config_to_dict(cfg),
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
            mode=None if os.environ.get("WANDB_MODE") else "offline",
            settings=wandb.Settings(silent=quiet))

    def write(self, step: int, scalars: dict[str, float], hists: dict[str, Histogram]) -> None:
        data: dict[str, Any] = dict(scalars)
        for tag, h in hists.items():
            if h.per_expert:
                edges = list(range(len(h.values) + 1))
                data[tag] = self._wandb.Histogram(np_histogram=(list(h.values), edges))
            else:
                data[tag] = self._wandb.Histogram(h.values)
        self.run.log(data, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class LoggerGroup(Logger):
    """Every configured logger; ``log`` / ``close`` go to each in turn."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def log(self, entry: dict[str, Any]) -> None:
        for lg in self.loggers:
            lg.log(entry)

    def close(self, failed: bool = False) -> None:
        for lg in self.loggers:
            lg.close(failed)


def open_loggers(cfg: RunConfig, run_dir: Path, model: torch.nn.Module, *,
                 resume_step: int | None = None, quiet: bool = False) -> LoggerGroup:
    """The loggers of ``cfg.train.loggers`` for ``run_dir`` (jsonl always first).
    ``resume_step``: the step a resumed run continues from (None: a new run)."""
    names = cfg.train.loggers
    require_backends(names)
    layer_of = moe_layer_index(model)
    group = LoggerGroup([JsonlLogger(run_dir)])
    try:
        if "tensorboard" in names:
            group.loggers.append(TensorBoardLogger(
                run_dir, layer_of, resume_step=resume_step,
                config_text=None if resume_step is not None else dump_toml(cfg)))
        if "wandb" in names:
            group.loggers.append(WandbLogger(run_dir, layer_of, cfg,
                                             resumed=resume_step is not None, quiet=quiet))
    except BaseException:
        group.close(failed=True)  # the ones already open
        raise
    return group
