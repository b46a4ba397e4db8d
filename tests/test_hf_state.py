"""Saving and loading patched Hugging Face MoE models: the HF checkpoint stays plain, moelab's
own state (Default MoE EMA, learnable momentum) round-trips beside it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import tiny_model, token_batch  # noqa: E402

from moelab.hf import Excitation, load_state, patch, patched_blocks, save_state, unpatch  # noqa: E402,E501
from moelab.hf.state import STATE_FILE  # noqa: E402
from moelab.methods.default_moe import DefaultMoEConfig  # noqa: E402
from moelab.methods.momentum import MomentumConfig  # noqa: E402

DMOE = DefaultMoEConfig(beta=0.8)
MOM = MomentumConfig("heavy_ball", mu=0.6, learnable=True)


def _trained(family, **overrides):
    model = tiny_model(family, **overrides).train()
    patch(model, default_moe=DMOE, momentum=MOM)
    opt = Excitation(torch.optim.AdamW(model.parameters(), lr=1e-2), model)
    ids = token_batch(batch=2, seq=9)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_save_pretrained_is_plain_hf_and_moelab_state_round_trips(family, tmp_path):
    model = _trained(family)
    ids = token_batch(seed=4)
    with torch.no_grad():
        want = model(ids).logits
    with pytest.warns(UserWarning, match="Default MoE .* MomentumSMoE"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / STATE_FILE).is_file()
    cls = type(unpatch(copy.deepcopy(model)))
    loaded, info = cls.from_pretrained(tmp_path, output_loading_info=True,
                                       experts_implementation="eager", attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(loaded).__name__ == type(model).__name__
    loaded.eval()
    plain = unpatch(copy.deepcopy(model))
    with torch.no_grad():  # the plain checkpoint is the unpatched model
        torch.testing.assert_close(loaded(ids).logits, plain(ids).logits, atol=0, rtol=0)
        assert not torch.allclose(loaded(ids).logits, want)
    load_state(loaded, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, atol=1e-6, rtol=1e-6)
    got = dict(patched_blocks(loaded))
    for name, block in patched_blocks(model):
        assert torch.equal(got[name].moelab.method.ema, block.moelab.method.ema)
        assert torch.equal(got[name].moelab.method.n_updates, block.moelab.method.n_updates)
    assert torch.equal(loaded.moelab_momentum.mu, model.moelab_momentum.mu)
    assert not torch.equal(model.moelab_momentum.mu, torch.full_like(model.moelab_momentum.mu,
                                                                     0.6))


def test_tied_embeddings_survive(tmp_path):
    model = _trained("qwen3_moe", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.warns(UserWarning):
        model.save_pretrained(tmp_path)
    loaded = type(unpatch(copy.deepcopy(model))).from_pretrained(
        tmp_path, experts_implementation="eager", attn_implementation="eager")
    load_state(loaded, tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)
    ids = token_batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits,
                                   atol=1e-6, rtol=1e-6)


def test_no_warning_when_methods_leave_the_function_unchanged(tmp_path):
    model = patch(tiny_model("olmoe"), momentum=MomentumConfig("heavy_ball", mu=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.save_pretrained(tmp_path)
    assert (tmp_path / STATE_FILE).is_file()


def test_load_state_checks_settings(tmp_path):
    model = patch(tiny_model("mixtral"), default_moe=DMOE)
    save_state(model, tmp_path)
    other = patch(tiny_model("mixtral"), default_moe=DefaultMoEConfig(beta=0.5))
    with pytest.raises(ValueError, match="patched with"):
        load_state(other, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_state(tiny_model("mixtral"), tmp_path / "nowhere")


def test_readme_example_runs(tmp_path):
    """The Hugging Face snippet of docs/HF.md (self-contained: a tiny random Mixtral)."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "HF.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    namespace: dict = {}
    with pytest.warns(UserWarning, match="change the model's function"):
        exec(code, namespace)
    assert (Path(namespace["out"]) / STATE_FILE).is_file()
    blocks = patched_blocks(namespace["model"])
    assert len(blocks) == 2 and all(b.moelab.method.n_updates.sum() > 0 for _, b in blocks)
