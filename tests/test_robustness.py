"""moelab.robustness: the word-swap attack, image corruptions, and `moelab eval --attack /
--corrupt` on tiny trained runs."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from moelab.cli import main
from moelab.robustness import CORRUPTIONS, SEVERITIES, STOPWORDS, corrupt, swap_count, word_swap

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("The quick brown fox jumps over the lazy dog near the river bank today\n"
        "\n"
        "To be, or not to be: that is the question.\n"
        "and the of\n"
        + " ".join(f"word{i}" for i in range(90)) + "\n"
        "O Romeo, Romeo! wherefore art thou Romeo?")
WORD = re.compile(r"\w+(?:'\w+)*")


# --- word swap --------------------------------------------------------------------------------

def test_swap_count_rule():
    assert [swap_count(n, 0.025) for n in (0, 1, 39, 40, 79, 80, 90)] == [0, 1, 1, 1, 1, 2, 2]
    assert swap_count(10, 0.25) == 2


def test_word_swap_is_deterministic_and_seeded():
    a, b = word_swap(TEXT, seed=3), word_swap(TEXT, seed=3)
    assert a == b
    assert any(word_swap(TEXT, seed=s) != a for s in range(4, 10))


@pytest.mark.parametrize("rate", [0.025, 0.1, 0.5])
def test_exact_swap_count_and_stopwords_never_swapped(rate):
    out = word_swap(TEXT, rate=rate, seed=1)
    for before, after in zip(TEXT.split("\n"), out.split("\n"), strict=True):
        words_b = [m.group() for m in WORD.finditer(before)]
        words_a = [m.group() for m in WORD.finditer(after)]
        assert len(words_a) == len(words_b)  # "AAA" is one word in place of one word
        eligible = [w for w in words_b if w.lower() not in STOPWORDS]
        swapped = [(x, y) for x, y in zip(words_b, words_a, strict=True) if x != y]
        assert len(swapped) == min(swap_count(len(words_b), rate), len(eligible))
        assert all(y == "AAA" and x.lower() not in STOPWORDS for x, y in swapped)
        # everything outside the words (punctuation, spacing) is kept
        assert WORD.sub("", before) == WORD.sub("", after)
    lines = out.split("\n")
    assert lines[1] == "" and lines[3] == "and the of"  # no words / only stopwords


def test_word_swap_choice_is_uniform_over_eligible_words():
    line = "alpha beta gamma delta"
    hits = {w: 0 for w in line.split()}
    for s in range(800):
        out = word_swap(line, seed=s).split()
        for w, o in zip(line.split(), out, strict=True):
            hits[w] += o == "AAA"
    assert sum(hits.values()) == 800
    assert all(150 < h < 250 for h in hits.values()), hits


def test_word_swap_validation():
    with pytest.raises(ValueError, match="^rate="):
        word_swap(TEXT, rate=0.0)


# --- corruptions ------------------------------------------------------------------------------

def _images(dtype=torch.uint8):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 12, 12, generator=g)
    x[:, :, 3:9, 3:9] += 0.5  # some structure for the blurs
    x = x.clamp(0, 1)
    return (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_corruption_shape_dtype_range_determinism(name, dtype):
    x = _images(dtype)
    before = x.clone()
    for s in SEVERITIES:
        y = corrupt(x, name, s, seed=5)
        assert y.shape == x.shape and y.dtype == x.dtype
        hi = 255 if dtype == torch.uint8 else 1.0
        assert float(y.min()) >= 0 and float(y.max()) <= hi
        assert torch.equal(y, corrupt(x, name, s, seed=5))
        assert not torch.equal(y, x)
    assert torch.equal(x, before)  # input untouched
    if name.endswith("noise"):
        assert not torch.equal(corrupt(x, name, 3, seed=5), corrupt(x, name, 3, seed=6))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_severity_is_monotone(name):
    x = _images(torch.float32)
    change = [float((corrupt(x, name, s) - x).abs().mean()) for s in SEVERITIES]
    assert all(a < b for a, b in zip(change, change[1:], strict=False)), change


def test_corruption_formulas_on_hand_examples():
    x = torch.full((1, 1, 5, 5), 0.2)
    x[0, 0, 2, 2] = 1.0
    # contrast: (x - mean) * c + mean, c = 0.15 at severity 5
    m = float(x.mean())
    torch.testing.assert_close(corrupt(x, "contrast", 5), (x - m) * 0.15 + m)
    # blurs keep the mean of a constant image and spread a peak
    flat = torch.full((1, 1, 6, 6), 0.4)
    for name in ("defocus_blur", "gaussian_blur"):
        torch.testing.assert_close(corrupt(flat, name, 5), flat)
        assert float(corrupt(x, name, 5)[0, 0, 2, 2]) < 1.0
    # impulse noise sets a fraction of about c of the values to 0 or 1
    big = torch.full((1, 1, 200, 200), 0.5)
    y = corrupt(big, "impulse_noise", 5)
    frac = float((y != 0.5).double().mean())
    assert abs(frac - 0.07) < 0.01 and set(y.unique().tolist()) == {0.0, 0.5, 1.0}
    # gaussian noise has std c (0.10 at severity 5) away from the clip
    z = corrupt(big, "gaussian_noise", 5) - 0.5
    assert abs(float(z.std()) - 0.10) < 0.005


def test_corruption_validation():
    x = _images()
    with pytest.raises(ValueError, match="corruption 'fog'"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="^severity="):
        corrupt(x, "contrast", 6)
    with pytest.raises(ValueError, match="shape"):
        corrupt(x[0], "contrast", 1)


# --- moelab eval --attack / --corrupt ------------------------------------------------------------

LM_TOML = """\
base = "default"
name = "tiny"
[model]
d_model = 16
n_layers = 2
n_heads = 2
max_seq_len = 32
norm_position = "post"
[model.moe]
n_experts = 4
d_ff = 16
[model.momentum]
rule = "heavy_ball"
[data]
seq_len = 32
batch_size = 8
eval_batches = 2
final_eval_batches = 2
[train]
steps = 3
eval_every = 3
log_every = 1
checkpoint_every = 3
threads = 1
"""


def _train(tmp_path, capsys, name, *sets, toml=None):
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(toml or LM_TOML)
    out = tmp_path / name
    argv = ["train", "--config", str(cfg), "--out", str(out), "--quiet", "--no-report"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    return out


def test_eval_attack_cli(tmp_path, capsys):
    run_dir = _train(tmp_path, capsys, "lm")
    assert main(["eval", str(run_dir), "--attack", "word_swap:0.1", "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "| val |" in out and "| test |" in out
    path = run_dir / "robustness" / "word_swap-r0.1-seed0-b2.json"
    res = json.loads(path.read_text())
    assert path.with_suffix(".md").is_file()
    for r in res["rows"]:
        assert math.isfinite(r["attacked_ppl"]) and r["attacked_ppl"] != r["clean_ppl"]
        assert r["gap_ppl"] == pytest.approx(r["attacked_ppl"] - r["clean_ppl"])
    # cached: a second call reads the file (same numbers)
    assert main(["eval", str(run_dir), "--attack", "word_swap:0.1", "--batches", "2",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == res["rows"]
    assert main(["eval", str(run_dir), "--attack", "swap"]) == 2
    assert main(["eval", str(run_dir), "--seed", "3"]) == 2  # a seed without an attack
    assert main(["eval", str(run_dir), "--attack", "word_swap", "--baseline", "x"]) == 2
    assert main(["eval", str(run_dir), "--attack", "word_swap", "--corrupt", "all"]) == 2
    assert main(["eval", str(run_dir), "--corrupt", "all"]) == 2  # an LM run
    assert "image run" in capsys.readouterr().err


VIT_TOML = """\
base = "mnist"
name = "tinyvit"
[model]
kind = "vit"
d_model = 16
n_layers = 2
n_heads = 2
moe_every = 2
patch_size = 7
[model.moe]
n_experts = 4
d_ff = 16
[data]
dataset = "mnist5k"
batch_size = 32
eval_batches = 2
final_eval_batches = 2
[train]
steps = 3
eval_every = 3
log_every = 1
checkpoint_every = 3
threads = 1
"""


def test_eval_corrupt_cli_with_baseline(tmp_path, capsys):
    base = _train(tmp_path, capsys, "base", toml=VIT_TOML)
    mom = _train(tmp_path, capsys, "mom", "model.momentum.rule=\"heavy_ball\"", toml=VIT_TOML)
    assert main(["eval", str(mom), "--corrupt", "gaussian_noise,contrast", "--batches", "1",
                 "--baseline", str(base), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["rows"]) == 10
    for n in ("gaussian_noise", "contrast"):
        assert res["summed_err"][n] == pytest.approx(
            sum(r["err"] for r in res["rows"] if r["corruption"] == n))
    b = json.loads((base / "robustness" /
                    "corrupt-gaussian_noise+contrast-s12345-seed0-b1.json").read_text())
    b_sum = sum(1 - r["acc"] for r in b["rows"] if r["corruption"] == "contrast")
    assert res["ce"]["contrast"] == pytest.approx(res["summed_err"]["contrast"] / b_sum)
    assert res["mce"] == pytest.approx(sum(res["ce"].values()) / 2)
    assert main(["eval", str(base), "--corrupt", "impulse_noise:3", "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "impulse_noise" in out and "s3 acc" in out and "s4 acc" not in out
    assert main(["eval", str(base), "--corrupt", "fog"]) == 2


def test_attack_touches_only_the_eval_splits(tmp_path, capsys, monkeypatch):
    from moelab.data import load_text_dataset
    from moelab.robustness import evaluate

    run_dir = _train(tmp_path, capsys, "lm2")
    seen = []

    def spy(text, rate, seed):
        seen.append(text)
        return word_swap(text, rate, seed)

    monkeypatch.setattr(evaluate, "word_swap", spy)
    evaluate.evaluate_attack(run_dir, 0.025, 0, batches=1)
    splits = load_text_dataset("shakespeare")
    assert seen == [splits.valid, splits.test]
