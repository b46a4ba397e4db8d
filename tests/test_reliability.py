"""Runs that never lose work: divergence guard, graceful SIGINT/SIGTERM, run-directory lock,
finished / never-checkpointed runs on resume, progress without a terminal, device default."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import losses, tiny

import moelab
from moelab.analysis.report import make_report
from moelab.cli import main
from moelab.config import dump_toml
from moelab.distributed.wrap import resolve_device as _resolve_device
from moelab.runs.checkpoint import load_checkpoint
from moelab.runs.directory import CHECKPOINT, COMMAND, METRICS, read_metrics
from moelab.runs.lock import LOCK, RunDirLockedError, RunLock
from moelab.train.guard import NonFiniteError
from moelab.train.interrupt import StopOnSignal
from moelab.train.trainer import Trainer

SRC = str(Path(moelab.__file__).resolve().parents[1])


def params(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(Path(run_dir) / CHECKPOINT)["model"]


def same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def poison_steps(trainer: Trainer, steps: set[int], where: str = "loss") -> None:
    """Make the forward of the given (1-based) steps produce NaN: in the loss, or in the
    embedding output (so it also reaches the MoE layers' buffers)."""
    if where == "loss":
        task_loss = trainer._task_loss

        def bad_loss(logits, target, reduction="mean"):
            out = task_loss(logits, target, reduction)
            return out * float("nan") if trainer.model.training and trainer.step + 1 in steps \
                else out

        trainer._task_loss = bad_loss
    else:
        def hook(module, args, out):
            if module.training and trainer.step + 1 in steps:
                return out * float("nan")
            return out

        trainer.model.tok_emb.register_forward_hook(hook)


# ------------------------------------------------------------------ non-finite guard


def test_nan_step_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny("train.checkpoint_every=4", "train.eval_every=0")
    ref = Trainer(cfg, tmp_path / "ref", quiet=True)
    ref.fit(max_steps=4)
    tr = Trainer(cfg, tmp_path / "run", quiet=True)
    poison_steps(tr, {6})
    with pytest.raises(NonFiniteError) as exc:
        tr.fit()
    msg = str(exc.value)
    assert "\n" not in msg
    assert "diverged at step 6: loss nan" in msg and "lr " in msg and "optim.lr" in msg
    assert f"{tmp_path / 'run' / CHECKPOINT} keeps the last good state (step 4)" in msg
    # the checkpoint is the step-4 state, bit for bit; nothing was logged past step 5
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["step"] == 4
    assert same_params(params(tmp_path / "run"), params(tmp_path / "ref"))
    entries = read_metrics(tmp_path / "run")
    assert max(e["step"] for e in entries) == 5 and all(e["kind"] == "train" for e in entries)
    assert all(math.isfinite(x) for x in losses(tmp_path / "run"))
    assert not (tmp_path / "run" / LOCK).exists()  # released on the way out


def test_diverged_without_checkpoint_says_so(tmp_path, capsys):
    cfg = tiny("train.eval_every=0")
    (tmp_path / "c.toml").write_text(dump_toml(cfg))
    rc = main(["train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "r"),
               "--set", "optim.lr=1e6", "--set", "optim.warmup_steps=0", "--no-report", "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("moelab: error: training diverged at step ")
    assert "no checkpoint was written" in err and "\n" not in err
    assert not (tmp_path / "r" / CHECKPOINT).exists()


def test_skip_nonfinite_steps_applies_no_update_and_is_bounded(tmp_path):
    cfg = tiny("train.skip_nonfinite_steps=1", "train.eval_every=0",
               "model.default_moe.beta=0.9")  # Default MoE: EMA buffers a NaN forward touches
    tr = Trainer(cfg, tmp_path / "run", quiet=True)
    poison_steps(tr, {5}, where="embed")
    tr.fit(max_steps=4)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    opt_before = tr.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    tr.fit(max_steps=5)  # the poisoned step: skipped
    assert tr.step == 5 and tr.guard.skipped == 1
    assert same_params(tr.model.state_dict(), before)  # parameters and buffers untouched
    assert torch.equal(tr.optimizer.state_dict()["state"][0]["exp_avg"], opt_before)
    summary = tr.fit()
    assert summary["kind"] == "final" and math.isfinite(summary["val_loss"])
    entries = read_metrics(tmp_path / "run")
    assert [e.get("skipped_steps", 0) for e in entries if e["kind"] == "train"][3:6] == [0, 1, 1]

    tr2 = Trainer(cfg, tmp_path / "run2", quiet=True)
    poison_steps(tr2, {3, 7})
    with pytest.raises(NonFiniteError, match=r"step 7: .*1 bad steps skipped before"):
        tr2.fit()


def test_checkpoint_with_nan_is_never_written(tmp_path):
    tr = Trainer(tiny("train.eval_every=0"), tmp_path / "run", quiet=True)
    tr.fit(max_steps=2)
    good = (tmp_path / "run" / CHECKPOINT).read_bytes()
    with torch.no_grad():
        next(tr.model.parameters())[0].fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="not writing a checkpoint at step 2"):
        tr.save_checkpoint()
    assert (tmp_path / "run" / CHECKPOINT).read_bytes() == good


def test_evaluate_of_non_finite_outputs_is_one_clear_error(tmp_path):
    tr = Trainer(tiny(), tmp_path / "run", quiet=True)
    tr.model.tok_emb.register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(NonFiniteError, match="evaluation on the val split at step 0 gave a "
                       "nan loss"):
        tr.evaluate("val", 2)  # not the routing metrics' "mean_prob_E must be finite"


def test_eval_and_report_of_a_diverged_run(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny("train.steps=4", "train.eval_every=2"), run, quiet=True).fit()
    # a checkpoint as older moelab versions wrote them for a diverged run
    state = torch.load(run / CHECKPOINT, weights_only=False)
    for v in state["model"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(state, run / CHECKPOINT)
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moelab: error: the checkpoint in") and "diverged" in err
    # metrics of a diverged run: null losses and null eval metrics, no final record
    entries = [e for e in read_metrics(run) if e["kind"] != "final"]
    for e in entries:
        if e["kind"] == "train" and e["step"] >= 2:
            e["loss"] = None
        if e["kind"] == "eval":
            e["val_ppl"] = None
            for layer in e["layers"]:
                layer["gini"] = None
    (run / METRICS).write_text("".join(json.dumps(e) + "\n" for e in entries))
    md = make_report([run]).read_text()
    assert "training losses are NaN/inf (null in metrics.jsonl), first at step 2" in md
    assert "no final evaluation" in md and "non-finite val_ppl" in md


# ------------------------------------------------------------------ signals


def test_first_signal_sets_a_flag_second_aborts():
    previous = signal.getsignal(signal.SIGINT)
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is previous


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_and_resume_equals_uninterrupted(tmp_path, sig):
    cfg = tiny("train.steps=100000", "train.eval_every=0", "train.log_every=1")
    (tmp_path / "c.toml").write_text(dump_toml(cfg))
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moelab", "train", "--config", str(tmp_path / "c.toml"),
         "--out", str(run), "--no-report"], env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(read_metrics(run)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    stopped = load_checkpoint(run / CHECKPOINT)["step"]
    assert stopped >= 3 and max(e["step"] for e in read_metrics(run)) == stopped
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"moelab: stopped by {sig.name} at step {stopped}/100000")
    assert shlex.split(line.split("continue with: ")[1]) == [
        "moelab", "train", "--resume", str(run)]
    # resume (what that command does) for 3 more steps == the same steps uninterrupted
    Trainer.resume(run, quiet=True).fit(max_steps=stopped + 3)
    ref = tmp_path / "ref"
    Trainer(cfg, ref, quiet=True).fit(max_steps=stopped + 3)
    assert losses(run) == losses(ref)
    assert same_params(params(run), params(ref))


def test_ctrl_c_during_start_up_has_no_traceback(monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "__init__", interrupted)
    assert main(["train", "--set", "train.steps=1"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "moelab: interrupted during start-up; nothing was written"


# ------------------------------------------------------------------ run-directory lock


def test_second_writer_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny("train.checkpoint_every=4", "train.eval_every=0")
    Trainer(cfg, run, quiet=True).fit(max_steps=4)
    before = (run / METRICS).read_text()
    with RunLock(run):
        assert main(["train", "--resume", str(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"moelab: error: run directory {run} is being written by "
                              f"another moelab process (pid {os.getpid()} ")
        other = Trainer(cfg, run, quiet=True)  # the library refuses too
        with pytest.raises(RunDirLockedError):
            other.fit()
    assert (run / METRICS).read_text() == before
    assert not (run / LOCK).exists()


def test_lock_is_held_across_processes_and_stale_after_a_crash(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from moelab.runs.lock import RunLock; "
            "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLockedError, match=f"pid {proc.pid} "):
            RunLock(run).acquire()
    finally:
        proc.kill()  # a crash: no release
        proc.wait(timeout=30)
    assert (run / LOCK).exists()
    lock = RunLock(run).acquire()
    assert lock.stale is not None and f"pid {proc.pid} " in lock.stale
    note = lock.stale_note()  # said once, however often the holder checks
    assert note.startswith(f"{run} was left locked by a process that ended without unlocking")
    assert f"pid {proc.pid} " in note and lock.acquire() is lock and lock.stale_note() is None
    lock.release()
    fresh = RunLock(run).acquire()
    assert fresh.stale is None and fresh.stale_note() is None
    fresh.release()
    assert not (run / LOCK).exists()


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny("train.steps=4", "train.eval_every=0"), run, quiet=True).fit()
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run} already finished at step 4; nothing to do, nothing changed" in out
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files
    assert [e["kind"] for e in read_metrics(run)].count("final") == 1


def test_resume_before_the_first_checkpoint_starts_again(tmp_path, capsys):
    cfg = tiny("train.steps=6", "train.eval_every=0")
    ref = tmp_path / "ref"
    Trainer(cfg, ref, quiet=True).fit()
    run = tmp_path / "run"
    tr = Trainer(cfg, run, quiet=True)
    tr._start_run_dir()  # what a kill -9 before the first checkpoint leaves behind
    (run / METRICS).write_text('{"kind": "train", "step": 1, "loss": 9.0}\n')
    assert main(["train", "--resume", str(run), "--no-report", "-q"]) == 0
    assert losses(run) == losses(ref)
    assert same_params(params(run), params(ref))
    assert len((run / COMMAND).read_text().splitlines()) == 2


# ------------------------------------------------------------------ progress, device


def test_progress_lines_without_a_terminal(tmp_path, capsys):
    cfg = tiny("train.steps=8", "train.progress_every=4", "train.eval_every=0")
    Trainer(cfg, tmp_path / "run").fit()
    err = capsys.readouterr().err.splitlines()
    steps = [ln for ln in err if ln.startswith("step ")]
    pat = r"step (\d+)/8 \| loss \d+\.\d{4} \| [\d,]+ tokens/s \| ETA \d+s( \(after 1 step\))?"
    # the first step, then every 4 (a run shows progress from its first step)
    assert [re.fullmatch(pat, ln).group(1) for ln in steps] == ["1", "4", "8"], err
    assert steps[0].endswith("(after 1 step)")
    assert "evaluating val: 2 batches" in err and "evaluating test: 2 batches" in err


def test_progress_line_after_a_quiet_minute(monkeypatch):
    """Between the every-N lines, a line whenever a minute passed without one."""
    import io

    from moelab.train import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    out = io.StringIO()
    p = progress.StepProgress(100, 10, "tokens", every=50, stream=out)
    for step, t in [(11, 5.0), (12, 30.0), (13, 66.0), (14, 70.0), (15, 127.0)]:
        clock[0] = t
        p.update(step, 2.0, 100)
    lines = out.getvalue().splitlines()
    assert [ln.split(" |")[0] for ln in lines] == ["step 11/100", "step 13/100",
                                                   "step 15/100"], lines
    # 300 items in 66 s; 87 steps left at 66 s / 3 steps
    assert lines[1] == "step 13/100 | loss 2.0000 | 5 tokens/s | ETA 31m54s"


def test_device_auto_is_the_default_and_printed(tmp_path, capsys, monkeypatch):
    cfg = tiny("train.steps=1", "train.eval_every=0")
    assert cfg.train.device == "auto"
    Trainer(cfg, tmp_path / "run").fit()
    assert "1 steps on cpu (train.device=auto)" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _resolve_device("auto") == torch.device("cuda")
    assert main(["train", "--help"]) == 0
    helptext = " ".join(capsys.readouterr().out.split())
    assert "--device DEVICE" in helptext and "auto (CUDA when available, else CPU" in helptext


def test_device_flag_sets_train_device(tmp_path, capsys):
    cfg = tiny("train.steps=1", "train.eval_every=0")
    (tmp_path / "c.toml").write_text(dump_toml(cfg))
    assert main(["train", "-c", str(tmp_path / "c.toml"), "--device", "cpu", "--out",
                 str(tmp_path / "r"), "--no-report", "-q"]) == 0
    assert 'device = "cpu"' in (tmp_path / "r" / "config.toml").read_text()
    assert main(["train", "-c", str(tmp_path / "c.toml"), "--device", "tpu"]) == 2
    assert "train.device='tpu' is invalid" in capsys.readouterr().err


def test_patch_size_error_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"model\.patch_size=5 is invalid for 28x28 images.*"
                       r"1, 2, 4, 7, 14, 28"):
        Trainer(tiny("model.patch_size=5", base="mnist", tiny=[]), tmp_path / "r", quiet=True)
