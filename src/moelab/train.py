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
from moelab import rundir
from moelab.config import RunConfig, dump_toml
from moelab.metrics import LayerAccumulator

__all__ = ["Trainer", "load_trained"]

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
            acc = [LayerAccumulator() for _ in layers]
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
        if path is not None:
            ckpt.save_atomic(state, path)
        if self.ctx is not None:
            dist.barrier()
        return self.run_dir / rundir.CHECKPOINT

    @classmethod
    def resume(cls, run_dir: str | Path, *, quiet: bool = False,
               command: Sequence[str] | None = None, _verb: str = "resume") -> Trainer:
        """A Trainer that continues the run in ``run_dir`` from its ``ckpt.pt``, with the
        run's ``config.toml`` (edit ``train.steps`` there to extend a finished run)."""
        run_dir = Path(run_dir)
        cfg = rundir.read_config(run_dir, _verb)
        if not (run_dir / rundir.CHECKPOINT).is_file():
            raise FileNotFoundError(f"cannot {_verb} {run_dir}: no {rundir.CHECKPOINT} there "
                                    "(the run stopped before its first checkpoint)")
        trainer = cls(cfg, run_dir, quiet=quiet, command=command)
        trainer.load_state_dict(ckpt.load_for_resume(
            run_dir, trainer._rank, trainer.world_size, cfg.train.expert_parallel,
            trainer.device, distributed=trainer.ctx is not None, verb=_verb))
        trainer._resumed = True
        return trainer

    # ------------------------------------------------------------------ the loop

    def _log(self, entry: dict[str, Any]) -> None:
        if self.is_main:
            rundir.append_metrics(self.run_dir, entry)

    def _start_run_dir(self) -> None:
        d = self.run_dir
        if not self._resumed:
            rundir.check_fresh_run_dir(d)  # on every rank, before rank 0 writes anything
        if self.ctx is not None:
            dist.barrier()
        if self.is_main:
            if self._resumed:
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
