"""The run's lifecycle parts (``moelab.train.callbacks``), each on its own with a stand-in trainer:
no model is trained here; the parts only see the attributes they read."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train import tiny

from moelab.runs.checkpoint import load_checkpoint
from moelab.runs.directory import CHECKPOINT, COMMAND, CONFIG, METRICS, read_metrics
from moelab.runs.lock import LOCK, RunDirLockedError, RunLock
from moelab.train.callbacks import (
    Callback,
    Callbacks,
    Checkpointer,
    MetricsLog,
    PeriodicEval,
    RunDirectory,
    StopSignals,
)
from moelab.train.guard import NonFiniteError, NonFiniteGuard


def stand_in(run_dir: Path, *extra: str, **attrs) -> SimpleNamespace:
    """What the callbacks read of a Trainer, for a tiny LM config."""
    t = SimpleNamespace(cfg=tiny(*extra), run_dir=run_dir, ctx=None, is_main=True, rank=0,
                        world_size=1, device=torch.device("cpu"), quiet=True, step=0,
                        train_time_s=0.0, resumed=False, restarted=False, stop_signal=None,
                        checkpoint_step=None, command=["moelab", "train"],
                        guard=NonFiniteGuard(), excitation=None, model=torch.nn.Linear(2, 2),
                        data=SimpleNamespace(unit="tokens", is_lm=True), n_params=6,
                        precision="fp32")
    t.say = lambda msg: None
    t.callbacks = Callbacks()
    t.checkpoint_note = lambda: "no checkpoint"
    t.flush_guard = lambda: None  # Checkpointer.save reads the deferred guard first
    for k, v in attrs.items():
        setattr(t, k, v)
    return t


class Recorder(Callback):
    def __init__(self, name: str, calls: list, fail: str | None = None) -> None:
        self.name, self.calls, self.fail = name, calls, fail

    def pre_train(self, trainer):
        self.calls.append((self.name, "pre_train"))

    def post_train(self, trainer, failed):
        self.calls.append((self.name, "post_train"))
        if self.fail == "post_train":
            raise RuntimeError(self.name)


def test_callbacks_run_in_order_and_every_post_train_runs():
    calls: list = []
    cbs = Callbacks([Recorder("a", calls, fail="post_train"), Recorder("b", calls)])
    cbs.call("pre_train", None)
    with pytest.raises(RuntimeError, match="^a$"):
        cbs.call("post_train", None, False)
    assert calls == [("a", "pre_train"), ("b", "pre_train"), ("a", "post_train"),
                     ("b", "post_train")]


def test_stop_signals_set_the_flag_and_restore_the_handler(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    t = stand_in(tmp_path)
    stop = StopSignals()
    stop.pre_train(t)
    try:
        stop.post_step(t, {})
        assert t.stop_signal is None
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next bytecode
        stop.post_step(t, {})
        assert t.stop_signal == "SIGINT"
        assert stop.requested(t)
    finally:
        stop.post_train(t, False)
    assert signal.getsignal(signal.SIGINT) is before


def test_run_directory_starts_locks_and_releases(tmp_path):
    run = tmp_path / "run"
    t = stand_in(run)
    part = RunDirectory(run)
    part.pre_train(t)
    assert (run / LOCK).exists() and part.lock.held
    assert (run / CONFIG).is_file() and (run / METRICS).read_text() == ""
    assert (run / COMMAND).read_text() == "moelab train\n"
    with pytest.raises(RunDirLockedError):
        RunDirectory(run).acquire(stand_in(run))  # a second writer
    part.post_train(t, False)
    assert not (run / LOCK).exists()
    part.pre_train(t)  # a later fit() of the same run: locked again, not started again
    part.post_train(t, False)
    assert (run / COMMAND).read_text() == "moelab train\n"


def test_run_directory_refuses_a_used_directory_and_cuts_back_a_resumed_one(tmp_path):
    run = tmp_path / "run"
    RunDirectory(run).start(stand_in(run))
    (run / METRICS).write_text('{"kind": "train", "step": 2}\n{"kind": "train", "step": 4}\n'
                               '{"kind": "final", "step": 4}\n')
    with pytest.raises(FileExistsError, match="already holds a run"):
        RunDirectory(run).start(stand_in(run))
    RunDirectory(run).start(stand_in(run, resumed=True, step=2))
    assert read_metrics(run) == [{"kind": "train", "step": 2}]
    assert len((run / COMMAND).read_text().splitlines()) == 2


def test_stale_lock_note_is_printed_once(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text("pid 1 on a crashed host")  # left behind, nobody holds it
    t = stand_in(run)
    part = RunDirectory(run)
    part.acquire(t)  # Trainer.resume takes the lock ...
    part.pre_train(t)  # ... and fit() finds it held
    part.post_train(t, False)
    err = capsys.readouterr().err
    assert err.count("was left locked by a process that ended without unlocking") == 1
    assert "pid 1 on a crashed host" in err


def test_metrics_log_writes_window_means(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS).write_text("")
    t = stand_in(run, "train.log_every=2", "train.steps=4")
    log = MetricsLog()
    log.pre_train(t)
    steps = [(1.0, 0.1, 100, 0.5, False), (3.0, 0.3, 100, 0.5, False),
             (float("nan"), 0.0, 100, 1.0, True), (5.0, 0.5, 100, 1.0, False)]
    for i, (loss, aux, items, secs, skipped) in enumerate(steps, 1):
        t.step, t.train_time_s = i, t.train_time_s + secs
        res = {"loss": loss, "aux_loss": aux, "items": items, "time_s": secs, "lr": 0.01 * i,
               "grad_norm": 1.0}
        log.post_step(t, {**res, "skipped": True} if skipped else res)
    log.post_eval(t, {"val_loss": 2.0, "val_ppl": 7.389}, False)
    log.post_train(t, False)
    train = [e for e in read_metrics(run) if e["kind"] == "train"]
    assert [e["step"] for e in train] == [2, 4]
    assert train[0]["loss"] == pytest.approx(2.0) and train[0]["aux_loss"] == pytest.approx(0.2)
    assert train[0]["tokens_per_s"] == pytest.approx(200 / 1.0)
    # the skipped step: out of the loss mean and the item count, in the time
    assert train[1]["loss"] == pytest.approx(5.0)
    assert train[1]["tokens_per_s"] == pytest.approx(100 / 2.0)
    assert train[1]["lr"] == pytest.approx(0.04) and train[1]["elapsed_s"] == pytest.approx(3.0)
    ev = [e for e in read_metrics(run) if e["kind"] == "eval"]
    assert ev == [{"kind": "eval", "step": 4, "split": "val", "val_loss": 2.0, "val_ppl": 7.389}]


def test_periodic_eval_runs_every_n_steps_but_not_at_the_last(tmp_path):
    t = stand_in(tmp_path, "train.eval_every=2", "train.steps=4", "data.eval_batches=3")
    asked, seen = [], []
    t.evaluate = lambda split, n: asked.append((t.step, split, n)) or {"val_loss": t.step}

    class Seen(Callback):
        def post_eval(self, trainer, ev, final):
            seen.append((ev["val_loss"], final))

    t.callbacks = Callbacks([Seen()])
    part = PeriodicEval()
    for step in range(1, 5):
        t.step = step
        part.post_step(t, {})
    assert asked == [(2, "val", 3)]
    assert seen == [(2, False)]


def test_checkpointer_saves_every_n_steps_and_at_the_end(tmp_path):
    run = tmp_path / "run"
    weight = torch.ones(2)
    t = stand_in(run, "train.checkpoint_every=2")
    t.state_dict = lambda: {"version": 1, "step": t.step, "model": {"w": weight.clone()}}
    part = Checkpointer()
    saved = []
    for step in range(1, 4):
        t.step = step
        part.post_step(t, {})
        saved.append(t.checkpoint_step)
    assert saved == [None, 2, 2]
    part.post_loop(t)  # step 3 not saved yet
    assert t.checkpoint_step == 3 and load_checkpoint(run / CHECKPOINT)["step"] == 3
    assert not list(run.glob("*.tmp"))
    good = (run / CHECKPOINT).read_bytes()
    weight[0] = float("nan")
    t.step = 4
    with pytest.raises(NonFiniteError, match=r"not writing a checkpoint at step 4: .* \(w\)"):
        part.post_step(t, {})
    assert (run / CHECKPOINT).read_bytes() == good and t.checkpoint_step == 3


def test_a_held_lock_is_seen_by_run_directory(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(RunDirLockedError, match="being written by another moelab"):
            RunDirectory(run).pre_train(stand_in(run))
