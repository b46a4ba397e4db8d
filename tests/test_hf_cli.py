"""``moelab train`` on Hugging Face MoE models: ``model.kind = "hf"``, ``model.hf_path``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import tiny_model  # noqa: E402
from test_train import _straight_vs_resumed, tiny  # noqa: E402

from moelab.config import (  # noqa: E402
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from moelab.hf import patched_blocks  # noqa: E402
from moelab.runs.directory import read_metrics  # noqa: E402
from moelab.train.trainer import Trainer  # noqa: E402

ALL_THREE = ["model.default_moe.beta=0.9", "model.momentum.rule=heavy_ball",
             "model.momentum.learnable=true", "optim.excitation.strategy=zero_sum"]


@pytest.fixture()
def mixtral_config(tmp_path):
    """A tiny Mixtral config.json (random init: the vocabulary follows the data)."""
    from transformers import MixtralConfig

    MixtralConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                  num_experts_per_tok=2, output_router_logits=True,
                  max_position_embeddings=64).save_pretrained(tmp_path / "cfg")
    return tmp_path / "cfg" / "config.json"


def _hf(path, *extra):
    return tiny("model.kind=hf", f"model.hf_path={path}", *extra)


def test_train_random_init_from_config_json_with_all_three_methods(tmp_path, mixtral_config):
    tr = Trainer(_hf(mixtral_config, *ALL_THREE, "train.steps=6", "train.eval_every=3"),
                 tmp_path / "run", quiet=True)
    hf = tr.model.hf
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.vocab_size == tr.vocab_size
    assert len(patched_blocks(hf)) == 2 and type(tr.excitation).__module__ == "moelab.hf.excitation"
    tr.fit()
    entries = read_metrics(tmp_path / "run")
    train = [e for e in entries if e["kind"] == "train"]
    assert len(train) == 6 and train[-1]["aux_loss"] > 0
    evals = [e for e in entries if e["kind"] == "eval"]
    assert evals and "val_ppl" in evals[-1]
    assert all(b.moelab.method.n_updates.sum() > 0 for _, b in patched_blocks(hf))


def test_resume_is_bit_for_bit(tmp_path, mixtral_config):
    cfg = _hf(mixtral_config, *ALL_THREE, "train.steps=6", "train.eval_every=3",
              "train.checkpoint_every=3")
    entries = _straight_vs_resumed(tmp_path, cfg, half=3)
    assert any(e["kind"] == "eval" for e in entries)


def test_fine_tune_a_checkpoint_directory(tmp_path):
    model = tiny_model("qwen3_moe", vocab_size=300)  # >= the byte tokenizer's vocabulary
    model.save_pretrained(tmp_path / "ckpt")
    tr = Trainer(_hf(tmp_path / "ckpt", "model.default_moe.beta=0.9", "train.steps=2",
                     "train.eval_every=0"), tmp_path / "run", quiet=True)
    loaded = dict(tr.model.hf.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(loaded[name], p), name
    tr.fit()


def test_config_errors():
    for override in ("model.kind=hf", "model.hf_path=x"):  # one without the other
        data = config_to_dict(load_config("default"))
        with pytest.raises(ConfigError, match="hf_path"):
            config_from_dict(apply_overrides(data, [override]))


def test_init_note_says_random_init_or_pretrained(tmp_path, mixtral_config):
    from moelab.hf.model import hf_init_note, hf_weights_file

    folder = mixtral_config.parent  # a folder holding only config.json
    for path in (mixtral_config, folder):
        assert hf_weights_file(path) is None
        assert hf_init_note(path).startswith(f"RANDOM INIT from {folder / 'config.json'}")
    tr = Trainer(_hf(folder, "train.steps=1", "train.eval_every=0"), tmp_path / "r",
                 quiet=True)
    assert tr.model.init_note == hf_init_note(folder)
    tiny_model("qwen3_moe", vocab_size=300).save_pretrained(tmp_path / "ckpt")
    weights = hf_weights_file(tmp_path / "ckpt")
    assert weights is not None and weights.parent == tmp_path / "ckpt"
    assert hf_init_note(tmp_path / "ckpt") == f"pretrained weights from {weights}"


def test_the_header_says_when_an_hf_model_starts_from_random_init(tmp_path, mixtral_config,
                                                                  capsys):
    cfg = _hf(mixtral_config.parent, "train.steps=1", "train.eval_every=0",
              "data.final_eval_batches=1")
    Trainer(cfg, tmp_path / "loud").fit()
    out = capsys.readouterr().out
    assert f"params (RANDOM INIT from {mixtral_config}" in out.splitlines()[0]
    Trainer(cfg, tmp_path / "quiet", quiet=True).fit()  # no header: still said, on stderr
    assert "moelab: note: model.hf_path: RANDOM INIT from" in capsys.readouterr().err
