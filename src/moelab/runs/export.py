"""A trained run's model outside moelab's checkpoints (``moelab export RUN_DIR OUT``).

    export("runs/a", "a.pt")          # moelab models: a plain state dict, torch.save
    export("runs/hf", "hf-out/")      # model.kind="hf": save_pretrained (+ moelab_hf.pt)

Any checkpoint one process can read goes: a single-file one, and a sharded FSDP one written
at any world size (``moelab.runs.sharded_checkpoint``), gathered here into full tensors. The state dict
is the one-process model's (expert-parallel shards joined), so
``build_model(cfg.model, ...).load_state_dict(torch.load(OUT))`` restores it.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["export"]


def export(run_dir: str | Path, out: str | Path) -> Path:
    """Write the checkpointed model of ``run_dir`` to ``out`` (see the module docstring);
    returns ``out``. Runs on one process (ValueError under torchrun); raises what
    ``moelab.train.trainer.load_trained`` raises for a missing or unusable checkpoint."""
    from moelab.distributed.ddp_ep import world_size_from_env
    from moelab.train.trainer import load_trained

    if world_size_from_env() > 1:
        raise ValueError("moelab export runs on one process: run it without torchrun (it "
                         "reads a sharded checkpoint of any world size)")
    out = Path(out)
    trainer = load_trained(run_dir)
    if trainer.cfg.model.kind == "hf":
        trainer.model.hf.save_pretrained(out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}, out)
    return out
