"""One Trainer for every moelab model: LM (next-token) and image classification.

    cfg = load_config("default", ["train.steps=200"])
    trainer = Trainer(cfg, run_dir="runs/try")      # loads data, builds model + optimizer
    summary = trainer.fit()                          # trains, evaluates, checkpoints
    trainer = Trainer.resume("runs/try")             # continue bit-for-bit from ckpt.pt

The Trainer assembles parts and runs the loop; each part lives in its own module:

    moelab.data.run             the run's data and training batcher (``load_run_data``)
    moelab.distributed.wrap     device, expert sharding, DDP / FSDP: the model that trains
                                (``wrap_model``)
    moelab.train.optim          optimizer, Excitation, learning-rate schedule
    moelab.train.evaluation     evaluation batches, metrics, the final summary's numbers
    moelab.train.callbacks      the lifecycle: signals, run directory + lock, logging + progress,
                                periodic evaluation, checkpoints (hooks the loop calls)
    moelab.train.guard          the non-finite guard of each step

The run directory (``config.toml``, ``command.txt``, ``metrics.jsonl``, ``ckpt.pt``): its
layout and records in ``moelab.runs.directory``; checkpoints (model, optimizer with Excitation, RNG
states, batcher, step, the open log window) in ``moelab.runs.checkpoint``.

Multi-process: under ``torchrun`` (``WORLD_SIZE`` > 1) the Trainer initialises
``torch.distributed``, shards each global batch of ``data.batch_size`` rows over the ranks, shards
the experts over ``train.expert_parallel`` ranks and wraps the model in DDP or FSDP (see
``moelab.distributed.wrap``). Rank 0 alone prints, logs and writes ``config.toml``/``ckpt.pt``;
DDP with EP: rank r > 0 writes its experts to ``ckpt.rank<r>.pt``; FSDP: every rank its shards
(DCP, ``moelab.runs.sharded_checkpoint``). Logged losses are global-batch means; evaluation runs
everywhere.

Determinism: seeded (``train.seed``) init and data order; batches depend on (seed, step) only;
deterministic algorithms during the run where ``train.deterministic`` resolves on (by default on
CPU, not on CUDA: ``moelab.distributed.wrap.resolve_deterministic``). Resuming restores every
piece of state, so N steps straight and N/2 + resume + N/2 log identical losses.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moelab.config import RunConfig
from moelab.data import load_run_data
from moelab.distributed import ddp_ep as mdist
from moelab.distributed.wrap import broadcast_from_main, init_parallel, runtime_settings, wrap_model
from moelab.runs import checkpoint as ckpt
from moelab.runs import directory as rundir
from moelab.runs import sharded_checkpoint as sharded_ckpt
from moelab.runs.lock import live_holder
from moelab.train.callbacks import (
    Callbacks,
    Checkpointer,
    GuardCheck,
    MetricsLog,
    PeriodicEval,
    RunDirectory,
    StopSignals,
)
from moelab.train.evaluation import EvalInterrupted, evaluate, final_summary
from moelab.train.guard import NonFiniteError, NonFiniteGuard, StepBuffers
from moelab.train.optim import build_optimizer, set_lr
from moelab.train.precision import autocast, resolve_precision

__all__ = ["Trainer", "load_trained"]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_to(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A batch's tensors on ``device``. To a GPU through pinned host memory with
    ``non_blocking`` (the copy overlaps the step; a ``non_blocking`` copy from pageable memory
    would be a synchronous one); elsewhere a plain copy."""
    if device.type != "cuda":
        return tuple(t.to(device) for t in tensors)
    return tuple(t.to(device) if t.is_cuda else t.pin_memory().to(device, non_blocking=True)
                 for t in tensors)


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
    data. Nothing is written until :meth:`fit`. ``callbacks`` (``moelab.train.callbacks``) are the
    parts the loop calls at its named points; append your own before :meth:`fit`.
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None, *, quiet: bool = False,
                 command: Sequence[str] | None = None) -> None:
        self.cfg = cfg
        tcfg = cfg.train
        self.command = list(command) if command is not None else ["moelab", *sys.argv[1:]]
        self.ctx, self.device = init_parallel(tcfg, cfg.data.batch_size)
        self.precision = resolve_precision(tcfg.precision, self.device)
        self.is_main = self.ctx is None or self.ctx.is_main
        if run_dir is None:
            run_dir = tcfg.out_dir or rundir.default_run_dir(cfg)
        self.run_dir = Path(broadcast_from_main(str(run_dir), self.ctx))  # rank 0's choice
        self.quiet = quiet or not self.is_main
        self.step = self.items_seen = 0
        self.train_time_s = 0.0
        self.resumed = False  # continues from a checkpoint
        self.restarted = False  # --resume of a run that never wrote a checkpoint
        self.checkpoint_step: int | None = None  # the step ckpt.pt holds (None: none yet)
        self.stop_signal: str | None = None  # "SIGINT" / "SIGTERM" once one stopped fit()
        self.guard = NonFiniteGuard(max_skips=tcfg.skip_nonfinite_steps)
        self._step_buffers = StepBuffers()  # what a skipped step restores
        self.signals = StopSignals()
        self.run = RunDirectory(self.run_dir)
        self.metrics = MetricsLog()
        self.checkpointer = Checkpointer()
        self.callbacks = Callbacks([self.signals, self.run, GuardCheck(), self.metrics,
                                    PeriodicEval(), self.checkpointer])
        with self._runtime():
            _seed_everything(tcfg.seed)
            self.data = load_run_data(cfg.data, lm=self.is_lm, seed=tcfg.seed,
                                      shard=self.rank, num_shards=self.world_size)
            torch.manual_seed(tcfg.seed)
            from moelab.models import build_model

            self.model = build_model(cfg.model, **self.data.model_kwargs())
            self.n_params = sum(p.numel() for p in self.model.parameters())  # before sharding
            self._train_model, self._expert_params = wrap_model(
                self.model, self.ctx, self.device, compile=tcfg.compile,
                precision=self.precision)
            self.optimizer, self.excitation = build_optimizer(
                self.model, cfg.optim, all_reduce_counts=self.ctx is not None,
                device=self.device)
            # a fused optimizer skips a non-finite step itself: nothing to read back per step
            self.guard.deferred = getattr(self.optimizer, "_step_supports_amp_scaling", False)
            _seed_everything(tcfg.seed)  # the run starts from the same RNG state always

    # ------------------------------------------------------------------ what the run is

    @property
    def world_size(self) -> int:
        return 1 if self.ctx is None else self.ctx.world_size

    @property
    def rank(self) -> int:
        return 0 if self.ctx is None else self.ctx.rank

    @property
    def is_lm(self) -> bool:
        return self.cfg.model.kind in ("lm", "hf")

    @property
    def lock(self) -> Any:
        """The run directory's RunLock."""
        return self.run.lock

    # the data, as ``moelab.robustness`` and ``moelab reproduce`` read it
    tokens = property(lambda self: self.data.tokens)
    images = property(lambda self: self.data.images)
    tokenizer = property(lambda self: self.data.tokenizer)
    vocab_size = property(lambda self: self.data.vocab_size)
    data_source = property(lambda self: self.data.source)

    def _runtime(self) -> contextlib.AbstractContextManager[None]:
        """The run's global torch settings for the duration of a call
        (``moelab.distributed.wrap.runtime_settings``)."""
        return runtime_settings(self.cfg.train, self.device, self.precision)

    def say(self, msg: str) -> None:
        """Print ``msg`` unless quiet (rank 0 only under torchrun)."""
        if not self.quiet:
            print(msg, flush=True)

    # ------------------------------------------------------------------ one step

    def _task_loss(self, logits: torch.Tensor, target: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                               reduction=reduction)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (``grad_accum`` micro-batches); returns its loss, aux loss, lr,
        grad norm and item count. A NaN/inf loss or grad norm applies no update: the step is
        skipped (``"skipped": True``) while ``train.skip_nonfinite_steps`` allows, else
        NonFiniteError (one line: step, loss, lr, the last good checkpoint, what to try)."""
        tcfg, ocfg = self.cfg.train, self.cfg.optim
        self.model.train()
        lr = set_lr(self.optimizer, ocfg, self.step, tcfg.steps)
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        items = 0
        # a skipped step must leave the model as it was: keep the buffers it may update
        buffers = (self._step_buffers.take(self.model)
                   if self.guard.deferred or self.guard.max_skips > self.guard.skipped else [])
        for i in range(tcfg.grad_accum):
            x, y = self.data.batcher.next_batch()
            x, y = batch_to(self.device, x, y)
            last = i == tcfg.grad_accum - 1
            # FSDP2 has no no_sync: its gradients reduce-scatter at the last micro-batch only
            gradient_sync = getattr(self._train_model, "set_requires_gradient_sync", None)
            if gradient_sync is not None:
                gradient_sync(last)
            no_sync = getattr(self._train_model, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with autocast(self.precision, self.device):
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
        if self.guard.deferred:
            return self._deferred_update(loss_sum / tcfg.grad_accum, aux_sum / tcfg.grad_accum,
                                         grad_norm, lr, items, buffers)
        res = {"loss": float(loss_sum) / tcfg.grad_accum, "aux_loss": float(aux_sum)
               / tcfg.grad_accum, "lr": lr, "grad_norm": float(grad_norm), "items": items}
        if not self.guard.ok(res["loss"], res["aux_loss"], res["grad_norm"]):
            # the same decision on every rank: loss sums and the grad norm are global
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.skip(self.step + 1, res["loss"], res["grad_norm"], lr,
                            self.checkpoint_note())
            self._step_buffers.restore(buffers)  # undo what the bad forward did to the EMA etc.
            self.step += 1
            return {**res, "skipped": True}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.items_seen += items
        return res

    def _deferred_update(self, loss: torch.Tensor, aux: torch.Tensor, grad_norm: torch.Tensor,
                         lr: float, items: int, buffers: list[tuple]) -> dict[str, Any]:
        """The end of a step that reads nothing back from the device (a fused optimizer): a
        non-finite step is skipped by the optimizer (``found_inf``), its buffer updates are
        undone, and the guard notes it, to be read at the next logged step. The result's
        ``loss``, ``aux_loss`` and ``grad_norm`` are device tensors and ``ok`` says whether
        the step was applied."""
        ok = torch.isfinite(torch.stack([loss, aux, grad_norm.to(loss.dtype)])).all()
        self.optimizer.found_inf = (~ok).float()
        try:
            self.optimizer.step()
        finally:
            self.optimizer.found_inf = None
        self.optimizer.zero_grad(set_to_none=True)
        self._step_buffers.restore(buffers, ok)
        self.step += 1
        self.items_seen += items  # the skipped steps' items come off at the guard's flush
        self.guard.record(ok, self.step, loss, grad_norm, lr, items)
        return {"loss": loss, "aux_loss": aux, "lr": lr, "grad_norm": grad_norm,
                "items": items, "ok": ok}

    def flush_guard(self) -> None:
        """Read the deferred guard (a no-op in immediate mode): raise if the run passed its
        non-finite step budget; keep skipped steps out of ``items_seen``."""
        self.items_seen -= self.guard.flush(self.checkpoint_note(), self.step)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, split: str = "val", max_batches: int | None = None,
                 routing: bool = True, progress: bool = False) -> dict[str, Any]:
        """Loss and perplexity (LM) or accuracy on ``split`` ("val" | "test") over the first
        ``max_batches`` batches (None: all), plus per-MoE-layer routing metrics (``layers``);
        see ``moelab.train.evaluation.evaluate``. ``progress``: show progress (a bar, or plain
        lines when stderr is not a terminal). Raises NonFiniteError if the loss is NaN or
        infinite."""
        return self._evaluate(split, max_batches, routing, progress)

    def _evaluate(self, split: str, max_batches: int | None, routing: bool, progress: bool,
                  should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        dcfg = self.cfg.data
        with self._runtime():
            return evaluate(
                self.model, self.data, split, batch_size=dcfg.batch_size, seq_len=dcfg.seq_len,
                device=self.device, loss_fn=self._task_loss, max_batches=max_batches,
                routing=routing, progress=progress and not self.quiet, should_stop=should_stop,
                precision=self.precision,
                layer_blocks=self.cfg.model.moe_block_indices(), step=self.step,
                run_dir=self.run_dir)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run bit-for-bit (``Checkpointer.state``)."""
        return self.checkpointer.state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (``Checkpointer.restore``)."""
        self.checkpointer.restore(self, state)

    def save_checkpoint(self) -> Path:
        """Write this rank's checkpoint atomically; returns ``RUN/ckpt.pt``. All ranks take
        part under torchrun."""
        return self.checkpointer.save(self)

    def checkpoint_note(self) -> str:
        """Where the last good state is, for error messages."""
        if self.checkpoint_step is None:
            return f"no checkpoint was written to {self.run_dir}"
        return (f"{self.run_dir / rundir.CHECKPOINT} keeps the last good state (step "
                f"{self.checkpoint_step})")

    def _start_run_dir(self) -> None:
        """Check / create the run directory's files (what the first ``fit()`` does first)."""
        self.run.start(self)

    @classmethod
    def resume(cls, run_dir: str | Path, *, quiet: bool = False,
               command: Sequence[str] | None = None, device: str | None = None,
               precision: str | None = None, _verb: str = "resume") -> Trainer:
        """A Trainer that continues the run in ``run_dir`` from its ``ckpt.pt``, with the
        run's ``config.toml`` (edit ``train.steps`` there to extend a finished run).

        Takes the run directory's lock (RunDirLockedError if another process writes it),
        held until :meth:`fit` returns. A run that stopped before its first checkpoint starts
        again from step 0. ``device`` / ``precision`` override ``train.device`` /
        ``train.precision`` for this process (``config.toml`` keeps its values; a change of
        precision is noted in one line); a sharded checkpoint of an expert-parallel run
        loads on one process with all experts there. CheckpointError for an
        unreadable, foreign or untrusted ``ckpt.pt``."""
        run_dir = Path(run_dir)
        cfg = rundir.read_config(run_dir, _verb)
        changes = {k: v for k, v in (("device", device), ("precision", precision))
                   if v is not None} | sharded_ckpt.one_process_layout(cfg, run_dir)
        if changes:
            import dataclasses

            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
        has_ckpt = (run_dir / rundir.CHECKPOINT).is_file()
        if not has_ckpt and _verb != "resume":
            holder = live_holder(run_dir)
            why = (f"the run is still training ({holder}) and has not reached its first "
                   "checkpoint yet (train.checkpoint_every); try again once it has"
                   if holder else "the run stopped before its first checkpoint")
            raise FileNotFoundError(f"cannot {_verb} {run_dir}: no {rundir.CHECKPOINT} there "
                                    f"({why})")
        trainer = cls(cfg, run_dir, quiet=quiet, command=command)
        if _verb == "resume":  # held until fit() ends: nobody else may write the run meanwhile
            trainer.run.acquire(trainer)
        try:
            if not has_ckpt:  # stopped before its first checkpoint: start it again, same config
                trainer.restarted = True
            else:
                trainer.load_state_dict(ckpt.load_for_resume(
                    run_dir, trainer.rank, trainer.world_size, cfg.train.expert_parallel,
                    trainer.device, distributed=trainer.ctx is not None, verb=_verb))
                trainer.resumed = True
        except BaseException:
            trainer.run.release()
            raise
        return trainer

    @property
    def finished_summary(self) -> dict[str, Any] | None:
        """The ``final`` record of a resumed run that already reached ``train.steps``."""
        if not self.resumed or self.step < self.cfg.train.steps:
            return None
        finals = [e for e in rundir.read_metrics(self.run_dir) if e.get("kind") == "final"]
        return finals[-1] if finals and finals[-1].get("step") == self.step else None

    # ------------------------------------------------------------------ the loop

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
            self.run.release()
            return done
        from moelab.train.loggers import require_backends

        require_backends(self.cfg.train.loggers)  # a missing tracker: before any write
        failed = True
        try:
            self.callbacks.call("pre_train", self)
            out = self._fit(max_steps)
            failed = False
            return out
        finally:
            self.callbacks.call("post_train", self, failed)

    def _fit(self, max_steps: int | None) -> dict[str, Any]:
        """The loop of :meth:`fit`: step, hand the result to the callbacks (logging,
        evaluation, checkpoints, signals), stop when asked; then the final evaluation."""
        total = self.cfg.train.steps
        stop_at = total if max_steps is None else min(total, max_steps)
        with self._runtime():
            while self.step < stop_at:
                t0 = time.perf_counter()
                result = self.train_step()
                result["time_s"] = time.perf_counter() - t0
                self.train_time_s += result["time_s"]
                self.callbacks.call("post_step", self, result)
                if self.stop_signal is not None:
                    break
            self.callbacks.call("post_loop", self)
        if self.step < total:
            return self._stopped()
        try:
            return self._finish()
        except EvalInterrupted:
            return self._stopped()

    def _stopped(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "stopped": True}
        if self.stop_signal is not None:
            out["signal"] = self.stop_signal
        return out

    def _finish(self) -> dict[str, Any]:
        """The final evaluation on the whole validation and test splits (interruptible: a stop
        request raises EvalInterrupted; the checkpoint at the last step is written, so a
        resume redoes just this), logged with the final summary."""
        n = self.cfg.data.final_eval_batches
        stop = lambda: self.signals.requested(self)  # noqa: E731
        val = self._evaluate("val", n, True, True, stop)
        test = self._evaluate("test", n, False, True, stop)
        self.callbacks.call("post_eval", self, val, True)
        summary = final_summary(
            {"step": self.step, "name": self.cfg.name, "model_kind": self.cfg.model.kind,
             "dataset": self.cfg.data.dataset, "params": self.n_params}, val, test,
            {f"{self.data.unit}_per_s": self.items_seen / max(self.train_time_s, 1e-9),
             "train_time_s": self.train_time_s, "items_seen": self.items_seen})
        self.callbacks.call("post_final", self, summary)
        return summary


def load_trained(run_dir: str | Path, *, quiet: bool = True,
                 precision: str | None = None) -> Trainer:
    """A Trainer holding the checkpointed model of ``run_dir`` (for evaluation, in the run's
    precision unless ``precision`` is given). Raises NonFiniteError if the checkpoint holds
    NaN/inf parameters (a run that diverged before moelab refused to checkpoint such a
    state)."""
    trainer = Trainer.resume(run_dir, quiet=quiet, command=[], precision=precision,
                             _verb="evaluate")
    bad = ckpt.check_finite({"model": trainer.model.state_dict()})
    if bad:
        raise NonFiniteError(
            f"the checkpoint in {run_dir} holds NaN/inf values ({', '.join(bad[:3])}): that "
            "run diverged; train it again with a smaller optim.lr")
    return trainer
