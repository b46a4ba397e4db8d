"""moelab.robustness: the word-swap attack, image corruptions, and `moelab eval --attack /
--corrupt` on tiny trained runs."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from moelab.cli import main
from moelab.robustness import (
    CORRUPTIONS,
    SEVERITIES,
    STOPWORDS,
    corrupt,
    count_words,
    is_stopword,
    swap_count,
    word_swap,
)
from moelab.robustness.text import PARAGRAPH_WORDS, choose_swaps, swap_units
from moelab.runs.directory import read_metrics

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
    for unit in ("line", "paragraph", "auto"):
        a, b = word_swap(TEXT, seed=3, unit=unit), word_swap(TEXT, seed=3, unit=unit)
        assert a == b
        assert any(word_swap(TEXT, seed=s, unit=unit) != a for s in range(4, 10))


@pytest.mark.parametrize("rate", [0.025, 0.1, 0.5])
def test_per_line_swap_count_and_stopwords_never_swapped(rate):
    out = word_swap(TEXT, rate=rate, seed=1, unit="line")
    for before, after in zip(TEXT.split("\n"), out.split("\n"), strict=True):
        words_b = [m.group() for m in WORD.finditer(before)]
        words_a = [m.group() for m in WORD.finditer(after)]
        assert len(words_a) == len(words_b)  # "AAA" is one word in place of one word
        eligible = [w for w in words_b if not is_stopword(w)]
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
    with pytest.raises(ValueError, match="^unit='lines' is invalid"):
        word_swap(TEXT, unit="lines")


def _swapped(before: str, after: str) -> list[tuple[str, str]]:
    wb = [m.group() for m in WORD.finditer(before)]
    wa = [m.group() for m in WORD.finditer(after)]
    assert len(wa) == len(wb) and WORD.sub("", before) == WORD.sub("", after)
    return [(x, y) for x, y in zip(wb, wa, strict=True) if x != y]


# a vocabulary with contractions whose pieces are stopwords, and plain content words
_VOCAB = ("don't it's we're I'll you've she'd can't the and of to my thou love king night "
          "sword crown heaven blood lord death honour grace").split()


def _verse(n_lines: int, words_per_line: int, seed: int = 0) -> str:
    """Synthetic text of short lines drawn from _VOCAB (known word count)."""
    import random

    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(_VOCAB) for _ in range(words_per_line)) + ","
                     for _ in range(n_lines))


@pytest.mark.parametrize("words_per_line,unit", [(6, "paragraph"), (20, "paragraph"),
                                                 (120, "line")])
def test_swapped_fraction_is_the_rate_on_short_and_long_lines(words_per_line, unit):
    text = _verse(24_000 // words_per_line, words_per_line)
    def spans(u):
        return [[m.span() for m in words] for words in swap_units(text, u)]

    assert spans("auto") == spans(unit)  # "auto" picks the expected unit
    for seed in (0, 1):
        sw = _swapped(text, word_swap(text, 0.025, seed))
        frac = len(sw) / count_words(text)
        assert abs(frac - 0.025) <= 0.005, frac
        assert all(y == "AAA" and not is_stopword(x) for x, y in sw)
    # the official per-line rule on the same short lines: far above the rate
    if words_per_line < 40:
        frac_line = len(_swapped(text, word_swap(text, 0.025, unit="line"))) / count_words(text)
        assert frac_line > 0.8 / words_per_line > 1.5 * 0.025


def test_shakespeare_test_split_gets_the_papers_rate():
    from moelab.data import load_text_dataset

    text = load_text_dataset("shakespeare").test
    sw = _swapped(text, word_swap(text, 0.025, 0))
    assert abs(len(sw) / count_words(text) - 0.025) <= 0.005
    assert not any(is_stopword(x) for x, _ in sw)


def test_paragraph_units_hold_200_words_and_their_swap_count():
    text = _verse(700, 7, seed=2)  # 4900 words
    units = swap_units(text, "paragraph")
    assert sum(map(len, units)) == 4900
    assert all(len(u) >= PARAGRAPH_WORDS for u in units)
    assert all(len(u) < PARAGRAPH_WORDS + 7 for u in units[:-1])  # lines are never split
    spans = choose_swaps(text, 0.025, 0, "paragraph")
    for u in units:
        lo, hi = u[0].start(), u[-1].end()
        assert sum(1 for a, _ in spans if lo <= a < hi) == len(u) * 25 // 1000  # floor


def test_stopwords_are_nltk_english_as_textattack_uses():
    """TextAttack's StopwordModification default is NLTK's English list: 179 words; the four
    the issue found swapped are in it, the Shakespeare pronouns (not in NLTK) are not."""
    assert len(STOPWORDS) == 179
    for w in ("as", "because", "until", "while", "couldn't", "should've", "that'll", "ma"):
        assert w in STOPWORDS, w
    for w in ("thou", "thee", "yet", "shall", "would", "could", "may", "must"):
        assert w not in STOPWORDS, w
    assert word_swap("as because until while crown", seed=0) == \
        "as because until while AAA"


def test_contractions_of_stopwords_are_stopwords():
    for w in ("don't", "It's", "we're", "I'll", "you've", "she'd", "THE"):
        assert is_stopword(w), w
    for w in ("o'er", "king's", "crown"):
        assert not is_stopword(w), w
    text = "don't it's we're I'll you've she'd can't crown"
    for s in range(20):  # one unit of 8 words: one swap, and only "crown" is eligible
        assert word_swap(text, seed=s) == "don't it's we're I'll you've she'd can't AAA"


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


def test_eval_attack_cli(train_tiny, capsys):
    run_dir = train_tiny("lm", toml=LM_TOML)
    assert main(["eval", str(run_dir), "--attack", "word_swap:0.1", "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "| val |" in out and "| test |" in out
    path = run_dir / "robustness" / "word_swap-v3-r0.1-seed0-b2.json"
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


def test_eval_corrupt_cli_with_baseline(train_tiny, capsys):
    base = train_tiny("base", toml=VIT_TOML)
    mom = train_tiny("mom", "model.momentum.rule=\"heavy_ball\"", toml=VIT_TOML)
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


def test_attack_touches_only_the_eval_splits(train_tiny, monkeypatch):
    from moelab.data import load_text_dataset
    from moelab.robustness import evaluate

    run_dir = train_tiny("lm2", toml=LM_TOML)
    seen = []

    def spy(text, rate, seed):
        seen.append(text)
        return choose_swaps(text, rate, seed)

    monkeypatch.setattr(evaluate, "choose_swaps", spy)
    evaluate.evaluate_attack(run_dir, 0.025, 0, batches=1)
    splits = load_text_dataset("shakespeare")
    assert seen == [splits.valid, splits.test]


def test_clean_and_attacked_evaluations_score_the_same_span(train_tiny, monkeypatch):
    """The clean windows are the run's own first `batches` windows; the attacked tokens are
    that same stretch of text with its chosen words replaced (fewer tokens: "AAA" is short)."""
    import moelab.train.trainer
    from moelab.data import ByteTokenizer, load_text_dataset
    from moelab.robustness import evaluate

    run_dir = train_tiny("lm3", toml=LM_TOML)
    final = [r for r in read_metrics(run_dir) if r.get("kind") == "final"][-1]
    scored: list[tuple[str, torch.Tensor]] = []
    real = moelab.train.trainer.load_trained

    def load(d):
        trainer = real(d)
        ev = trainer.evaluate

        def spy(split, batches=None, **kw):
            scored.append((split, trainer.tokens[split].clone()))
            return ev(split, batches, **kw)

        trainer.evaluate = spy
        return trainer

    monkeypatch.setattr(moelab.train.trainer, "load_trained", load)
    res = evaluate.evaluate_attack(run_dir, 0.025, 0, batches=2, cache=False)
    splits = load_text_dataset("shakespeare")
    tok = ByteTokenizer()
    for row, text in zip(res["rows"], (splits.valid, splits.test), strict=True):
        (s1, clean), (s2, attacked) = [x for x in scored if x[0] == row["split"]]
        n = 2 * 8 * 32 + 1  # 2 batches x 8 windows x 32 tokens, + the last target
        assert clean.numel() == n and tok.decode(clean) == text[:row["span_chars"]]
        att = tok.decode(attacked)
        assert attacked.numel() < n and att.count("AAA") == row["swapped"] > 0
        assert _swapped(text[:row["span_chars"]], att)  # same words, same skeleton
        assert row["words"] == count_words(text[:row["span_chars"]])
        # every attacked target is scored, the last partial window included: the same
        # characters as the clean evaluation
        assert row["attacked_tokens"] == attacked.numel() - 1
        assert row["clean_tokens"] == clean.numel() - 1
        assert row["attacked_loss"] == pytest.approx(
            _naive_loss(load(run_dir), attacked, 32), rel=1e-5)
    test_row = res["rows"][1]  # the clean test windows are those of the run's final eval
    assert test_row["clean_ppl"] == pytest.approx(final["test_ppl"], rel=1e-6)


def _naive_loss(trainer, tokens, s):
    """Mean loss over every target of ``tokens``, each scored once: windows of ``s`` targets
    from the start, then the remaining targets with the ``s`` tokens before them as context."""
    import torch.nn.functional as F

    trainer.model.eval()
    total, n = 0.0, tokens.numel() - 1
    with torch.no_grad():
        for k in range(0, n - n % s, s):
            w = tokens[k:k + s + 1].long()
            total += float(F.cross_entropy(trainer.model(w[None, :-1]).logits[0], w[1:],
                                           reduction="sum"))
        r = n % s
        if r:
            w = tokens[-s - 1:].long()
            total += float(F.cross_entropy(trainer.model(w[None, :-1]).logits[0, -r:],
                                           w[-r:], reduction="sum"))
    return total / n
