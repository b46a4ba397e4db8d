"""moelab's own state of a patched HF model, saved beside the HF checkpoint.

``model.save_pretrained(DIR)`` on a patched model writes the plain HF checkpoint (HF's
weights only; it loads into the unpatched class with no missing or unexpected keys) and, beside
it, ``DIR/moelab_hf.pt`` from :func:`save_state`: the settings given to ``patch``, each block's
Default MoE buffers (EMA, update counts) and the momentum rule's parameters (learnable mu/gamma).
It warns when an active method changes the model's function, since the HF checkpoint alone
then loads as a different model. Restore with::

    model = AutoModelForCausalLM.from_pretrained(DIR)
    moelab.hf.load_state(model, DIR)      # patches with the saved settings, loads the state
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moelab.hf.patch import MOMENTUM_ATTR, patch, patched_blocks, set_state_writer
from moelab.methods.default_moe import DefaultMoEConfig
from moelab.methods.momentum import MomentumConfig

STATE_FILE = "moelab_hf.pt"
FORMAT = "moelab.hf/1"

__all__ = ["STATE_FILE", "changes_function", "load_moelab_state_dict", "load_state",
           "moelab_state_dict", "save_state"]


def _settings(model: nn.Module) -> dict[str, Any]:
    settings = model.__dict__.get("_moelab_settings")
    if settings is None:
        raise ValueError(f"{type(model).__name__} is not patched by moelab.hf.patch")
    return settings


def changes_function(model: nn.Module) -> list[str]:
    """The active methods of a patched model that make it compute something other than the
    unpatched HF model (empty: the HF checkpoint alone reproduces it)."""
    settings = _settings(model)
    active = []
    dmoe: DefaultMoEConfig | None = settings["default_moe"]
    if dmoe is not None and not dmoe.straight_through:
        active.append("Default MoE (its default-output term)")
    mom: MomentumConfig | None = settings["momentum"]
    if mom is not None and mom.rule != "none" and not (
            mom.rule == "heavy_ball" and mom.mu == 0.0 and mom.gamma == 1.0 and not mom.learnable):
        active.append(f"MomentumSMoE (rule {mom.rule!r})")
    return active


def moelab_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """moelab's tensors of a patched model: ``blocks.<block path>.<key>`` (Default MoE
    buffers) and ``momentum.<key>`` (the rule's parameters), detached."""

    _settings(model)
    state = {f"blocks.{name}.{k}": v.detach()
             for name, block in patched_blocks(model)
             if block.moelab is not None and block.moelab.method is not None
             for k, v in block.moelab.method.state_dict().items()}
    rule = model._modules.get(MOMENTUM_ATTR)
    if rule is not None:
        state.update({f"momentum.{k}": v.detach() for k, v in rule.state_dict().items()})
    return state


def load_moelab_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what :func:`moelab_state_dict` returned into a model patched the same way
    (every key must match)."""

    have = moelab_state_dict(model)
    if set(have) != set(state):
        missing, extra = sorted(set(have) - set(state)), sorted(set(state) - set(have))
        raise ValueError(f"moelab state does not match the patched model: missing {missing}, "
                         f"unexpected {extra}")
    for name, block in patched_blocks(model):
        prefix = f"blocks.{name}."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            block.moelab.method.load_state_dict(part)
    rule = model._modules.get(MOMENTUM_ATTR)
    if rule is not None:
        rule.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("momentum.")})


def save_state(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write moelab's state of a patched model to ``path`` (a directory: ``path/moelab_hf.pt``;
    else the file itself). Returns the file written."""
    settings = _settings(model)
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    torch.save({
        "format": FORMAT,
        "settings": {
            "default_moe": None if settings["default_moe"] is None
            else dataclasses.asdict(settings["default_moe"]),
            "momentum": None if settings["momentum"] is None
            else dataclasses.asdict(settings["momentum"]),
            "dispatch": settings["dispatch"],
        },
        "state": moelab_state_dict(model),
    }, file)
    return file


def load_state(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Restore moelab's state saved by :func:`save_state` (a directory holding
    ``moelab_hf.pt``, or the file). An unpatched model is patched with the saved settings
    first; a patched one must have been patched with the same settings. Returns the model."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no moelab state file (written by save_state / "
                                "save_pretrained of a patched model)")
    saved = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{file}: not a {FORMAT} state file")
    raw = saved["settings"]
    settings = {
        "default_moe": None if raw["default_moe"] is None
        else DefaultMoEConfig(**raw["default_moe"]),
        "momentum": None if raw["momentum"] is None else MomentumConfig(**raw["momentum"]),
        "dispatch": raw["dispatch"],
    }
    current = model.__dict__.get("_moelab_settings")
    if current is None:
        patch(model, **settings)
    elif current != settings:
        raise ValueError(f"{type(model).__name__} is patched with {current}, the state in "
                         f"{file} was saved with {settings}: unpatch(model) first")
    load_moelab_state_dict(model, saved["state"])
    return model


def save_pretrained_with_state(model: nn.Module, save_directory: str | os.PathLike,
                               *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` of a patched model: the HF checkpoint, then moelab's state beside
    it; warns when the HF checkpoint alone does not reproduce the model."""
    active = changes_function(model)
    if active:
        warnings.warn(
            f"{type(model).__name__}.save_pretrained writes a plain HF checkpoint, but "
            f"{' and '.join(active)} change the model's function: loaded without moelab it is "
            f"a different model. moelab's state goes to {STATE_FILE} beside it; restore with "
            "moelab.hf.load_state(model, dir) after from_pretrained.", UserWarning, stacklevel=3)
    out = model._moelab_orig_class.save_pretrained(model, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        save_state(model, save_directory)
    return out


set_state_writer(save_pretrained_with_state)
