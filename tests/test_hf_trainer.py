"""moelab's methods inside ``transformers.Trainer``: a patched model plus an Excitation-hooked
optimizer passed as ``optimizers=(opt, scheduler)``, on one process and under accelerate's DDP on
gloo ranks; and the optimizer hooked before FSDP2 shards the model (accelerate's FSDP2 order)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_tiny import VOCAB, tiny_model  # noqa: E402
from test_distributed import spawn  # noqa: E402

from moelab.hf import Excitation, MoelabCallback, patch, patched_blocks  # noqa: E402
from moelab.methods.default_moe import DefaultMoEConfig  # noqa: E402
from moelab.methods.momentum import MomentumConfig  # noqa: E402

SEQ = 8
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


class Tokens(torch.utils.data.Dataset):
    """32 fixed random sequences of SEQ tokens, each its own labels."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, VOCAB, (32, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def patched(excitation: bool = True):
    """A tiny Mixtral with Default MoE and learnable heavy-ball momentum, SGD (lr 0.5) and,
    optionally, zero-sum Excitation hooked onto it. HF's own aux loss (each rank's batch's) is
    off, so several ranks train what one process does."""
    model = tiny_model("mixtral", router_aux_loss_coef=0.0).train()
    patch(model, default_moe=DefaultMoEConfig(beta=0.5),
          momentum=MomentumConfig("heavy_ball", learnable=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    exc = Excitation(opt, model, strategy="zero_sum") if excitation else None
    return model, opt, exc


def hf_trainer(model, opt, out, *, batch: int, steps: int):
    from transformers import Trainer, TrainingArguments

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch,
                             max_steps=steps, use_cpu=True, report_to=[], logging_steps=1,
                             save_strategy="no", disable_tqdm=True, seed=0,
                             ddp_backend="gloo" if ranks > 1 else None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched))


def test_methods_inside_transformers_trainer(tmp_path, one_thread):
    """One step from the same weights and batch with and without Excitation: every expert's
    update is Φ_k times the plain one; Default MoE's EMA moved; the second layer's μ moved (it
    multiplies the momentum carried from the first) while the first's, which sees none, did
    not; the routing numbers reach the Trainer's log."""
    start, _, _ = patched(excitation=False)
    plain, plain_opt, _ = patched(excitation=False)
    hf_trainer(plain, plain_opt, tmp_path / "plain", batch=4, steps=1).train()
    model, opt, exc = patched()
    trainer = hf_trainer(model, opt, tmp_path / "exc", batch=4, steps=1)
    MoelabCallback(exc).attach(trainer)
    trainer.train()
    blocks = zip(patched_blocks(start), patched_blocks(plain), patched_blocks(model), strict=True)
    for (name, b0), (_, bp), (_, be) in blocks:
        phi = exc.last_multipliers[name]
        assert phi.std() > 0.1  # Φ is not 1 everywhere
        for attr in ("gate_up_proj", "down_proj"):
            w0 = getattr(b0.experts, attr).detach()
            delta_plain = getattr(bp.experts, attr).detach() - w0
            delta_exc = getattr(be.experts, attr).detach() - w0
            assert torch.allclose(delta_exc, phi.view(-1, 1, 1) * delta_plain, atol=1e-6)
        assert be.moelab.method.n_updates.min() > 0 and be.moelab.method.ema.abs().sum() > 0
    mu0 = start.moelab_momentum.mu.detach()
    mu = model.moelab_momentum.mu.detach()
    assert mu[0] == mu0[0] and abs(mu[1] - mu0[1]) > 1e-4
    record = trainer.state.log_history[0]
    assert record["moe/model.layers.0.mlp/phi_max"] == pytest.approx(
        float(exc.last_multipliers["model.layers.0.mlp"].max()))
    assert record["moe/model.layers.1.mlp/default_ema_norm"] > 0
    assert record["moe/momentum_mu_1"] == pytest.approx(float(mu[1]))


# ---------------------------------------------------------------------------- several ranks


def _ddp_worker(rank: int, world: int, out: str, ref_path: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    model, opt, exc = patched()
    trainer = hf_trainer(model, opt, out, batch=2, steps=2)
    MoelabCallback(exc).attach(trainer)
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
    for name, counts in exc.last_counts.items():  # the global batch's: 2 ranks x 2 rows
        assert counts.sum() == world * 2 * SEQ * 2, name
    ref = torch.load(ref_path, weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.allclose(value, ref["hf"][name], rtol=1e-4, atol=1e-6), name
    for name, block in patched_blocks(model):
        assert torch.allclose(block.moelab.method.ema, ref["ema"][name], atol=1e-6), name


@needs_gloo
def test_accelerate_ddp_on_gloo_matches_one_process(tmp_path):
    """accelerate's DDP on 2 gloo ranks (2 rows each) equals one process on 4 rows: the same
    weights, Default MoE EMA and global Excitation counts."""
    from transformers.trainer_utils import set_seed

    set_seed(0)
    model, opt, exc = patched()
    trainer = hf_trainer(model, opt, tmp_path / "one", batch=4, steps=2)
    MoelabCallback(exc).attach(trainer)
    trainer.train()
    ref = {"hf": model.state_dict(),
           "ema": {name: b.moelab.method.ema for name, b in patched_blocks(model)}}
    torch.save(ref, tmp_path / "ref.pt")
    spawn(2, tmp_path, _ddp_worker, str(tmp_path / "ddp"), str(tmp_path / "ref.pt"))


def _sharded_after_hooking_worker(rank: int, world: int, ref_path: str) -> None:
    """What accelerate's FSDP2 does on GPUs: the optimizer (with Excitation) is built first,
    then fully_shard replaces the parameters and the optimizer's groups are switched to the
    new ones by name."""
    from torch.distributed.fsdp import fully_shard

    from moelab.distributed.ddp_ep import enable_global_stats

    model, opt, exc = patched()
    names = {id(p): n for n, p in model.named_parameters()}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    new = dict(model.named_parameters())
    for group in opt.param_groups:
        group["params"] = [new[names[id(p)]] for p in group["params"]]
    enable_global_stats(model)
    exc.all_reduce_counts = True
    ids = Tokens().ids[:4]
    mine = ids[2 * rank:2 * rank + 2]
    model(input_ids=mine, labels=mine).loss.backward()
    opt.step()
    ref = torch.load(ref_path, weights_only=True)
    for name, value in model.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        assert torch.allclose(value, ref[name], rtol=1e-4, atol=1e-6), name


@needs_gloo
def test_excitation_hooked_before_fsdp2_shards_the_model(tmp_path):
    """One step on 2 gloo ranks with the optimizer hooked before sharding equals one process:
    Excitation follows the replaced parameters and rescales each rank's shard."""
    model, opt, exc = patched()
    ids = Tokens().ids[:4]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert torch.cat(list(exc.last_multipliers.values())).std() > 0.1
    torch.save(model.state_dict(), tmp_path / "ref.pt")
    spawn(2, tmp_path, _sharded_after_hooking_worker, str(tmp_path / "ref.pt"))
