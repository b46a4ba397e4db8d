"""One Trainer for every moelab model: LM (next-token) and image classification.

    cfg = load_config("default", ["train.steps=200"])
    trainer = Trainer(cfg, run_dir="runs/try")      # loads data, builds model + optimizer
    summary = trainer.fit()                          # trains, evaluates, checkpoints
    trainer = Trainer.resume("runs/try")             # continue bit-for-bit from ckpt.pt

Run directory::

    config.toml     the resolved RunConfig; ``moelab train --config RUN/config.toml`` redoes it
    command.txt     the exact command line(s) (one line per start / resume)
    metrics.jsonl   one JSON object per line, ``kind`` = "train" | "eval" | "final":
                    train: step, loss (mean over the log window), aux_loss, lr, grad_norm,
                      tokens_per_s (LM) or images_per_s, elapsed_s (training time so far)
                    eval:  step, split, val_loss + val_ppl (LM) or val_acc, and ``layers``: one
                      dict per MoE layer (depth order) from ``moelab.metrics.layer_metrics`` on
                      the counts aggregated over the whole evaluation (``track_out_norm`` on),
                      plus ``excitation`` {layer: last multipliers} when Excitation is on
                    final: the last evaluation on the full validation and test splits, params,
                      throughput, training time
    ckpt.pt         written atomically: model (MoE buffers included), optimizer (Excitation
                    included), schedule, RNG states (torch, numpy, python, cuda), batcher, step,
                    the open log window

Multi-process: under ``torchrun`` (``WORLD_SIZE`` > 1) the Trainer initialises
``torch.distributed``, shards each global batch of ``data.batch_size`` rows over the ranks, shards
the experts over ``train.expert_parallel`` ranks and wraps the model in DDP (see
``moelab.distributed``). Rank 0 alone prints, logs and writes ``config.toml``/``ckpt.pt``; with
expert parallelism every other rank r also writes its experts to ``ckpt.rank<r>.pt``. Logged
losses are global-batch means; evaluation runs the same batches on every rank.

Determinism: seeded (``train.seed``) init and data order; batches depend on (seed, step) only;
``torch.use_deterministic_algorithms`` during the run (``train.deterministic``). Resuming
restores every piece of state, so N steps straight and N/2 + resume + N/2 log identical losses.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moelab import distributed as mdist
from moelab.config import RunConfig, dump_toml, load_config
from moelab.metrics import aggregate_counts, layer_metrics

__all__ = ["CHECKPOINT", "CONFIG", "METRICS", "Trainer", "check_fresh_run_dir", "default_run_dir",
           "load_trained", "read_metrics"]

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
CHECKPOINT = "ckpt.pt"
COMMAND = "command.txt"
CKPT_VERSION = 1


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


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} is invalid: CUDA is not available here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"train.device={name!r} is invalid: MPS is not available here")
    return dev


def _atomic_write_text(path: Path, text: str) -> None:
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


class _LayerAccumulator:
    """Routing statistics of one MoE layer summed over the forwards of one evaluation."""

    def __init__(self) -> None:
        self.counts: list[torch.Tensor] = []
        self.tokens = 0
        self.entropy = 0.0
        self.dropped = 0.0
        self.mean_prob: torch.Tensor | None = None
        self.norm_sum: torch.Tensor | None = None
        self.norm_weight: torch.Tensor | None = None
        self.load_balance = 0.0
        self.z_loss = 0.0
        self.n_forwards = 0

    def add(self, stats: Any, losses: Any) -> None:
        n = int(stats.n_tokens)
        counts = stats.tokens_per_expert.detach().double().cpu()
        self.counts.append(counts)
        self.tokens += n
        self.entropy += float(stats.entropy) * n
        self.dropped += float(stats.dropped_frac) * n
        mp = stats.mean_prob.detach().double().cpu() * n
        self.mean_prob = mp if self.mean_prob is None else self.mean_prob + mp
        if stats.expert_out_norm is not None:
            norm = stats.expert_out_norm.detach().double().cpu()
            ok = ~torch.isnan(norm)
            w = torch.where(ok, counts, torch.zeros_like(counts))
            s = torch.where(ok, norm, torch.zeros_like(norm)) * w
            self.norm_sum = s if self.norm_sum is None else self.norm_sum + s
            self.norm_weight = w if self.norm_weight is None else self.norm_weight + w
        if losses is not None:
            self.load_balance += float(losses.load_balance)
            self.z_loss += float(losses.z_loss)
        self.n_forwards += 1

    def metrics(self) -> dict[str, Any]:
        counts = aggregate_counts(self.counts)
        out_norm = None
        if self.norm_sum is not None:
            out_norm = torch.where(self.norm_weight > 0,
                                   self.norm_sum / self.norm_weight.clamp_min(1e-300),
                                   torch.full_like(self.norm_sum, float("nan")))
        m = layer_metrics(
            counts,
            mean_prob_E=self.mean_prob / self.tokens,
            entropy=self.entropy / self.tokens,
            dropped_frac=min(1.0, max(0.0, self.dropped / self.tokens)),
            out_norm_E=out_norm,
            aux_loss=self.load_balance / self.n_forwards,
            z_loss=self.z_loss / self.n_forwards,
        )
        if out_norm is not None:
            m["out_norm"] = [None if math.isnan(v) else v for v in out_norm.tolist()]
        m["tokens"] = self.tokens
        return m


class Trainer:
    """Trains ``cfg`` into ``run_dir`` (created on :meth:`fit`).

    Args:
        cfg: the run.
        run_dir: where the run lives (default: ``cfg.train.out_dir`` or
            ``runs/<name>-<timestamp>``).
        quiet: no progress bar and no printed lines (``fit`` still writes the run directory).
        command: the command line to record in ``command.txt`` (default: ``sys.argv``).

    Construction loads the data and builds the model and optimizer; it raises ValueError /
    FileNotFoundError / ModuleNotFoundError with a clear message for bad settings or missing
    data. Nothing is written until :meth:`fit`.
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None, *, quiet: bool = False,
                 command: Sequence[str] | None = None) -> None:
        self.cfg = cfg
        tcfg = cfg.train
        self.command = list(command) if command is not None else ["moelab", *sys.argv[1:]]
        self.device = _resolve_device(tcfg.device)
        self.ctx = self._setup_distributed()
        self.is_main = self.ctx is None or self.ctx.is_main
        self.run_dir = Path(run_dir) if run_dir is not None else (
            Path(tcfg.out_dir) if tcfg.out_dir else default_run_dir(cfg))
        if self.ctx is not None:  # one run directory for all ranks: rank 0's
            shared = [str(self.run_dir)]
            dist.broadcast_object_list(shared, src=0)
            self.run_dir = Path(shared[0])
        self.quiet = quiet or not self.is_main
        self.step = 0
        self.items_seen = 0
        self.train_time_s = 0.0
        self._window = self._new_window()
        self._resumed = False
        with self._runtime():
            self._seed_everything(tcfg.seed)
            self._setup_data()
            torch.manual_seed(tcfg.seed)
            from moelab.models import build_model

            if self.is_lm:
                self.model = build_model(cfg.model, vocab_size=self.vocab_size)
            else:
                self.model = build_model(cfg.model, image_shape=self.image_shape,
                                         n_classes=self.n_classes)
            self.model.to(self.device)
            self.n_params = sum(p.numel() for p in self.model.parameters())  # before sharding
            self._train_model: torch.nn.Module = self.model
            self._expert_params: list[torch.nn.Parameter] = []
            if self.ctx is not None:
                mdist.shard_experts(self.model, self.ctx)
                mdist.enable_global_stats(self.model)
                self._expert_params = mdist.expert_parameters(self.model)
                self._train_model = mdist.wrap_ddp(self.model, self.ctx)
            self.optimizer = self._build_optimizer()
            self._seed_everything(tcfg.seed)  # the run starts from the same RNG state always

    # ------------------------------------------------------------------ setup

    def _setup_distributed(self) -> Any:
        """The ParallelContext under torchrun (world size > 1), else None."""
        tcfg = self.cfg.train
        initialised = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if initialised else mdist.world_size_from_env()
        if world == 1:
            if tcfg.expert_parallel > 1:
                raise ValueError(f"train.expert_parallel={tcfg.expert_parallel} is invalid on "
                                 "one process: launch with `torchrun --nproc_per_node N` "
                                 "(N a multiple of expert_parallel)")
            return None
        ctx = mdist.init_distributed(tcfg.expert_parallel, self.device.type, tcfg.dist_backend)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", ctx.local_rank)
        bs = self.cfg.data.batch_size
        if bs % ctx.world_size:
            raise ValueError(f"data.batch_size={bs} is invalid: the global batch must split "
                             f"evenly over the {ctx.world_size} ranks")
        return ctx

    @property
    def world_size(self) -> int:
        return 1 if self.ctx is None else self.ctx.world_size

    @property
    def is_lm(self) -> bool:
        return self.cfg.model.kind == "lm"

    @property
    def unit(self) -> str:
        """What the throughput counts: "tokens" or "images"."""
        return "tokens" if self.is_lm else "images"

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    @contextlib.contextmanager
    def _runtime(self) -> Iterator[None]:
        """Thread count and deterministic algorithms for the duration of a call (restored
        afterwards, so the Trainer leaves no global settings behind)."""
        tcfg = self.cfg.train
        prev_threads = torch.get_num_threads()
        prev_det = torch.are_deterministic_algorithms_enabled()
        prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        try:
            if tcfg.threads > 0:
                torch.set_num_threads(tcfg.threads)
            if tcfg.deterministic:
                if self.device.type == "cuda":
                    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True, warn_only=True)
            yield
        finally:
            if tcfg.threads > 0:
                torch.set_num_threads(prev_threads)
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)

    @property
    def _shard(self) -> int:
        return 0 if self.ctx is None else self.ctx.rank

    def _setup_data(self) -> None:
        from moelab.data import (
            ImageBatcher,
            LMBatcher,
            encode_splits,
            load_image_dataset,
            load_text_dataset,
            make_tokenizer,
        )

        dcfg, seed = self.cfg.data, self.cfg.train.seed
        if self.is_lm:
            splits = load_text_dataset(dcfg.dataset, dcfg.path)
            cache = Path(os.environ.get("MOELAB_CACHE", Path.home() / ".cache" / "moelab"))
            tok = make_tokenizer(dcfg.tokenizer, train_text=splits.train,
                                 vocab_size=dcfg.bpe_vocab_size, cache_dir=cache / "bpe")
            self.tokenizer = tok
            self.vocab_size = int(tok.vocab_size)
            small = torch.uint8 if self.vocab_size <= 256 else torch.int32
            toks = encode_splits(splits, tok)
            self.tokens = {"train": toks.train.to(small), "val": toks.valid.to(small),
                           "test": toks.test.to(small)}
            self.data_source = splits.source
            for split, t in self.tokens.items():
                if t.numel() < dcfg.seq_len + 1:
                    raise ValueError(
                        f"data.seq_len={dcfg.seq_len} is invalid: the {split} split of "
                        f"{dcfg.dataset!r} has only {t.numel()} tokens")
            self.batcher = LMBatcher(self.tokens["train"], dcfg.batch_size, dcfg.seq_len,
                                     seed=seed, shard=self._shard, num_shards=self.world_size)
        else:
            splits = load_image_dataset(dcfg.dataset, dcfg.path)
            self.images = {"train": splits.train, "val": splits.valid, "test": splits.test}
            self.image_shape = splits.image_shape
            self.n_classes = splits.n_classes
            self.data_source = splits.source
            self.mean, self.std = splits.channel_stats()
            n_train = splits.train.x.shape[0]
            if dcfg.batch_size > n_train:
                raise ValueError(f"data.batch_size={dcfg.batch_size} is invalid: the train "
                                 f"split of {dcfg.dataset!r} has only {n_train} images")
            self.batcher = ImageBatcher(splits.train.x, splits.train.y, dcfg.batch_size,
                                        seed=seed, mean=self.mean, std=self.std,
                                        shard=self._shard, num_shards=self.world_size)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        ocfg = self.cfg.optim
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": ocfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if ocfg.name == "adamw":
            opt = torch.optim.AdamW(groups, lr=ocfg.lr, betas=ocfg.betas, eps=ocfg.eps)
        elif ocfg.name == "adam":
            opt = torch.optim.Adam(groups, lr=ocfg.lr, betas=ocfg.betas, eps=ocfg.eps)
        else:
            opt = torch.optim.SGD(groups, lr=ocfg.lr, momentum=ocfg.momentum,
                                  nesterov=ocfg.nesterov and ocfg.momentum > 0)
        for g in opt.param_groups:
            g["initial_lr"] = ocfg.lr
        if ocfg.excitation is not None:
            from moelab.methods.excitation import Excitation

            opt = Excitation(opt, self.model, config=ocfg.excitation)
            opt.all_reduce_counts = self.ctx is not None  # the global batch's utilization
        return opt

    # ------------------------------------------------------------------ one step

    @staticmethod
    def _new_window() -> dict[str, float]:
        return {"loss": 0.0, "aux": 0.0, "steps": 0, "items": 0, "time": 0.0}

    def _task_loss(self, logits: torch.Tensor, target: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                               reduction=reduction)

    def _set_lr(self) -> float:
        ocfg = self.cfg.optim
        lr = ocfg.lr * ocfg.lr_factor(self.step, self.cfg.train.steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def train_step(self) -> dict[str, float]:
        """One optimizer step (``grad_accum`` micro-batches); returns its loss, aux loss, lr,
        grad norm and item count."""
        tcfg, ocfg = self.cfg.train, self.cfg.optim
        self.model.train()
        lr = self._set_lr()
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        items = 0
        for i in range(tcfg.grad_accum):
            x, y = self.batcher.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = i == tcfg.grad_accum - 1
            no_sync = getattr(self._train_model, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                out = self._train_model(x)
                loss = self._task_loss(out.logits, y)
                ((loss + out.aux_loss) / tcfg.grad_accum).backward()
            loss_sum += loss.detach()
            aux_sum += out.aux_loss.detach()
            items += y.numel()
        if self.ctx is not None:
            mdist.sync_expert_grads(self._expert_params, self.ctx)
            sums = torch.stack([loss_sum, aux_sum])
            dist.all_reduce(sums)
            loss_sum, aux_sum = sums / self.ctx.world_size
            items *= self.ctx.world_size
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = mdist.clip_grad_norm_(params, ocfg.grad_clip, self.ctx, self._expert_params)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.items_seen += items
        return {"loss": float(loss_sum) / tcfg.grad_accum, "aux_loss": float(aux_sum)
                / tcfg.grad_accum, "lr": lr, "grad_norm": float(grad_norm), "items": items}

    # ------------------------------------------------------------------ evaluation

    def _eval_batches(self, split: str, max_batches: int | None):
        from moelab.data import EvalWindows, iter_image_batches

        bs = self.cfg.data.batch_size
        if self.is_lm:
            it = iter(EvalWindows(self.tokens[split], bs, self.cfg.data.seq_len))
        else:
            imgs = self.images[split]
            it = iter_image_batches(imgs.x, imgs.y, bs, self.mean, self.std)
        for i, batch in enumerate(it):
            if max_batches is not None and i >= max_batches:
                break
            yield batch

    @torch.no_grad()
    def evaluate(self, split: str = "val", max_batches: int | None = None,
                 routing: bool = True) -> dict[str, Any]:
        """Loss and perplexity (LM) or accuracy on ``split`` ("val" | "test") over the first
        ``max_batches`` batches (None: all), plus per-MoE-layer routing metrics (``layers``)."""
        if split not in ("val", "test"):
            raise ValueError(f"split={split!r} is invalid: choose 'val' or 'test'")
        with self._runtime():
            model = self.model
            was_training = model.training
            model.eval()
            layers = model.moe_layers() if routing else []
            if routing:
                model.set_track_out_norm(True)
            acc = [_LayerAccumulator() for _ in layers]
            loss_sum, n_items, correct = 0.0, 0, 0
            try:
                for x, y in self._eval_batches(split, max_batches):
                    x, y = x.to(self.device), y.to(self.device)
                    out = model(x)
                    loss_sum += float(self._task_loss(out.logits, y, reduction="sum"))
                    n_items += y.numel()
                    if not self.is_lm:
                        correct += int((out.logits.argmax(-1) == y).sum())
                    for i, layer in enumerate(layers):
                        losses = out.moe_losses[i] if i < len(out.moe_losses) else None
                        acc[i].add(layer.last_stats, losses)
            finally:
                if routing:
                    model.set_track_out_norm(False)
                model.train(was_training)
        if n_items == 0:
            raise ValueError(f"the {split} split gave no evaluation batch")
        loss = loss_sum / n_items
        res: dict[str, Any] = {f"{split}_loss": loss}
        if self.is_lm:
            res[f"{split}_ppl"] = math.exp(min(loss, 700.0))
        else:
            res[f"{split}_acc"] = correct / n_items
        res[f"{split}_items"] = n_items
        if routing:
            blocks = self.cfg.model.moe_block_indices()
            res["layers"] = [{"layer": i, "block": blocks[i] if i < len(blocks) else None,
                              **a.metrics()} for i, a in enumerate(acc)]
        return res

    def _excitation_summary(self) -> dict[str, Any] | None:
        mult = getattr(self.optimizer, "last_multipliers", None)
        if not mult:
            return None
        out = {}
        for name, phi in mult.items():
            v = phi.detach().double().cpu()
            out[name] = {"multipliers": v.tolist(), "min": float(v.min()), "max": float(v.max()),
                         "std": float(v.std(unbiased=False))}
        return out

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run bit-for-bit."""
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
               "python": random.getstate()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "version": CKPT_VERSION,
            "step": self.step,
            "items_seen": self.items_seen,
            "train_time_s": self.train_time_s,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"step": self.step, "base_lr": self.cfg.optim.lr,
                          "total_steps": self.cfg.train.steps},
            "batcher": self.batcher.state_dict(),
            "rng": rng,
            "window": dict(self._window),
            "config_toml": dump_toml(self.cfg),
            "parallel": {"world_size": self.world_size,
                         "expert_parallel": self.cfg.train.expert_parallel},
        }

    def _check_parallel(self, state: dict[str, Any]) -> None:
        """Raise if ``state`` comes from an expert-parallel run of another world size."""
        saved = state.get("parallel", {"world_size": 1, "expert_parallel": 1})
        if saved["expert_parallel"] > 1 and saved["world_size"] != self.world_size:
            raise ValueError(
                f"this checkpoint holds experts sharded over {saved['world_size']} ranks "
                f"(expert_parallel={saved['expert_parallel']}); load it under torchrun with "
                f"--nproc_per_node {saved['world_size']} (this process has a world of "
                f"{self.world_size}); resharding experts to another world size is not "
                "supported")
        if self.cfg.train.expert_parallel != saved["expert_parallel"] and \
                saved["expert_parallel"] > 1:
            raise ValueError(f"checkpoint expert_parallel={saved['expert_parallel']} != "
                             f"train.expert_parallel={self.cfg.train.expert_parallel}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != CKPT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')!r} is not supported "
                             f"(need {CKPT_VERSION})")
        self._check_parallel(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batcher.load_state_dict(state["batcher"])
        self.step = int(state["step"])
        self.items_seen = int(state["items_seen"])
        self.train_time_s = float(state["train_time_s"])
        self._window = dict(state["window"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _checkpoint_path(self) -> Path | None:
        """This rank's checkpoint file: ``ckpt.pt`` (rank 0), ``ckpt.rank<r>.pt`` (rank r > 0
        of an expert-parallel run), None for ranks > 0 of a data-parallel run (rank 0's
        holds everything)."""
        if self.is_main:
            return self.run_dir / CHECKPOINT
        if self.cfg.train.expert_parallel > 1:
            return self.run_dir / f"ckpt.rank{self.ctx.rank}.pt"
        return None

    def save_checkpoint(self) -> Path:
        """Write this rank's checkpoint atomically (temporary file + ``os.replace``); returns
        ``RUN/ckpt.pt``. All ranks take part under torchrun."""
        path = self._checkpoint_path()
        state = self.state_dict()  # on every rank: a collective-free snapshot
        if path is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)
        if self.ctx is not None:
            dist.barrier()
        return self.run_dir / CHECKPOINT

    @classmethod
    def resume(cls, run_dir: str | Path, *, quiet: bool = False,
               command: Sequence[str] | None = None, _verb: str = "resume") -> Trainer:
        """A Trainer that continues the run in ``run_dir`` from its ``ckpt.pt``, with the
        run's ``config.toml`` (edit ``train.steps`` there to extend a finished run)."""
        run_dir = Path(run_dir)
        cfg_path, ckpt_path = run_dir / CONFIG, run_dir / CHECKPOINT
        if not cfg_path.is_file():
            raise FileNotFoundError(f"cannot {_verb} {run_dir}: not a moelab run directory "
                                    f"(no {CONFIG})")
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"cannot {_verb} {run_dir}: no {CHECKPOINT} there (the run "
                                    "stopped before its first checkpoint)")
        trainer = cls(load_config(cfg_path), run_dir, quiet=quiet, command=command)
        own = trainer._checkpoint_path() or ckpt_path
        main_state = torch.load(ckpt_path, map_location=trainer.device, weights_only=False)
        trainer._check_parallel(main_state)
        state = main_state if own == ckpt_path else torch.load(
            own, map_location=trainer.device, weights_only=False)
        if trainer.ctx is not None:  # all ranks must resume from the same step (or all stop)
            torn = torch.tensor([float(state["step"] != main_state["step"])],
                                device=trainer.device)
            dist.all_reduce(torn)
            if float(torn) > 0:
                raise ValueError(f"cannot {_verb} {run_dir}: the per-rank checkpoint files are "
                                 "from different steps (a save was interrupted)")
        trainer.load_state_dict(state)
        trainer._resumed = True
        return trainer

    # ------------------------------------------------------------------ the loop

    def _log(self, entry: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(_json_safe(entry)) + "\n")

    def _start_run_dir(self) -> None:
        d = self.run_dir
        if not self._resumed:
            check_fresh_run_dir(d)  # on every rank, before rank 0 writes anything
        if self.ctx is not None:
            dist.barrier()
        if self.is_main:
            self._write_run_dir_header()
        if self.ctx is not None:
            dist.barrier()

    def _write_run_dir_header(self) -> None:
        d = self.run_dir
        if self._resumed:
            # drop what was logged after the checkpoint (and any final summary)
            kept = [e for e in read_metrics(d)
                    if e.get("step", 0) <= self.step and e.get("kind") != "final"]
            _atomic_write_text(d / METRICS, "".join(json.dumps(e) + "\n" for e in kept))
        else:
            d.mkdir(parents=True, exist_ok=True)
            header = (f"moelab run config ({self.cfg.name}), resolved.\n"
                      f"Reproduce: moelab train --config {d / CONFIG}")
            _atomic_write_text(d / CONFIG, dump_toml(self.cfg, header=header))
            (d / METRICS).write_text("", encoding="utf-8")
        command = self.command
        if self.ctx is not None and command and command[0] != "torchrun":
            command = ["torchrun", "--nproc_per_node", str(self.world_size), *command]
        with open(d / COMMAND, "a", encoding="utf-8") as f:
            f.write(shlex.join(command) + "\n")

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def fit(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train until ``train.steps`` (or until step ``max_steps``, then checkpoint and return,
        as if interrupted); evaluate every ``eval_every`` steps; write the run directory.
        Returns the final summary (also the last line of ``metrics.jsonl``), or the state at
        ``max_steps`` (``{"step": ..., "stopped": True}``)."""
        tcfg = self.cfg.train
        total = tcfg.steps
        stop = total if max_steps is None else min(total, max_steps)
        self._start_run_dir()
        if not self._resumed:
            self._say(f"moelab: run {self.run_dir} | {self.cfg.model.kind} model, "
                      f"{self.n_params / 1e6:.2f}M params | data: {self.cfg.data.dataset} | "
                      f"{total} steps on {self.device}")
        else:
            self._say(f"moelab: resuming {self.run_dir} at step {self.step}/{total}")
        show = not self.quiet and sys.stderr.isatty()
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.step, disable=not show, unit="step",
                   dynamic_ncols=True, leave=False)
        try:
            with self._runtime():
                while self.step < stop:
                    t0 = time.perf_counter()
                    r = self.train_step()
                    dt = time.perf_counter() - t0
                    self.train_time_s += dt
                    w = self._window
                    w["loss"] += r["loss"]
                    w["aux"] += r["aux_loss"]
                    w["steps"] += 1
                    w["items"] += r["items"]
                    w["time"] += dt
                    bar.update(1)
                    step = self.step
                    if step % tcfg.log_every == 0 or step == total:
                        rate = w["items"] / max(w["time"], 1e-9)
                        entry = {"kind": "train", "step": step,
                                 "loss": w["loss"] / w["steps"], "aux_loss": w["aux"] / w["steps"],
                                 "lr": r["lr"], "grad_norm": r["grad_norm"],
                                 f"{self.unit}_per_s": rate, "elapsed_s": self.train_time_s}
                        self._log(entry)
                        bar.set_postfix(loss=f"{entry['loss']:.3f}",
                                        **{f"{self.unit[:3]}/s": f"{rate:,.0f}"})
                        self._window = self._new_window()
                    if tcfg.eval_every and step % tcfg.eval_every == 0 and step != total:
                        ev = self.evaluate("val", self.cfg.data.eval_batches)
                        self._log_eval(ev)
                        bar.set_postfix(**self._metric_postfix(ev))
                    if ((tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0)
                            or step == stop):
                        self.save_checkpoint()
        finally:
            bar.close()
        if self.step < total:
            return {"step": self.step, "stopped": True}
        return self._finish()

    def _metric_postfix(self, ev: dict[str, Any]) -> dict[str, str]:
        if self.is_lm:
            return {"val_ppl": f"{ev['val_ppl']:.2f}"}
        return {"val_acc": f"{ev['val_acc']:.3f}"}

    def _log_eval(self, ev: dict[str, Any], final: bool = False) -> None:
        entry = {"kind": "eval", "step": self.step, "split": "val", **ev}
        if final:
            entry["final"] = True
        exc = self._excitation_summary()
        if exc is not None:
            entry["excitation"] = exc
        self._log(entry)

    def _finish(self) -> dict[str, Any]:
        dcfg = self.cfg.data
        ev = self.evaluate("val", dcfg.final_eval_batches)
        self._log_eval(ev, final=True)
        test = self.evaluate("test", dcfg.final_eval_batches, routing=False)
        summary = {"kind": "final", "step": self.step, "name": self.cfg.name,
                   "model_kind": self.cfg.model.kind, "dataset": dcfg.dataset,
                   "params": self.n_params, **{k: v for k, v in ev.items() if k != "layers"},
                   **test, f"{self.unit}_per_s": self.items_seen / max(self.train_time_s, 1e-9),
                   "train_time_s": self.train_time_s, "items_seen": self.items_seen}
        layers = ev.get("layers", [])
        if layers:
            summary["gini_mean"] = sum(x["gini"] for x in layers) / len(layers)
            summary["dead_experts"] = sum(x["dead"] for x in layers)
        self._log(summary)
        return summary


def load_trained(run_dir: str | Path, *, quiet: bool = True) -> Trainer:
    """A Trainer holding the checkpointed model of ``run_dir`` (for evaluation)."""
    return Trainer.resume(run_dir, quiet=quiet, command=[], _verb="evaluate")
