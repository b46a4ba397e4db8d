"""A Hugging Face MoE model (``model.kind = "hf"``) under ``train.parallel = "fsdp"``: its decoder
layers as the FSDP units, every method on, equal to one process; the sharded checkpoint
exported with ``save_pretrained`` on one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from test_distributed import assert_same_run, run_dist, tiny_all  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _hf(config_json) -> list[str]:
    """test_distributed's TINY_ALL on a tiny Mixtral (every method; μ/γ learnable)."""
    return ["model.kind=hf", f"model.hf_path={config_json}", "model.momentum.learnable=true"]


def test_hf_model_under_fsdp_matches_one_process_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moelab.hf import patched_blocks
    from moelab.methods.momentum import MomentumConfig
    from moelab.runs.export import export
    from moelab.train.trainer import Trainer, load_trained

    # HF's own router aux loss is each rank's batch's (transformers computes it in the
    # forward), so with it on a sharded run is not the one-process run: off here
    MixtralConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                  num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.0,
                  max_position_embeddings=64).save_pretrained(tmp_path / "cfg")
    extra = _hf(tmp_path / "cfg" / "config.json")
    ref = tmp_path / "one"
    Trainer(tiny_all(*extra), ref, quiet=True).fit()
    run = tmp_path / "fsdp"
    run_dist(tmp_path, 2, run, "train.parallel=fsdp", *extra)
    assert_same_run(run, ref, 2, 1)
    out = tmp_path / "pretrained"
    export(run, out)
    assert (out / "config.json").is_file() and (out / "moelab_hf.pt").is_file()
    trained = load_trained(ref).model.hf
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for key, value in trained.state_dict().items():
        assert torch.allclose(loaded.state_dict()[key], value, rtol=1e-3, atol=2e-5), key
    # the methods acted: the second MoE layer's μ, which multiplies the momentum carried from
    # the first, moved from its start; Default MoE's EMA was updated
    mu = trained.moelab_momentum.mu.detach()
    assert abs(mu[1] - MomentumConfig().mu) > 1e-3
    assert all(b.moelab.method.n_updates.sum() > 0 for _, b in patched_blocks(trained))
