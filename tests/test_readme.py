"""README.md and docs/RESULTS.md against the committed results: the generated results table
is current, every figure quoted from a reproduction equals its results.json, the Python
examples run on their own, and the README stays one page with a two-command quick start."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moelab.experiments.reaggregate import old_steps_metrics
from moelab.experiments.summary import readme_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
RESULTS_MD = (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")


def page(name: str) -> dict:
    return json.loads((ROOT / "docs" / "results" / "reproduce" / name / "results.json")
                      .read_text())


def flat(text: str) -> str:
    """Line breaks and runs of spaces as one space (prose wraps anywhere)."""
    return " ".join(text.split())


def f(x: float, spec: str) -> str:
    """``format(x, spec)`` with the typographic minus the docs use."""
    return format(x, spec).replace("-", "−")


def claim(doc: dict, start: str) -> dict:
    (c,) = [c for c in doc["claims"] if c["text"].startswith(start)]
    return c


def effect(doc: dict, metric: str, name: str) -> dict:
    (e,) = [e for e in doc["factorial"]["metrics"][metric] if e["name"] == name]
    return e


def arm_mean(doc: dict, arm: str, metric: str) -> float:
    (a,) = [a for a in doc["arms"] if a["arm"] == arm]
    return a["metrics"][metric]["summary"]["mean"]


def excitation_effect_given_momentum(doc: dict, mom: bool) -> float:
    """Excitation on - off, averaged over Default MoE off/on and seeds, with momentum fixed."""
    def cell(*on: str) -> dict:
        name = "+".join(x for x in ("dmoe", "mom", "exc") if x in on) or "base"
        (a,) = [a for a in doc["arms"] if a["arm"] == name]
        return a["metrics"]["test_loss"]["per_seed"]
    m = ("mom",) if mom else ()
    diffs = []
    for d in ((), ("dmoe",)):
        on, off = cell(*d, *m, "exc"), cell(*d, *m)
        diffs.append([on[s] - off[s] for s in sorted(off)])
    return float(np.mean(diffs))


def readme_figures() -> list[str]:
    """Each sentence of "Which method when" that quotes a number, rebuilt from the JSON."""
    speed, comb = page("default-moe-speed"), page("methods-combined")
    beta5, rescue, depth = page("default-moe-beta/seeds5"), page("excitation-rescue"), \
        page("momentum-depth")
    st, pp = effect(speed, "steps_to_val_loss", "dmoe"), effect(speed, "test_ppl", "dmoe")
    topk_ppl = np.mean([arm_mean(speed, a, "test_ppl") for a in ("base", "32c4")])
    dl, dp = effect(comb, "test_loss", "dmoe"), effect(comb, "test_ppl", "dmoe")
    cells_ppl = np.mean([a["metrics"]["test_ppl"]["summary"]["mean"] for a in comb["arms"]])
    b999 = claim(beta5, "8c1: b0.999-8c1")
    adam, sgd = claim(rescue, "Excitation rescues Adam"), claim(rescue, "Excitation rescues SGD")
    mxe = effect(comb, "test_loss", "mom × exc")
    adam_cells = [c for c in depth["claims"] if c["text"].startswith("adam beats")]
    adam_worse = [c for c in adam_cells if c["verdict"] == "contradicted"]
    pre_set = speed["claims"]
    steps8 = claim(speed, "8c1: Default MoE reaches")
    ppl32 = claim(speed, "32c4: Default MoE has lower test")
    supported = [c for c in pre_set if c["verdict"] == "supported"]
    assert supported == [steps8, ppl32] and not old_steps_metrics(speed)
    assert all(c["verdict"] == "inconclusive" for c in pre_set if c not in supported)
    topk8 = arm_mean(speed, "base", "steps_to_val_loss")
    assert "differ by up to 0.08 in a seed's test perplexity" in speed["experiment"]["notes"]
    return [
        f"Of its {len(pre_set)} pre-set claims on the byte LM, {len(supported)} are supported "
        f"(8c1: Top-K's mid-training validation loss {-steps8['mean']:.0f} steps sooner "
        f"[{f(steps8['ci_low'], '.0f')}, {f(steps8['ci_high'], '.0f')}], "
        f"~{-100 * steps8['mean'] / topk8:.0f}% of Top-K's {topk8:.0f}; 32c4: test perplexity "
        f"{f(ppl32['mean'], '.3f')} [{f(ppl32['ci_low'], '.3f')}, {f(ppl32['ci_high'], '.3f')}]"
        f"), {len(pre_set) - len(supported)} inconclusive, none surviving the correction "
        f"(p (BH) {min(c['p_bh'] for c in pre_set):.3f})",
        f"pooled over 8c1 and 32c4 (factorial main effect) it got there {-st['mean']:.0f} steps "
        f"sooner [{f(st['ci_low'], '.0f')}, {f(st['ci_high'], '.0f')}]",
        "single Default MoE seeds moved by up to 0.08 perplexity (page notes)",
        f"test perplexity lower by {-pp['mean']:.3f} [{-pp['ci_high']:.3f}, "
        f"{-pp['ci_low']:.3f}] (~{-100 * pp['mean'] / topk_ppl:.1f}%)",
        f"it lowered test loss by {-dl['mean']:.3f} nats [{-dl['ci_high']:.3f}, "
        f"{-dl['ci_low']:.3f}] (test perplexity {f(dp['mean'], '.3f')}, "
        f"~{-100 * dp['mean'] / cells_ppl:.1f}%)",
        f"β 0.999 plain at 8c1 does (p (BH) {b999['p_bh']:.3f})",
        f"plain SMoE in {len(adam_worse)} of {len(adam_cells)} cells "
        f"({sum(c['p_bh'] < 0.05 for c in adam_worse)} surviving the correction)",
        f"{f(100 * adam['mean'], '+.1f')} points with Adam (p (BH) {adam['p_bh']:.3f}; "
        f"{f(100 * sgd['mean'], '.1f')} with SGD, CI containing 0)",
        f"on the LM {f(claim(comb, 'exc lowers')['mean'], '+.3f')} nats of test loss vs Top-K",
        f"{f(excitation_effect_given_momentum(comb, False), '+.3f')} nats without, "
        f"{f(excitation_effect_given_momentum(comb, True), '.3f')} with heavy ball",
        f"interaction, {f(mxe['mean'], '.3f')} [{f(mxe['ci_low'], '.3f')}, "
        f"{f(mxe['ci_high'], '.3f')}]",
        f"level with Top-K alone ({f(claim(comb, 'dmoe+mom+exc')['mean'], '.3f')}, CI containing "
        "0)",
        *robustness_rerun_figures(),
        *auto_beta_figures(),
    ]


def auto_beta_figures() -> list[str]:
    """The automatic-β sentence of the Default MoE bullet (issue 40)."""
    auto = page("default-moe-auto-beta")
    picked = {a["arm"]: a["picked"]["arm"] for a in auto["arms"] if "picked" in a}
    assert picked == {"best-fixed-8c1": "b0.9-8c1", "best-fixed-32c4": "b0.9-32c4"}
    w8, w32 = (claim(auto, f"{sp}: beta='warmup' is no worse") for sp in ("8c1", "32c4"))
    t8 = claim(auto, "8c1: beta='tokens' is no worse")
    assert all(c["verdict"] == "inconclusive" for c in (w8, w32, t8))

    def d(c: dict) -> str:
        return (f"{f(c['mean'], '+.3f')} [{f(c['ci_low'], '+.3f')}, "
                f"{f(c['ci_high'], '+.3f')}]")
    return [f"(Δ test perplexity {d(w8)} at 8c1, {d(w32)} at 32c4: no CI inside",
            f"`beta = \"tokens\"` worse ({d(t8)} at 8c1)"]


def robustness_rerun_figures() -> list[str]:
    """The word-swap rerun and the depth runs trained again for it."""
    text = page("momentum-robustness-text")
    again = page("momentum-robustness-text/source-momentum-depth")
    first = page("momentum-depth")
    agree = sum(a["verdict"] == b["verdict"] for a, b in
                zip(first["claims"], again["claims"], strict=True))
    gaps = [a["metrics"]["attack_gap"]["summary"]["mean"] for a in text["arms"]]
    post2 = claim(again, "mom beats SMoE (official double post-norm, 8")
    pre4 = claim(again, "mom beats SMoE (pre-norm, 4")
    assert post2["verdict"] == "supported" and pre4["verdict"] == "inconclusive"
    return [f"kept only the 8-layer gain (p (BH) {post2['p_bh']:.3f}) and {agree} of "
            f"{len(first['claims'])} verdicts",
            f"rose by {min(gaps):.2f}–{max(gaps):.2f} for every arm"]


@pytest.mark.parametrize("i", range(len(readme_figures())))
def test_readme_figure_matches_results_json(i):
    want = readme_figures()[i]
    assert want in flat(README), want


def test_excitation_within_a_fifth_of_a_point_on_fashion_mnist():
    foundation = page("excitation-foundation")
    assert "accuracy within 0.2 points on Fashion-MNIST" in flat(README)
    assert "Fashion-MNIST" in foundation["data_sources"][0]
    assert max(abs(a["vs_first"]["mean"]) for a in foundation["arms"] if "vs_first" in a) < 0.002


def results_md_figures() -> list[str]:
    """The figures of docs/RESULTS.md the audit found wrong, rebuilt from the JSON."""
    comb, sens = page("methods-combined"), page("momentum-sensitivity")
    spec = page("excitation-specialization")
    dp = effect(comb, "test_ppl", "dmoe")
    cells_ppl = np.mean([a["metrics"]["test_ppl"]["summary"]["mean"] for a in comb["arms"]])
    ci = [claim(comb, f"{x} lowers") for x in ("mom", "exc", "dmoe+mom+exc")]
    share = [c for c in sens["claims"] if "per_layer" in c][0]["per_layer"]
    gini = claim(spec, "adam+excitation: higher Gini")["per_layer"]
    supported = [x["layer"] for x in gini if x["verdict"] == "supported"]
    assert supported == [9, 11, 12, 13, 14, 15]
    speed = page("default-moe-speed")
    st8, pp32 = claim(speed, "8c1: Default MoE reaches"), claim(speed, "32c4: Default MoE has")
    st, pp = effect(speed, "steps_to_val_loss", "dmoe"), effect(speed, "test_ppl", "dmoe")
    return [
        f"8c1 {arm_mean(speed, 'base', 'steps_to_val_loss'):.0f} ± "
        f"{speed['arms'][0]['metrics']['steps_to_val_loss']['summary']['std']:.0f} → "
        f"{arm_mean(speed, 'dmoe', 'steps_to_val_loss'):.0f} ± "
        f"{speed['arms'][1]['metrics']['steps_to_val_loss']['summary']['std']:.0f} (Δ "
        f"{f(st8['mean'], '.0f')} [{f(st8['ci_low'], '.0f')}, {f(st8['ci_high'], '.0f')}]",
        f"(Δ {f(pp32['mean'], '.3f')} [{f(pp32['ci_low'], '.3f')}, {f(pp32['ci_high'], '.3f')}])",
        f"(factorial main effect): {f(st['mean'], '.0f')} steps [{f(st['ci_low'], '.0f')}, "
        f"{f(st['ci_high'], '.0f')}], test perplexity {f(pp['mean'], '.3f')} "
        f"[{f(pp['ci_low'], '.3f')}, {f(pp['ci_high'], '.3f')}]",
        f"is {f(excitation_effect_given_momentum(comb, False), '+.3f')} without momentum and "
        f"{f(excitation_effect_given_momentum(comb, True), '.3f')} with it",
        f"test perplexity {f(dp['mean'], '.3f')} [{f(dp['ci_low'], '.3f')}, "
        f"{f(dp['ci_high'], '.3f')}] on a mean of {cells_ppl:.2f} over the 8 cells: about "
        f"{-100 * dp['mean'] / cells_ppl:.1f}%",
        *(f"{f(c['mean'], '+.3f')} [{f(c['ci_low'], '.3f')}, {f(c['ci_high'], '+.3f')}]"
          for c in ci),
        "CI half-widths " + ", ".join(f"{(x['ci_high'] - x['ci_low']) / 2:.3f}"
                                      for x in share[:3])
        + f" and {(share[3]['ci_high'] - share[3]['ci_low']) / 2:.3f}",
        f"higher in layers 9 and 11–15 (layer 10: Δ {f(gini[10]['mean'], '+.2f')} "
        f"[{f(gini[10]['ci_low'], '.2f')}, {f(gini[10]['ci_high'], '+.2f')}])",
    ]


@pytest.mark.parametrize("i", range(10))
def test_results_md_figure_matches_results_json(i):
    figures = results_md_figures()
    assert len(figures) == 10 and figures[i] in flat(RESULTS_MD), figures[i]


def test_readme_results_table_is_generated_from_the_json():
    assert readme_table(ROOT) in README, \
        "README's results table is stale: python -m moelab.experiments.summary --write"


def test_readme_is_one_page_with_a_two_command_quick_start():
    # 200 lines of prose and examples + the generated results table, one row per page
    assert len(README.splitlines()) <= 210
    quick = README.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", quick, re.S).group(1)
    assert [x.split("#")[0].strip() for x in block.strip().splitlines()] == [
        "bash scripts/install.sh && .venv/bin/moelab train", ".venv/bin/python -m pytest"]
    assert ".[dev,bpe,hf]" in README and "source .venv/bin/activate" in README
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert 'pip install -e ".[dev,bpe,hf]"' in install and "TORCH_INDEX_URL" in install


def python_blocks() -> list[tuple[str, str]]:
    out = []
    for doc in ("README.md", "docs/HF.md", "docs/DISTRIBUTED.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        out += [(f"{doc}#{i}", b) for i, b in
                enumerate(re.findall(r"```python\n(.*?)```", text, re.S))]
    return out


@pytest.mark.parametrize("name,code", python_blocks(), ids=[n for n, _ in python_blocks()])
def test_python_example_runs_on_its_own(name, code, tmp_path):
    if "transformers" in code:
        pytest.importorskip("transformers")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, f"{name}:\n{p.stderr[-2000:]}"
    for pattern in PRINTS.get(name, ()):  # what the block's comments promise
        assert re.search(pattern, p.stdout, re.M), f"{name} printed:\n{p.stdout[-2000:]}"


# per block: what its output holds (the snippets print what their comments promise)
PRINTS = {
    "README.md#0": [r"^torch\.Size\(\[4, 128, 512\]\) torch\.Size\(\[64\]\) entropy \d\.\d{3}, "
                    r"dropped 0%$"],
    "README.md#1": [r"^torch\.Size\(\[8, 128, 256\]\) aux loss \d\.\d{4}$"],
    "README.md#2": [r"^\{'blocks\.0\.ffn': tensor\(\[.*\]\), 'blocks\.1\.ffn': tensor"],
    "docs/DISTRIBUTED.md#0": [r"'loss': \d", r"'moe/model\.layers\.1\.mlp/phi_max': \d",
                              r"'moe/model\.layers\.0\.mlp/default_ema_norm': \d"],
}


def test_every_example_is_checked_for_its_output():
    names = {n for n, _ in python_blocks()}
    assert set(PRINTS) <= names
    assert {n for n in names if not n.startswith("docs/HF.md")} <= set(PRINTS)


def test_results_md_word_swap_row_matches_the_rerun():
    text = page("momentum-robustness-text")
    again = page("momentum-robustness-text/source-momentum-depth")
    smoe = [a for a in text["arms"] if a["arm"].startswith("smoe-")]
    gap = [a["metrics"]["attack_gap"]["summary"]["mean"] for a in smoe]
    pre2 = next(a for a in smoe if a["arm"] == "smoe-pre-d2")["metrics"]
    deltas = [c["mean"] for c in text["claims"] if c["metric"] == "attack_gap"]
    post2 = claim(again, "mom beats SMoE (official double post-norm, 8")
    md = (ROOT / "docs" / "results" / "reproduce" / "momentum-robustness-text" / "results.md")
    strength = re.search(r"\| test \| (\d+) \| (\d+) \| ([\d.]+)% \|", md.read_text())
    words, swapped = int(strength.group(1)), int(strength.group(2))
    for want in [
        f"{swapped} of the {words:,} words the evaluation windows cover, "
        f"{100 * swapped / words:.2f}%",
        f"SMoE's perplexity rises by {min(gap):.2f}–{max(gap):.2f} (pre-norm, 2 layers: "
        f"{pre2['clean_ppl']['summary']['mean']:.2f} → "
        f"{pre2['attacked_ppl']['summary']['mean']:.2f})",
        f"from {f(min(deltas), '.3f')} to {f(max(deltas), '+.3f')}",
        f"smallest p (BH) {min(c['p_bh'] for c in text['claims']):.2f}",
        f"({f(post2['mean'], '.2f')} [{f(post2['ci_low'], '.2f')}, {f(post2['ci_high'], '.2f')}], "
        f"p (BH) {post2['p_bh']:.3f} there)",
    ]:
        assert want in flat(RESULTS_MD), want


def _wall_min(name: str) -> int:
    return round(page(name)["meta"]["invocation_wall_s"] / 60)


def test_wall_times_quoted_in_the_docs_come_from_provenance():
    """Every 'N min' quoted for a page in docs/RESULTS.md and every 'measured N min' in
    docs/REPRODUCE.md equals that page's invocation wall time (results.json meta)."""
    quoted = re.findall(r"\[([a-z0-9/-]+)\]\(results/reproduce/\1/results\.md\); (\d+) min\)",
                        RESULTS_MD)
    assert len(quoted) >= 4
    for name, minutes in quoted:
        assert int(minutes) == _wall_min(name), name
    reproduce_md = (ROOT / "docs" / "REPRODUCE.md").read_text(encoding="utf-8")
    measured = re.findall(r"(?m)^moelab reproduce (\S+)(.*)measured (\d+) min", reproduce_md)
    assert len(measured) >= 5
    for name, rest, minutes in measured:
        where = name + ("/seeds5" if "--seeds 5" in rest else "")
        assert int(minutes) == _wall_min(where), where
    depth = page("momentum-depth")["meta"]
    assert (f"trained {depth['n_run']} of them ({depth['n_skipped']} done before) in "
            f"{round(depth['invocation_wall_s'] / 60)} min") in reproduce_md


def test_summary_names_a_per_layer_claims_own_verdict():
    """A per-layer claim contradicted overall, with layers 1-2 and 4 supported after BH: the
    table lists those layers together and the whole claim's verdict beside them."""
    from moelab.experiments.summary import survivors

    rows = [{"layer": i, "verdict": v, "p_bh": p} for i, (v, p) in enumerate(
        [("contradicted", 0.01), ("supported", 0.01), ("supported", 0.02), ("supported", 0.2),
         ("supported", 0.03)])]
    doc = {"claims": [{"arm": "src/adam+exc", "metric": "gini", "verdict": "contradicted",
                       "per_layer": rows},
                      {"arm": "sgd", "metric": "gini", "verdict": "supported", "p_bh": 0.04}]}
    assert survivors(doc) == {
        "supported": ["adam+exc L1–L2, L4 (whole claim: contradicted)", "sgd"],
        "contradicted": ["adam+exc L0"]}


def test_shared_runs_are_said_once_in_results_md_and_on_each_page():
    """Arms of two pages holding the same runs (bit-identical per seed) are listed, as
    generated, in docs/RESULTS.md and on each page concerned: methods-combined base/dmoe are
    default-moe-lr's x1 arms (and default-moe-speed's seeds 0-2)."""
    from moelab.experiments.summary import page_section, shared_runs, shared_runs_block

    assert shared_runs_block(ROOT) in RESULTS_MD, \
        "docs/RESULTS.md's shared runs are stale: python -m moelab.experiments.summary --write"
    groups = shared_runs(ROOT)
    assert [("default-moe-lr", "topk-x1"), ("default-moe-speed", "base"),
            ("methods-combined", "base")] in [[(p, a) for p, a, _ in g] for g in groups]
    for name in {p for g in groups for p, _, _ in g}:
        md = (ROOT / "docs" / "results" / "reproduce" / name / "results.md").read_text()
        assert page_section(name, groups) in md, name


def test_shared_runs_need_every_common_seed_identical(tmp_path):
    from moelab.experiments.summary import shared_runs

    def write(name, arm, vals):
        d = tmp_path / "docs" / "results" / "reproduce" / name
        d.mkdir(parents=True)
        doc = {"arms": [{"key": arm, "metrics": {"test_loss": {"per_seed": vals}}}]}
        (d / "results.json").write_text(json.dumps(doc))

    write("a", "x", {"0": 1.5, "1": 1.25})
    write("b", "y", {"0": 1.5, "1": 1.25, "2": 1.0})
    write("c", "z", {"0": 1.5, "1": 1.3})            # one seed differs: other runs
    assert shared_runs(tmp_path) == [[("a", "x", ["0", "1"]), ("b", "y", ["0", "1"])]]
    write("d", "x", {"0": 2.5, "1": 2.25})
    write("d/seeds5", "x", {"0": 2.5, "1": 2.25})    # d's own follow-up: by design, not listed
    assert len(shared_runs(tmp_path)) == 1
