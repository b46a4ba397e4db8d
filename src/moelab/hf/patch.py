"""``patch`` / ``unpatch``: moelab's methods on Hugging Face ``transformers`` MoE models.

``patch(model, default_moe=..., momentum=..., dispatch=...)`` changes the model in place:

- every sparse MoE block (see ``moelab.hf.families``) gets a subclass of its own class (same
  ``__name__``) whose forward calls the block's own HF router module (so routing, router
  logits recording and the HF aux loss are unchanged) and then either moelab's ``MoELayer``
  running on transposed *views* of HF's ``gate_up_proj`` / ``down_proj`` (no copies: the
  Parameters, their state-dict keys and ``save_pretrained`` stay HF's), or HF's own experts
  (``dispatch="hf"``). moelab's modules live at ``<block>.moelab`` and are left out of the
  model's state_dict (save them with ``moelab.hf.save_state``).
- with ``momentum`` (a MomentumSMoE rule), every decoder layer holding a patched block gets a
  subclass too: it carries the per-token momentum state from MoE layer to MoE layer within one
  forward, as a keyword argument of the layer (so non-reentrant gradient checkpointing saves
  and replays it), and the block returns the momentum update instead of its output (the
  decoder layer's own residual add stays). The rule is held at ``model.moelab_momentum``
  (learnable mu/gamma are then ordinary model parameters, also left out of the state_dict).

``unpatch(model)`` puts the original classes back; the Parameters are the same objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from moelab.hf.families import FAMILIES, Family
from moelab.methods.default_moe import DefaultMoE, DefaultMoEConfig
from moelab.methods.momentum import CombineRule, MomentumConfig, State, build_combine_rule
from moelab.moe import Experts, MoEConfig, MoELayer, Routing
from moelab.moe.amp import autocast_dtype, autocast_off

__all__ = ["DISPATCHES", "MOELAB_ATTR", "MOMENTUM_ATTR", "patch", "patched_blocks", "unpatch"]

DISPATCHES = ("auto", "loop", "grouped_mm", "padded", "hf")
#: Attribute of a patched block holding its moelab MoELayer (None with dispatch="hf").
MOELAB_ATTR = "moelab"
#: Attribute of the patched model holding the momentum rule.
MOMENTUM_ATTR = "moelab_momentum"
_SWIGLU_ACTS = ("silu", "swish")


# ----------------------------------------------------------------------------- adapters

class HFRouter(nn.Module):
    """Calls a HF router module (``(logits, weights, indices)``) and returns a ``Routing``.

    Holds the HF router outside its module tree (no duplicate state-dict keys)."""

    def __init__(self, block: nn.Module, family: Family) -> None:
        super().__init__()
        self.__dict__["hf_router"] = getattr(block, family.router)
        self.__dict__["hf_block"] = block
        self.family = family

    def forward(self, x_TD: Tensor) -> Routing:
        """Under autocast the HF router runs in fp32 (autocast off, fp32 input), as moelab's
        own router does: logits, softmax and top-k stay fp32."""
        device = x_TD.device.type
        if autocast_dtype(device) is not None:
            with autocast_off(device):
                logits_TE, weights_TK, ids_TK = self.__dict__["hf_router"](x_TD.float())
        else:
            logits_TE, weights_TK, ids_TK = self.__dict__["hf_router"](x_TD)
        probs_TE = self.family.probs(self.__dict__["hf_block"], logits_TE)
        return Routing(logits_TE, probs_TE, ids_TK, weights_TK)


class HFExpertsView(Experts):
    """moelab ``Experts`` computing on a HF experts module's weights, without copying them:
    ``w_in = gate_up_proj.transpose(1, 2)`` [E, D, 2F] (gate then up),
    ``w_out = down_proj.transpose(1, 2)`` [E, F, D]. Holds no parameters of its own."""

    def __init__(self, hf_experts: nn.Module, backend: str) -> None:
        nn.Module.__init__(self)
        self.__dict__["hf_experts"] = hf_experts
        n_experts, width_in, d_model = hf_experts.gate_up_proj.shape
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, width_in // 2
        self.activation = "swiglu"
        self.backend = backend

    @property
    def w_in(self) -> Tensor:  # type: ignore[override]
        return self.__dict__["hf_experts"].gate_up_proj.transpose(1, 2)

    @property
    def w_out(self) -> Tensor:  # type: ignore[override]
        return self.__dict__["hf_experts"].down_proj.transpose(1, 2)

    def reset_parameters(self) -> None:
        raise RuntimeError("HFExpertsView holds no parameters: initialise the HF model instead")


def _check_experts(block: nn.Module, family: Family) -> None:
    experts = block.experts
    cfg = getattr(experts, "config", None)
    act = getattr(cfg, "hidden_act", None)
    shapes_ok = (hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj")
                 and experts.gate_up_proj.dim() == 3 and experts.down_proj.dim() == 3
                 and experts.gate_up_proj.shape[1] == 2 * experts.down_proj.shape[2]
                 and experts.gate_up_proj.shape[2] == experts.down_proj.shape[1])
    biased = any(n.endswith("bias") for n, _ in experts.named_parameters())
    if (not shapes_ok or biased or act not in _SWIGLU_ACTS
            or getattr(experts, "is_transposed", False)
            or not getattr(experts, "is_concatenated", True)):
        raise ValueError(
            f"{type(block).__name__}: its experts ({type(experts).__name__}, hidden_act={act!r})"
            " are not SwiGLU with gate_up_proj [E, 2F, D] / down_proj [E, D, F] and no bias, "
            "so moelab's experts cannot run on them: use dispatch='hf' (no Default MoE)")


# ----------------------------------------------------------------------------- block class

class _MomentumCarrier:
    """The momentum state handed from one patched decoder layer to the next in a forward."""

    def __init__(self, rule: CombineRule) -> None:
        self.rule = rule
        self.state: State | None = None


class _PatchedBlock(nn.Module):
    """Mixin placed before the HF block class; see the module docstring."""

    _moelab_family: Family
    _moelab_orig_class: type

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        family = self._moelab_family
        shape = hidden_states.shape
        rule: CombineRule | None = self.__dict__.get("_moelab_rule")
        state: State = ()
        if rule is not None:
            state = self.__dict__.pop("_moelab_state_in", None)
            if state is None:
                raise RuntimeError(f"{type(self).__name__}: momentum is on but no state was "
                                   "handed in (call the block through its decoder layer)")
            hidden_states = rule.moe_input(hidden_states, state, self._moelab_index)
        layer: MoELayer | None = getattr(self, MOELAB_ATTR)
        if layer is None:
            out = self._moelab_orig_class.forward(self, hidden_states, *args, **kwargs)
            f, extra = (out[0], out[1:]) if family.tuple_output else (out, ())
        else:
            if args or kwargs:
                raise TypeError(f"{type(self).__name__}.forward takes only hidden_states")
            if family.jitter and self.training and self.jitter_noise > 0:
                hidden_states *= torch.empty_like(hidden_states).uniform_(
                    1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            x_TD = hidden_states.reshape(-1, shape[-1])
            y_TD = layer(x_TD).y
            if family.shared is not None:
                y_TD = family.shared(self, x_TD, y_TD)
            f, extra = y_TD.view(shape), ()
        if rule is not None:
            f, self.__dict__["_moelab_state_out"] = rule.update(f, state, self._moelab_index)
        return (f, *extra) if family.tuple_output else f


def _block_class(orig: type, family: Family) -> type:
    return _subclass(orig, (_PatchedBlock, orig), {"_moelab_family": family,
                                                   "_moelab_orig_class": orig})


class _PatchedDecoderLayer(nn.Module):
    """Mixin for a decoder layer holding a patched block when momentum is on: passes the
    momentum state in (as the keyword ``moelab_state``, so a non-reentrant checkpoint of the
    layer replays it) and out (to the carrier shared by the model's layers)."""

    _moelab_orig_class: type

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        carrier: _MomentumCarrier = self.__dict__["_moelab_carrier"]
        if (getattr(self, "gradient_checkpointing", False) and self.training
                and torch.is_grad_enabled()):
            func = getattr(self, "_gradient_checkpointing_func", None)
            if getattr(func, "keywords", {}).get("use_reentrant", False):
                raise RuntimeError(
                    f"{type(self).__name__}: MomentumSMoE carries a state between decoder "
                    "layers, which reentrant gradient checkpointing does not differentiate: "
                    "call model.activation_checkpointing_enable(activation_checkpointing_kwargs="
                    "{'use_reentrant': False})")
        hidden_states = args[0] if args else kwargs["hidden_states"]
        if self.__dict__["_moelab_first"] or carrier.state is None:
            carrier.state = carrier.rule.init_state(hidden_states)
        kwargs["moelab_state"] = carrier.state
        return super().__call__(*args, **kwargs)

    def forward(self, *args: Any, moelab_state: State, **kwargs: Any) -> Any:
        block = self.__dict__["_moelab_block"]
        block.__dict__["_moelab_state_in"] = moelab_state
        out = self._moelab_orig_class.forward(self, *args, **kwargs)
        state = block.__dict__.pop("_moelab_state_out")
        # the last MoE layer drops the state: nothing keeps this forward's graph alive
        self.__dict__["_moelab_carrier"].state = None if self.__dict__["_moelab_last"] else state
        return out


def _decoder_class(orig: type) -> type:
    return _subclass(orig, (_PatchedDecoderLayer, orig), {"_moelab_orig_class": orig})


class _PatchedModel(nn.Module):
    """Mixin for the patched model's own class: ``save_pretrained`` also writes moelab's
    state beside the HF checkpoint (``moelab.hf.state``)."""

    _moelab_orig_class: type

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        if _STATE_WRITER is None:  # moelab.hf's __init__ imports state.py, which sets it
            raise RuntimeError("moelab.hf.state is not imported: import moelab.hf")
        return _STATE_WRITER(self, save_directory, *args, **kwargs)


#: ``moelab.hf.state.save_pretrained_with_state``, registered by that module when it is
#: imported (state.py builds on this module, so this one does not import it).
_STATE_WRITER: Callable[..., Any] | None = None


def set_state_writer(writer: Callable[..., Any]) -> None:
    """Install how a patched model's ``save_pretrained`` writes moelab's state beside the HF
    checkpoint (called once by ``moelab.hf.state``)."""
    global _STATE_WRITER
    _STATE_WRITER = writer


_CLASS_CACHE: dict[tuple[type, ...], type] = {}


def _subclass(orig: type, bases: tuple[type, ...], attrs: dict[str, Any]) -> type:
    """A subclass of ``orig`` with the same name, qualname and module (cached per bases)."""
    key = (*bases, *(id(v) for v in attrs.values()))
    cls = _CLASS_CACHE.get(key)
    if cls is None:
        cls = type(orig.__name__, bases, {"__qualname__": orig.__qualname__,
                                          "__module__": orig.__module__, **attrs})
        _CLASS_CACHE[key] = cls
    return cls


# ----------------------------------------------------------------------------- state dict

def _drop_moelab_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                      local_metadata: Any) -> None:
    for name in (MOELAB_ATTR, MOMENTUM_ATTR):
        for key in [k for k in state_dict if k.startswith(f"{prefix}{name}.")]:
            del state_dict[key]


def _ignore_missing_moelab_keys(module: nn.Module, incompatible: Any) -> None:
    keep = [k for k in incompatible.missing_keys
            if f".{MOELAB_ATTR}." not in f".{k}" and not k.startswith(f"{MOMENTUM_ATTR}.")]
    incompatible.missing_keys[:] = keep


# ----------------------------------------------------------------------------- patch

def patched_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, block)`` of every patched MoE block of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _PatchedBlock)]


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """``(path, block, decoder layer holding it or None)`` of every supported sparse block."""
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    return [(name, m, parents.get(id(m))) for name, m in model.named_modules()
            if type(m).__name__ in FAMILIES]


def patch(model: nn.Module, default_moe: DefaultMoEConfig | None = None,
          momentum: MomentumConfig | None = None, dispatch: str = "auto") -> nn.Module:
    """Apply moelab's layer methods to a ``transformers`` MoE model, in place; returns it.

    default_moe: Default MoE settings (None: off).  momentum: a MomentumSMoE rule (None or
    rule "none": off).  dispatch: "auto" (moelab's experts with their automatic backend; HF's
    own experts for families moelab's experts cannot run, i.e. GPT-OSS), "loop" /
    "grouped_mm" / "padded" (moelab's experts with that backend) or "hf" (HF's own experts and its
    ``experts_implementation``; bit-identical to the unpatched model with the methods off;
    no Default MoE).  Excitation is an optimizer wrapper: ``moelab.hf.Excitation``.
    """
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch={dispatch!r} is invalid: choose one of {DISPATCHES}")
    if default_moe is not None and not isinstance(default_moe, DefaultMoEConfig):
        raise ValueError(f"default_moe={default_moe!r} is invalid: need a DefaultMoEConfig")
    if momentum is not None and not isinstance(momentum, MomentumConfig):
        raise ValueError(f"momentum={momentum!r} is invalid: need a MomentumConfig")
    if patched_blocks(model):
        raise ValueError(f"{type(model).__name__} is already patched: unpatch(model) first")
    found = _find_blocks(model)
    if not found:
        names = sorted({type(m).__name__ for m in model.modules()
                        if "moe" in type(m).__name__.lower() or "expert" in
                        type(m).__name__.lower()})
        raise ValueError(
            f"{type(model).__name__}: no supported MoE block found (supported blocks: "
            f"{', '.join(FAMILIES)}; MoE-like modules in this model: {names or 'none'})")
    if default_moe is not None and dispatch == "hf":
        raise ValueError("default_moe needs moelab's experts (their per-expert output sums): "
                         "dispatch='hf' cannot run it")
    for name, block, parent in found:
        family = FAMILIES[type(block).__name__]
        if not family.moelab_experts and (dispatch in ("loop", "grouped_mm", "padded")
                                          or default_moe is not None):
            raise ValueError(f"{type(block).__name__} ({name}): moelab's experts cannot run "
                             "this family's experts (biased, interleaved gate/up, clamped "
                             "SwiGLU): use dispatch='hf' or 'auto', without default_moe")
        if family.moelab_experts and dispatch != "hf":
            _check_experts(block, family)
        if momentum is not None and momentum.rule != "none" and parent is None:
            raise ValueError(f"{type(block).__name__} ({name}) has no parent decoder layer")
    rule = None
    if momentum is not None and momentum.rule != "none":
        rule = build_combine_rule(momentum, len(found))
        first_param = next(model.parameters(), None)
        if first_param is not None:
            rule.to(first_param.device)
        rule.train(model.training)
        model.add_module(MOMENTUM_ATTR, rule)
        model.__dict__["_moelab_handles"] = [
            model.register_state_dict_post_hook(_drop_moelab_keys),
            model.register_load_state_dict_post_hook(_ignore_missing_moelab_keys)]
    carrier = _MomentumCarrier(rule) if rule is not None else None
    for idx, (_name, block, parent) in enumerate(found):
        family = FAMILIES[type(block).__name__]
        orig = type(block)
        layer = None
        if family.moelab_experts and dispatch != "hf":
            layer = _moelab_layer(block, family, default_moe,
                                  "auto" if dispatch == "auto" else dispatch)
        if layer is not None:
            layer.train(block.training)  # new modules start in training mode
        block.__class__ = _block_class(orig, family)
        block.add_module(MOELAB_ATTR, layer)
        block.__dict__["_moelab_index"] = idx
        block.__dict__["_moelab_handles"] = [
            block.register_state_dict_post_hook(_drop_moelab_keys),
            block.register_load_state_dict_post_hook(_ignore_missing_moelab_keys)]
        if rule is not None:
            block.__dict__["_moelab_rule"] = rule
            parent.__class__ = _decoder_class(type(parent))
            parent.__dict__.update(_moelab_carrier=carrier, _moelab_block=block,
                                   _moelab_first=idx == 0, _moelab_last=idx == len(found) - 1)
    model.__dict__["_moelab_settings"] = {"default_moe": default_moe, "momentum": momentum,
                                          "dispatch": dispatch}
    if hasattr(model, "save_pretrained"):
        model.__class__ = _subclass(type(model), (_PatchedModel, type(model)),
                                    {"_moelab_orig_class": type(model)})
    return model


def _moelab_layer(block: nn.Module, family: Family, default_moe: DefaultMoEConfig | None,
                  backend: str) -> MoELayer:
    router = getattr(block, family.router)
    n_experts, width_in, d_model = block.experts.gate_up_proj.shape
    cfg = MoEConfig(d_model=d_model, n_experts=n_experts, top_k=router.top_k,
                    d_ff=width_in // 2, activation="swiglu", aux_loss_coef=0.0,
                    z_loss_coef=0.0, dispatch=backend)
    method = None
    if default_moe is not None:
        ref = block.experts.gate_up_proj
        method = DefaultMoE(cfg, default_moe).to(ref.device)
    return MoELayer(cfg, method, router=HFRouter(block, family),
                    experts=HFExpertsView(block.experts, backend))


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: original block and decoder-layer classes, moelab's modules removed
    (the HF Parameters are the same objects throughout). Returns the model."""
    blocks = patched_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} is not patched")
    for _name, block in blocks:
        for handle in block.__dict__.pop("_moelab_handles"):
            handle.remove()
        del block._modules[MOELAB_ATTR]
        for key in ("_moelab_index", "_moelab_rule", "_moelab_state_in", "_moelab_state_out"):
            block.__dict__.pop(key, None)
        block.__class__ = block._moelab_orig_class
    for module in model.modules():
        if isinstance(module, _PatchedDecoderLayer):
            for key in ("_moelab_carrier", "_moelab_block", "_moelab_first", "_moelab_last"):
                module.__dict__.pop(key, None)
            module.__class__ = module._moelab_orig_class
    if MOMENTUM_ATTR in model._modules:
        del model._modules[MOMENTUM_ATTR]
    for handle in model.__dict__.pop("_moelab_handles", []):
        handle.remove()
    model.__dict__.pop("_moelab_settings", None)
    if isinstance(model, _PatchedModel):
        model.__class__ = model._moelab_orig_class
    return model
