"""Trackers: entry -> names, TensorBoard event files read back, W&B offline run files, resume,
missing packages, and that the core never imports tensorboard / wandb."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import tiny

from moelab.cli import main
from moelab.config import ConfigError
from moelab.runs.directory import CHECKPOINT, CONFIG, read_metrics
from moelab.train.loggers import WANDB_ID, Histogram, tracker_records
from moelab.train.trainer import Trainer, load_trained

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Excitation + Default MoE + learnable momentum: every method section is logged
ALL_METHODS = ("optim.excitation.strategy=positive_sum", "model.default_moe.beta=0.9",
               "model.momentum.rule=heavy_ball", "model.momentum.learnable=true")


# ------------------------------------------------------------------ names (no backend)


def test_tracker_records_names_and_values():
    train = {"kind": "train", "step": 7, "loss": 2.5, "aux_loss": 0.01, "lr": 1e-3,
             "grad_norm": float("nan"), "tokens_per_s": 900.0, "elapsed_s": 1.5}
    s, h = tracker_records(train)
    assert s == {"train/loss": 2.5, "train/aux_loss": 0.01, "train/lr": 1e-3,
                 "train/tokens_per_s": 900.0, "train/elapsed_s": 1.5}  # NaN grad norm left out
    assert h == {}

    layer = {"layer": 1, "block": 3, "share": [0.5, 0.25, 0.25, 0.0], "load_imbalance": 2.0,
             "gini": 0.375, "dead": 1, "entropy": 1.2, "entropy_normalized": 0.87,
             "dropped_frac": 0.0, "aux_loss": 1.1, "z_loss": 0.0, "tokens": 64,
             "mean_prob": [0.25] * 4, "out_norm": [1.0, None, 2.0, None]}
    ev = {"kind": "eval", "step": 9, "split": "val", "val_loss": 3.0, "val_ppl": 20.0,
          "val_items": 64, "final": True, "layers": [layer],
          "excitation": {"blocks.3.ffn": {"multipliers": [1.0, 1.5, 1.0, 2.0], "min": 1.0,
                                          "max": 2.0, "std": 0.4},
                         "custom group": {"multipliers": [1.0], "min": 1.0, "max": 1.0,
                                          "std": 0.0}},
          "default_moe": [{"layer": 1, "ema_norm": [1.0, 2.0, 3.0, 6.0]}],
          "momentum": {"mu": [0.7, 0.6], "gamma": [1.0, 0.9]}}
    s, h = tracker_records(ev, {"blocks.3.ffn": 1})
    assert s == {
        "val/loss": 3.0, "val/ppl": 20.0,
        "layer1/gini": 0.375, "layer1/entropy": 1.2, "layer1/entropy_normalized": 0.87,
        "layer1/load_imbalance": 2.0, "layer1/dead_experts": 1.0, "layer1/dropped_frac": 0.0,
        "layer1/aux_loss": 1.1, "layer1/z_loss": 0.0,
        "layer1/excitation_phi_min": 1.0, "layer1/excitation_phi_max": 2.0,
        "excitation/custom_group/excitation_phi_min": 1.0,
        "excitation/custom_group/excitation_phi_max": 1.0,
        "layer1/default_moe_ema_norm_mean": 3.0,
        "layer0/momentum_mu": 0.7, "layer1/momentum_mu": 0.6,
        "layer0/momentum_gamma": 1.0, "layer1/momentum_gamma": 0.9}
    assert h == {"layer1/expert_share": Histogram([0.5, 0.25, 0.25, 0.0], per_expert=True),
                 "layer1/excitation_phi": Histogram([1.0, 1.5, 1.0, 2.0]),
                 "excitation/custom_group/excitation_phi": Histogram([1.0]),
                 "layer1/default_moe_ema_norm": Histogram([1.0, 2.0, 3.0, 6.0])}

    final = {"kind": "final", "step": 9, "name": "x", "params": 100, "val_loss": 3.0,
             "val_items": 64, "test_acc": 0.5, "items_seen": 9, "gini_mean": 0.1}
    assert tracker_records(final) == ({"final/val_loss": 3.0, "final/test_acc": 0.5,
                                       "final/gini_mean": 0.1}, {})


def test_loggers_config_is_checked():
    with pytest.raises(ConfigError, match=r"train.loggers=\['jsonl', 'tb'\].*tensorboard"):
        tiny("train.loggers=['jsonl', 'tb']")
    with pytest.raises(ConfigError, match="listed twice"):
        tiny("train.loggers=['tensorboard', 'tensorboard']")
    with pytest.raises(ConfigError, match="need an array of str values"):
        tiny("train.loggers=tensorboard")
    assert tiny().train.loggers == ("jsonl",)


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_missing_package_is_one_line_with_pip_install(package, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    cfg = tiny(f"train.loggers=['jsonl', '{package}']")
    install = f"pip install 'moelab[{package}]'"
    with pytest.raises(ModuleNotFoundError, match=re.escape(install)) as e:
        Trainer(cfg, tmp_path / "run", quiet=True).fit()
    assert "\n" not in str(e.value) and package in str(e.value)
    assert not (tmp_path / "run").exists()  # stopped before writing anything
    rc = main(["train", "--set", f"train.loggers=['{package}']", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and install in err


def test_evaluating_a_tracked_run_needs_no_tracker_package(tmp_path, monkeypatch):
    run = tmp_path / "run"
    Trainer(tiny("train.steps=2", "train.eval_every=0"), run, quiet=True).fit()
    text = (run / CONFIG).read_text()
    assert 'loggers = ["jsonl"]' in text
    (run / CONFIG).write_text(text.replace('loggers = ["jsonl"]', 'loggers = ["jsonl", "wandb"]'))
    monkeypatch.setitem(sys.modules, "wandb", None)
    trainer = load_trained(run)
    assert trainer.cfg.train.loggers == ("jsonl", "wandb")
    assert trainer.evaluate("val", 1)["val_loss"] > 0


def test_core_never_imports_tensorboard_or_wandb(tmp_path):
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_train import tiny
import moelab.cli, moelab.train.loggers, moelab.analysis.report
from moelab.train.trainer import Trainer
Trainer(tiny("train.steps=2", "train.eval_every=0", "model.default_moe.beta=0.9"),
        {str(tmp_path / "run")!r}, quiet=True).fit()
bad = sorted(m for m in sys.modules
             if m.split(".")[0] in ("tensorboard", "wandb", "tensorboardX")
             or m.startswith("torch.utils.tensorboard"))
print("IMPORTED", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORTED []" in out.stdout, out.stdout


# ------------------------------------------------------------------ TensorBoard


def _event_accumulator(run: Path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    ea = ea_mod.EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    return ea


def test_tensorboard_scalars_and_histograms_match_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    cfg = tiny(*ALL_METHODS, "train.steps=6", "train.eval_every=3",
               "train.loggers=['jsonl', 'tensorboard']")
    Trainer(cfg, run, quiet=True).fit()
    entries = read_metrics(run)
    train = [e for e in entries if e["kind"] == "train"]
    evals = [e for e in entries if e["kind"] == "eval"]
    ea = _event_accumulator(run)

    def scalars(tag):
        return [(e.step, e.value) for e in ea.Scalars(tag)]

    assert scalars("train/loss") == [(e["step"], pytest.approx(e["loss"], rel=1e-6))
                                     for e in train]
    assert [s for s, _ in scalars("train/lr")] == list(range(1, 7))
    assert {"train/grad_norm", "train/tokens_per_s", "val/loss", "val/ppl",
            "final/test_ppl"} <= set(ea.Tags()["scalars"])
    assert scalars("val/ppl") == [(e["step"], pytest.approx(e["val_ppl"], rel=1e-6))
                                  for e in evals]
    for i in range(2):  # two MoE layers, one section each
        assert scalars(f"layer{i}/gini") == [
            (e["step"], pytest.approx(e["layers"][i]["gini"], rel=1e-6)) for e in evals]
        assert scalars(f"layer{i}/dead_experts") == [(e["step"], e["layers"][i]["dead"])
                                                     for e in evals]
        mu = scalars(f"layer{i}/momentum_mu")
        assert mu == [(e["step"], pytest.approx(e["momentum"]["mu"][i], rel=1e-6))
                      for e in evals]
    # learnable: μ of layer 1 moved from its init (layer 0's multiplies a zero momentum)
    assert evals[-1]["momentum"]["mu"][1] != pytest.approx(0.7)
    # the expert-share histogram: bucket e = [e, e+1) holds expert e's share
    share = ea.Histograms("layer1/expert_share")
    assert [h.step for h in share] == [3, 6]
    hv = share[-1].histogram_value
    assert hv.bucket_limit == [1.0, 2.0, 3.0, 4.0]
    assert hv.bucket == pytest.approx(evals[-1]["layers"][1]["share"])
    # Φ and Default MoE's EMA norms: histograms over the 4 experts
    phi = ea.Histograms("layer0/excitation_phi")[-1].histogram_value
    mult = evals[-1]["excitation"]["blocks.0.ffn"]["multipliers"]
    assert phi.num == 4 and phi.min == pytest.approx(min(mult))
    assert phi.max == pytest.approx(max(mult)) and phi.sum == pytest.approx(sum(mult))
    norm = ea.Histograms("layer1/default_moe_ema_norm")[-1].histogram_value
    assert norm.sum == pytest.approx(sum(evals[-1]["default_moe"][1]["ema_norm"]), rel=1e-6)
    assert all(v > 0 for v in evals[-1]["default_moe"][1]["ema_norm"])


def _steps(ea, tag):
    return [e.step for e in ea.Scalars(tag)]


def test_tensorboard_resume_has_no_duplicated_steps(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    cfg = tiny("train.steps=12", "train.eval_every=3", "train.checkpoint_every=4",
               "train.loggers=['jsonl', 'tensorboard']")
    assert Trainer(cfg, run, quiet=True).fit(max_steps=4)["stopped"]
    shutil.copy(run / CHECKPOINT, tmp_path / "ckpt4.pt")
    # event file names start with whole seconds: let each process's file sort after the last
    time.sleep(1.1)
    assert Trainer.resume(run, quiet=True).fit(max_steps=8)["stopped"]
    # ... then the process dies after step 8 and its last checkpoint is the one of step 4
    shutil.copy(tmp_path / "ckpt4.pt", run / CHECKPOINT)
    time.sleep(1.1)
    Trainer.resume(run, quiet=True).fit()
    files = sorted(run.glob("events.out.tfevents.*"))
    assert len(files) == 3
    ea = _event_accumulator(run)
    assert _steps(ea, "train/loss") == list(range(1, 13))
    assert _steps(ea, "val/loss") == [3, 6, 9, 12]  # step 6 was logged twice, kept once
    assert _steps(ea, "layer0/gini") == [3, 6, 9, 12]
    assert [h.step for h in ea.Histograms("layer0/expert_share")] == [3, 6, 9, 12]
    losses = {e["step"]: e["loss"] for e in read_metrics(run) if e["kind"] == "train"}
    assert [v for _, v in sorted(losses.items())] == pytest.approx(
        [e.value for e in ea.Scalars("train/loss")], rel=1e-6)
    # the resumed file starts with TensorBoard's purge marker at the step after the checkpoint
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    starts = [e.step for e in EventFileLoader(str(files[-1])).Load()
              if e.HasField("session_log") and e.session_log.status == 1]  # START
    assert starts == [5]


# ------------------------------------------------------------------ W&B (offline)


def _wandb_records(path: Path):
    """The records of a ``run-<id>.wandb`` file (a LevelDB-style log: 7-byte file header,
    32 KiB blocks, 7-byte record headers: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def _wandb_history(path: Path) -> tuple[list[dict], object]:
    rows, run = [], None
    for rec in _wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows, run


def test_wandb_offline_run_has_the_same_scalars_and_resumes_the_same_run(tmp_path,
                                                                         monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    run = tmp_path / "run"
    cfg = tiny(*ALL_METHODS, "train.steps=6", "train.eval_every=3", "train.checkpoint_every=3",
               "train.loggers=['jsonl', 'wandb']", "train.tracker_group=exp-a")
    assert Trainer(cfg, run, quiet=True).fit(max_steps=3)["stopped"]
    Trainer.resume(run, quiet=True).fit()
    run_id = (run / WANDB_ID).read_text().strip()
    dirs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.name.endswith(run_id) for d in dirs)
    rows, info = [], []
    for d in dirs:
        r, meta = _wandb_history(d / f"run-{run_id}.wandb")
        rows += r
        info.append(meta)
    assert all(m.run_id == run_id and m.run_group == "exp-a" and m.display_name == "run"
               for m in info)
    # the same scalar names as the trackers' records of metrics.jsonl, at the same steps
    want: dict[int, dict[str, float]] = {}
    for e in read_metrics(run):
        want.setdefault(e["step"], {}).update(tracker_records(e, {"blocks.0.ffn": 0,
                                                                  "blocks.1.ffn": 1})[0])
    got: dict[int, dict[str, float]] = {}
    for row in rows:
        got.setdefault(row["_step"], {}).update(
            {k: v for k, v in row.items() if not k.startswith("_") and not isinstance(v, dict)
             and "/" in k and k.rsplit("/", 1)[1] not in ("values", "bins", "_type")})
    assert sorted(got) == list(range(1, 7))
    for step, scal in want.items():
        assert set(got[step]) == set(scal), step
        for k, v in scal.items():
            assert got[step][k] == pytest.approx(v, rel=1e-6), (step, k)
    share = [r for r in rows if "layer1/expert_share/values" in r]
    last = [e for e in read_metrics(run) if e["kind"] == "eval"][-1]
    assert share[-1]["layer1/expert_share/values"] == pytest.approx(last["layers"][1]["share"])
    assert share[-1]["layer1/expert_share/bins"] == [0, 1, 2, 3, 4]
    assert math.isfinite(got[6]["final/test_ppl"])


# ------------------------------------------------------------------ torchrun: rank 0 only


def test_only_rank_0_writes_tracker_files(tmp_path):
    pytest.importorskip("tensorboard")
    from test_distributed import run_dist

    run = tmp_path / "dp"
    run_dist(tmp_path, 2, run, "train.loggers=['jsonl', 'tensorboard']")
    files = list(run.glob("events.out.tfevents.*"))
    assert len(files) == 1
    ea = _event_accumulator(run)
    assert _steps(ea, "train/loss") == list(range(1, 7))
    assert _steps(ea, "layer1/gini") == [3, 6]
