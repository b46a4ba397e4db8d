"""A Hugging Face causal LM as a moelab model, for ``moelab train`` (``model.kind = "hf"``).

``model.hf_path`` names a checkpoint directory (config.json + weights: fine-tune it) or a
``config.json`` / a directory holding only one (random init, its vocabulary resized to the
data's tokenizer). The model is patched with the run's ``model.default_moe`` and
``model.momentum`` (``moelab.hf.patch``, dispatch ``model.moe.dispatch``); Excitation comes from
``optim.excitation`` through :meth:`HFCausalLM.build_excitation`. The Trainer sees the usual
interface: ``forward(x) -> ModelOutput``, ``moe_layers()``, ``set_track_out_norm``, and a
``state_dict`` holding the HF weights plus moelab's state (``moelab.hf.state``), so checkpoints
and resume carry everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.hf.excitation import Excitation
from moelab.hf.patch import patch, patched_blocks
from moelab.hf.state import load_moelab_state_dict, moelab_state_dict
from moelab.methods.excitation import ExcitationConfig
from moelab.models.blocks import ModelOutput
from moelab.moe import MoELayer

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def hf_weights_file(path: str | Path) -> Path | None:
    """The weights file ``model.hf_path`` loads (None: there is none, so the model starts
    from a random init of its config.json). ``path``: a checkpoint directory or a
    config.json."""
    path = Path(path)
    if not path.is_dir():
        return None
    return next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)


def hf_init_note(path: str | Path) -> str:
    """How ``model.hf_path`` initialises the model, for the run's header line: pretrained
    weights from a file, or a random init (only a config.json there)."""
    found = hf_weights_file(path)
    if found is not None:
        return f"pretrained weights from {found}"
    config = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    return (f"RANDOM INIT from {config} (no weights file: "
            f"{', '.join(_WEIGHT_FILES[::2])} not found)")


def load_hf_causal_lm(path: str | Path, vocab_size: int) -> nn.Module:
    """The ``transformers`` causal LM at ``path``: pretrained weights if the directory holds
    them (``hf_weights_file``), else a random init from its config.json with ``vocab_size``
    tokens."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("model.kind='hf' needs transformers: pip install 'moelab[hf]'") from e
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model.hf_path={str(path)!r} does not exist")
    if hf_weights_file(path) is not None:
        model = AutoModelForCausalLM.from_pretrained(path)
        if model.config.vocab_size < vocab_size:
            raise ValueError(f"model.hf_path={str(path)!r}: vocab_size="
                             f"{model.config.vocab_size} < the data tokenizer's {vocab_size}")
        return model
    config = AutoConfig.from_pretrained(str(path))
    config.vocab_size = vocab_size
    return AutoModelForCausalLM.from_config(config)


class HFCausalLM(nn.Module):
    """A patched HF causal LM with moelab's model interface; ``self.hf`` is the HF model."""

    def __init__(self, hf: nn.Module, init_note: str = "") -> None:
        super().__init__()
        self.hf = hf
        self.init_note = init_note  # hf_init_note: pretrained weights or a random init

    def forward(self, x: Tensor) -> ModelOutput:
        """x: [B, S] token ids -> ModelOutput(logits [B, S, V], aux_loss: HF's router aux
        loss times ``router_aux_loss_coef`` (0 for families without one), moe_losses: [])."""
        out = self.hf(input_ids=x)
        aux = getattr(out, "aux_loss", None)
        coef = float(getattr(self.hf.config, "router_aux_loss_coef", 0.0) or 0.0)
        aux_loss = out.logits.new_zeros((), dtype=torch.float) if aux is None else coef * aux
        return ModelOutput(out.logits, aux_loss, [])

    def moe_layers(self) -> list[MoELayer]:
        """moelab's MoE layers of the patched blocks (none with dispatch='hf')."""
        return [b.moelab for _, b in patched_blocks(self.hf) if b.moelab is not None]

    def set_track_out_norm(self, on: bool = True) -> None:
        for layer in self.moe_layers():
            layer.track_out_norm = on

    def build_excitation(self, optimizer: torch.optim.Optimizer,
                         config: ExcitationConfig) -> Excitation:
        """Excitation over the HF model's sparse blocks (``moelab.hf.Excitation``)."""
        return Excitation(optimizer, self.hf, config=config)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The HF state dict (keys ``hf.<HF key>``) plus moelab's state (keys ``moelab/...``)."""
        state = {f"hf.{k}": v for k, v in self.hf.state_dict().items()}
        state.update({f"moelab/{k}": v for k, v in moelab_state_dict(self.hf).items()})
        return state

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        hf = {k[3:]: v for k, v in state_dict.items() if k.startswith("hf.")}
        ours = {k[7:]: v for k, v in state_dict.items() if k.startswith("moelab/")}
        other = [k for k in state_dict if not k.startswith(("hf.", "moelab/"))]
        if strict and other:
            raise KeyError(f"unexpected keys in the state dict: {other[:5]}")
        load_moelab_state_dict(self.hf, ours)
        return self.hf.load_state_dict(hf, strict=strict, assign=assign)


def build_hf_lm(cfg: Any, vocab_size: int) -> HFCausalLM:
    """The Trainer's model for ``model.kind = "hf"`` (``cfg``: the ``ModelConfig``)."""
    hf = load_hf_causal_lm(cfg.hf_path, vocab_size)
    if cfg.activation_checkpointing:
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    momentum = cfg.momentum if cfg.momentum.rule != "none" else None
    patch(hf, default_moe=cfg.default_moe, momentum=momentum, dispatch=cfg.moe.dispatch)
    return HFCausalLM(hf.train(), hf_init_note(cfg.hf_path))
