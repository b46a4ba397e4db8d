"""Checkpoint loading: weights_only with our allow-list; broken, foreign and malicious files
give one clear line (rc 2 from the CLI) and never run code."""

from __future__ import annotations

import contextlib
import os
import re
import shutil

import numpy as np
import pytest
import torch
from test_train import tiny

from moelab.cli import main
from moelab.runs.checkpoint import CheckpointError, load_checkpoint
from moelab.runs.directory import CHECKPOINT
from moelab.train.trainer import Trainer


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ck") / "run"
    Trainer(tiny("train.steps=2", "train.eval_every=0"), run, quiet=True).fit()
    return run


def copy_run(good_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    return run


def test_our_checkpoint_loads_weights_only_and_resumes(good_run):
    state = load_checkpoint(good_run / CHECKPOINT)
    assert state["step"] == 2 and isinstance(state["rng"]["numpy"][1], np.ndarray)
    # exactly what torch's weights_only unpickler accepts once our allow-list is in place
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(good_run / CHECKPOINT)
    assert {g.rsplit(".", 1)[-1] for g in unsafe} <= {"_reconstruct", "ndarray", "dtype",
                                                       "UInt32DType"}


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling calls os.system("touch MARKER")
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_malicious_pickle_in_ckpt_is_not_executed(good_run, tmp_path, capsys, command):
    run = copy_run(good_run, tmp_path)
    marker = tmp_path / "code-ran"
    state = torch.load(run / CHECKPOINT, weights_only=False)  # our own file: trusted
    state["window"] = _RunsCode(marker)
    torch.save(state, run / CHECKPOINT)
    argv = ["eval", str(run)] if command == "eval" else ["train", "--resume", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert not marker.exists()
    assert err.startswith("moelab: error: checkpoint") and "\n" not in err
    assert str(run / CHECKPOINT) in err and "refuses to load" in err and "system" in err


@pytest.mark.parametrize("damage", ["empty", "truncated", "random", "text", "foreign",
                                    "old_version"])
def test_broken_checkpoints_are_one_line_errors(good_run, tmp_path, capsys, damage):
    run = copy_run(good_run, tmp_path)
    f = run / CHECKPOINT
    raw = f.read_bytes()
    if damage == "empty":
        f.write_bytes(b"")
    elif damage == "truncated":
        f.write_bytes(raw[: len(raw) // 2])
    elif damage == "random":
        f.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif damage == "text":
        f.write_text("not a checkpoint\n")
    elif damage == "foreign":  # someone's plain model state_dict
        torch.save({"weight": torch.zeros(3)}, f)
    else:
        state = torch.load(f, weights_only=False)
        state["version"] = 99
        torch.save(state, f)
    for argv in (["eval", str(run)], ["train", "--resume", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("moelab: error: ") and "\n" not in err, err
        assert str(f) in err or "ckpt.pt" in err
    with pytest.raises(CheckpointError):
        load_checkpoint(f)


def test_truncated_checkpoint_suggests_what_to_do(good_run, tmp_path):
    run = copy_run(good_run, tmp_path)
    f = run / CHECKPOINT
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="restore it from a copy, or start the run again"):
        load_checkpoint(f)


def test_corruption_is_named_as_damage_not_as_an_attack(good_run, tmp_path):
    f = tmp_path / "ckpt.pt"
    for seed in range(5):  # random bytes, and text: the safe unpickler rejects both
        f.write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8)
                      .tobytes())
        with pytest.raises(CheckpointError, match="this is damage, not an unsafe file") as e:
            load_checkpoint(f)
        assert "could run code" not in str(e.value)
    f.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="damage"):
        load_checkpoint(f)


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_a_raw_pickle_that_builds_objects_is_named_unsafe(tmp_path, protocol):
    import pickle

    marker = tmp_path / "code-ran"
    f = tmp_path / "ckpt.pt"
    f.write_bytes(pickle.dumps({"model": _RunsCode(marker)}, protocol=protocol))
    with pytest.warns(UserWarning) if protocol > 2 else contextlib.nullcontext():
        with pytest.raises(CheckpointError, match="asks to build posix.system") as e:
            load_checkpoint(f)
    assert "could run code" in str(e.value) and not marker.exists()


def test_truncated_checkpoint_message_ends_on_a_whole_word(good_run, tmp_path):
    run = copy_run(good_run, tmp_path)
    f = run / CHECKPOINT
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(f)
    inner = re.search(r"not a torch file \((.*)\); restore", str(e.value)).group(1)
    try:
        torch.load(f, weights_only=True)
    except RuntimeError as raw:
        words = " ".join(str(raw).split()).split()
    assert len(inner) <= 120
    if inner.endswith("..."):
        last = inner[:-3].split()[-1]
        assert any(w.rstrip(".,;:") == last for w in words), inner
