"""FSDP2 (``train.parallel = "fsdp"``) on gloo CPU ranks: Excitation on DTensor shards by hand,
the mixed-precision policy, whole runs equal to one process at 2 and 4 ranks with and without
expert parallelism (every method on), resharding resume (2 -> 4, 4 -> 2), a killed rank, and a
sharded run read back on one process (eval, report, export)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import assert_same_run, run_dist, spawn, tiny_all, train_log
from torch import nn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

FSDP = "train.parallel=fsdp"


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The one-process run every sharded run must equal (test_distributed's TINY_ALL: all
    three methods, gradient accumulation, clipping)."""
    from moelab.train.trainer import Trainer

    run = tmp_path_factory.mktemp("single") / "run"
    Trainer(tiny_all(), run, quiet=True).fit()
    return run


# ---------------------------------------------------------------------------- units


def _sgd_expected(w0: torch.Tensor, g: torch.Tensor, phi: torch.Tensor, lr: float,
                  wd: float) -> torch.Tensor:
    """θ + Φ_k δ_k with SGD's δ = -lr (g + wd θ), written out on the full tensor."""
    return w0 - lr * phi.view(-1, *([1] * (w0.dim() - 1))) * (g + wd * w0)


def _as_grad(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as the DTensor ``p`` is (every rank holds the same ``full``)."""
    from torch.distributed.tensor import DTensor, Replicate

    whole = DTensor.from_local(full, p.device_mesh, [Replicate()] * p.device_mesh.ndim,
                               run_check=False)
    return whole.redistribute(p.device_mesh, p.placements)


def _units_worker(rank: int, world: int, run_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    from moelab.distributed.fsdp import DP_REPLICA, DP_SHARD, EP, build_mesh
    from moelab.methods.excitation import Excitation

    mesh = build_mesh(world, 2, "cpu")  # [2 replicas, 2 expert-parallel ranks]
    g = torch.Generator().manual_seed(0)
    full_a, full_b = torch.randn(3, 4, 2, generator=g), torch.randn(4, 2, 3, generator=g)
    grad_a, grad_b = torch.randn(3, 4, 2, generator=g), torch.randn(4, 2, 3, generator=g)
    # a: 3 experts over 4 ranks (1, 1, 1, 0 rows: uneven, one rank holds none);
    # b: 4 experts split over "ep" (2 each), then over their 2 replicas (1 each)
    dense = nn.Module()
    dense.a = nn.Parameter(full_a.clone())
    fully_shard(dense, mesh=mesh[DP_SHARD])
    experts = nn.Module()
    ep_rank = rank % 2
    experts.b = nn.Parameter(DTensor.from_local(full_b[2 * ep_rank:2 * ep_rank + 2].clone(),
                                                mesh[EP], [Shard(0)], run_check=False))
    fully_shard(experts, mesh=mesh[DP_REPLICA])
    assert dense.a.to_local().shape[0] == (0 if rank == 3 else 1)
    assert experts.b.to_local().shape[0] == 1 and experts.b.shape == full_b.shape
    lr, wd = 0.1, 0.01
    opt = torch.optim.SGD([dense.a, experts.b], lr=lr, weight_decay=wd)
    exc = Excitation(opt, strategy="zero_sum", gamma=1.0)
    counts_a, counts_b = torch.tensor([6.0, 3.0, 0.0]), torch.tensor([1.0, 2.0, 3.0, 6.0])
    exc.add_expert_group(batched_params=[dense.a], token_counts=lambda: counts_a, name="a",
                         batched_owner=dense)
    exc.add_expert_group(batched_params=[experts.b], token_counts=lambda: counts_b, name="b",
                         batched_owner=experts)
    dense.a.grad, experts.b.grad = _as_grad(grad_a, dense.a), _as_grad(grad_b, experts.b)
    opt.step()
    # u^γ / mean(u^γ): a = [6, 3, 0] / 3 (Φ = 1 is left out on CPU, Φ = 0 restores θ),
    # b = [1, 2, 3, 6] / 3
    phi_a, phi_b = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 2.0, 3.0, 6.0]) / 3
    assert torch.allclose(exc.last_multipliers["a"], phi_a)
    assert torch.allclose(exc.last_multipliers["b"], phi_b)
    assert torch.allclose(dense.a.full_tensor(), _sgd_expected(full_a, grad_a, phi_a, lr, wd),
                          atol=1e-6)
    assert torch.allclose(experts.b.full_tensor(), _sgd_expected(full_b, grad_b, phi_b, lr, wd),
                          atol=1e-6)
    assert torch.equal(dense.a.full_tensor()[2], full_a[2])  # Φ = 0: bit for bit
    # sharded along another dim: an expert's rows on several ranks -> a clear error
    other = nn.Module()
    other.c = nn.Parameter(full_a.clone())
    fully_shard(other, mesh=mesh[DP_SHARD], shard_placement_fn=lambda p: Shard(1))
    opt2 = torch.optim.SGD([other.c], lr=lr)
    exc2 = Excitation(opt2, strategy="zero_sum")  # hooked while referenced
    exc2.add_expert_group(batched_params=[other.c], token_counts=lambda: counts_a, name="c")
    other.c.grad = _as_grad(grad_a, other.c)
    with pytest.raises(ValueError, match=r"Excitation \(c\).*along dim 0"):
        opt2.step()
    _bf16_policy(run_dir)


def _bf16_policy(run_dir: str) -> None:
    """train.precision=bf16 under FSDP: blocks compute with bf16 parameters; the sharded
    parameters, their gradients and AdamW's state stay fp32."""
    from moelab.train.trainer import Trainer

    trainer = Trainer(tiny_all(FSDP, "train.precision=bf16", "train.grad_accum=1"), run_dir,
                      quiet=True)
    seen = []
    qkv = trainer.model.blocks[0].attn.qkv
    qkv.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    res = trainer.train_step()
    assert seen == [torch.bfloat16] and torch.isfinite(torch.tensor(res["loss"]))
    assert qkv.weight.dtype == torch.float32
    state = trainer.optimizer.state[qkv.weight]
    assert state["exp_avg"].dtype == torch.float32 and type(state["exp_avg"]).__name__ == "DTensor"


def test_excitation_on_shards_and_bf16_policy(tmp_path):
    """Φ·δ applied to each rank's local rows equals Φ·δ on the full tensor (1-D and 2-D
    meshes, uneven and empty shards), by hand; and the bf16 mixed-precision policy."""
    spawn(4, tmp_path, _units_worker, str(tmp_path / "bf16"))


# ---------------------------------------------------------------------------- runs


def test_fsdp_2_ranks_then_4_matches_one_process(tmp_path, single_run):
    """fsdp without expert parallel: 3 steps on 2 ranks, resumed on 4 ranks (the checkpoint
    resharded), equals one process; the sharded run reads back on one process."""
    run = tmp_path / "fsdp"
    run_dist(tmp_path, 2, run, FSDP, max_steps=3)
    assert (run / "ckpt.shards" / "step-000003" / ".metadata").is_file()
    run_dist(tmp_path, 4, run, resume=True)
    assert_same_run(run, single_run, 4, 1)
    assert [p.name for p in (run / "ckpt.shards").iterdir()] == ["step-000006"]
    _read_on_one_process(run, single_run, tmp_path)


def _read_on_one_process(run, ref, tmp_path) -> None:
    """`moelab eval`, `moelab report` and `moelab export` of a sharded run, on one process."""
    from moelab.cli import main
    from moelab.models import build_model
    from moelab.runs.sharded_checkpoint import full_state
    from moelab.train.trainer import load_trained

    final = [e for e in train_log(ref)[2] if e.get("final")][0]
    trainer = load_trained(run)
    assert trainer.step == 6 and trainer.ctx is None
    assert trainer.evaluate("val", 2)["val_loss"] == pytest.approx(final["val_loss"], rel=1e-4)
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert main(["export", str(run), str(tmp_path / "model.pt")]) == 0
    plain = torch.load(tmp_path / "model.pt", weights_only=True)
    stored = full_state(run)["model"]
    assert plain.keys() == stored.keys()
    assert all(torch.equal(plain[k], stored[k]) for k in plain)
    build_model(trainer.cfg.model, **trainer.data.model_kwargs()).load_state_dict(plain)


def test_fsdp_expert_parallel_4_ranks_then_1_then_2_matches_one_process(tmp_path, single_run):
    """fsdp with expert parallel 2 over a 2x2 mesh (activation checkpointing on) for 2 steps,
    resumed on one process (every expert there) for 2, then on 2 ranks (a 1x2 mesh): equals
    one process."""
    from moelab.train.trainer import Trainer

    run = tmp_path / "fsdp-ep"
    run_dist(tmp_path, 4, run, FSDP, "train.expert_parallel=2",
             "model.activation_checkpointing=true", max_steps=2)
    alone = Trainer.resume(run, quiet=True)
    assert alone.ctx is None and alone.cfg.train.expert_parallel == 1 and alone.step == 2
    alone.fit(max_steps=4)
    assert (run / "ckpt.shards" / "step-000004" / ".metadata").is_file()
    run_dist(tmp_path, 2, run, resume=True)
    assert_same_run(run, single_run, 2, 2)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_padded_expert_parallel_trainer_matches_one_process(tmp_path, single_run, parallel):
    """dispatch='padded' (T static slots per expert: equal all-to-all splits, no count
    exchange, no host read) under DDP+EP and FSDP+EP on 2 ranks, activation checkpointing on
    (the recompute exchanges again): the dropless one-process run (expert loop), in every
    loss, gradient norm, evaluation and final weight."""
    run = tmp_path / f"{parallel}-padded"
    run_dist(tmp_path, 2, run, f"train.parallel={parallel}", "train.expert_parallel=2",
             "model.moe.dispatch=padded", "model.activation_checkpointing=true")
    assert_same_run(run, single_run, 2, 2)


def _kill_rank1_in_second_save(rank: int, world: int, run_dir: str) -> None:
    """Rank 1 dies (SIGKILL) while it writes its shards of the second checkpoint."""
    from torch.distributed.checkpoint import filesystem

    from moelab.train.trainer import Trainer

    if rank == 1:
        write = filesystem.FileSystemWriter.write_data
        calls = []

        def dying_write(self, plan, planner):
            calls.append(1)
            if len(calls) == 2:
                (filesystem.Path(self.path) / "__1_0.distcp").write_bytes(b"partial")
                os.kill(os.getpid(), signal.SIGKILL)
            return write(self, plan, planner)

        filesystem.FileSystemWriter.write_data = dying_write
    Trainer(tiny_all(FSDP, "train.expert_parallel=2"), run_dir, quiet=True).fit()


def test_killed_rank_leaves_the_last_complete_checkpoint(tmp_path, single_run):
    """A rank killed while writing the step-6 checkpoint: ckpt.pt still names step 3,
    which loads on one process, and the run resumes on 2 ranks to the same end."""
    from moelab.train.trainer import load_trained

    run = tmp_path / "killed"
    with pytest.raises(mp.ProcessExitedException):
        spawn(2, tmp_path, _kill_rank1_in_second_save, str(run))
    assert (run / "ckpt.shards" / "step-000006").is_dir()  # the save that was cut short
    assert load_trained(run).step == 3
    run_dist(tmp_path, 2, run, resume=True)
    assert_same_run(run, single_run, 2, 2)


# ---------------------------------------------------------------------------- bf16 numerics


@pytest.fixture(scope="module")
def single_bf16_run(tmp_path_factory):
    """One process under bf16 autocast, every method on: what FSDP's bf16 policy must equal."""
    from moelab.train.trainer import Trainer

    run = tmp_path_factory.mktemp("single-bf16") / "run"
    Trainer(tiny_all("train.precision=bf16"), run, quiet=True).fit()
    return run


def _bf16_dtypes_worker(rank: int, world: int, run_dir: str, ep: int) -> None:
    """Under FSDP's bf16 policy the router (input and weight), the routing weights handed to
    the experts and the residual stream / MomentumSMoE state stay fp32, as under one-GPU
    autocast; the experts compute in bf16."""
    from moelab.moe.layer import MoELayer
    from moelab.train.trainer import Trainer

    trainer = Trainer(tiny_all(FSDP, "train.precision=bf16", f"train.expert_parallel={ep}"),
                      run_dir, quiet=True)
    seen: dict[str, set] = {k: set() for k in ("router", "routing", "state", "expert_w")}
    for layer in [m for m in trainer.model.modules() if isinstance(m, MoELayer)]:
        layer.router.register_forward_pre_hook(lambda m, a: seen["router"].update(
            {a[0].dtype, m.weight.dtype}))
        layer.experts.register_forward_pre_hook(lambda m, a: seen["routing"].add(
            a[1].weights.dtype))
    rule = trainer.model.combine_rule

    def combine(h, f, state, i, _orig=rule.combine):
        seen["state"].update({h.dtype, *(s.dtype for s in state)})
        return _orig(h, f, state, i)

    rule.combine = combine
    qkv = trainer.model.blocks[0].attn.qkv
    qkv.register_forward_pre_hook(lambda m, a: seen["expert_w"].add(m.weight.dtype))
    trainer.fit()
    assert seen["router"] == seen["routing"] == seen["state"] == {torch.float32}, seen
    assert seen["expert_w"] == {torch.bfloat16}  # the policy still gathers bf16 weights


@pytest.mark.parametrize("ep", [1, 2])
def test_fsdp_bf16_equals_one_process_under_autocast(tmp_path, single_bf16_run, ep):
    """FSDP with the bf16 policy on 2 ranks (every method on, gradient accumulation: the
    reduce-scatter of the last micro-batch only) follows the one-process bf16 autocast run to
    bf16 accuracy, with fp32 routing and state."""
    run = tmp_path / "fsdp-bf16"
    spawn(2, tmp_path, _bf16_dtypes_worker, str(run), ep)
    got, ref = train_log(run), train_log(single_bf16_run)
    assert len(got[0]) == len(ref[0]) == 6
    for a, b in zip(got[0], ref[0], strict=True):
        assert a == pytest.approx(b, rel=1e-2), (got[0], ref[0])
    for a, b in zip(got[1], ref[1], strict=True):  # grad norms
        assert a == pytest.approx(b, rel=5e-2), (got[1], ref[1])


def _compiled_worker(rank: int, world: int, run_dir: str) -> None:
    from moelab.distributed import wrap
    from moelab.train.trainer import Trainer

    wrap.COMPILE_BACKEND = "aot_eager"
    trainer = Trainer(tiny_all(FSDP, "train.precision=bf16", "train.compile=true",
                               "train.steps=2", "train.grad_accum=1"), run_dir, quiet=True)
    assert trainer.fit()["step"] == 2


def test_compiled_blocks_train_under_fsdp_bf16(tmp_path):
    """Compiled blocks (fullgraph) under FSDP's bf16 policy: no nested FSDP unit inside a
    compiled block (its hooks would break the graph)."""
    spawn(2, tmp_path, _compiled_worker, str(tmp_path / "run"))


def test_fsdp_automatic_beta_matches_one_process(tmp_path):
    """beta='tokens' under FSDP takes each expert's global token count (the layer's stats
    reducer): 2 ranks equal one process, Ê and the logged betas included."""
    from moelab.train.trainer import Trainer

    extra = ('model.default_moe.beta="tokens"', "model.default_moe.horizon=64")
    ref = tmp_path / "single"
    Trainer(tiny_all(*extra), ref, quiet=True).fit()
    run = tmp_path / "fsdp"
    run_dist(tmp_path, 2, run, FSDP, *extra)
    assert_same_run(run, ref, 2, 1)
    betas = [b for e in train_log(run)[2] for row in e["default_moe"] for b in row["beta"]]
    ref_betas = [b for e in train_log(ref)[2] for row in e["default_moe"] for b in row["beta"]]
    assert betas == pytest.approx(ref_betas, rel=1e-5) and min(ref_betas) < 1.0
