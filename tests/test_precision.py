"""Mixed precision (train.precision, moelab.train.precision, moelab.moe.amp): the CPU stand-in for
bf16 autocast on a GPU. Under ``torch.autocast("cpu", bf16)`` every expert GEMM of both
dispatch paths runs in bf16, forward and backward, while the router and Default MoE stay fp32;
a dispatch mode records the dtype of every matrix product."""

from __future__ import annotations

import math
import os
import sys
from collections import defaultdict

import pytest
import torch
from test_train import tiny
from torch.utils._python_dispatch import TorchDispatchMode

from moelab.methods.default_moe import DefaultMoE, DefaultMoEConfig
from moelab.methods.momentum import MomentumConfig
from moelab.models import ModelConfig, build_model
from moelab.moe import MoEConfig, MoELayer
from moelab.runs.checkpoint import load_checkpoint
from moelab.runs.directory import CHECKPOINT, read_metrics
from moelab.train.guard import NonFiniteError
from moelab.train.precision import matmul_flags, resolve_precision
from moelab.train.trainer import Trainer

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "matmul", "linear", "addmv"}
# sizes chosen so that only the experts' products involve F or 2F (bf16 grouped GEMM needs row
# strides that are multiples of 16 bytes)
D, E, F, T = 16, 4, 24, 20


class MatmulDtypes(TorchDispatchMode):
    """Records (op, input dtype, operand shapes) of every matrix product, forward and
    backward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.dtype, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.seen.append((name, tensors[0].dtype, [tuple(t.shape) for t in tensors]))
        return func(*args, **(kwargs or {}))

    def kinds(self) -> dict[str, set[torch.dtype]]:
        """dtypes of the experts' GEMMs, of the per-expert output sums for Default MoE (fp32
        by design: [E, 1, F] x [E, F, D], or the loop's matrix-vector sums) and of the rest
        (the router, Default MoE's default term)."""
        out: dict[str, set[torch.dtype]] = defaultdict(set)
        for name, dtype, shapes in self.seen:
            if name == "addmv" or (name == "bmm" and shapes[0] == (E, 1, F)):
                out["sums"].add(dtype)
            elif any(F in s or 2 * F in s for s in shapes):
                out["expert"].add(dtype)
            else:
                out["other"].add(dtype)
        return out


def layer(dispatch: str, default_moe: bool, capacity: float | None = None) -> MoELayer:
    cfg = MoEConfig(d_model=D, n_experts=E, top_k=2, d_ff=F, dispatch=dispatch,
                    capacity_factor=capacity)
    torch.manual_seed(0)
    return MoELayer(cfg, method=DefaultMoE(cfg, DefaultMoEConfig(beta=0.9))
                    if default_moe else None)


@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm", "padded"])
@pytest.mark.parametrize("default_moe", [False, True])
def test_expert_gemms_run_in_bf16_and_the_router_in_fp32_under_autocast(dispatch, default_moe):
    moe = layer(dispatch, default_moe)
    x = torch.randn(2, T // 2, D, requires_grad=True)
    with MatmulDtypes() as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = moe(x)
            loss = out.y.float().square().mean() + out.losses.total
        loss.backward()
    kinds = rec.kinds()
    assert kinds["expert"] == {torch.bfloat16}, rec.seen
    assert kinds["other"] == {torch.float32}, rec.seen  # router (+ default term) fwd and bwd
    n_expert = sum(1 for _, dtype, _ in rec.seen if dtype == torch.bfloat16)
    assert n_expert >= 6  # 2 GEMMs forward, 4 backward (input and weight gradients)
    assert out.y.dtype == torch.bfloat16
    assert moe.experts.w_in.grad.dtype == torch.float32  # fp32 master weights keep fp32 grads
    assert x.grad.dtype == torch.float32
    if default_moe:
        assert kinds["sums"] == {torch.float32}
        assert moe.method.ema.dtype == torch.float32 and moe.method.ema.abs().sum() > 0


@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm", "padded"])
def test_autocast_output_is_the_fp32_output_to_bf16_accuracy(dispatch):
    moe = layer(dispatch, default_moe=True, capacity=1.0)
    x = torch.randn(T, D)
    ref = moe.eval()(x).y
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x).y
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    assert (y.float() - ref).abs().max() > 0  # really computed in bf16


def test_router_and_momentum_state_stay_in_the_stream_dtype():
    cfg = ModelConfig(kind="lm", d_model=D, n_layers=2, n_heads=2,
                      moe=MoEConfig(n_experts=E, top_k=2, d_ff=F),
                      momentum=MomentumConfig(rule="adam"))
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=32)
    seen = {}

    def combine(h, f, state, i, _orig=model.combine_rule.combine):
        h, state = _orig(h, f, state, i)
        seen[i] = (f.dtype, h.dtype, [s.dtype for s in state])
        return h, state

    model.combine_rule.combine = combine
    routing = {}
    layer0 = model.moe_layers()[0]
    layer0.router.register_forward_hook(lambda m, a, out: routing.update(r=out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 32, (2, 8)))
    assert routing["r"].logits.dtype == routing["r"].probs.dtype == torch.float32
    for f_dtype, h_dtype, state_dtypes in seen.values():
        assert f_dtype == torch.bfloat16  # the MoE output, like an autocast Linear's
        assert h_dtype == torch.float32 and set(state_dtypes) == {torch.float32}


def test_precision_resolution_and_flags():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="TF32 is a CUDA matmul mode"):
        resolve_precision("tf32", cpu)
    with pytest.raises(ValueError, match="train.precision='fp16' is invalid"):
        resolve_precision("fp16", cpu)
    knobs = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
    before = [k.fp32_precision for k in knobs]
    with matmul_flags("tf32"):
        assert [k.fp32_precision for k in knobs] == ["tf32"] * 3
    with matmul_flags("fp32"):
        assert [k.fp32_precision for k in knobs] == ["ieee"] * 3
    assert [k.fp32_precision for k in knobs] == before
    with pytest.raises(ValueError, match="train.precision"):
        tiny("train.precision=half")


def test_tf32_settings_beside_hugging_face_new_api(tmp_path):
    """Item 7 of issue 35: once HF has set TF32 through torch's new ``fp32_precision`` API
    (``TrainingArguments(tf32=True)`` calls ``enable_tf32``; on a machine without an Ampere
    GPU TrainingArguments refuses tf32=True, so its helper is called directly), moelab's
    runtime settings in tf32 and fp32 neither raise "mix of the legacy and new APIs" nor
    leave anything changed behind."""
    pytest.importorskip("transformers")
    from transformers.utils.import_utils import enable_tf32

    from moelab.config import TrainConfig
    from moelab.distributed.wrap import runtime_settings
    from moelab.train.precision import new_tf32_api

    assert new_tf32_api()  # torch >= 2.9 (pyproject pins a newer one)
    knobs = (torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn.conv,
             torch.backends.cudnn.rnn)
    before = [k.fp32_precision for k in knobs]
    try:
        enable_tf32(True)
        hf_state = [k.fp32_precision for k in knobs]
        assert hf_state[0] == "tf32"
        cpu = torch.device("cpu")
        for precision, mode in (("tf32", "tf32"), ("fp32", "ieee")):
            with runtime_settings(TrainConfig(device="cpu"), cpu, precision):
                assert [k.fp32_precision for k in knobs[1:]] == [mode] * 3
                torch.ones(2, 2) @ torch.ones(2, 2)
            assert [k.fp32_precision for k in knobs] == hf_state
    finally:
        for k, value in zip(knobs, before, strict=True):
            k.fp32_precision = value


def test_a_bf16_run_checkpoints_its_precision_and_a_resume_may_change_it(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny("train.steps=4", "train.eval_every=0", "train.precision=bf16")
    tr = Trainer(cfg, run)
    assert tr.fit(max_steps=2)["stopped"]
    assert "precision bf16" in capsys.readouterr().out
    assert load_checkpoint(run / CHECKPOINT)["precision"] == "bf16"
    (run / "config.toml").write_text((run / "config.toml").read_text().replace(
        'precision = "bf16"', 'precision = "fp32"'))
    resumed = Trainer.resume(run)
    err = capsys.readouterr().err
    assert f"{run} trained in bf16 up to step 2; it continues in fp32" in err
    summary = resumed.fit()
    assert summary["step"] == 4 and load_checkpoint(run / CHECKPOINT)["precision"] == "fp32"


def test_bf16_training_follows_fp32_training(tmp_path):
    """The same 20 steps in bf16 mixed precision and in fp32: the losses agree to bf16
    accuracy, and both learn."""
    base = ("train.steps=20", "train.eval_every=0", "train.log_every=5")
    runs = {}
    for p in ("fp32", "bf16"):
        Trainer(tiny(*base, f"train.precision={p}"), tmp_path / p, quiet=True).fit()
        from test_train import losses

        runs[p] = losses(tmp_path / p)
    assert runs["fp32"][-1] < runs["fp32"][0] - 0.5 and runs["bf16"][-1] < runs["bf16"][0] - 0.5
    for a, b in zip(runs["fp32"], runs["bf16"], strict=True):
        assert abs(a - b) < 0.05 * a


# ------------------------------------------------------------------ no host syncs

SYNCS = {"_local_scalar_dense", "item", "nonzero", "bincount", "unique", "_unique2",
         "masked_select", "equal", "is_nonzero"}


class HostReads(TorchDispatchMode):
    """Counts the ops that read a device value back on the host (a sync on a GPU) or whose
    output shape depends on data."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNCS:
            self.calls.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("capacity", [None, 0.75])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grouped_path_forward_and_backward_never_read_the_device(capacity, precision):
    moe = layer("grouped_mm", default_moe=True, capacity=capacity)
    x = torch.randn(2, T // 2, D, requires_grad=True)
    moe(x)  # the backend probe runs once, on the first call (not a step's cost)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        with HostReads() as reads:
            out = moe(x)
            (out.y.float().square().mean() + out.losses.total).backward()
    assert reads.calls == []
    assert moe.last_stats.dropped_frac.item() >= 0  # read on demand, after the step
    if capacity is not None:
        assert int(moe._stats_inputs[3]) > 0  # something was dropped, without a sync


# ------------------------------------------------------------------ a step without syncs


def test_a_fused_optimizer_step_reads_nothing_back_until_it_is_logged(tmp_path, monkeypatch):
    """With torch's fused AdamW (the default on CUDA; forced here on CPU) a training step
    reads no device value on the host: the losses and the grad norm (one read) and the guard
    (one read) are read at logged steps only."""
    from moelab.train.callbacks import Callback

    tolist = torch.Tensor.tolist  # on CPU it reads memory without an op the mode would see

    def counted_tolist(t):
        caller = sys._getframe(1).f_code.co_filename
        if f"moelab{os.sep}data{os.sep}" not in caller:  # the batchers' host-side indices
            reads.calls.append("tolist")
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    # (not Excitation: on CPU it reads which experts move, to skip the others; on a GPU it
    # rescales every expert instead)
    cfg = tiny("train.steps=8", "train.log_every=4", "train.eval_every=0", "optim.fused=true",
               "model.default_moe.beta=0.9", "model.momentum.rule=heavy_ball",
               "model.moe.dispatch=grouped_mm")
    tr = Trainer(cfg, tmp_path / "run", quiet=True)
    assert tr.guard.deferred
    per_step, reads = [], HostReads()

    class Count(Callback):
        def post_step(self, trainer, result):
            per_step.append(len(reads.calls))

    tr.callbacks.append(Count())
    tr.fit(max_steps=1)  # the first step runs the grouped GEMM probe: not a step's cost
    per_step.clear()
    reads.calls.clear()
    with reads:
        tr.fit(max_steps=8)
    steps = [per_step[0], *(b - a for a, b in zip(per_step, per_step[1:], strict=False))]
    assert steps[:2] == [0, 0] and steps[3:6] == [0, 0, 0]  # steps 2, 3, 5, 6, 7
    assert steps[2] == steps[6] == 2  # steps 4 and 8: logged
    train = [e for e in read_metrics(tmp_path / "run") if e["kind"] == "train"]
    assert [e["step"] for e in train] == [4, 8]
    assert all(math.isfinite(e["loss"]) and e["grad_norm"] > 0 for e in train)


def test_a_fused_optimizer_skips_a_nonfinite_step_on_the_device(tmp_path):
    from test_reliability import poison_steps, same_params

    base = ("train.steps=8", "train.log_every=4", "train.eval_every=0", "optim.fused=true",
            "model.default_moe.beta=0.9")
    tr = Trainer(tiny(*base, "train.skip_nonfinite_steps=1"), tmp_path / "run", quiet=True)
    poison_steps(tr, {3}, where="embed")  # NaN reaches the Default MoE buffers too
    tr.fit(max_steps=2)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    items = tr.items_seen
    result = tr.train_step()  # step 3: not applied, nothing read yet
    assert not result["ok"] and tr.guard.skipped == 0
    assert same_params(tr.model.state_dict(), before)
    tr.flush_guard()
    assert tr.guard.skipped == 1 and tr.items_seen == items
    summary = tr.fit()
    assert summary["kind"] == "final" and math.isfinite(summary["val_loss"])
    train = [e for e in read_metrics(tmp_path / "run") if e["kind"] == "train"]
    assert [(e["step"], e.get("skipped_steps", 0)) for e in train] == [(4, 1), (8, 1)]

    tr2 = Trainer(tiny(*base), tmp_path / "run2", quiet=True)  # no skip allowed
    poison_steps(tr2, {3})
    with pytest.raises(NonFiniteError, match=r"diverged at step 3: loss nan.*noticed at step 4 "
                                             r"\(the guard is read at logged steps"):
        tr2.fit()


def test_cli_precision_flag_for_new_and_resumed_runs(tmp_path, capsys):
    from moelab.cli import main
    from moelab.config import dump_toml

    (tmp_path / "c.toml").write_text(dump_toml(tiny("train.steps=4", "train.eval_every=0")))
    run = tmp_path / "run"
    base = ["--no-report", "-q"]
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--out", str(run),
                 "--precision", "bf16", *base, "--set", "train.steps=2"]) == 0
    assert 'precision = "bf16"' in (run / "config.toml").read_text()
    (run / "config.toml").write_text((run / "config.toml").read_text().replace(
        "steps = 2", "steps = 4"))
    assert main(["train", "--resume", str(run), "--precision", "fp32", *base]) == 0
    assert "trained in bf16 up to step 2; it continues in fp32" in capsys.readouterr().err
    assert load_checkpoint(run / CHECKPOINT)["precision"] == "fp32"
    assert main(["eval", str(run), "--batches", "1", "--precision", "bf16", "--json"]) == 0


def test_a_patched_hf_block_runs_experts_in_bf16_and_its_router_in_fp32():
    pytest.importorskip("transformers")
    from hf_tiny import tiny_model

    from moelab.hf import patch, patched_blocks

    hf = tiny_model("mixtral", intermediate_size=F).train()  # E = 4 experts, F = 24
    patch(hf, default_moe=DefaultMoEConfig(beta=0.9), dispatch="grouped_mm")
    routing = []
    for _, block in patched_blocks(hf):
        block.moelab.router.register_forward_hook(lambda m, a, out: routing.append(out))
    x = torch.randint(0, 64, (2, 10))
    with MatmulDtypes() as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = hf(input_ids=x, labels=x).loss
        loss.backward()
    assert all(r.logits.dtype == r.probs.dtype == torch.float32 for r in routing)
    experts = {d for name, d, shapes in rec.seen
               if name == "_grouped_mm" and any(2 * F in s for s in shapes)}
    assert experts == {torch.bfloat16}
    router = {d for name, d, shapes in rec.seen if any(s[-1:] == (E,) for s in shapes[1:2])}
    assert router == {torch.float32}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_training_step_does_not_sync(tmp_path):
    """On a GPU: a Trainer step (bf16, fused AdamW, Default MoE + heavy ball) under
    ``torch.cuda.set_sync_debug_mode("error")``, after two warm-up steps."""
    from benchmarks.gpu_check import step_without_syncs

    cfg = tiny("train.device=cuda", "train.steps=8", "train.eval_every=0", "train.log_every=100",
               "model.default_moe.beta=0.9", "model.momentum.rule=heavy_ball")
    tr = Trainer(cfg, tmp_path / "run", quiet=True)
    assert tr.precision == "bf16" and tr.guard.deferred
    tr.fit(max_steps=2)
    step_without_syncs(tr)
    tr.flush_guard()
    assert tr.guard.skipped == 0
