"""One Trainer for every moelab model: LM (next-token) and image classification.

    cfg = load_config("default", ["train.steps=200"])
    trainer = Trainer(cfg, run_dir="runs/try")      # loads data, builds model + optimizer
    summary = trainer.fit()                          # trains, evaluates, checkpoints
    trainer = Trainer.resume("runs/try")             # continue bit-for-bit from ckpt.pt

Run directory (layout and I/O in ``moelab.rundir``; checkpoints in ``moelab.checkpoint``)::

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
                    included), RNG states (torch, numpy, python, cuda), batcher, step,
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
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moelab import checkpoint as ckpt
from moelab import distributed as mdist
from moelab import loggers as mlog
from moelab import rundir
from moelab.config import RunConfig, dump_toml
from moelab.guard import NonFiniteError, NonFiniteGuard
from moelab.interrupt import StopOnSignal
from moelab.metrics import LayerAccumulator
from moelab.progress import EvalProgress, StepProgress, auto_every
from moelab.runlock import RunLock

__all__ = ["Trainer", "load_trained"]


class _Interrupted(Exception):
    """A stop was requested during the final evaluation (internal)."""


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
            Path(tcfg.out_dir) if tcfg.out_dir else rundir.default_run_dir(cfg))
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
        self._loggers: mlog.LoggerGroup | None = None  # opened by fit, on rank 0
        self._restarted = False  # --resume of a run that never wrote a checkpoint
        self.guard = NonFiniteGuard(max_skips=tcfg.skip_nonfinite_steps)
        self.checkpoint_step: int | None = None  # the step ckpt.pt holds (None: none yet)
        self.lock = RunLock(self.run_dir)
        self.stop_signal: str | None = None  # "SIGINT" / "SIGTERM" once one stopped fit()
        self._stop: StopOnSignal | None = None
        self._final_phase = False
        self._started = False  # fit() has set up the run directory
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
            self.excitation = None
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
        return self.cfg.model.kind in ("lm", "hf")

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
            from moelab.models.lm import check_token_ids

            for split, t in self.tokens.items():
                check_token_ids(t, self.vocab_size, f"{split} split token ids")  # once per split
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

            # hooks onto opt: its step applies Φ, its state_dict carries Excitation's state
            build = getattr(self.model, "build_excitation", None)  # models finding their own
            self.excitation = (build(opt, ocfg.excitation) if build is not None  # (moelab.hf)
                               else Excitation(opt, self.model, config=ocfg.excitation))
            self.excitation.all_reduce_counts = self.ctx is not None  # global utilization
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
        grad norm and item count. A NaN/inf loss or grad norm applies no update: the step is
        skipped (``"skipped": True``) while ``train.skip_nonfinite_steps`` allows, else
        NonFiniteError (one line: step, loss, lr, the last good checkpoint, what to try)."""
        tcfg, ocfg = self.cfg.train, self.cfg.optim
        self.model.train()
        lr = self._set_lr()
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        items = 0
        # a skipped step must leave the model as it was: keep the buffers (small) it may update
        buffers = ([b.detach().clone() for b in self.model.buffers()]
                   if self.guard.max_skips > self.guard.skipped else [])
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
            # free the logits ([B, S, V]) now, not after the next micro-batch's forward and
            # the optimizer step: with a large vocabulary they are the biggest activation
            del out, loss
        if self.ctx is not None:
            mdist.sync_expert_grads(self._expert_params, self.ctx)
            sums = torch.stack([loss_sum, aux_sum])
            dist.all_reduce(sums)
            loss_sum, aux_sum = sums / self.ctx.world_size
            items *= self.ctx.world_size
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = mdist.clip_grad_norm_(params, ocfg.grad_clip, self.ctx, self._expert_params)
        res = {"loss": float(loss_sum) / tcfg.grad_accum, "aux_loss": float(aux_sum)
               / tcfg.grad_accum, "lr": lr, "grad_norm": float(grad_norm), "items": items}
        if not self.guard.ok(res["loss"], res["aux_loss"], res["grad_norm"]):
            # the same decision on every rank: loss sums and the grad norm are global
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.skip(self.step + 1, res["loss"], res["grad_norm"], lr,
                            self._checkpoint_note())
            for b, saved in zip(self.model.buffers(), buffers, strict=True):
                b.copy_(saved)  # undo what the bad forward did to EMA buffers etc.
            self.step += 1
            return {**res, "skipped": True}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.items_seen += items
        return res

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

    def _n_eval_batches(self, split: str, max_batches: int | None) -> int:
        bs = self.cfg.data.batch_size
        if self.is_lm:
            from moelab.data import EvalWindows

            n = len(EvalWindows(self.tokens[split], bs, self.cfg.data.seq_len))
        else:
            n = -(-self.images[split].x.shape[0] // bs)
        return n if max_batches is None else min(n, max_batches)

    @torch.no_grad()
    def evaluate(self, split: str = "val", max_batches: int | None = None,
                 routing: bool = True, progress: bool = False) -> dict[str, Any]:
        """Loss and perplexity (LM) or accuracy on ``split`` ("val" | "test") over the first
        ``max_batches`` batches (None: all), plus per-MoE-layer routing metrics (``layers``).
        ``progress``: show progress (a bar, or plain lines when stderr is not a terminal).
        Raises NonFiniteError if the loss is NaN or infinite."""
        if split not in ("val", "test"):
            raise ValueError(f"split={split!r} is invalid: choose 'val' or 'test'")
        bar = EvalProgress(split, self._n_eval_batches(split, max_batches),
                           enabled=progress and not self.quiet)
        with self._runtime():
            model = self.model
            was_training = model.training
            model.eval()
            layers = model.moe_layers() if routing else []
            if routing:
                model.set_track_out_norm(True)
            acc = [LayerAccumulator() for _ in layers]
            loss_sum, n_items, correct = 0.0, 0, 0
            try:
                for b, (x, y) in enumerate(self._eval_batches(split, max_batches)):
                    if self._final_phase and self._stop_requested():
                        raise _Interrupted
                    x, y = x.to(self.device), y.to(self.device)
                    out = model(x)
                    loss_sum += float(self._task_loss(out.logits, y, reduction="sum"))
                    if not math.isfinite(loss_sum):  # before the routing metrics see NaNs
                        break
                    n_items += y.numel()
                    if not self.is_lm:
                        correct += int((out.logits.argmax(-1) == y).sum())
                    for i, layer in enumerate(layers):
                        losses = out.moe_losses[i] if i < len(out.moe_losses) else None
                        acc[i].add(layer.last_stats, losses)
                    bar.update(b + 1)
            finally:
                bar.close()
                if routing:
                    model.set_track_out_norm(False)
                model.train(was_training)
        if not math.isfinite(loss_sum):
            loss = loss_sum
        elif n_items == 0:
            raise ValueError(f"the {split} split gave no evaluation batch")
        else:
            loss = loss_sum / n_items
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"evaluation on the {split} split at step {self.step} gave a {loss} loss: the "
                f"model in {self.run_dir} has diverged or overflows; train it again with a "
                "smaller optim.lr (routing metrics need finite outputs)")
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
        mult = self.excitation.last_multipliers if self.excitation is not None else None
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
        """Everything needed to continue the run bit-for-bit (see ``moelab.checkpoint``)."""
        return {
            "version": ckpt.CKPT_VERSION,
            "step": self.step,
            "items_seen": self.items_seen,
            "train_time_s": self.train_time_s,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "batcher": self.batcher.state_dict(),
            "rng": ckpt.capture_rng(self.device),
            "window": dict(self._window),
            "nonfinite_skipped": self.guard.skipped,
            "config_toml": dump_toml(self.cfg),
            "parallel": {"world_size": self.world_size,
                         "expert_parallel": self.cfg.train.expert_parallel},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ckpt.check_version(state)
        ckpt.check_parallel(state, self.world_size, self.cfg.train.expert_parallel)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batcher.load_state_dict(state["batcher"])
        self.step = int(state["step"])
        self.items_seen = int(state["items_seen"])
        self.train_time_s = float(state["train_time_s"])
        self._window = dict(state["window"])
        self.guard.skipped = int(state.get("nonfinite_skipped", 0))
        self.checkpoint_step = self.step
        ckpt.restore_rng(state["rng"], self.device)

    @property
    def _rank(self) -> int:
        return 0 if self.ctx is None else self.ctx.rank

    def save_checkpoint(self) -> Path:
        """Write this rank's checkpoint atomically; returns ``RUN/ckpt.pt``. All ranks take
        part under torchrun."""
        path = ckpt.rank_checkpoint_path(self.run_dir, self._rank,
                                         self.cfg.train.expert_parallel)
        state = self.state_dict()  # on every rank: a collective-free snapshot
        bad = ckpt.check_finite(state)
        if self.ctx is not None:  # every rank refuses, or none
            flag = torch.tensor([float(bool(bad))], device=self.device)
            dist.all_reduce(flag)
            bad = bad or (["another rank's experts"] if float(flag) > 0 else [])
        if bad:
            raise NonFiniteError(
                f"not writing a checkpoint at step {self.step}: the model holds NaN/inf values "
                f"({', '.join(bad[:3])}); {self._checkpoint_note()}; try a smaller optim.lr")
        if path is not None:
            ckpt.save_atomic(state, path)
        if self.ctx is not None:
            dist.barrier()
        self.checkpoint_step = self.step
        return self.run_dir / rundir.CHECKPOINT

    def _checkpoint_note(self) -> str:
        if self.checkpoint_step is None:
            return f"no checkpoint was written to {self.run_dir}"
        return (f"{self.run_dir / rundir.CHECKPOINT} keeps the last good state (step "
                f"{self.checkpoint_step})")

    @classmethod
    def resume(cls, run_dir: str | Path, *, quiet: bool = False,
               command: Sequence[str] | None = None, device: str | None = None,
               _verb: str = "resume") -> Trainer:
        """A Trainer that continues the run in ``run_dir`` from its ``ckpt.pt``, with the
        run's ``config.toml`` (edit ``train.steps`` there to extend a finished run).

        Takes the run directory's lock (RunDirLockedError if another process writes it),
        held until :meth:`fit` returns. A run that stopped before its first checkpoint starts
        again from step 0. ``device`` overrides ``train.device``. CheckpointError for an
        unreadable, foreign or untrusted ``ckpt.pt``."""
        run_dir = Path(run_dir)
        cfg = rundir.read_config(run_dir, _verb)
        if device is not None:
            import dataclasses

            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
        has_ckpt = (run_dir / rundir.CHECKPOINT).is_file()
        if not has_ckpt and _verb != "resume":
            raise FileNotFoundError(f"cannot {_verb} {run_dir}: no {rundir.CHECKPOINT} there "
                                    "(the run stopped before its first checkpoint)")
        trainer = cls(cfg, run_dir, quiet=quiet, command=command)
        if _verb == "resume":  # held until fit() ends: nobody else may write the run meanwhile
            trainer._acquire_lock()
        try:
            if not has_ckpt:  # stopped before its first checkpoint: start it again, same config
                trainer._restarted = True
            else:
                trainer.load_state_dict(ckpt.load_for_resume(
                    run_dir, trainer._rank, trainer.world_size, cfg.train.expert_parallel,
                    trainer.device, distributed=trainer.ctx is not None, verb=_verb))
                trainer._resumed = True
        except BaseException:
            trainer.lock.release()
            raise
        return trainer

    @property
    def finished_summary(self) -> dict[str, Any] | None:
        """The ``final`` record of a resumed run that already reached ``train.steps``."""
        if not self._resumed or self.step < self.cfg.train.steps:
            return None
        finals = [e for e in rundir.read_metrics(self.run_dir) if e.get("kind") == "final"]
        return finals[-1] if finals and finals[-1].get("step") == self.step else None

    def _acquire_lock(self) -> None:
        """Rank 0 locks the run directory; under torchrun every rank learns the outcome."""
        error = None
        if self.is_main and not self.lock.held:
            try:
                self.lock.acquire()
            except FileExistsError as e:
                error = str(e)
        if self.ctx is not None:
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error is not None:
            from moelab.runlock import RunDirLockedError

            raise RunDirLockedError(error)
        if self.lock.stale:
            print(f"moelab: note: {self.run_dir} was left locked by a process that ended "
                  f"without unlocking ({self.lock.stale}); taking it over", file=sys.stderr)

    # ------------------------------------------------------------------ the loop

    def _log(self, entry: dict[str, Any]) -> None:
        if self.is_main:
            self._loggers.log(entry)  # metrics.jsonl + train.loggers (moelab.loggers)

    def _start_run_dir(self) -> None:
        d = self.run_dir
        if not self._resumed and not self._restarted:
            rundir.check_fresh_run_dir(d)  # on every rank, before rank 0 writes anything
        if self.ctx is not None:
            dist.barrier()
        if self.is_main:
            if self._resumed or self._restarted:
                rundir.truncate_metrics(d, self.step)
            else:
                rundir.start_run_dir(d, self.cfg)
            command = self.command
            if self.ctx is not None and command and command[0] != "torchrun":
                command = ["torchrun", "--nproc_per_node", str(self.world_size), *command]
            rundir.append_command(d, command)
        if self.ctx is not None:
            dist.barrier()

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def fit(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train until ``train.steps`` (or until step ``max_steps``, then checkpoint and return,
        as if interrupted); evaluate every ``eval_every`` steps; write the run directory.
        Returns the final summary (also the last line of ``metrics.jsonl``), or the state at
        ``max_steps`` (``{"step": ..., "stopped": True}``) or at a SIGINT/SIGTERM (plus
        ``"signal"``; the step in progress is finished and checkpointed first; a second signal
        raises KeyboardInterrupt at once). A resumed run that had already finished returns its
        final summary and writes nothing. Holds the run directory's lock throughout; the
        TensorBoard / W&B runs end with the call, however it ends."""
        done = self.finished_summary
        if done is not None:
            self.lock.release()
            return done
        mlog.require_backends(self.cfg.train.loggers)  # a missing tracker: before any write
        failed = True
        try:
            with StopOnSignal() as self._stop:
                self._acquire_lock()
                continuing = self._started or self._resumed or self._restarted
                if not self._started:  # a later fit() continues the same run
                    self._start_run_dir()
                    self._started = True
                if self.is_main and self._loggers is None:  # closed at the end of each fit()
                    self._loggers = mlog.open_loggers(
                        self.cfg, self.run_dir, self.model, quiet=self.quiet,
                        resume_step=self.step if continuing else None)
                out = self._fit(max_steps)
                failed = False
                return out
        finally:
            self._stop = None
            self.lock.release()
            if self._loggers is not None:
                self._loggers.close(failed)
                self._loggers = None

    def _stop_requested(self) -> bool:
        """Whether a SIGINT/SIGTERM asked to stop (agreed over ranks under torchrun)."""
        name = self._stop.requested if self._stop is not None else None
        if self.ctx is not None:
            flag = torch.tensor([float(name is not None)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if float(flag) > 0 and name is None:
                name = "SIGTERM"  # another rank's signal
        if name is not None and self.stop_signal is None:
            self.stop_signal = name
        return name is not None

    def _fit(self, max_steps: int | None) -> dict[str, Any]:
        """The loop of :meth:`fit`."""
        tcfg = self.cfg.train
        total = tcfg.steps
        stop = total if max_steps is None else min(total, max_steps)
        where = f"{self.device} (train.device=auto)" if tcfg.device == "auto" else self.device
        if self._resumed:
            self._say(f"moelab: resuming {self.run_dir} at step {self.step}/{total} on {where}")
        else:
            again = " (again: it stopped before its first checkpoint)" if self._restarted else ""
            self._say(f"moelab: run {self.run_dir}{again} | {self.cfg.model.kind} model, "
                      f"{self.n_params / 1e6:.2f}M params | data: {self.cfg.data.dataset} | "
                      f"{total} steps on {where}")
        progress = StepProgress(total, self.step, self.unit, enabled=not self.quiet,
                                every=tcfg.progress_every or auto_every(total, tcfg.log_every))
        try:
            with self._runtime():
                while self.step < stop:
                    t0 = time.perf_counter()
                    r = self.train_step()
                    dt = time.perf_counter() - t0
                    self.train_time_s += dt
                    w = self._window
                    skipped = bool(r.get("skipped"))
                    if not skipped:
                        w["loss"] += r["loss"]
                        w["aux"] += r["aux_loss"]
                        w["steps"] += 1
                        w["items"] += r["items"]
                    w["time"] += dt
                    step = self.step
                    progress.update(step, None if skipped else r["loss"], r["items"])
                    if step % tcfg.log_every == 0 or step == total:
                        self._log_train(r)
                    if tcfg.eval_every and step % tcfg.eval_every == 0 and step != total:
                        ev = self.evaluate("val", self.cfg.data.eval_batches)
                        self._log_eval(ev)
                        progress.note(step, **self._metric_postfix(ev))
                    if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self._stop_requested():
                        break
                if self.checkpoint_step != self.step:
                    self.save_checkpoint()
        finally:
            progress.close()
        if self.step < total:
            return self._stopped()
        try:
            return self._finish()
        except _Interrupted:
            return self._stopped()

    def _stopped(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "stopped": True}
        if self.stop_signal is not None:
            out["signal"] = self.stop_signal
        return out

    def _log_train(self, r: dict[str, Any]) -> None:
        w = self._window
        n = w["steps"]
        rate = w["items"] / max(w["time"], 1e-9)
        entry = {"kind": "train", "step": self.step,
                 "loss": w["loss"] / n if n else float("nan"),
                 "aux_loss": w["aux"] / n if n else float("nan"),
                 "lr": r["lr"], "grad_norm": r["grad_norm"],
                 f"{self.unit}_per_s": rate, "elapsed_s": self.train_time_s}
        if self.guard.skipped:
            entry["skipped_steps"] = self.guard.skipped  # NaN/inf steps skipped so far
        self._log(entry)
        self._window = self._new_window()

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
        entry.update(mlog.method_summary(self.model))  # Default MoE EMA norms, learnable μ/γ
        self._log(entry)

    def _finish(self) -> dict[str, Any]:
        """The final evaluation (interruptible: raises _Interrupted on a stop request; the
        checkpoint at the last step is written, so a resume redoes just this)."""
        dcfg = self.cfg.data
        self._final_phase = True
        if self._stop is not None:
            self._stop.message = ("stopping the final evaluation (ckpt.pt holds the last "
                                  "step; a resume redoes just the evaluation)")
        try:
            ev = self.evaluate("val", dcfg.final_eval_batches, progress=True)
            test = self.evaluate("test", dcfg.final_eval_batches, routing=False, progress=True)
        finally:
            self._final_phase = False
        self._log_eval(ev, final=True)
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
    """A Trainer holding the checkpointed model of ``run_dir`` (for evaluation). Raises
    NonFiniteError if the checkpoint holds NaN/inf parameters (a run that diverged before
    moelab refused to checkpoint such a state)."""
    trainer = Trainer.resume(run_dir, quiet=quiet, command=[], _verb="evaluate")
    bad = ckpt.check_finite({"model": trainer.model.state_dict()})
    if bad:
        raise NonFiniteError(
            f"the checkpoint in {run_dir} holds NaN/inf values ({', '.join(bad[:3])}): that "
            "run diverged; train it again with a smaller optim.lr")
    return trainer
