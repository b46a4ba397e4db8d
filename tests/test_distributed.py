"""Data and expert parallelism on gloo: N spawned CPU processes (1 thread each) against one.

Every worker builds the single-process reference itself (same seed) and asserts inside; a
failed assertion in any rank fails the test through ``torch.multiprocessing.spawn``.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelab.distributed.ddp_ep import (
    all_to_all,
    enable_global_stats,
    make_context,
    shard_experts,
    sync_expert_grads,
)
from moelab.methods.default_moe import DefaultMoE, DefaultMoEConfig
from moelab.moe import MoEConfig, MoELayer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _entry(rank: int, world: int, init_file: str, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        dist.destroy_process_group()
        raise  # spawn hands the traceback to the test
    # A rank sometimes died with SIGABRT ("terminate called without an active exception")
    # after its work had passed: gloo's C++ threads still releasing tensors while the
    # interpreter shut down. So: free the cyclic garbage holding tensors (a Trainer lives in
    # reference cycles), leave together, tear the group down (joining gloo's threads) while
    # the interpreter is fully alive, and skip interpreter finalization.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(world: int, tmp_path: Path, fn, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks."""
    # a fresh rendezvous file per launch: a FileStore file left by an earlier group (it is
    # removed asynchronously) would hand the new ranks stale keys
    init_file = tmp_path / f"pg-{fn.__name__}-{world}-{uuid.uuid4().hex}"
    mp.spawn(_entry, args=(world, str(init_file), fn, args), nprocs=world, join=True)


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 2e-5) -> None:
    assert torch.allclose(a, b, rtol=tol, atol=tol), \
        f"rank {dist.get_rank()}: {what} differs by {(a - b).abs().max().item():.3g}"


# ---------------------------------------------------------------------------- all_to_all


def _all_to_all_worker(rank: int, world: int) -> None:
    # rank r sends (j + 1) rows to rank j, each row = [r, j]; so it receives (r + 1) from each
    in_splits = [j + 1 for j in range(world)]
    out_splits = [rank + 1] * world
    rows = torch.tensor([[rank, j] for j in range(world) for _ in range(j + 1)],
                        dtype=torch.float, requires_grad=True)
    got = all_to_all(rows, out_splits, in_splits, None)
    want = torch.tensor([[src, rank] for src in range(world) for _ in range(rank + 1)],
                        dtype=torch.float)
    assert torch.equal(got, want), got
    # backward routes each row's gradient back to where the row came from
    weight = torch.arange(got.numel(), dtype=torch.float).view_as(got) + 100 * rank
    (got * weight).sum().backward()
    back = torch.empty_like(rows)
    dist.all_to_all_single(back, weight, in_splits, out_splits)
    assert torch.equal(rows.grad, back)


@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_uneven_splits_and_backward(tmp_path, world):
    spawn(world, tmp_path, _all_to_all_worker)


# ---------------------------------------------------------------------------- EP layer


def _ep_layer_worker(rank: int, world: int, ep: int, default_moe: bool | str,
                     dispatch: tuple[str, str] = ("auto", "auto")) -> None:
    """``default_moe``: off, on (beta 0.5, scored) or an automatic beta rule's name;
    ``dispatch``: the sharded layer's and the one-process reference's."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, n_experts=8, top_k=2, d_ff=8, aux_loss_coef=0.1,
                    z_loss_coef=0.01, dispatch=dispatch[1])
    dm = (DefaultMoEConfig(beta=default_moe, horizon=8.0) if isinstance(default_moe, str)
          else DefaultMoEConfig(beta=0.5, scored=True))
    method = DefaultMoE(cfg, dm) if default_moe else None
    ref = MoELayer(cfg, method=method)
    layer = copy.deepcopy(ref)
    if dispatch[0] != dispatch[1]:
        cfg = dataclasses.replace(cfg, dispatch=dispatch[0])
        layer = MoELayer(cfg, method=DefaultMoE(cfg, dm) if default_moe else None)
        layer.load_state_dict(ref.state_dict())
    ctx = make_context(ep)
    shard_experts(layer, ctx)
    enable_global_stats(layer)
    n_tokens = 12 * world
    rows = slice(rank * 12, (rank + 1) * 12)
    n_local = cfg.n_experts // ep
    experts = slice(ctx.ep_rank * n_local, (ctx.ep_rank + 1) * n_local)
    for step in range(2):  # the second step uses the Ê the first one stored
        g = torch.Generator().manual_seed(step)
        x = torch.randn(n_tokens, cfg.d_model, generator=g)
        upstream = torch.randn(n_tokens, cfg.d_model, generator=g)
        for m in (ref, layer):
            m.zero_grad(set_to_none=True)
        # reference objective: the global batch's mean-style loss
        x_ref = x.clone().requires_grad_()
        out = ref(x_ref)
        ((out.y * upstream).sum() / world + out.losses.total).backward()
        # each rank: its shard, its own loss; gradients averaged over ranks as DDP would
        x_loc = x[rows].clone().requires_grad_()
        o = layer(x_loc)
        ((o.y * upstream[rows]).sum() + o.losses.total).backward()
        close(o.y, out.y[rows], f"step {step} output")
        close(x_loc.grad, x_ref.grad[rows] * world, f"step {step} input grad")
        total = o.losses.total.detach().clone()
        dist.all_reduce(total)
        close(total / world, out.losses.total.detach(), f"step {step} router losses")
        router_grad = layer.router.weight.grad.clone()
        dist.all_reduce(router_grad)
        close(router_grad / world, ref.router.weight.grad, f"step {step} router grad")
        if ep > 1:
            sync_expert_grads(list(layer.experts.parameters()), ctx)
            local = layer.experts.local
        else:  # replicated experts: averaged like every other parameter
            local = layer.experts
            for p in local.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        close(local.w_in.grad, ref.experts.w_in.grad[experts], f"step {step} w_in grad")
        close(local.w_out.grad, ref.experts.w_out.grad[experts], f"step {step} w_out grad")
        if default_moe:
            close(layer.method.ema, ref.method.ema, f"step {step} default Ê")
            assert torch.equal(layer.method.n_updates, ref.method.n_updates)
            # beta from the global counts: the one-process run's
            close(layer.method.beta_E, ref.method.beta_E, f"step {step} beta")
            close(layer.method.horizon_E, ref.method.horizon_E, f"step {step} horizon")
        stats = layer.last_stats.tokens_per_expert.clone()
        dist.all_reduce(stats)
        assert torch.equal(stats, ref.last_stats.tokens_per_expert)
        if dispatch[0] == "padded" and ep > 1:  # equal splits of E/P experts x C = 12 slots
            assert layer.experts.last_send_splits == [cfg.n_experts // ep * 12] * ep


@pytest.mark.parametrize("world,ep,default_moe", [
    (2, 2, False),
    (2, 2, True),
    (4, 4, True),
    (4, 2, True),   # two replicas of each expert shard
    (2, 1, True),   # plain data parallel: global balance loss and Ê
    (2, 2, "tokens"),  # automatic beta from the global token counts
    (2, 1, "warmup"),
])
def test_expert_parallel_layer_matches_single_process(tmp_path, world, ep, default_moe):
    spawn(world, tmp_path, _ep_layer_worker, ep, default_moe)


@pytest.mark.parametrize("dispatch", [("padded", "padded"), ("padded", "loop")])
def test_padded_expert_parallel_layer_matches_single_process(tmp_path, dispatch):
    """Dropless dispatch='padded': equal splits of T slots per expert (no count exchange),
    equal to one process over the global batch, padded or not."""
    spawn(2, tmp_path, _ep_layer_worker, 2, True, dispatch)


def _ep_capacity_worker(rank: int, world: int) -> None:
    """With a capacity (static slots C), each rank's padded exchange equals the unsharded
    layer run on that rank's tokens alone (same drops; no global statistics here): output,
    every gradient, Default MoE's EMA and the expert output norms; under activation
    checkpointing (the recompute exchanges again and updates nothing twice)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, n_experts=8, top_k=2, d_ff=8, capacity_factor=0.75,
                    aux_loss_coef=0.1, z_loss_coef=0.01)
    ref = MoELayer(cfg, method=DefaultMoE(cfg, DefaultMoEConfig(beta=0.5, scored=True)))
    layer = copy.deepcopy(ref)
    ctx = make_context(world)
    shard_experts(layer, ctx)
    ref.track_out_norm = layer.track_out_norm = True
    n_local = cfg.n_experts // world
    experts = slice(rank * n_local, (rank + 1) * n_local)
    for step in range(2):
        g = torch.Generator().manual_seed(10 * step + rank)
        x = torch.randn(12, cfg.d_model, generator=g)
        upstream = torch.randn(12, cfg.d_model, generator=g)
        for m in (ref, layer):
            m.zero_grad(set_to_none=True)
        x_ref = x.clone().requires_grad_()
        out = ref(x_ref)
        ((out.y * upstream).sum() + out.losses.total).backward()
        assert ref.last_stats.dropped_frac > 0
        x_loc = x.clone().requires_grad_()
        o = checkpoint(layer, x_loc, use_reentrant=False)
        ((o.y * upstream).sum() + o.losses.total).backward()
        capacity = 3  # ceil(0.75 * 12 * 2 / 8) slots per expert, 4 experts per rank
        assert layer.experts.last_send_splits == [n_local * capacity] * world
        close(o.y, out.y, f"step {step} output")
        close(x_loc.grad, x_ref.grad, f"step {step} input grad")
        close(layer.router.weight.grad, ref.router.weight.grad, f"step {step} router grad")
        sync_expert_grads(list(layer.experts.parameters()), ctx)
        for name in ("w_in", "w_out"):
            want = getattr(ref.experts, name).grad.clone()
            dist.all_reduce(want)
            close(getattr(layer.experts.local, name).grad, want[experts] / world,
                  f"step {step} {name} grad")
        close(layer.method.ema, ref.method.ema, f"step {step} default Ê")
        assert torch.equal(layer.method.n_updates, ref.method.n_updates)
        torch.testing.assert_close(layer.last_stats.expert_out_norm,
                                   ref.last_stats.expert_out_norm, equal_nan=True)
        assert layer.last_stats.dropped_frac == ref.last_stats.dropped_frac


def test_padded_expert_parallel_with_a_capacity_matches_each_ranks_tokens_alone(tmp_path):
    spawn(2, tmp_path, _ep_capacity_worker)


def _ep_idle_shard_worker(rank: int, world: int, ep: int) -> None:
    """Every token picks experts 0-3, so the ranks holding 4-7 receive no rows (loop
    backend: their expert weights get no gradient at all in backward)."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, n_experts=8, top_k=2, d_ff=8, dispatch="loop")
    ref = MoELayer(cfg)
    with torch.no_grad():
        ref.router.weight[:4, 0] = 10.0
        ref.router.weight[4:, 0] = -10.0
    layer = copy.deepcopy(ref)
    ctx = make_context(ep)
    shard_experts(layer, ctx)
    x = torch.randn(6 * world, cfg.d_model, generator=torch.Generator().manual_seed(1))
    x[:, 0] = 3.0
    (ref(x).y.sum() / world).backward()
    layer(x[rank * 6:(rank + 1) * 6]).y.sum().backward()
    sync_expert_grads(list(layer.experts.parameters()), ctx)  # must not hang or skip
    n_local = cfg.n_experts // ep
    held = slice(ctx.ep_rank * n_local, (ctx.ep_rank + 1) * n_local)
    ref_w_in = ref.experts.w_in.grad
    close(layer.experts.local.w_in.grad,
          torch.zeros_like(ref_w_in[held]) if ref_w_in is None else ref_w_in[held], "w_in grad")


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2)])
def test_expert_shard_without_tokens_gets_zero_grads(tmp_path, world, ep):
    spawn(world, tmp_path, _ep_idle_shard_worker, ep)


def _ep_errors_worker(rank: int, world: int) -> None:
    try:
        make_context(3)
    except ValueError as e:
        assert "expert_parallel=3" in str(e)
    else:
        raise AssertionError("make_context(3) on 2 ranks did not raise")
    layer = MoELayer(MoEConfig(d_model=4, n_experts=3, top_k=1, d_ff=4))
    try:
        shard_experts(layer, make_context(2))
    except ValueError as e:
        assert "n_experts=3" in str(e)
    else:
        raise AssertionError("sharding 3 experts over 2 ranks did not raise")


def test_expert_parallel_errors(tmp_path):
    spawn(2, tmp_path, _ep_errors_worker)


# ---------------------------------------------------------------------------- Trainer

# tiny LM with every method on (Default MoE, MomentumSMoE, Excitation), clipping, accumulation
TINY_ALL = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.moe.n_experts=4",
    "model.moe.top_k=2", "model.moe.d_ff=32", "model.max_seq_len=32", "model.default_moe.beta=0.9",
    "model.momentum.rule=heavy_ball", "optim.excitation.strategy=zero_sum",
    "data.seq_len=32", "data.batch_size=8", "data.eval_batches=2", "data.final_eval_batches=2",
    "optim.lr=3e-3", "optim.warmup_steps=2", "optim.grad_clip=0.5",
    "train.steps=6", "train.eval_every=3", "train.log_every=1", "train.checkpoint_every=3",
    "train.threads=1", "train.grad_accum=2",
]


def tiny_all(*extra: str):
    from moelab.config import apply_overrides, config_from_dict, config_to_dict, load_config

    data = config_to_dict(load_config("default"))
    data["name"] = "tiny"
    return config_from_dict(apply_overrides(data, [*TINY_ALL, *extra]))


def _trainer_worker(rank: int, world: int, run_dir: str, extra: tuple[str, ...],
                    max_steps: int | None, resume: bool) -> None:
    from moelab.train.trainer import Trainer

    if resume:
        trainer = Trainer.resume(run_dir, quiet=True)
    else:
        trainer = Trainer(tiny_all(*extra), run_dir, quiet=True)
    trainer.fit(max_steps=max_steps)


def run_dist(tmp_path: Path, world: int, run_dir: Path, *extra: str,
             max_steps: int | None = None, resume: bool = False) -> None:
    spawn(world, tmp_path, _trainer_worker, str(run_dir), extra, max_steps, resume)


def train_log(run_dir: Path) -> tuple[list[float], list[float], list[dict]]:
    from moelab.runs.directory import read_metrics

    entries = read_metrics(run_dir)
    train = [e for e in entries if e["kind"] == "train"]
    evals = [e for e in entries if e["kind"] == "eval"]
    return [e["loss"] for e in train], [e["grad_norm"] for e in train], evals


def full_state(run_dir: Path, world: int, ep: int) -> dict[str, torch.Tensor]:
    """The model state of a run, expert shards concatenated back into full [E, ...] tensors
    (a sharded run's: read back from its DCP directory)."""
    main = torch.load(run_dir / "ckpt.pt", weights_only=False)
    if "shards" in main:
        from moelab.runs.sharded_checkpoint import full_state as sharded_full_state

        return sharded_full_state(run_dir)["model"]
    states = [main["model"]]
    states += [torch.load(run_dir / f"ckpt.rank{r}.pt", weights_only=False)["model"]
               for r in range(1, ep)]
    out = {}
    for key, value in states[0].items():
        if ".experts.local." in key:
            out[key.replace(".local.", ".")] = torch.cat([s[key] for s in states])
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    from moelab.train.trainer import Trainer

    run = tmp_path_factory.mktemp("single") / "run"
    Trainer(tiny_all(), run, quiet=True).fit()
    return run


def assert_same_run(run: Path, ref: Path, world: int, ep: int) -> None:
    losses, norms, evals = train_log(run)
    ref_losses, ref_norms, ref_evals = train_log(ref)
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert norms == pytest.approx(ref_norms, rel=1e-3)
    assert [e["val_loss"] for e in evals] == pytest.approx(
        [e["val_loss"] for e in ref_evals], rel=1e-4)
    for e, ref_e in zip(evals, ref_evals, strict=True):  # the global batch's multipliers
        for layer, phi in ref_e["excitation"].items():
            assert e["excitation"][layer]["multipliers"] == pytest.approx(
                phi["multipliers"], rel=1e-5)
    state, ref_state = full_state(run, world, ep), full_state(ref, 1, 1)
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        assert torch.allclose(state[key].float(), value.float(), rtol=1e-3, atol=2e-5), key


def test_data_parallel_trainer_matches_one_process(tmp_path, single_run):
    run = tmp_path / "dp"
    run_dist(tmp_path, 2, run)
    assert_same_run(run, single_run, 2, 1)
    assert not list(run.glob("ckpt.rank*"))  # rank 0's checkpoint holds everything
    assert (run / "command.txt").read_text().startswith(
        "torchrun --standalone --nproc_per_node 2 -m moelab")


def test_expert_parallel_trainer_matches_one_process_and_resumes(tmp_path, single_run):
    run = tmp_path / "ep"
    # 2 ranks, stopped after 3 steps, then resumed on 2 ranks to the end; activation
    # checkpointing on (the recompute repeats the all-to-alls, and must not update Ê again)
    run_dist(tmp_path, 2, run, "train.expert_parallel=2", "model.activation_checkpointing=true",
             max_steps=3)
    assert (run / "ckpt.rank1.pt").is_file()
    run_dist(tmp_path, 2, run, resume=True)
    assert_same_run(run, single_run, 2, 2)


def test_expert_parallel_checkpoint_needs_the_same_world_size(tmp_path):
    from moelab.train.trainer import Trainer

    run = tmp_path / "ep"
    run_dist(tmp_path, 2, run, "train.expert_parallel=2", "train.steps=2", max_steps=1)
    with pytest.raises(ValueError, match="expert_parallel=2 is invalid on one process"):
        Trainer.resume(run, quiet=True)
    with pytest.raises(mp.ProcessRaisedException, match="sharded over 2 ranks"):
        run_dist(tmp_path, 4, run, resume=True)


def test_data_parallel_checkpoint_resumes_on_one_process(tmp_path, single_run):
    from moelab.train.trainer import Trainer

    run = tmp_path / "dp"
    run_dist(tmp_path, 2, run, max_steps=3)
    Trainer.resume(run, quiet=True).fit()
    assert_same_run(run, single_run, 1, 1)


def test_expert_parallel_needs_torchrun():
    from moelab.train.trainer import Trainer

    with pytest.raises(ValueError, match="train.expert_parallel=2 is invalid on one process"):
        Trainer(tiny_all("train.expert_parallel=2"), quiet=True)


def test_torchrun_command_line(tmp_path):
    """The README's command: ``torchrun --nproc_per_node 2 -m moelab train ...``."""
    run = tmp_path / "run"
    sets = [a for s in [*TINY_ALL, "train.steps=2", "train.expert_parallel=2"]
            for a in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "moelab", "train", *sets, "--out", str(run), "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0 and re.search(r"[Rr]endezvous|Address already in use", done.stderr):
        # --standalone picks a free port; a port race on a busy machine is not our bug
        shutil.rmtree(run, ignore_errors=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("val ppl") == 1, done.stdout  # rank 0 alone reports
    final = [e for e in train_log(run)[2] if e.get("final")]
    assert len(final) == 1
    from moelab.runs.directory import read_metrics
    from moelab.train.trainer import Trainer

    summary = read_metrics(run)[-1]
    one_process = Trainer(tiny_all(), tmp_path / "unused", quiet=True)
    assert summary["kind"] == "final" and summary["params"] == one_process.n_params
    assert (run / "ckpt.pt").is_file() and (run / "ckpt.rank1.pt").is_file()
