"""The lifecycle of a run as parts the Trainer calls at named points (OLMo-core's callbacks).

The loop in ``moelab.train.trainer`` knows only the hooks; each concern is one :class:`Callback`:

    StopSignals      SIGINT / SIGTERM: finish the step, checkpoint, stop (agreed over ranks)
    RunDirectory     the run directory's lock, and its files at the start (config, command)
    GuardCheck       reads the deferred non-finite guard at each logged step (fused optimizer)
    MetricsLog       the header line, progress, the train-log window, loggers (metrics.jsonl,
                     TensorBoard, W&B): every train / eval / final record
    PeriodicEval     validation every ``train.eval_every`` steps
    Checkpointer     ``ckpt.pt`` every ``train.checkpoint_every`` steps and when the loop ends
                     (with FSDP also its DCP shards: ``moelab.runs.sharded_checkpoint``)

Hooks, in the order a ``fit()`` call reaches them (every callback's hook runs, in list order):

    pre_train(trainer)              fit() starts (before its first step)
    post_step(trainer, result)      after each optimizer step (``result``: see ``Trainer``)
    post_eval(trainer, ev, final)   after an evaluation (final: the end-of-run one)
    post_loop(trainer)              the steps of this call are done (finished or stopped)
    post_final(trainer, summary)    the final summary of a finished run
    post_train(trainer, failed)     fit() ends, however it ends (also after an exception)

A new concern (a profiler, a speed monitor, garbage collection) is a new Callback in the
Trainer's ``callbacks`` list; the loop does not change.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from moelab.config import dump_toml
from moelab.distributed.launch import launch_command
from moelab.runs import checkpoint as ckpt
from moelab.runs import directory as rundir
from moelab.runs import sharded_checkpoint as sharded_ckpt
from moelab.runs.lock import RunDirLockedError, RunLock
from moelab.train import loggers as mlog
from moelab.train.evaluation import excitation_summary
from moelab.train.guard import NonFiniteError
from moelab.train.interrupt import StopOnSignal
from moelab.train.progress import StepProgress, auto_every

if TYPE_CHECKING:
    from moelab.train.trainer import Trainer

__all__ = ["Callback", "Callbacks", "Checkpointer", "GuardCheck", "MetricsLog", "PeriodicEval",
           "RunDirectory", "StopSignals"]


class Callback:
    """One part of a run's lifecycle; every hook is a no-op here (see the module docstring)."""

    def pre_train(self, trainer: Trainer) -> None:
        pass

    def post_step(self, trainer: Trainer, result: dict[str, Any]) -> None:
        pass

    def post_eval(self, trainer: Trainer, ev: dict[str, Any], final: bool) -> None:
        pass

    def post_loop(self, trainer: Trainer) -> None:
        pass

    def post_final(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        pass

    def post_train(self, trainer: Trainer, failed: bool) -> None:
        pass


class Callbacks(list):
    """The Trainer's callbacks, in call order."""

    def call(self, hook: str, *args: Any) -> None:
        """Run ``hook`` of every callback in order. For ``post_train`` every callback runs
        even if an earlier one raised (the first error is re-raised at the end)."""
        error: BaseException | None = None
        for cb in self:
            try:
                getattr(cb, hook)(*args)
            except BaseException as e:
                if hook != "post_train":
                    raise
                error = error or e
        if error is not None:
            raise error


def _any_rank(trainer: Trainer, flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (itself on one process)."""
    if trainer.ctx is None:
        return flag
    t = torch.tensor([float(flag)], device=trainer.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t) > 0


class StopSignals(Callback):
    """The first SIGINT / SIGTERM during ``fit()`` asks the run to stop: the step in progress
    finishes, a checkpoint is written and ``fit()`` returns; a second one aborts at once
    (``moelab.train.interrupt``). Sets ``trainer.stop_signal`` ("SIGINT" / "SIGTERM").

    Under torchrun a signal on any rank stops every rank after the same step, without a device
    sync: the flag is a host tensor all-reduced (MAX) over a gloo group (the default group when
    it is gloo, else a gloo group made at the first ``pre_train``). Each ``post_step`` reads
    the all-reduce started at the step before (usually finished long ago) and starts this
    step's, so every rank stops after the step following the one in which the signal arrived
    (one step later than on one process, the same step on every rank)."""

    def __init__(self) -> None:
        self._stop: StopOnSignal | None = None
        self._group: dist.ProcessGroup | None = None  # the gloo group of the flag
        # the flag: a host tensor [1] and its numpy view (read and written without torch ops)
        self._flag = torch.zeros(1)
        self._flag_np = self._flag.numpy()
        self._pending: Any = None  # the all-reduce started at the last step

    def pre_train(self, trainer: Trainer) -> None:
        self._stop = StopOnSignal(announce=trainer.is_main).__enter__()  # one message
        if trainer.ctx is not None and self._group is None:
            # collective: every rank reaches its first pre_train in the same order
            self._group = (dist.group.WORLD if dist.get_backend() == "gloo"
                           else dist.new_group(backend="gloo"))

    def _agree(self, trainer: Trainer, any_rank: bool) -> bool:
        """When a stop was asked on any rank (``any_rank``), record this rank's signal, or
        "SIGTERM" for another rank's, in ``trainer.stop_signal``; returns ``any_rank``."""
        if any_rank and trainer.stop_signal is None:
            local = self._stop.requested if self._stop is not None else None
            trainer.stop_signal = local or "SIGTERM"
        return any_rank

    def _local_flag(self) -> float:
        return float(self._stop is not None and self._stop.requested is not None)

    def requested(self, trainer: Trainer) -> bool:
        """Whether a stop was asked (on any rank, agreed now: a blocking all-reduce of the host
        flag, on every rank; used between evaluation batches); records it in
        ``trainer.stop_signal``."""
        if trainer.ctx is None:
            return self._agree(trainer, self._local_flag() > 0)
        self._drain(trainer)
        self._flag_np[0] = self._local_flag()
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        return self._agree(trainer, self._flag_np[0] > 0)

    def _drain(self, trainer: Trainer) -> None:
        """Wait for the all-reduce started at the last step and act on its flag."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
            self._agree(trainer, self._flag_np[0] > 0)

    def post_step(self, trainer: Trainer, result: dict[str, Any]) -> None:
        if trainer.ctx is None:
            self._agree(trainer, self._local_flag() > 0)
            return
        self._drain(trainer)  # the previous step's flags, all ranks'
        self._flag_np[0] = self._local_flag()
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group,
                                        async_op=True)

    def post_loop(self, trainer: Trainer) -> None:
        self._drain(trainer)  # every rank has started the same all-reduces: finish the last
        if self._stop is not None:  # what the next signal interrupts now
            self._stop.message = ("stopping the final evaluation (ckpt.pt holds the last "
                                  "step; a resume redoes just the evaluation)")

    def post_train(self, trainer: Trainer, failed: bool) -> None:
        self._pending = None  # drained at post_loop; after an error, left to the group
        if self._stop is not None:
            self._stop.__exit__()
            self._stop = None


class RunDirectory(Callback):
    """The run directory: locked (``moelab.runs.lock``) from :meth:`acquire` (at the latest
    ``pre_train``) to the end of ``fit()``; at the first ``pre_train`` of a new run it is checked
    to be fresh and gets ``config.toml`` and an empty ``metrics.jsonl``; a resumed or
    restarted run has its metrics cut back to the checkpoint's step. Each start appends its
    command to ``command.txt``. Rank 0 writes; every rank checks."""

    def __init__(self, run_dir: Path) -> None:
        self.lock = RunLock(run_dir)
        self.started = False  # a later fit() continues the same run
        self._acquired = False

    def acquire(self, trainer: Trainer) -> None:
        """Rank 0 locks the run directory (RunDirLockedError if another process holds it);
        under torchrun every rank learns the outcome. A no-op while held."""
        if self._acquired:
            return
        error = None
        if trainer.is_main:
            try:
                self.lock.acquire()
            except FileExistsError as e:
                error = str(e)
        if trainer.ctx is not None:
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error is not None:
            raise RunDirLockedError(error)
        self._acquired = True
        note = self.lock.stale_note()  # once per taken-over lock
        if note is not None:
            print(f"moelab: note: {note}", file=sys.stderr)

    def release(self) -> None:
        self.lock.release()
        self._acquired = False

    def pre_train(self, trainer: Trainer) -> None:
        self.acquire(trainer)
        if not self.started:
            self.start(trainer)

    def start(self, trainer: Trainer) -> None:
        """Check the run directory and write its start files (see the class docstring)."""
        d = trainer.run_dir
        continuing = trainer.resumed or trainer.restarted
        if not continuing:
            rundir.check_fresh_run_dir(d)  # on every rank, before rank 0 writes anything
        if trainer.ctx is not None:
            dist.barrier()
        if trainer.is_main:
            if continuing:
                rundir.truncate_metrics(d, trainer.step)
            else:
                rundir.start_run_dir(d, trainer.cfg)
            command = trainer.command
            if trainer.ctx is not None and command and command[0] == "moelab":
                command = launch_command(command, trainer.world_size)  # runs as written
            rundir.append_command(d, command)
        if trainer.ctx is not None:
            dist.barrier()
        self.started = True

    def post_train(self, trainer: Trainer, failed: bool) -> None:
        self.release()


def is_log_step(trainer: Trainer) -> bool:
    """Whether this step writes a train record (every ``train.log_every`` and the last)."""
    return (trainer.step % trainer.cfg.train.log_every == 0
            or trainer.step == trainer.cfg.train.steps)


class GuardCheck(Callback):
    """With a deferred non-finite guard (a fused optimizer skips bad steps on the device),
    read it at each logged step and when the loop ends: raise NonFiniteError past the budget
    (``train.skip_nonfinite_steps``), and count the skipped steps. Runs before MetricsLog, so
    the train record's ``skipped_steps`` is current."""

    def post_step(self, trainer: Trainer, result: dict[str, Any]) -> None:
        if is_log_step(trainer):
            trainer.flush_guard()

    def post_loop(self, trainer: Trainer) -> None:
        trainer.flush_guard()


def new_window() -> dict[str, float]:
    """An empty train-log window: sums over the steps since the last train record."""
    return {"loss": 0.0, "aux": 0.0, "steps": 0, "items": 0, "time": 0.0}


class MetricsLog(Callback):
    """Everything a run reports while it trains: the header line and progress (stderr; none
    when ``trainer.quiet``), and on rank 0 the records of ``metrics.jsonl`` and the trackers
    (``moelab.train.loggers``): a ``train`` record every ``train.log_every`` steps (means over the
    window since the previous one; skipped steps count only in its time), an ``eval`` record
    per evaluation, the ``final`` summary. ``window`` is checkpointed, so a resumed run's first
    record covers the same steps as an uninterrupted one's."""

    def __init__(self) -> None:
        self.window = new_window()
        self._loggers: mlog.LoggerGroup | None = None  # open during fit(), on rank 0
        self._progress: StepProgress | None = None
        self._fits = 0  # fit() calls so far: a later one continues the trackers' runs
        self._last_loss: float | None = None  # of the latest train record (deferred steps)

    def log(self, trainer: Trainer, entry: dict[str, Any]) -> None:
        if trainer.is_main and self._loggers is not None:
            self._loggers.log(entry)

    def pre_train(self, trainer: Trainer) -> None:
        tcfg = trainer.cfg.train
        if trainer.is_main and self._loggers is None:  # closed at the end of each fit()
            continuing = self._fits > 0 or trainer.resumed or trainer.restarted
            self._loggers = mlog.open_loggers(trainer.cfg, trainer.run_dir, trainer.model,
                                              quiet=trainer.quiet,
                                              resume_step=trainer.step if continuing else None)
        self._fits += 1
        trainer.say(self._header(trainer))
        init = getattr(trainer.model, "init_note", "")
        if trainer.quiet and trainer.is_main and init.startswith("RANDOM INIT"):
            print(f"moelab: note: model.hf_path: {init}", file=sys.stderr)  # even when quiet
        self._progress = StepProgress(
            tcfg.steps, trainer.step, trainer.data.unit, enabled=not trainer.quiet,
            every=tcfg.progress_every or auto_every(tcfg.steps, tcfg.log_every))

    @staticmethod
    def _header(trainer: Trainer) -> str:
        tcfg = trainer.cfg.train
        where = (f"{trainer.device} (train.device=auto)" if tcfg.device == "auto"
                 else str(trainer.device))
        if trainer.resumed:
            return (f"moelab: resuming {trainer.run_dir} at step {trainer.step}/{tcfg.steps} "
                    f"on {where} | {MetricsLog._how(trainer)}")
        again = " (again: it stopped before its first checkpoint)" if trainer.restarted else ""
        init = getattr(trainer.model, "init_note", "")  # an HF model: its weights or none
        return (f"moelab: run {trainer.run_dir}{again} | {trainer.cfg.model.kind} model, "
                f"{trainer.n_params / 1e6:.2f}M params{f' ({init})' if init else ''} | "
                f"data: {trainer.cfg.data.dataset} | {tcfg.steps} steps on {where} | "
                f"{MetricsLog._how(trainer)}")

    @staticmethod
    def _how(trainer: Trainer) -> str:
        """The ranks and how they split the model (under torchrun), the precision and
        whether the blocks are compiled."""
        tcfg = trainer.cfg.train
        how = ""
        if trainer.ctx is not None:
            ep = f", experts over {tcfg.expert_parallel}" if tcfg.expert_parallel > 1 else ""
            how = f"{trainer.world_size} ranks, {tcfg.parallel}{ep} | "
        how += f"precision {trainer.precision}"
        if tcfg.precision == "auto":
            how += " (train.precision=auto)"
        return how + (", compiled" if tcfg.compile else "")

    def post_step(self, trainer: Trainer, result: dict[str, Any]) -> None:
        w = self.window
        ok = result.get("ok")  # a device bool: the step's values stay on the device
        if ok is not None:
            w["loss"] = w["loss"] + torch.where(ok, result["loss"].double(), 0.0)
            w["aux"] = w["aux"] + torch.where(ok, result["aux_loss"].double(), 0.0)
            w["steps"] = w["steps"] + ok.long()
            w["items"] = w["items"] + ok.long() * result["items"]
        elif not result.get("skipped"):
            w["loss"] += result["loss"]
            w["aux"] += result["aux_loss"]
            w["steps"] += 1
            w["items"] += result["items"]
        w["time"] += result["time_s"]
        logged = is_log_step(trainer)
        if logged:
            self._log_train(trainer, result)
        if self._progress is not None:
            if ok is not None:  # the loss is read only when logged: show the latest record's
                loss = self._last_loss
            else:
                loss = None if result.get("skipped") else result["loss"]
            self._progress.update(trainer.step, loss, result["items"])

    def window_state(self, **extra: Any) -> dict[str, float]:
        """The open window (and ``extra`` values) as plain numbers, with one read of whatever
        is on the device (for the checkpoint and the train record)."""
        values = {**self.window, **extra}
        on_device = [k for k, v in values.items() if torch.is_tensor(v)]
        if on_device:
            read = torch.stack([values[k].double() for k in on_device]).tolist()
            values.update(zip(on_device, read, strict=True))
            for k in ("steps", "items"):
                values[k] = int(values[k])
        return values

    def _log_train(self, trainer: Trainer, result: dict[str, Any]) -> None:
        w = self.window_state(grad_norm=result["grad_norm"])
        n = w["steps"]
        entry = {"kind": "train", "step": trainer.step,
                 "loss": w["loss"] / n if n else float("nan"),
                 "aux_loss": w["aux"] / n if n else float("nan"),
                 "lr": result["lr"], "grad_norm": w["grad_norm"],
                 f"{trainer.data.unit}_per_s": w["items"] / max(w["time"], 1e-9),
                 "elapsed_s": trainer.train_time_s}
        if trainer.guard.skipped:
            entry["skipped_steps"] = trainer.guard.skipped  # NaN/inf steps skipped so far
        self._last_loss = entry["loss"]
        self.log(trainer, entry)
        self.window = new_window()

    def post_eval(self, trainer: Trainer, ev: dict[str, Any], final: bool) -> None:
        entry = {"kind": "eval", "step": trainer.step, "split": "val", **ev}
        if final:
            entry["final"] = True
        exc = excitation_summary(trainer.excitation)
        if exc is not None:
            entry["excitation"] = exc
        entry.update(mlog.method_summary(trainer.model))  # Default MoE EMA norms, learnable μ/γ
        self.log(trainer, entry)
        if not final and self._progress is not None:
            key = "val_ppl" if trainer.data.is_lm else "val_acc"
            shown = f"{ev[key]:.2f}" if trainer.data.is_lm else f"{ev[key]:.3f}"
            self._progress.note(trainer.step, **{key: shown})

    def post_loop(self, trainer: Trainer) -> None:
        self._close_progress()

    def post_final(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self.log(trainer, summary)

    def post_train(self, trainer: Trainer, failed: bool) -> None:
        self._close_progress()
        if self._loggers is not None:
            self._loggers.close(failed)
            self._loggers = None

    def _close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None


class PeriodicEval(Callback):
    """Validation on ``data.eval_batches`` batches every ``train.eval_every`` steps (not at the
    last step: the final evaluation covers it); its result goes to every ``post_eval``."""

    def post_step(self, trainer: Trainer, result: dict[str, Any]) -> None:
        every, step = trainer.cfg.train.eval_every, trainer.step
        if every and step % every == 0 and step != trainer.cfg.train.steps:
            ev = trainer.evaluate("val", trainer.cfg.data.eval_batches)
            trainer.callbacks.call("post_eval", trainer, ev, False)


class Checkpointer(Callback):
    """``ckpt.pt`` (``moelab.runs.checkpoint``: atomic, per-rank files under expert parallelism)
    every ``train.checkpoint_every`` steps and when the loop of a ``fit()`` call ends, unless
    that step is already saved. A model holding NaN/inf is never written (NonFiniteError; the
    last good checkpoint stays)."""

    def post_step(self, trainer: Trainer, result: dict[str, Any]) -> None:
        every = trainer.cfg.train.checkpoint_every
        if every and trainer.step % every == 0:
            self.save(trainer)

    def post_loop(self, trainer: Trainer) -> None:
        if trainer.checkpoint_step != trainer.step:
            self.save(trainer)

    @staticmethod
    def sharded(trainer: Trainer) -> bool:
        """Whether the run writes sharded checkpoints: ``train.parallel = "fsdp"``, on one
        process too (so it resumes under torchrun at any size)."""
        return trainer.cfg.train.parallel == "fsdp"

    @staticmethod
    def state(trainer: Trainer) -> dict[str, Any]:
        """Everything needed to continue the run bit-for-bit (see ``moelab.runs.checkpoint``);
        under FSDP the model and optimizer entries hold this rank's shards, keyed by
        parameter name (``moelab.runs.sharded_checkpoint.tensor_state``)."""
        if Checkpointer.sharded(trainer):
            tensors = sharded_ckpt.tensor_state(trainer.model, trainer.optimizer)
        else:
            tensors = {"model": trainer.model.state_dict(),
                       "optimizer": trainer.optimizer.state_dict()}
        return {
            "version": ckpt.CKPT_VERSION,
            "step": trainer.step,
            "items_seen": trainer.items_seen,
            "train_time_s": trainer.train_time_s,
            **tensors,
            "batcher": trainer.data.batcher.state_dict(),
            "rng": ckpt.capture_rng(trainer.device),
            "window": trainer.metrics.window_state(),
            "nonfinite_skipped": trainer.guard.skipped,
            "precision": trainer.precision,
            "config_toml": dump_toml(trainer.cfg),
            "parallel": {"world_size": trainer.world_size,
                         "expert_parallel": trainer.cfg.train.expert_parallel,
                         "parallel": trainer.cfg.train.parallel},
        }

    @staticmethod
    def restore(trainer: Trainer, state: dict[str, Any]) -> None:
        """Put ``trainer`` back in the state :meth:`state` saved; a change of precision is
        allowed, with a one-line note. A sharded checkpoint (``ckpt.pt`` naming its DCP
        directory) loads at any world size and expert-parallel degree, one process included;
        every rank takes part."""
        ckpt.check_version(state)
        if sharded_ckpt.is_sharded(state):
            Checkpointer._restore_sharded(trainer, state)
        else:
            if Checkpointer.sharded(trainer):
                raise ValueError(f"{trainer.run_dir}: its checkpoint was written without "
                                 "train.parallel='fsdp' and cannot resume under it: set "
                                 "train.parallel back in its config.toml")
            ckpt.check_parallel(state, trainer.world_size, trainer.cfg.train.expert_parallel)
            trainer.model.load_state_dict(state["model"])
            trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.data.batcher.load_state_dict(state["batcher"])
        trainer.step = int(state["step"])
        trainer.items_seen = int(state["items_seen"])
        trainer.train_time_s = float(state["train_time_s"])
        trainer.metrics.window = dict(state["window"])
        trainer.guard.skipped = int(state.get("nonfinite_skipped", 0))
        trainer.checkpoint_step = trainer.step
        ckpt.restore_rng(state["rng"], trainer.device)
        before = state.get("precision", "fp32")
        if before != trainer.precision and trainer.is_main:  # even when quiet: it matters
            print(f"moelab: note: {trainer.run_dir} trained in {before} up to step "
                  f"{trainer.step}; it continues in {trainer.precision} (train.precision)",
                  file=sys.stderr)

    @staticmethod
    def _restore_sharded(trainer: Trainer, state: dict[str, Any]) -> None:
        if trainer.cfg.train.expert_parallel > 1 and not Checkpointer.sharded(trainer):
            raise ValueError(f"{trainer.run_dir}: its checkpoint is sharded (FSDP); with "
                             "train.expert_parallel > 1 it resumes only with "
                             "train.parallel='fsdp'")
        state = sharded_ckpt.load(trainer.run_dir, state, trainer.model, trainer.optimizer)
        sharded_ckpt.apply(trainer.model, trainer.optimizer, state)
        if trainer.excitation is not None:
            trainer.excitation.load_extra_state(state.get("optimizer_extra", {}))

    @staticmethod
    def save(trainer: Trainer) -> Path:
        """Write this rank's checkpoint of ``trainer.state_dict()``; returns ``RUN/ckpt.pt``.
        Every rank takes part under torchrun (each refuses, or none)."""
        path = ckpt.rank_checkpoint_path(trainer.run_dir, trainer.rank,
                                         trainer.cfg.train.expert_parallel)
        trainer.flush_guard()  # the skipped-step count it saves must be current
        state = trainer.state_dict()  # on every rank: a collective-free snapshot
        bad = ckpt.check_finite(state)
        if _any_rank(trainer, bool(bad)) and not bad:
            bad = ["another rank's experts"]
        if bad:
            raise NonFiniteError(
                f"not writing a checkpoint at step {trainer.step}: the model holds NaN/inf "
                f"values ({', '.join(bad[:3])}); {trainer.checkpoint_note()}; try a smaller "
                "optim.lr")
        if Checkpointer.sharded(trainer):
            sharded_ckpt.save(state, trainer.run_dir, is_main=trainer.is_main)
        elif path is not None:
            ckpt.save_atomic(state, path)
            if trainer.is_main:  # the run was sharded before (resumed without FSDP)
                shutil.rmtree(trainer.run_dir / sharded_ckpt.SHARDS, ignore_errors=True)
        if trainer.ctx is not None:
            dist.barrier()
        trainer.checkpoint_step = trainer.step
        return trainer.run_dir / rundir.CHECKPOINT
