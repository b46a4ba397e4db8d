"""The moelab command line, end to end through ``main([...])``."""

from __future__ import annotations

import os
import re

import pytest

from moelab.cli import main
from moelab.config import load_config
from moelab.runs.directory import read_metrics


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def train_losses(run_dir):
    return [e["loss"] for e in read_metrics(run_dir) if e["kind"] == "train"]


def test_train_end_to_end_then_eval_report_and_rerun(tmp_path, tiny_toml, capsys):
    out_dir = tmp_path / "run"
    argv = ["train", "--config", str(tiny_toml), "--set", "model.default_moe.beta=0.9",
            "--out", str(out_dir), "--quiet"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "val ppl" in out and "test ppl" in out and f"run: {out_dir}" in out
    assert f"report: {out_dir / 'report.md'}" in out
    for name in ("config.toml", "metrics.jsonl", "command.txt", "ckpt.pt", "report.md",
                 "loss.png", "gini_by_depth.png"):
        assert (out_dir / name).is_file(), name
    assert (out_dir / "command.txt").read_text().strip() == "moelab " + " ".join(argv)
    cfg = load_config(out_dir / "config.toml")
    assert cfg.name == "tiny" and cfg.model.default_moe is not None and cfg.train.steps == 6

    # the saved config alone reproduces the run exactly
    again = tmp_path / "again"
    code, _, err = run(capsys, "train", "--config", str(out_dir / "config.toml"), "--out",
                       str(again), "--quiet", "--no-report")
    assert code == 0, err
    assert train_losses(again) == train_losses(out_dir) and len(train_losses(again)) == 6
    assert not (again / "report.md").exists()

    code, out, err = run(capsys, "eval", str(out_dir))
    assert code == 0, err
    final = read_metrics(out_dir)[-1]
    assert f"val ppl {final['val_ppl']:.3f}" in out and "Gini by MoE layer" in out

    code, out, err = run(capsys, "report", str(out_dir), str(again), "--out",
                         str(tmp_path / "rep"))
    assert code == 0, err
    assert (tmp_path / "rep" / "report.md").is_file()
    assert (tmp_path / "rep" / "utilization_again.png").is_file()

    # the directory now holds a run: starting another one there is refused
    code, _, err = run(capsys, *argv)
    assert code == 2 and "already holds a run" in err and "--resume" in err


def test_resume_finishes_an_interrupted_run(tmp_path, tiny_toml, train_tiny, capsys):
    from moelab.train.trainer import Trainer

    straight = train_tiny("straight")
    part = tmp_path / "part"
    Trainer(load_config(tiny_toml), part, quiet=True).fit(max_steps=3)
    code, out, err = run(capsys, "train", "--resume", str(part), "--no-report")
    assert code == 0, err
    assert "resuming" in out and "step 6" in out
    assert train_losses(part) == train_losses(straight)
    assert len((part / "command.txt").read_text().splitlines()) == 2
    code, _, err = run(capsys, "train", "--resume", str(part), "--set", "optim.lr=1")
    assert code == 2 and "--resume uses the run's own config.toml" in err


@pytest.mark.parametrize("args,message", [
    (["--set", "optim.lr=-1"], "optim.lr=-1.0 is invalid: need lr > 0"),
    (["--set", "optim.lrr=0.1"], "unknown key 'optim.lrr'; did you mean optim.lr?"),
    (["--set", "optim.lr"], "bad --set 'optim.lr': expected KEY=VALUE"),
    (["--config", "defualt"], "did you mean 'default'?"),
    (["--set", "data.dataset=wikitext"], "text dataset 'wikitext' reads your own files"),
    (["--set", "data.dataset=textfile", "--set", "data.path=/no/such/file.txt"],
     "file not found: /no/such/file.txt. Pass the path"),
    (["--set", "data.dataset=textfile", "--set", "data.path=/tmp"],
     "textfile: /tmp is a directory; this loader reads one file: give the file's path. Pass"),
    (["--set", "data.path=/no/such/dir"], "directory not found: /no/such/dir. "),
    (["--set", "data.dataset=wikitext", "--set", "data.path=/nonexistent/wt103"],
     "not found: /nonexistent/wt103. Get WikiText-2/103"),
    (["--set", "data.dataset=mnist5k"], "needs a text dataset"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    code, out, err = run(capsys, "train", "--out", str(tmp_path / "r"), "--quiet", *args)
    assert code == 2
    assert err.startswith("moelab: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_other_commands_and_errors(tmp_path, capsys):
    code, out, _ = run(capsys, "configs")
    assert code == 0 and "default" in out and "mnist" in out and "excitation" in out
    code, out, _ = run(capsys, "configs", "momentum", "--set", "model.momentum.mu=0.5")
    assert code == 0 and 'rule = "heavy_ball"' in out and "mu = 0.5" in out
    code, _, err = run(capsys, "eval", str(tmp_path))
    assert code == 2 and "cannot evaluate" in err and "not a moelab run directory" in err
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "none"))
    assert code == 2 and err.startswith("moelab: error: cannot resume")
    code, _, err = run(capsys, "report", str(tmp_path))
    assert code == 2 and "not a moelab run directory" in err
    code, _, err = run(capsys, "train", "--bogus")
    assert code == 2 and "unrecognized arguments: --bogus" in err
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0 and "--set KEY=VALUE" in out and "--resume RUN_DIR" in out
    code, out, _ = run(capsys)
    assert code == 2 and "train" in out and "report" in out


def test_configs_prints_every_key_and_loads_back(tmp_path, capsys):
    """`moelab configs default`: every key of RunConfig, the unset ones and the tables that
    are off as comment lines; the text loads back to the same config."""
    import dataclasses
    import typing

    import tomllib

    from moelab.config import RunConfig, config_from_dict, load_config

    code, out, _ = run(capsys, "configs", "default")
    assert code == 0
    assert config_from_dict(tomllib.loads(out)) == load_config("default")
    assert "# capacity_factor: none (unset)" in out and "# [model.default_moe]" in out
    assert "# [optim.excitation]" in out and "# strategy = " in out

    def keys(cls: type) -> list[tuple[str, str]]:  # (table, key) of every field
        out, hints = [], typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            sub = [a for a in (hints[f.name], *typing.get_args(hints[f.name]))
                   if dataclasses.is_dataclass(a)]
            if sub:
                out += [(f"{f.name}.{t}" if t else f.name, k) for t, k in keys(sub[0])]
            else:
                out.append(("", f.name))
        return out

    table, seen = "", set()
    for line in out.splitlines():
        bare = line.removeprefix("# ")
        if bare.startswith("["):
            table = bare[1:bare.index("]")]
        elif bare:
            seen.add((table, re.split(r"[ :=]", bare)[0]))
    want = {(t, k) for t, k in keys(RunConfig)}
    assert want - seen == set() and len(want) > 80


def test_eval_of_a_run_still_training_says_so(tmp_path, capsys, train_tiny):
    from moelab.runs.lock import RunLock

    run_dir = train_tiny("r", "train.steps=1")
    (run_dir / "ckpt.pt").unlink()
    code, _, err = run(capsys, "eval", str(run_dir))
    assert code == 2 and "the run stopped before its first checkpoint" in err
    with RunLock(run_dir):  # a training process holds the run
        code, _, err = run(capsys, "eval", str(run_dir))
    assert code == 2 and err.count("\n") == 1, err
    assert f"the run is still training (pid {os.getpid()} on " in err
    assert "stopped" not in err
