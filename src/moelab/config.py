"""Run configuration: one frozen dataclass tree that describes a whole training run.

``RunConfig`` = ``name`` + ``model: ModelConfig`` (+ ``model.moe: MoEConfig``,
``model.default_moe``, ``model.momentum``) + ``data: DataConfig`` + ``optim: OptimConfig``
(+ ``optim.excitation: ExcitationConfig | None``) + ``train: TrainConfig``. Every dataclass
validates itself in ``__post_init__`` with ``moelab.validation.require``, naming its bare field;
the loader adds the dotted path (``optim.lr=-1 is invalid: need lr > 0``). Keys that moved
(``model.n_experts`` -> ``model.moe.n_experts``) raise an error naming the new key.

TOML <-> dataclasses, generically (works for any nested frozen dataclass tree):

* :func:`load_config` reads a TOML file (or a shipped config by name), applies ``--set``
  overrides and builds the tree. Tables become nested dataclasses; an ``X | None`` dataclass
  field is None when its table is absent and built (defaults filled in) when present; unknown
  keys raise a :class:`ConfigError` naming them with a close-match suggestion. A top-level
  ``base = "NAME-or-path"`` key inherits from another config (deep merge, this file wins).
* :func:`apply_overrides` applies ``KEY=VALUE`` strings: VALUE is parsed as a TOML literal and
  falls back to a plain string; ``none`` sets an optional field to None
  (``model.default_moe=none`` disables Default MoE).
* :func:`dump_toml` writes the resolved tree back; ``config_from_toml(dump_toml(c)) == c``.

Invariant that keeps the round trip exact: every optional (``X | None``) field defaults to None,
so "absent from the file" and "None" are the same thing.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import operator
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

from moelab.methods.excitation import ExcitationConfig
from moelab.models.config import ModelConfig
from moelab.validation import FieldError, require

__all__ = [
    "ConfigError",
    "DataConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_from_toml",
    "config_to_dict",
    "dump_toml",
    "dump_toml_all",
    "load_config",
    "resolve_config_path",
    "shipped_configs",
]

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
TOKENIZERS = ("byte", "bpe")


class ConfigError(ValueError):
    """A config file, key or value is wrong. The message names the key."""



def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class DataConfig:
    """What the model reads.

    dataset: a text dataset (``shakespeare``, ``wikitext``, ``textfile``) for ``model.kind =
        "lm"``, an image dataset (``mnist5k``, ``cifar10``, ``npz``, ``idx``) for "vit"/"mlp".
    path: the dataset's files (required by wikitext/textfile/cifar10/npz/idx; optional
        override for the built-ins).
    tokenizer: "byte" (vocab 256) or "bpe" (byte-level BPE trained on the train split,
        ``bpe_vocab_size`` tokens, cached; needs the ``tokenizers`` package).
    seq_len: LM context length S.  batch_size: sequences (or images) per micro-batch.
    eval_batches: batches per periodic evaluation (None: the whole validation split).
    final_eval_batches: batches of the final validation/test evaluation (None: whole split).
    """

    dataset: str = "shakespeare"
    path: str | None = None
    tokenizer: str = "byte"
    bpe_vocab_size: int = 4096
    seq_len: int = 128
    batch_size: int = 32
    eval_batches: int | None = None
    final_eval_batches: int | None = None

    def __post_init__(self) -> None:
        from moelab.data import IMAGE_DATASETS, TEXT_DATASETS

        known = TEXT_DATASETS + IMAGE_DATASETS
        require(self.dataset in known, "dataset", self.dataset, f"choose one of {known}")
        require(self.tokenizer in TOKENIZERS, "tokenizer", self.tokenizer,
               f"choose one of {TOKENIZERS}")
        require(_is_int(self.bpe_vocab_size) and self.bpe_vocab_size >= 257,
               "bpe_vocab_size", self.bpe_vocab_size, "need an int >= 257")
        for name in ("seq_len", "batch_size"):
            v = getattr(self, name)
            require(_is_int(v) and v >= 1, name, v, "need a positive int")
        for name in ("eval_batches", "final_eval_batches"):
            v = getattr(self, name)
            require(v is None or (_is_int(v) and v >= 1), name, v,
                   "need a positive int (or none for the whole split)")

    @property
    def is_text(self) -> bool:
        from moelab.data import TEXT_DATASETS

        return self.dataset in TEXT_DATASETS


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule.

    name: "adamw", "adam" or "sgd".  lr: peak learning rate.  betas, eps: Adam(W).
    weight_decay: decoupled (adamw) or L2 (adam, sgd).  momentum, nesterov: SGD.
    warmup_steps or warmup_frac (of ``train.steps``; not both): linear warmup from 0.
    schedule: "cosine" (to ``min_lr_ratio * lr`` at the last step), "linear" (same end),
        "constant".  grad_clip: max global grad norm, 0 = off.
    excitation: wrap the optimizer in Excitation (None = off).
    fused: torch's fused optimizer kernels (one kernel for all parameters; a non-finite step
        is skipped on the device, so the step reads nothing back). None: fused on CUDA, the
        for-each implementation elsewhere (CPU results unchanged).
    """

    name: str = "adamw"
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    warmup_steps: int = 0
    warmup_frac: float = 0.0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    excitation: ExcitationConfig | None = None
    fused: bool | None = None

    def __post_init__(self) -> None:
        require(self.name in OPTIMIZERS, "name", self.name, f"choose one of {OPTIMIZERS}")
        require(self.fused is None or isinstance(self.fused, bool), "fused", self.fused,
                "need true, false or none (fused on CUDA)")
        require(math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "need lr > 0")
        require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
               "betas", self.betas, "need two values in [0, 1)")
        require(self.eps > 0, "eps", self.eps, "need eps > 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "need >= 0")
        require(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "need 0 <= m < 1")
        require(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps",
               self.warmup_steps, "need an int >= 0")
        require(0.0 <= self.warmup_frac < 1.0, "warmup_frac", self.warmup_frac,
               "need 0 <= frac < 1")
        require(not (self.warmup_steps and self.warmup_frac), "warmup_frac",
               self.warmup_frac, "set warmup_steps or warmup_frac, not both")
        require(self.schedule in SCHEDULES, "schedule", self.schedule,
               f"choose one of {SCHEDULES}")
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio,
               "need 0 <= ratio <= 1")
        require(math.isfinite(self.grad_clip) and self.grad_clip >= 0, "grad_clip",
               self.grad_clip, "need >= 0 (0 = off)")
        require(self.excitation is None or isinstance(self.excitation, ExcitationConfig),
                "excitation", self.excitation, "need an ExcitationConfig or None")

    def warmup(self, total_steps: int) -> int:
        """Number of warmup steps for a run of ``total_steps``."""
        return self.warmup_steps or int(round(self.warmup_frac * total_steps))

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of ``lr`` for optimizer step ``step`` (0-based) of ``total_steps``."""
        warm = self.warmup(total_steps)
        if step < warm:
            return (step + 1) / warm
        if self.schedule == "constant":
            return 1.0
        span = max(1, total_steps - 1 - warm)
        t = min(1.0, (step - warm) / span)
        shape = 0.5 * (1.0 + math.cos(math.pi * t)) if self.schedule == "cosine" else 1.0 - t
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


@dataclass(frozen=True)
class TrainConfig:
    """The loop.

    steps: optimizer steps.  eval_every: validation every N steps (0: only at the end).
    log_every: a metrics line every N steps.  checkpoint_every: ``ckpt.pt`` every N steps
        (0: only at the end).  seed: everything random (init, data order, dropout).
    out_dir: run directory (None: ``runs/<name>-<timestamp>``).
    device: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N" or "mps".
    threads: torch CPU threads (0: torch default).
    grad_accum: micro-batches per optimizer step.
    deterministic: "auto" (on for CPU, off for CUDA and other devices), true or false. On:
        deterministic algorithms that raise where torch has none (``warn_only=False``); on
        CUDA also math attention and a deterministic cuBLAS workspace
        (``moelab.distributed.wrap.runtime_settings``; docs/GPU.md).
    expert_parallel: under torchrun, shard every MoE layer's experts over this many ranks
        (a divisor of the world size and of n_experts; 1: plain data parallel).
    parallel: how the other parameters are spread over the ranks under torchrun: "ddp" (a
        full copy on every rank, gradients averaged) or "fsdp" (FSDP2: every block's
        parameters, gradients and optimizer state sharded over the ranks; experts over what
        expert_parallel leaves; sharded checkpoints that resume at any world size;
        ``moelab.distributed.fsdp``). On one process nothing is wrapped either way; "fsdp"
        still writes sharded checkpoints, so the run can continue under torchrun.
    dist_backend: torch.distributed backend under torchrun: "auto" (nccl on cuda, else gloo),
        "gloo" or "nccl".
    loggers: where metrics go (``moelab.train.loggers``): "jsonl" (``metrics.jsonl``, always on),
        "tensorboard", "wandb" (``pip install 'moelab[tracking]'`` for both).
    tracker_group: W&B group of this run (e.g. the experiment of a ``moelab reproduce`` arm).
    skip_nonfinite_steps: how many steps with a NaN/inf loss or gradient norm the run may
        skip (no update applied) before it stops; 0: stop at the first.
    progress_every: a plain progress line every N steps when stderr is not a terminal
        (0: about 20 lines per run).
    precision: "auto" (bf16 mixed precision on a CUDA GPU that has it, fp32 elsewhere),
        "fp32" (TF32 off), "tf32" (CUDA) or "bf16" (fp32 weights and optimizer state, forward
        under bf16 autocast; ``moelab.train.precision``).
    compile: ``torch.compile`` each block (fullgraph; ``moelab.distributed.wrap.compile_blocks``).
    """

    steps: int = 1000
    eval_every: int = 200
    log_every: int = 10
    checkpoint_every: int = 0
    seed: int = 0
    out_dir: str | None = None
    device: str = "auto"
    threads: int = 0
    grad_accum: int = 1
    deterministic: bool | str = "auto"
    expert_parallel: int = 1
    parallel: str = "ddp"
    dist_backend: str = "auto"
    loggers: tuple[str, ...] = ("jsonl",)
    tracker_group: str | None = None
    skip_nonfinite_steps: int = 0
    progress_every: int = 0
    precision: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        require(_is_int(self.steps) and self.steps >= 1, "steps", self.steps,
               "need a positive int")
        for name in ("eval_every", "checkpoint_every", "threads", "skip_nonfinite_steps",
                     "progress_every"):
            v = getattr(self, name)
            require(_is_int(v) and v >= 0, name, v, "need an int >= 0")
        for name in ("log_every", "grad_accum", "expert_parallel"):
            v = getattr(self, name)
            require(_is_int(v) and v >= 1, name, v, "need a positive int")
        require(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "need an int >= 0")
        require(re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", self.device) is not None,
               "device", self.device, "use cpu, cuda, cuda:N, mps or auto")
        require(self.parallel in ("ddp", "fsdp"), "parallel", self.parallel,
                "use ddp or fsdp")
        require(self.dist_backend in ("auto", "gloo", "nccl"), "dist_backend",
                 self.dist_backend, "use auto, gloo or nccl")
        known = ("jsonl", "tensorboard", "wandb")  # moelab.train.loggers.LOGGERS
        require(all(x in known for x in self.loggers), "loggers", list(self.loggers),
                f"choose from {', '.join(known)}")
        require(len(set(self.loggers)) == len(self.loggers), "loggers", list(self.loggers),
                "a logger is listed twice")
        require(self.tracker_group is None or self.tracker_group.strip() != "",
                "tracker_group", self.tracker_group, "need a non-empty string or none")
        from moelab.train.precision import PRECISIONS

        require(self.precision in PRECISIONS, "precision", self.precision,
                f"choose one of {', '.join(PRECISIONS)}")
        require(isinstance(self.compile, bool), "compile", self.compile, "need true or false")
        require(isinstance(self.deterministic, bool) or self.deterministic == "auto",
                "deterministic", self.deterministic, "use auto, true or false")


@dataclass(frozen=True)
class RunConfig:
    """A whole run: ``name`` (used for the default run directory) and the four sections."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        require(isinstance(self.name, str) and re.fullmatch(r"[\w.+-]+", self.name) is not None,
               "name", self.name, "use letters, digits, '_', '-', '.', '+'")
        kind, ds = self.model.kind, self.data.dataset
        ep = self.train.expert_parallel
        n_experts = self.model.moe.n_experts
        require(n_experts % ep == 0, "train.expert_parallel", ep,
                f"need a divisor of model.moe.n_experts={n_experts}")
        require(not (kind == "hf" and ep > 1 and self.train.parallel == "fsdp"),
                "train.expert_parallel", ep, "model.kind='hf' with train.parallel='fsdp' "
                "shards the experts with the rest of each decoder layer: use 1")
        if kind in ("lm", "hf"):
            require(self.data.is_text, "data.dataset", ds,
                   f"model.kind={kind!r} needs a text dataset, not an image dataset")
            require(kind == "hf" or self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
                   self.data.seq_len, f"need <= model.max_seq_len={self.model.max_seq_len}")
        else:
            require(not self.data.is_text, "data.dataset", ds,
                   f"model.kind={kind!r} needs an image dataset, not a text dataset")


# ------------------------------------------------------------------ dict <-> dataclasses

_NONE_WORDS = ("none", "null")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            if len(args) == 1:
                return args[0], True
            return functools.reduce(operator.or_, args), True
    return tp, False


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a table"
    names = {int: "an int", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"an array of {getattr(args[0], '__name__', args[0])} values"
        return f"an array of {len(args)} values"
    return str(tp)


def _bad(path: str, value: object, tp: Any, optional: bool) -> ConfigError:
    need = _type_name(tp) + (" or none" if optional else "")
    return ConfigError(f"{path}={value!r} is invalid: need {need}")


def _convert(path: str, value: Any, tp: Any) -> Any:
    base, optional = _split_optional(tp)
    if value is None or (optional and isinstance(value, str)
                         and value.strip().lower() in _NONE_WORDS and base is not str):
        if optional:
            return None
        raise _bad(path, value, base, optional)
    if optional and base is str and value is None:
        return None
    if dataclasses.is_dataclass(base):
        if not isinstance(value, dict):
            raise _bad(path, value, base, optional)
        return _build(base, value, path)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise _bad(path, value, base, optional)
    if base is int:
        if _is_int(value):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _bad(path, value, base, optional)
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _bad(path, value, base, optional)
    if base is str:
        if isinstance(value, str):
            if optional and value.strip().lower() in _NONE_WORDS:
                return None
            return value
        if _is_int(value):  # `--set data.path=2024` parses as a TOML int
            return str(value)
        raise _bad(path, value, base, optional)
    if typing.get_origin(base) is tuple:
        args = typing.get_args(base)
        if not isinstance(value, (list, tuple)):
            raise _bad(path, value, base, optional)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _bad(path, value, base, optional)
        return tuple(_convert(f"{path}[{i}]", v, a)
                     for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        for alt in typing.get_args(base):
            try:
                return _convert(path, value, alt)
            except ConfigError:
                pass
        raise _bad(path, value, base, optional)
    return value


#: Keys that moved (old dotted key -> new one): the MoE layer options now live in
#: ``[model.moe]`` (``moelab.moe.MoEConfig``) instead of being copied into ``[model]``.
MOVED_KEYS = {f"model.{k}": f"model.moe.{k}" for k in (
    "n_experts", "top_k", "d_ff", "activation", "normalize_topk", "capacity_factor",
    "aux_loss_coef", "z_loss_coef", "dispatch")}


def _unknown_key(path: str, key: str, known: list[str]) -> ConfigError:
    full = f"{path}.{key}" if path else key
    if full in MOVED_KEYS:
        new = MOVED_KEYS[full]
        table, leaf = new.rsplit(".", 1)
        return ConfigError(f"key {full!r} moved to {new!r} (TOML: `{leaf} = ...` under "
                           f"[{table}]; CLI: --set {new}=...)")
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = (f"; did you mean {path + '.' if path else ''}{close[0]}?" if close
            else f"; known keys: {', '.join(known)}")
    return ConfigError(f"unknown key {full!r}{hint}")


def _build(cls: type, data: dict[str, Any], path: str) -> Any:
    hints = _field_types(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    known = [f.name for f in fields]
    for key in data:
        if key not in known:
            raise _unknown_key(path, key, known)
    kwargs = {}
    for f in fields:
        if f.name in data:
            kwargs[f.name] = _convert(f"{path}.{f.name}" if path else f.name, data[f.name],
                                      hints[f.name])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except FieldError as e:
        raise ConfigError(str(e.at(path))) from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def config_from_dict(data: dict[str, Any], cls: type = RunConfig) -> Any:
    """Build ``cls`` (a dataclass tree) from nested dicts; raises :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a table, got {type(data).__name__}")
    return _build(cls, data, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dicts (tuples as lists, None values dropped), ready for TOML or JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        if dataclasses.is_dataclass(v):
            out[f.name] = config_to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


# ------------------------------------------------------------------------------- TOML

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        r = repr(v)
        return r if any(c in r for c in ".en") else r + ".0"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def _check_dumpable(cfg: Any, path: str = "") -> None:
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        key = f"{path}{f.name}"
        if v is None:
            default = (f.default if f.default is not dataclasses.MISSING else
                       f.default_factory() if f.default_factory is not dataclasses.MISSING
                       else dataclasses.MISSING)
            if default is not None:
                raise ValueError(f"{key}=None cannot be written to TOML: its default is "
                                 f"{default!r}, so leaving it out would change the config")
        elif dataclasses.is_dataclass(v):
            _check_dumpable(v, key + ".")


def _dump_table(d: dict[str, Any], prefix: str, lines: list[str]) -> None:
    scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in d.items() if isinstance(v, dict)}
    if prefix and (scalars or not tables):
        lines.append(f"\n[{prefix}]")
    for k, v in scalars.items():
        lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in tables.items():
        _dump_table(v, f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k), lines)


def dump_toml(cfg: Any, header: str | None = None) -> str:
    """The config tree as TOML text (every field written, None fields left out)."""
    _check_dumpable(cfg)
    lines: list[str] = []
    if header:
        lines += [f"# {line}" if line else "#" for line in header.splitlines()]
    _dump_table(config_to_dict(cfg), "", lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def dump_toml_all(cfg: Any) -> str:
    """Every key of the config tree: :func:`dump_toml`'s TOML plus, as comment lines, each
    key left unset (``# capacity_factor: none (unset)``) and each table that is off, with its
    keys at their defaults (``# [model.default_moe]`` ...). Loads back to ``cfg``."""
    _check_dumpable(cfg)
    lines: list[str] = []
    _dump_all(cfg, "", lines, off=False)
    return "\n".join(lines).lstrip("\n") + "\n"


def _dump_all(obj: Any, prefix: str, lines: list[str], off: bool) -> None:
    """``obj``'s table (``off``: an unset table, written as comments) for dump_toml_all."""
    c = "# " if off else ""
    types_ = _field_types(type(obj))
    tables = []
    if prefix:
        note = "  (none: off; setting any of its keys switches it on)" if off else ""
        lines.append(f"\n{c}[{prefix}]{note}")
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        tp, _ = _split_optional(types_[f.name])
        if dataclasses.is_dataclass(tp):
            tables.append((f.name, tp, v))
        elif v is None:
            lines.append(f"# {_toml_key(f.name)}: none (unset)")
        else:
            lines.append(f"{c}{_toml_key(f.name)} = {_toml_value(v)}")
    for name, tp, v in tables:
        sub = f"{prefix}.{_toml_key(name)}" if prefix else _toml_key(name)
        _dump_all(tp() if v is None else v, sub, lines, off or v is None)


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from None


def config_from_toml(text: str, cls: type = RunConfig) -> Any:
    """Build ``cls`` from TOML text (no ``base`` resolution, no overrides)."""
    return config_from_dict(_parse_toml(text, "config"), cls)


# ---------------------------------------------------------------------- overrides


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML literal (``16``, ``0.95``, ``true``, ``[0.9, 0.99]``,
    ``"x"``), otherwise the text itself as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``KEY=VALUE`` overrides (dotted keys) to a nested dict, in place; returns it.

    Creates missing tables (``model.default_moe.beta=0.95`` switches Default MoE on with
    beta 0.95); ``KEY=none`` sets an optional value or table to None.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
            raise ConfigError(f"bad --set {item!r}: expected KEY=VALUE, e.g. "
                              "--set model.moe.n_experts=16")
        value = parse_value(raw.strip())
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None or (isinstance(nxt, str) and nxt.lower() in _NONE_WORDS):
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"bad --set {item!r}: {'.'.join(parts[:i + 1])} is a "
                                  f"value ({nxt!r}), not a table")
            node = nxt
        node[parts[-1]] = value
    return data


# ------------------------------------------------------------------ files and names


def _configs_dir():
    return resources.files("moelab") / "configs"


def shipped_configs() -> dict[str, str]:
    """Name -> first comment line (description) of every config shipped in the package."""
    out = {}
    for entry in sorted(_configs_dir().iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            first = entry.read_text(encoding="utf-8").splitlines()[:1]
            desc = first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""
            out[entry.name[: -len(".toml")]] = desc
    return out


def resolve_config_path(name_or_path: str | Path, relative_to: Path | None = None):
    """A path to an existing file, or a shipped config's name (``default``, ``mnist``...)."""
    text = str(name_or_path)
    p = Path(text).expanduser()
    if relative_to is not None and not p.is_absolute():
        cand = relative_to / p
        if cand.is_file():
            return cand
    if p.is_file():
        return p
    stem = text[:-5] if text.endswith(".toml") else text
    entry = _configs_dir() / f"{stem}.toml"
    if "/" not in stem and "\\" not in stem and entry.is_file():
        return entry
    if p.exists():
        raise ConfigError(f"config {text!r} is not a file")
    names = list(shipped_configs())
    close = difflib.get_close_matches(stem, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"config {text!r} not found: not a file and not a shipped config; "
                      f"{hint}shipped: {', '.join(names)}")


def _read_with_base(name_or_path: str | Path, relative_to: Path | None,
                    seen: tuple[str, ...]) -> dict[str, Any]:
    path = resolve_config_path(name_or_path, relative_to)
    ident = str(path)
    if ident in seen:
        raise ConfigError(f"config 'base' loop: {' -> '.join(seen + (ident,))}")
    data = _parse_toml(path.read_text(encoding="utf-8"), str(name_or_path))
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"base={base!r} in {name_or_path} is invalid: need a config name "
                          "or path")
    parent_dir = Path(str(path)).parent if isinstance(path, Path) else None
    merged = _read_with_base(base, parent_dir, seen + (ident,))
    _deep_merge(merged, data)
    return merged


def _deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


def config_name_of(name_or_path: str | Path) -> str:
    """The default run name of a config given by name or path (file stem)."""
    stem = Path(str(name_or_path)).name
    return stem[:-5] if stem.endswith(".toml") else stem


def load_config(name_or_path: str | Path = "default",
                overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a config file or shipped config, resolve ``base``, apply ``--set`` overrides.

    A file without a top-level ``name`` gets its file stem as the run name.
    Raises :class:`ConfigError` (a ValueError) with a one-line message on any problem.
    """
    data = _read_with_base(name_or_path, None, ())
    data.setdefault("name", config_name_of(name_or_path))
    apply_overrides(data, list(overrides))
    return config_from_dict(data, RunConfig)
