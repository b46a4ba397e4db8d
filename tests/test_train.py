"""Trainer: learning on real data, bit-for-bit resume, run directory, Excitation, image models."""

from __future__ import annotations

import json

import pytest
import torch

from moelab.config import RunConfig, apply_overrides, config_from_dict, config_to_dict, load_config
from moelab.runs.directory import CHECKPOINT, CONFIG, METRICS, read_metrics
from moelab.train.trainer import Trainer

# A model small enough for a few dozen steps in seconds on 2 CPU cores.
TINY_LM = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.moe.n_experts=4",
    "model.moe.top_k=2", "model.moe.d_ff=32", "model.max_seq_len=32",
    "data.seq_len=32", "data.batch_size=8", "data.eval_batches=2", "data.final_eval_batches=2",
    "optim.lr=3e-3", "optim.warmup_steps=2",
    "train.steps=12", "train.eval_every=6", "train.log_every=1", "train.checkpoint_every=0",
    "train.threads=1",
]
TINY_IMG = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.moe.n_experts=4",
    "model.moe.top_k=2", "model.moe.d_ff=32", "model.moe_every=1",
    "data.batch_size=32", "data.eval_batches=2", "data.final_eval_batches=2",
    "train.steps=8", "train.eval_every=4", "train.log_every=2", "train.threads=1",
]


def tiny(*extra: str, base: str = "default", tiny: list[str] = TINY_LM) -> RunConfig:
    data = config_to_dict(load_config(base))
    data["name"] = "tiny"
    return config_from_dict(apply_overrides(data, [*tiny, *extra]))


def losses(run_dir) -> list[float]:
    return [e["loss"] for e in read_metrics(run_dir) if e["kind"] == "train"]


def test_loss_decreases_on_shakespeare(tmp_path):
    cfg = tiny("train.steps=60", "train.log_every=10", "train.eval_every=30")
    summary = Trainer(cfg, tmp_path / "run", quiet=True).fit()
    curve = losses(tmp_path / "run")
    assert len(curve) == 6
    # bytes start near ln(256) = 5.55 nats; 60 steps learn at least the character statistics
    assert curve[0] > 4.0 and curve[-1] < curve[0] - 1.0, curve
    assert summary["val_loss"] < 3.6 and summary["val_ppl"] == pytest.approx(
        torch.tensor(summary["val_loss"]).exp().item(), rel=1e-6)
    assert summary["test_ppl"] > 1.0


def test_run_directory_contents(tmp_path):
    run = tmp_path / "run"
    cfg = tiny("train.checkpoint_every=4")
    tr = Trainer(cfg, run, quiet=True, command=["moelab", "train", "--out", str(run)])
    summary = tr.fit()
    assert {p.name for p in run.iterdir()} == {CONFIG, METRICS, CHECKPOINT, "command.txt"}
    assert (run / "command.txt").read_text() == f"moelab train --out {run}\n"
    assert load_config(run / CONFIG) == cfg
    entries = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    train = [e for e in entries if e["kind"] == "train"]
    evals = [e for e in entries if e["kind"] == "eval"]
    assert [e["step"] for e in train] == list(range(1, 13))
    assert {"loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(train[0])
    assert [e["step"] for e in evals] == [6, 12] and evals[-1]["final"]
    layers = evals[0]["layers"]
    assert len(layers) == 2 and [x["block"] for x in layers] == [0, 1]
    for x in layers:
        assert {"share", "gini", "dead", "entropy", "entropy_normalized", "load_imbalance",
                "mean_prob", "norm_order_share", "out_norm", "aux_loss"} <= set(x)
        assert sum(x["share"]) == pytest.approx(1.0)
        # counts aggregated over the whole eval window: 2 batches x 8 x 32 tokens
        assert x["tokens"] == 2 * 8 * 32
    assert entries[-1]["kind"] == "final" and entries[-1] == summary
    assert summary["params"] == tr.n_params and summary["step"] == 12
    # the schedule: warmup 2 steps, then cosine down to min_lr_ratio * lr at the last step
    lrs = [e["lr"] for e in train]
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[1] == pytest.approx(3e-3)
    assert lrs[-1] == pytest.approx(3e-4)
    ckpt = torch.load(run / CHECKPOINT, weights_only=False)
    assert {"model", "optimizer", "rng", "batcher", "step"} <= set(ckpt) and "scheduler" not in ckpt
    assert ckpt["step"] == 12 and ckpt["batcher"]["step"] == 12
    assert not list(run.glob("*.tmp"))
    # the trainer restores torch's global settings
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(cfg, run, quiet=True).fit()


def _straight_vs_resumed(tmp_path, cfg, half):
    a, b = tmp_path / "straight", tmp_path / "resumed"
    Trainer(cfg, a, quiet=True).fit()
    first = Trainer(cfg, b, quiet=True)
    assert first.fit(max_steps=half) == {"step": half, "stopped": True}
    del first
    # a crash after the checkpoint: lines logged past it, the last one cut short
    with open(b / METRICS, "a") as f:
        f.write(json.dumps({"kind": "train", "step": half + 1, "loss": 0.0}) + "\n")
        f.write('{"kind": "train", "step": ')
    resumed = Trainer.resume(b, quiet=True)
    assert resumed.step == half
    resumed.fit()
    ea, eb = read_metrics(a), read_metrics(b)
    strip = ("tokens_per_s", "images_per_s", "elapsed_s", "train_time_s")

    def clean(entries):
        return [{k: v for k, v in e.items() if k not in strip} for e in entries]

    assert losses(a) == losses(b)  # exact equality, every step
    assert clean(ea) == clean(eb)
    sa = torch.load(a / CHECKPOINT, weights_only=False)["model"]
    sb = torch.load(b / CHECKPOINT, weights_only=False)["model"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    return ea


def test_resume_is_bit_for_bit(tmp_path):
    # dropout uses the torch RNG, Default MoE keeps EMA buffers, grad accumulation splits steps
    cfg = tiny("model.dropout=0.1", "model.default_moe.beta=0.9", "train.grad_accum=2",
               "train.log_every=3")
    entries = _straight_vs_resumed(tmp_path, cfg, half=5)  # resume inside a log window
    assert len({e["loss"] for e in entries if e["kind"] == "train"}) == 4


def test_resume_with_excitation_random_is_bit_for_bit(tmp_path):
    # the "random" ablation draws permutations from Excitation's own generator
    cfg = tiny("optim.excitation.strategy=random", "optim.excitation.seed=3",
               "model.momentum.rule=heavy_ball", "train.steps=8", "train.eval_every=4")
    entries = _straight_vs_resumed(tmp_path, cfg, half=4)
    evals = [e for e in entries if e["kind"] == "eval"]
    exc = evals[0]["excitation"]
    assert len(exc) == 2
    for v in exc.values():
        assert len(v["multipliers"]) == 4 and v["min"] <= 1.0 <= v["max"]


def test_same_seed_same_run_other_seed_differs(tmp_path):
    cfg = tiny("train.steps=4", "train.eval_every=0")
    Trainer(cfg, tmp_path / "a", quiet=True).fit()
    Trainer(cfg, tmp_path / "b", quiet=True).fit()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    other = tiny("train.steps=4", "train.eval_every=0", "train.seed=1")
    Trainer(other, tmp_path / "c", quiet=True).fit()
    assert losses(tmp_path / "c") != losses(tmp_path / "a")


def test_excitation_changes_training(tmp_path):
    plain = tiny("train.steps=4", "train.eval_every=0")
    exc = tiny("train.steps=4", "train.eval_every=0", "optim.excitation.strategy=zero_sum")
    Trainer(plain, tmp_path / "plain", quiet=True).fit()
    tr = Trainer(exc, tmp_path / "exc", quiet=True)
    tr.fit()
    assert type(tr.excitation).__name__ == "Excitation"
    assert tr.excitation.optimizer is tr.optimizer and "excitation" in tr.optimizer.state_dict()
    la, lb = losses(tmp_path / "plain"), losses(tmp_path / "exc")
    assert la[0] == lb[0] and la[1:] != lb[1:]  # same first batch, different updates after


@pytest.mark.parametrize("kind", ["vit", "mlp"])
def test_mnist_classification(tmp_path, kind):
    extra = ["model.patch_size=7"] if kind == "vit" else []
    cfg = tiny(f"model.kind={kind}", *extra, base="mnist", tiny=TINY_IMG)
    summary = Trainer(cfg, tmp_path / kind, quiet=True).fit()
    assert 0.0 <= summary["val_acc"] <= 1.0 and 0.0 <= summary["test_acc"] <= 1.0
    assert summary["val_items"] == 64 and summary["images_per_s"] > 0
    train = [e for e in read_metrics(tmp_path / kind) if e["kind"] == "train"]
    assert "images_per_s" in train[0] and train[-1]["loss"] < train[0]["loss"]
    evals = [e for e in read_metrics(tmp_path / kind) if e["kind"] == "eval"]
    assert len(evals[-1]["layers"]) == 2


def test_data_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="reads your own files: pass path"):
        Trainer(tiny("data.dataset=wikitext"), tmp_path / "r", quiet=True)
    with pytest.raises(FileNotFoundError, match="not found"):
        Trainer(tiny("data.dataset=textfile", f"data.path={tmp_path}/nope.txt"),
                tmp_path / "r", quiet=True)
    short = tmp_path / "short.txt"
    short.write_text("x" * 400)
    with pytest.raises(ValueError, match=r"data\.seq_len=32 is invalid: the val split"):
        Trainer(tiny("data.dataset=textfile", f"data.path={short}"), tmp_path / "r", quiet=True)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        Trainer.resume(tmp_path / "nothing")


def test_aux_loss_is_trained_on(tmp_path):
    runs = {}
    for coef in ("0.0", "1.0"):
        cfg = tiny(f"model.moe.aux_loss_coef={coef}", "train.steps=3", "train.eval_every=0")
        Trainer(cfg, tmp_path / coef, quiet=True).fit()
        runs[coef] = [e for e in read_metrics(tmp_path / coef) if e["kind"] == "train"]
    assert all(e["aux_loss"] == 0.0 for e in runs["0.0"])
    # 2 MoE layers, balance loss >= 1 each (1.0 = perfectly balanced)
    assert all(e["aux_loss"] >= 2.0 - 1e-6 for e in runs["1.0"])
    assert runs["0.0"][0]["loss"] == runs["1.0"][0]["loss"]  # same init and batch
    assert runs["0.0"][2]["loss"] != runs["1.0"][2]["loss"]  # the balance loss moved weights


def test_logits_are_freed_before_the_next_forward_and_the_optimizer_step(tmp_path):
    """With gradient accumulation, no micro-batch's logits ([B, S, V], the largest activation
    with a big vocabulary) are alive during the next forward or the optimizer step."""
    import weakref

    tr = Trainer(tiny("train.grad_accum=3", "train.steps=2"), tmp_path / "run", quiet=True)
    alive: list[weakref.ref] = []
    seen: list[int] = []

    def record(module, args, out):
        seen.append(sum(r() is not None for r in alive))
        alive.append(weakref.ref(out.logits))

    tr.model.register_forward_hook(record)
    step = tr.optimizer.step

    def checked_step(*args, **kwargs):
        seen.append(sum(r() is not None for r in alive))
        return step(*args, **kwargs)

    tr.optimizer.step = checked_step
    tr.train_step()
    assert len(alive) == 3 and seen == [0, 0, 0, 0], seen
