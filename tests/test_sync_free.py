"""No host sync in a training step, in any precision, on one process and on 2 gloo ranks: the
CPU stand-in for CUDA's sync debug mode (``sync_count.WouldSync``).

The CPU runs CUDA's dispatch policy (``moe.dispatch.backend_policy`` replaced), so each layer
takes the path it takes on a GPU: grouped GEMM for bf16; for fp32 and tf32 (TF32 is a cuBLAS
mode of the same fp32 matmuls: its path is fp32's; the Trainer is let run "tf32" on CPU) the
padded path with a capacity or ``dispatch="padded"`` (no host read), else the expert loop with
its one host read of the expert sizes per layer. Expert parallel reads the split sizes once per
layer when dropless (an uneven all-to-all needs them on the host), nothing with static slots
(equal splits). Every other would-sync op counts as a failure.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.distributed as dist
from reference import naive_moe
from sync_count import WouldSync
from test_distributed import spawn
from test_train import tiny

import moelab.moe.dispatch as dispatch
from moelab.moe import MoEConfig, MoELayer

ONE_READ = ("tolist", "moe/experts.py:_loop")  # the loop's one read of the expert sizes
EP_READ = ("tolist", "distributed/ddp_ep.py:_exchange_counts")  # expert parallel's split sizes


@pytest.fixture
def cuda_policy(monkeypatch):
    """``resolve_backend`` decides as on a CUDA GPU (sm90+) for CPU tensors; the Trainer
    accepts ``train.precision="tf32"`` on CPU (its TF32 switches do nothing there)."""
    import moelab.train.trainer as trainer_module

    monkeypatch.setattr(dispatch, "backend_policy", lambda device_type: "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainer_module, "resolve_precision", lambda name, device: name)


@pytest.fixture
def padded_runs(monkeypatch):
    """The number of forwards that ran the padded path (the list's length)."""
    from moelab.moe.experts import Experts

    runs, real = [], Experts._padded

    def counting(self, *args):
        runs.append(1)
        return real(self, *args)

    monkeypatch.setattr(Experts, "_padded", counting)
    return runs


def moe_layer(d_ff: int = 8, **kw) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(MoEConfig(**{**dict(d_model=16, n_experts=4, top_k=2, d_ff=d_ff), **kw}))


# ---------------------------------------------------------------------------- the MoE layer


def test_fp32_on_cuda_takes_the_loop_with_one_host_read_and_matches_the_reference(cuda_policy):
    layer = moe_layer(dispatch="auto")
    x = torch.randn(2, 7, 16, requires_grad=True)
    g = torch.randn(2, 7, 16)
    layer(x)  # the probe's first call is not a step's cost
    with WouldSync() as syncs:
        y = layer(x).y
        params = [layer.router.weight, layer.experts.w_in, layer.experts.w_out, x]
        got = torch.autograd.grad(y, params, g)
    assert syncs.calls == Counter({ONE_READ: 1})  # no _grouped_mm[float32], nothing else
    y_ref = naive_moe(layer, x.reshape(-1, 16)).view_as(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, torch.autograd.grad(y_ref, params, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(capacity_factor=1.0), dict(dispatch="padded"),
                                dict(routing="expert_choice", capacity_factor=0.5)], ids=str)
def test_fp32_on_cuda_with_static_slots_takes_the_padded_path_without_any_host_read(
        cuda_policy, padded_runs, kw):
    """fp32 with a capacity or expert choice ("auto"), or dispatch="padded" dropless: the
    padded path (E*C slots, batched matmuls), nothing read back."""
    layer = moe_layer(**kw)
    x = torch.randn(2, 7, 16, requires_grad=True)
    with WouldSync() as syncs:
        out = layer(x)
        (out.y.square().mean() + out.losses.total).backward()
    assert syncs.total() == 0, syncs.calls
    assert len(padded_runs) == 1


def test_bf16_on_cuda_takes_grouped_gemm_without_any_host_read(cuda_policy):
    layer = moe_layer(dispatch="auto", d_ff=24)
    x = torch.randn(20, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
        with WouldSync() as syncs:
            out = layer(x)
            (out.y.float().square().mean() + out.losses.total).backward()
    assert syncs.total() == 0, syncs.calls


def test_the_backend_probe_covers_both_gemms(cuda_policy, recwarn):
    """bf16 with d_ff=12: w_in [E, 16, 24] is aligned, w_out [E, 12, 16] is not (24-byte
    rows): "auto" falls back to the loop (a warning), "grouped_mm" raises a clear error; no
    "strides should be multiple of 16 bytes" from inside a forward."""
    dispatch._warn_loop_fallback.cache_clear()
    layer = moe_layer(dispatch="auto", d_ff=12)
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x).y
    assert y.shape == (10, 16) and torch.isfinite(y).all()
    assert any("falls back to a per-expert loop" in str(w.message) for w in recwarn.list)
    w_in, w_out = layer.experts.w_in, layer.experts.w_out
    assert dispatch.resolve_backend("grouped_mm", "cpu", torch.bfloat16, w_in) == "grouped_mm"
    with pytest.raises(RuntimeError, match=r"dispatch='grouped_mm' is not supported.*\(4, 12, "):
        dispatch.resolve_backend("grouped_mm", "cpu", torch.bfloat16, w_in, w_out)


def test_the_custom_ops_fake_kernel_gives_the_real_kernels_strides():
    from moelab.moe.gemm import GROUPED_MM, output_strides

    if GROUPED_MM is None:
        pytest.skip("this torch has no grouped GEMM")
    a, b = torch.randn(5, 16), torch.randn(2, 16, 24)
    offs = torch.tensor([2, 5], dtype=torch.int32)
    # the fake against the real kernel (CPU), shapes and strides, forward and backward
    torch.library.opcheck(torch.ops.moelab.grouped_mm, (a, b, offs))
    torch.library.opcheck(torch.ops.moelab.grouped_mm,
                          (torch.randn(16, 8), torch.randn(8, 24), offs + 3))
    # CUDA pads rows to 16 bytes, as torch's own meta function does: bf16 [5, 12] -> 16
    assert output_strides((5, 12), torch.bfloat16, "cuda") == (16, 1)
    assert output_strides((2, 12, 12), torch.bfloat16, "cuda") == (192, 16, 1)
    assert output_strides((5, 12), torch.float32, "cuda") == (12, 1)
    assert output_strides((5, 12), torch.bfloat16, "cpu") == (12, 1)


# ---------------------------------------------------------------------------- a training step


def counted_step(trainer) -> Counter:
    """The would-sync ops of one unlogged training step inside ``fit()`` (the step and every
    callback's ``post_step``: from one step's end to the next's), after two warm-up steps."""
    from moelab.train.callbacks import Callback

    trainer.fit(max_steps=trainer.step + 2)
    marks: list[Counter] = []

    class Mark(Callback):
        def post_step(self, trainer, result):
            marks.append(Counter(syncs.calls))

    trainer.callbacks.append(Mark())
    with WouldSync() as syncs:
        trainer.fit(max_steps=trainer.step + 2)
    trainer.callbacks.pop()
    assert len(marks) == 2
    return marks[1] - marks[0]


STEP = ("train.steps=100", "train.log_every=100", "train.eval_every=0", "optim.fused=true",
        "model.default_moe.beta=0.9", "model.momentum.rule=heavy_ball")


@pytest.mark.parametrize("precision", ["bf16", "fp32", "tf32"])
def test_a_dropless_training_step_reads_nothing_back_but_the_expert_sizes(
        tmp_path, cuda_policy, padded_runs, precision):
    """bf16: no host read at all; fp32 and tf32: exactly one per MoE layer, the loop's."""
    from moelab.train.trainer import Trainer

    tr = Trainer(tiny(*STEP, f"train.precision={precision}"), tmp_path / "run", quiet=True)
    assert tr.precision == precision
    n_layers = len(tr.model.moe_layers())
    calls = counted_step(tr)
    expected = Counter() if precision == "bf16" else Counter({ONE_READ: n_layers})
    assert calls == expected
    assert not padded_runs


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("moe", ["model.moe.capacity_factor=1.25", "model.moe.dispatch=padded"])
def test_a_padded_training_step_reads_nothing_back(tmp_path, cuda_policy, padded_runs,
                                                   precision, moe):
    """fp32 and tf32 with a capacity ("auto" takes the padded path) or dispatch="padded"
    (dropless, T slots per expert): no host read at all in an unlogged step."""
    from moelab.train.trainer import Trainer

    tr = Trainer(tiny(*STEP, f"train.precision={precision}", moe), tmp_path / "run",
                 quiet=True)
    assert tr.precision == precision
    assert counted_step(tr) == Counter()
    assert padded_runs  # the padded path really ran (the loop would read once per layer)


def _ep_step_worker(rank: int, world: int, run_dir: str, parallel: str, precision: str,
                    checkpointing: bool, capacity: bool) -> None:
    from moelab.train.trainer import Trainer

    dispatch.backend_policy = lambda device_type: "cuda"
    torch.cuda.is_available = lambda: False
    tr = Trainer(tiny(*STEP, f"train.precision={precision}", "train.expert_parallel=2",
                      f"train.parallel={parallel}",
                      f"model.activation_checkpointing={str(checkpointing).lower()}",
                      *(["model.moe.capacity_factor=1.25"] if capacity else [])),
                 run_dir, quiet=True)
    n_layers = len([m for m in tr.model.modules() if isinstance(m, MoELayer)])
    sent, exchange = [], dist.all_to_all_single

    def recording(out, x, *args, **kwargs):
        sent.append(x.dtype)
        return exchange(out, x, *args, **kwargs)

    dist.all_to_all_single = recording
    calls = counted_step(tr)
    dist.all_to_all_single = exchange
    # rows travel in the compute dtype; dropless, the split counts too (int64)
    rows = torch.bfloat16 if precision == "bf16" else torch.float32
    if capacity:  # equal splits of the padded slots: no count exchange, nothing read back
        assert calls == Counter(), (rank, calls)
        assert set(sent) == {rows}, sent
    else:
        assert calls == Counter({EP_READ: n_layers}), (rank, calls)
        assert set(sent) == {torch.int64, rows}, sent


@pytest.mark.parametrize("parallel,precision,checkpointing,capacity", [
    ("ddp", "bf16", False, False), ("fsdp", "bf16", False, False), ("ddp", "fp32", True, False),
    ("ddp", "bf16", True, True), ("fsdp", "fp32", False, True)])
def test_an_expert_parallel_step_reads_at_most_the_split_sizes_once_per_layer(
        tmp_path, parallel, precision, checkpointing, capacity):
    """DDP+EP and FSDP+EP on 2 gloo ranks. Dropless: one read per layer (the all-to-all's
    split sizes, reused by the local experts' loop in fp32 and by an activation-checkpoint
    recompute). With a capacity: none (padded slots, equal splits; also in the recompute).
    The stop flag is agreed without a device read."""
    spawn(2, tmp_path, _ep_step_worker, str(tmp_path / "run"), parallel, precision,
          checkpointing, capacity)


# ---------------------------------------------------------------------------- stop signals


def _stop_worker(rank: int, world: int, run_dir: str) -> None:
    import os
    import signal

    from moelab.train.callbacks import Callback, StopSignals
    from moelab.train.trainer import Trainer

    tr = Trainer(tiny("train.steps=10", "train.log_every=100", "train.eval_every=0",
                      "train.checkpoint_every=0"), run_dir, quiet=True)

    class Signal(Callback):  # SIGINT to rank 1 at the end of step 3
        def post_step(self, trainer, result):
            if rank == 1 and trainer.step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    at = next(i for i, cb in enumerate(tr.callbacks) if isinstance(cb, StopSignals))
    tr.callbacks.insert(at, Signal())
    summary = tr.fit()
    # both ranks stop after step 4 (the flag of step 3 is read at step 4), checkpointed there
    assert summary == {"step": 4, "stopped": True,
                       "signal": "SIGINT" if rank == 1 else "SIGTERM"}, (rank, summary)
    assert tr.checkpoint_step == 4


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    spawn(2, tmp_path, _stop_worker, str(tmp_path / "run"))


# ---------------------------------------------------------------------------- per-expert sums


def test_segment_sum_hand_computed():
    from moelab.moe.dispatch import segment_sum

    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    counts = torch.tensor([1, 0, 3])  # expert 1 gets no rows
    weight = torch.tensor([2.0, 1.0, 0.0, 0.5])
    assert torch.equal(segment_sum(rows, counts), torch.tensor([[1.0, 2.0], [0.0, 0.0],
                                                                [15.0, 18.0]]))
    assert torch.equal(segment_sum(rows, counts, weight),
                       torch.tensor([[2.0, 4.0], [0.0, 0.0], [6.5, 8.0]]))
    assert torch.equal(segment_sum(weight, counts), torch.tensor([2.0, 0.0, 1.5]))
    assert segment_sum(rows.bfloat16(), counts).dtype == torch.float32


def test_project_sums_widens_bf16_weights_a_few_experts_at_a_time(monkeypatch):
    import moelab.moe.experts as experts_module

    act = torch.randn(5, 8)
    w = torch.randn(5, 8, 4).bfloat16()
    ref = torch.bmm(act.unsqueeze(1), w.float()).squeeze(1)
    widened = []
    to_float = torch.Tensor.float

    def recording(t, *a, **kw):
        widened.append(t.shape)
        return to_float(t, *a, **kw)

    monkeypatch.setattr(experts_module, "PROJECT_CHUNK_BYTES", 2 * 4 * 8 * 4)  # 2 experts
    monkeypatch.setattr(torch.Tensor, "float", recording)
    got = experts_module.project_sums(act, w)
    monkeypatch.setattr(torch.Tensor, "float", to_float)
    assert torch.equal(got, ref)
    assert widened == [(2, 8, 4), (2, 8, 4), (1, 8, 4)]  # never all of w_out at once


@pytest.mark.parametrize("dispatch_name", ["grouped_mm", "loop", "padded"])
@pytest.mark.parametrize("capacity", [None, 0.75])
def test_default_moe_sums_are_segmented_reductions_not_scatters(dispatch_name, capacity):
    """A Default MoE training forward scatters no rows into [E, ...] slots (index_add_ /
    scatter_add_ onto a tensor of E rows): its per-expert sums are segmented reductions."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from moelab.methods.default_moe import DefaultMoE, DefaultMoEConfig

    cfg = MoEConfig(d_model=16, n_experts=4, top_k=2, d_ff=8, dispatch=dispatch_name,
                    capacity_factor=capacity)
    torch.manual_seed(0)
    layer = MoELayer(cfg, method=DefaultMoE(cfg, DefaultMoEConfig(beta=0.9, scored=True)))
    x = torch.randn(24, 16)
    scatters = []

    class Scatters(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("index_add", "index_add_", "scatter_add", "scatter_add_",
                        "index_put_", "_index_put_impl_") and args[0].shape[:1] == (4,):
                scatters.append(name)
            return func(*args, **(kwargs or {}))

    with Scatters():
        layer(x)
    assert scatters == []
    assert layer.method.ema.abs().sum() > 0


# ---------------------------------------------------------------------------- step costs


def test_step_buffers_clone_only_what_a_step_writes_in_place():
    """Replaced buffers are kept by reference, in-place ones cloned (learned on the first
    step, when all are); restore undoes both, on the host or where ``ok`` is False."""
    from torch import nn

    from moelab.train.guard import StepBuffers

    m = nn.Module()
    m.register_buffer("const", torch.arange(3.0))
    m.register_buffer("replaced", torch.zeros(2))
    m.register_buffer("in_place", torch.zeros(2))

    def step():
        m.replaced = m.replaced + 1
        m.in_place.add_(1)

    keep = StepBuffers()
    taken = keep.take(m)
    assert all(clone is not None for *_, clone in taken)  # the first step: all cloned
    step()
    keep.restore(taken, torch.tensor(True))  # a good step: kept
    assert m.replaced.tolist() == m.in_place.tolist() == [1.0, 1.0]
    taken = keep.take(m)
    assert {key for _, _, key, *_, clone in taken if clone is not None} == {".in_place"}
    const = m.const
    step()
    keep.restore(taken, torch.tensor(False))  # a bad step, decided on the device
    assert m.replaced.tolist() == m.in_place.tolist() == [1.0, 1.0] and m.const is const
    taken = keep.take(m)
    step()
    keep.restore(taken)  # a bad step, immediate mode
    assert m.replaced.tolist() == m.in_place.tolist() == [1.0, 1.0]


def test_a_trainer_step_clones_only_the_assignment_counts(tmp_path):
    from moelab.train.trainer import Trainer

    tr = Trainer(tiny(*STEP), tmp_path / "run", quiet=True)
    assert tr.guard.deferred
    tr.fit(max_steps=1)
    cloned = {key for _, _, key, *_, clone in tr._step_buffers.take(tr.model)
              if clone is not None}
    assert cloned == {"blocks.0.ffn._counts", "blocks.1.ffn._counts"}  # not ema, not rope


def test_batches_go_to_a_gpu_from_pinned_memory(monkeypatch):
    from moelab.train.trainer import batch_to

    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, device, non_blocking=False:
                        calls.append(("to", str(device), non_blocking)) or t)
    batch_to(torch.device("cuda"), torch.zeros(2), torch.zeros(2))
    assert calls == ["pin", ("to", "cuda", True)] * 2
    calls.clear()
    batch_to(torch.device("cpu"), torch.zeros(2))
    assert calls == [("to", "cpu", False)]


def test_a_compiled_model_does_not_recompile_to_evaluate(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    from moelab.distributed import wrap
    from moelab.train.trainer import Trainer

    monkeypatch.setattr(wrap, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    try:
        tr = Trainer(tiny("train.steps=4", "train.eval_every=2", "train.log_every=2",
                          "train.compile=true"), tmp_path / "run", quiet=True)
        tr.fit(max_steps=1)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        tr.fit(max_steps=3)  # an evaluation at step 2, then a training step again
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()


def test_capacity_dropped_rows_are_not_computed_by_the_loop(monkeypatch):
    """The loop runs the kept rows only (test_moe's loop-vs-grouped test checks that the
    outputs and every gradient still equal the grouped path's, which computes them)."""
    import moelab.moe.experts as experts_module

    layer = moe_layer(dispatch="loop", capacity_factor=0.5)
    x = torch.randn(24, 16)
    rows, real = [], experts_module.expert_loop

    def counting(x_TD, w_in, w_out, weights, token_idx, *args):
        rows.append(token_idx.numel())
        return real(x_TD, w_in, w_out, weights, token_idx, *args)

    monkeypatch.setattr(experts_module, "expert_loop", counting)
    layer(x)
    capacity = dispatch.expert_capacity(0.5, 24, 2, 4)  # 6 of 48 assignments per expert
    kept = int(layer.last_stats.tokens_per_expert.clamp(max=capacity).sum())
    assert rows == [kept] and kept < 24 * 2
    assert layer.last_stats.dropped_frac == (48 - kept) / 48
