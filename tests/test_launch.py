"""Runs on 2 gloo ranks launched as a user launches them: ``moelab launch`` interrupted with
Ctrl-C (SIGINT to the process group), and the command a torchrun run records in
``command.txt`` run again as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import TINY_LM_TOML

from moelab.distributed.launch import launch_command, split_argv

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env() -> dict[str, str]:
    """This checkout's moelab first, the venv's scripts (torchrun, moelab) on PATH."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": SRC + (os.pathsep + path if path else ""),
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}


def _port_race(stderr: str) -> bool:
    """--standalone picks a free port; a race for it on a busy machine is not our bug."""
    return bool(re.search(r"[Rr]endezvous|Address already in use", stderr))


def _train_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r["kind"] == "train"]


def test_split_argv_and_launch_command(monkeypatch):
    assert split_argv(["--nproc-per-node", "2", "train", "--set", "a=1"]) == (
        ["--nproc-per-node", "2"], ["train", "--set", "a=1"])
    with pytest.raises(ValueError, match="give train or eval"):
        split_argv(["--nproc-per-node", "2", "report"])
    monkeypatch.delenv("MOELAB_LAUNCH", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cmd = ["moelab", "train", "--out", "r"]
    assert launch_command(cmd, 2) == ["torchrun", "--standalone", "--nproc_per_node", "2",
                                      "-m", "moelab", "train", "--out", "r"]
    assert launch_command(cmd, 4)[:5] == ["torchrun", "--nnodes", "2", "--nproc_per_node", "2"]
    monkeypatch.setenv("MOELAB_LAUNCH", "moelab launch --standalone --nproc-per-node 2")
    assert launch_command(cmd, 2) == ["moelab", "launch", "--standalone", "--nproc-per-node",
                                      "2", "train", "--out", "r"]


def test_launch_usage_and_errors(capsys):
    from moelab.cli import main

    assert main(["launch", "--help"]) == 0
    assert "usage: moelab launch [TORCHRUN OPTIONS] train|eval" in capsys.readouterr().out
    assert main(["launch"]) == 2
    assert main(["launch", "--nproc-per-node", "2", "report", "r"]) == 2
    err = capsys.readouterr().err
    assert err == ("moelab launch: error: no moelab command to launch: give train or eval "
                   "after the torchrun options, e.g. moelab launch --nproc-per-node 2 train\n")
    assert main(["launch", "--no-such-option", "train"]) == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "launch" in capsys.readouterr().out


def test_child_pids_finds_this_process_s_children():
    from moelab.distributed.launch import _child_pids

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in _child_pids()
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("launcher", ["moelab launch", "torchrun"])
def test_sigint_stops_cleanly_and_resumes(tmp_path, capsys, launcher):
    """Ctrl-C under ``moelab launch``: every rank saves, one message, one stopped line, exit
    130 without a traceback; the run then resumes (here on one process) to its end. Under
    plain torchrun the workers do the same, but torchrun's agent then ends in its own
    SignalException (why ``moelab launch`` exists): its status is not checked."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_LM_TOML.replace("steps = 6", "steps = 5000"))
    run = tmp_path / "run"
    start = ([sys.executable, "-m", "moelab", "launch", "--nproc-per-node", "2"]
             if launcher == "moelab launch" else
             [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
              "2", "-m", "moelab"])
    cmd = [*start, "train", "--config", str(cfg), "--out", str(run), "--no-report"]
    for attempt in range(2):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=_env(), start_new_session=True)
        deadline = time.monotonic() + 300
        while not _train_rows(run) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole process group
        out, err = proc.communicate(timeout=300)
        if attempt == 0 and not _train_rows(run) and _port_race(err):
            shutil.rmtree(run, ignore_errors=True)  # it never started: try once more
            continue
        break
    if launcher == "moelab launch":
        assert proc.returncode == 130, out[-2000:] + err[-3000:]
        assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert err.count("SIGINT received") == 1, err[-3000:]
    stopped = [x for x in err.splitlines() if "stopped by SIGINT" in x]
    assert len(stopped) == 1, err[-3000:]
    step = int(re.search(r"at step (\d+)/5000", stopped[0]).group(1))
    recorded = "moelab launch --standalone --nproc-per-node 2" if launcher == "moelab launch" \
        else "torchrun --standalone --nproc_per_node 2 -m moelab"
    assert (run / "command.txt").read_text().startswith(f"{recorded} train --config ")
    assert stopped[0].endswith(f"continue with: {recorded} train --resume {run}")
    # resume on one process, to two steps past the stop
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text(re.sub(r"(?m)^steps = 5000$", f"steps = {step + 2}",
                                            text))
    from moelab.cli import main

    assert main(["train", "--resume", str(run), "--quiet", "--no-report"]) == 0, \
        capsys.readouterr().err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, step + 3))
    assert rows[-1]["kind"] == "final" and rows[-1]["step"] == step + 2


def test_torchrun_command_txt_runs_as_written(tmp_path):
    """An FSDP run under plain torchrun: its first line says fsdp and 2 ranks; the line it
    records in command.txt, run again as written elsewhere, trains the same run."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_LM_TOML.replace("steps = 6", "steps = 2"))
    first, again = tmp_path / "first", tmp_path / "again"
    first.mkdir()
    again.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "moelab", "train", "--config", str(cfg), "--set", "train.parallel=fsdp",
           "--out", "run", "--no-report"]

    def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
        for _ in range(2):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                                  env=_env(), cwd=cwd)
            if done.returncode == 0 or not _port_race(done.stderr):
                break
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done

    done = run(cmd, first)
    assert "2 ranks, fsdp" in done.stdout.splitlines()[0], done.stdout
    recorded = (first / "run" / "command.txt").read_text().splitlines()
    assert len(recorded) == 1
    assert recorded[0].startswith("torchrun --standalone --nproc_per_node 2 -m moelab train ")
    run(shlex.split(recorded[0]), again)
    finals = [[json.loads(x) for x in (d / "run" / "metrics.jsonl").read_text().splitlines()]
              [-1] for d in (first, again)]
    assert finals[0]["kind"] == "final" and finals[0]["step"] == 2
    assert finals[1]["val_loss"] == pytest.approx(finals[0]["val_loss"], rel=1e-6)
