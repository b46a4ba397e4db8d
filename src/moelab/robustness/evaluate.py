"""A trained run directory evaluated on attacked text or corrupted images.

Results are cached as JSON (with a Markdown table beside it) in ``RUN_DIR/robustness/`` and
reused while the run's checkpoint step is unchanged. Error and the mCE convention (Hendrycks &
Dietterich): per corruption c, ``E_c = sum_s err_{c,s}`` over the severities; with a baseline
run, ``CE_c = E_c / E_c(baseline)`` and ``mCE = mean_c CE_c``; without one the raw mean
errors are reported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moelab.robustness.images import CORRUPTIONS, SEVERITIES, corrupt
from moelab.robustness.text import apply_swaps, choose_swaps, count_words

__all__ = ["evaluate_attack", "evaluate_corruptions", "parse_attack", "parse_corrupt",
           "render_attack", "render_corruptions"]

OUT_DIR = "robustness"


def parse_attack(spec: str) -> float:
    """``"word_swap"`` or ``"word_swap:RATE"`` -> the rate (default 0.025)."""
    name, _, rate = spec.partition(":")
    if name != "word_swap":
        raise ValueError(f"--attack {spec!r} is invalid: the attack is word_swap[:rate]")
    try:
        value = float(rate) if rate else 0.025
    except ValueError:
        raise ValueError(f"--attack {spec!r} is invalid: rate must be a number") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"--attack {spec!r} is invalid: need 0 < rate <= 1")
    return value


def parse_corrupt(spec: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``"all"``, ``"NAME"`` or ``"NAME:SEVERITY"`` (names comma-separated) -> (names,
    severities)."""
    name, _, sev = spec.partition(":")
    names = tuple(sorted(CORRUPTIONS)) if name == "all" else tuple(name.split(","))
    for n in names:
        if n not in CORRUPTIONS:
            raise ValueError(f"--corrupt {spec!r} is invalid: {n!r} is not one of "
                             f"{sorted(CORRUPTIONS)} or 'all'")
    if not sev:
        return names, SEVERITIES
    if not sev.isdigit() or int(sev) not in SEVERITIES:
        raise ValueError(f"--corrupt {spec!r} is invalid: severity must be one of {SEVERITIES}")
    return names, (int(sev),)


def _run_step(run_dir: Path) -> int | None:
    from moelab.runs.directory import read_metrics

    for r in reversed(read_metrics(run_dir)):
        if r.get("kind") == "final":
            return r.get("step")
    return None


def _cached(path: Path, run_dir: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    res = json.loads(path.read_text(encoding="utf-8"))
    step = _run_step(run_dir)
    return res if step is not None and res.get("step") == step else None


def _write(path: Path, res: dict[str, Any], md: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    path.with_suffix(".md").write_text(md, encoding="utf-8")


def _tag(batches: int | None) -> str:
    return "all" if batches is None else str(batches)


def _scored_tokens(n_tokens: int, batches: int | None, batch_size: int, seq_len: int) -> int:
    """Tokens of a stream of ``n_tokens`` that the first ``batches`` evaluation batches read
    (``data.EvalWindows``: windows of ``seq_len`` + 1 tokens, overlapping by one)."""
    windows = (n_tokens - 1) // seq_len
    if batches is not None:
        windows = min(windows, batches * batch_size)
    return windows * seq_len + 1


def _prefix_chars(text: str, encode, n_tokens: int) -> int:
    """The longest prefix of ``text`` (in characters) that encodes to <= ``n_tokens`` tokens
    (binary search: the token count grows with the prefix)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(encode(text[:mid]).numel()) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _tail(trainer: Any, tokens: Any) -> tuple[float, int]:
    """Summed loss and count of the targets ``data.EvalWindows`` leaves out of a stream of
    ``N`` tokens (the last ``r = (N - 1) % seq_len``): one window of ``seq_len`` inputs ending
    at the stream's last token, of which only the last ``r`` targets are scored."""
    import torch
    import torch.nn.functional as F

    from moelab.train.precision import autocast

    s = trainer.cfg.data.seq_len
    n = int(tokens.numel())
    r = (n - 1) % s
    if r == 0 or n < s + 1:
        return 0.0, 0
    w = tokens[n - 1 - s:].to(torch.int64).to(trainer.device)
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), trainer._runtime(), autocast(trainer.precision, trainer.device):
            logits = model(w[None, :-1]).logits
        loss = F.cross_entropy(logits[0, -r:].float(), w[-r:], reduction="sum")
    finally:
        model.train(was_training)
    return float(loss), r


def evaluate_attack(run_dir: str | Path, rate: float = 0.025, seed: int = 0,
                    batches: int | None = None, *, cache: bool = True,
                    progress: bool = False) -> dict[str, Any]:
    """Clean and word-swap-attacked loss/perplexity of an LM run on its val and test splits.

    Both score the same span of the original text: the span the first ``batches`` clean
    evaluation windows cover (None: the whole split). The attack is chosen on the whole split
    (``word_swap``'s units) and applied inside that span; since "AAA" is shorter than most
    words, the attacked span has fewer tokens, and every one of its targets is scored: its
    full windows, then its last partial window (``_tail``), so clean and attacked score the
    same characters. Each row also gives the span's words and the share swapped. The
    training text is not touched."""
    from moelab.data import load_text_dataset
    from moelab.train.trainer import load_trained

    run_dir = Path(run_dir)
    path = run_dir / OUT_DIR / f"word_swap-v3-r{rate:g}-seed{seed}-b{_tag(batches)}.json"
    if cache and (hit := _cached(path, run_dir)) is not None:
        return hit
    trainer = load_trained(run_dir)
    if not trainer.is_lm:
        raise ValueError(f"--attack needs a language-model run; {run_dir} is "
                         f"model.kind={trainer.cfg.model.kind!r} (use --corrupt)")
    trainer.quiet = not progress
    dcfg = trainer.cfg.data
    splits = load_text_dataset(dcfg.dataset, dcfg.path)
    encode = trainer.tokenizer.encode
    rows = []
    for split, text in (("val", splits.valid), ("test", splits.test)):
        dtype = trainer.tokens[split].dtype
        n_tok = _scored_tokens(trainer.tokens[split].numel(), batches, dcfg.batch_size,
                               dcfg.seq_len)
        end = _prefix_chars(text, encode, n_tok)
        spans = choose_swaps(text, rate, seed)
        swapped = sum(1 for _, b in spans if b <= end)
        attacked_text = apply_swaps(text, spans, end=end)
        trainer.tokens[split] = encode(text[:end]).to(dtype)
        clean = trainer.evaluate(split, None, routing=False, progress=progress)
        trainer.tokens[split] = encode(attacked_text).to(dtype)
        att = trainer.evaluate(split, None, routing=False, progress=progress)
        tail_sum, tail_n = _tail(trainer, trainer.tokens[split])
        att_n = att[f"{split}_items"] + tail_n
        att_loss = (att[f"{split}_loss"] * att[f"{split}_items"] + tail_sum) / att_n
        att = {**att, f"{split}_loss": att_loss, f"{split}_ppl": math.exp(att_loss),
               f"{split}_items": att_n}
        words = count_words(text[:end])
        rows.append({"split": split, "clean_loss": clean[f"{split}_loss"],
                     "clean_ppl": clean[f"{split}_ppl"], "attacked_loss": att[f"{split}_loss"],
                     "attacked_ppl": att[f"{split}_ppl"],
                     "gap_ppl": att[f"{split}_ppl"] - clean[f"{split}_ppl"],
                     "span_chars": end, "words": words, "swapped": swapped,
                     "swapped_frac": swapped / words if words else 0.0,
                     "clean_tokens": clean[f"{split}_items"],
                     "attacked_tokens": att[f"{split}_items"]})
    res = {"run": str(run_dir), "step": trainer.step, "attack": "word_swap", "rate": rate,
           "seed": seed, "batches": batches, "unit": "auto", "rows": rows}
    _write(path, res, render_attack(res))
    return res


def render_attack(res: dict[str, Any]) -> str:
    """Markdown table of :func:`evaluate_attack`'s result."""
    lines = [f"# word_swap attack (rate {res['rate']:g}, seed {res['seed']}) on {res['run']} "
             f"(step {res['step']})", "",
             "| split | clean ppl | attacked ppl | gap (ppl) | words in the span | swapped |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['split']} | {r['clean_ppl']:.3f} | {r['attacked_ppl']:.3f} | "
                     f"{r['gap_ppl']:+.3f} | {r['words']} | {r['swapped']} "
                     f"({r['swapped_frac']:.2%}) |")
    return "\n".join(lines) + "\n"


def evaluate_corruptions(run_dir: str | Path, names: tuple[str, ...] | None = None,
                         severities: tuple[int, ...] = SEVERITIES, seed: int = 0,
                         batches: int | None = None, baseline: str | Path | None = None, *,
                         cache: bool = True, progress: bool = False) -> dict[str, Any]:
    """Test accuracy of an image run on each corruption x severity (first ``batches``
    batches; None: all), clean accuracy, per-corruption summed error and, with a
    ``baseline`` run (evaluated the same way), CE per corruption and mCE."""
    from moelab.data.images import LabeledImages
    from moelab.train.trainer import load_trained

    run_dir = Path(run_dir)
    names = tuple(sorted(CORRUPTIONS)) if names is None else tuple(names)
    sev_tag = "".join(map(str, severities))
    path = (run_dir / OUT_DIR /
            f"corrupt-{'+'.join(names)}-s{sev_tag}-seed{seed}-b{_tag(batches)}.json")
    res = _cached(path, run_dir) if cache else None
    if res is None:
        trainer = load_trained(run_dir)
        if trainer.is_lm:
            raise ValueError(f"--corrupt needs an image run; {run_dir} is a language model "
                             "(use --attack)")
        trainer.quiet = not progress
        clean_imgs = trainer.images["test"]
        clean = trainer.evaluate("test", batches, routing=False, progress=progress)
        rows = []
        for name in names:
            for s in severities:
                trainer.images["test"] = LabeledImages(corrupt(clean_imgs.x, name, s, seed),
                                                       clean_imgs.y)
                acc = trainer.evaluate("test", batches, routing=False,
                                       progress=progress)["test_acc"]
                rows.append({"corruption": name, "severity": s, "acc": acc, "err": 1.0 - acc})
        trainer.images["test"] = clean_imgs
        res = {"run": str(run_dir), "step": trainer.step, "seed": seed, "batches": batches,
               "clean_acc": clean["test_acc"], "rows": rows}
        _write(path, res, render_corruptions(res))
    res = dict(res)
    res["summed_err"] = {n: sum(r["err"] for r in res["rows"] if r["corruption"] == n)
                         for n in names}
    res["mean_err"] = sum(r["err"] for r in res["rows"]) / len(res["rows"])
    if baseline is not None:
        base = evaluate_corruptions(baseline, names, severities, seed, batches, cache=cache,
                                    progress=progress)
        ce = {n: (res["summed_err"][n] / base["summed_err"][n]
                  if base["summed_err"][n] > 0 else float("nan")) for n in names}
        res["baseline"] = str(baseline)
        res["ce"] = ce
        res["mce"] = sum(ce.values()) / len(ce)
        _write(path.with_name(path.stem + "-vs-baseline.json"), res, render_corruptions(res))
    return res


def render_corruptions(res: dict[str, Any]) -> str:
    """Markdown table of :func:`evaluate_corruptions`'s result (accuracy per corruption and
    severity, then CE / mCE when a baseline was given)."""
    sevs = sorted({r["severity"] for r in res["rows"]})
    names = list(dict.fromkeys(r["corruption"] for r in res["rows"]))
    acc = {(r["corruption"], r["severity"]): r["acc"] for r in res["rows"]}
    head = "| corruption | " + " | ".join(f"s{s} acc" for s in sevs) + " | summed err |"
    if "ce" in res:
        head += " CE |"
    lines = [f"# corruptions on {res['run']} (step {res['step']}, seed {res['seed']}); "
             f"clean test acc {res['clean_acc']:.4f}", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for n in names:
        err = sum(1.0 - acc[(n, s)] for s in sevs)
        row = f"| {n} | " + " | ".join(f"{acc[(n, s)]:.4f}" for s in sevs) + f" | {err:.4f} |"
        if "ce" in res:
            row += f" {res['ce'][n]:.4f} |"
        lines.append(row)
    if "mce" in res:
        lines += ["", f"mCE vs {res['baseline']}: {res['mce']:.4f}"]
    else:
        mean = sum(1.0 - a for a in acc.values()) / len(acc)
        lines += ["", f"mean corruption error (no baseline given): {mean:.4f}"]
    return "\n".join(lines) + "\n"
