"""The MomentumSMoE paper's claims (Teo & Nguyen, NeurIPS 2024, arXiv 2410.14574).

- ``momentum-depth``: SMoE / MomentumSMoE / AdamSMoE / Robust MomentumSMoE LMs on Shakespeare
  bytes, in three block forms (pre-norm; post-norm, the issue's single-LN reading; the
  official code's double post-norm, arms ``*-post2-*``) at 2, 4, 8 MoE layers.
- ``momentum-robustness-text``: the momentum-depth runs evaluated on word-swap-attacked text
  (``moelab.robustness``; computed when the results are aggregated, cached per run).
- ``momentum-robustness-images``: MoE ViTs (MoE every other block) under image corruptions.
- ``momentum-sensitivity``: a mu x gamma grid and the norm-ordered expert-load view.

Definitions are fixed before their test results are read; any later change is written in the
experiment's ``notes`` with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from moelab.experiments import keys as K
from moelab.experiments.gpu import DOCS_LM, SEQ, SMOKE_LM, estimate_minutes, lm_flops_per_token
from moelab.experiments.keys import kv
from moelab.experiments.paper import (
    MOMENTUM_LM,
    MOMENTUM_LM_SETTING,
    MOMENTUM_LM_SMOKE,
    PAPER_SEEDS,
    SMOKE_IMAGES,
    VMOE_CIFAR,
    VMOE_SETTING,
    momentum_lm_size,
)
from moelab.experiments.spec import Arm, Claim, Experiment, Metric, Profile, Records

__all__ = ["DEPTH", "ROBUSTNESS_IMAGES", "ROBUSTNESS_TEXT", "SENSITIVITY",
           "attack_metrics", "corruption_metrics", "momentum_arm", "momentum_overrides",
           "top_norm_share"]

PAPER = "Teo & Nguyen, MomentumSMoE (NeurIPS 2024, arXiv 2410.14574)"
TEST_PPL = Metric.final("ppl", label="test perplexity")
TEST_ACC = Metric.final("acc", label="test accuracy")

def momentum_overrides(rule: str, mu: float | None = None,
                       gamma: float | None = None) -> tuple[str, ...]:
    """``--set`` overrides of one momentum setting: the rule, then mu and gamma if given."""
    ov = (kv(K.MOMENTUM_RULE, rule),)
    if mu is not None:
        ov += (kv(K.MOMENTUM_MU, mu),)
    if gamma is not None:
        ov += (kv(K.MOMENTUM_GAMMA, gamma),)
    return ov


def momentum_arm(name: str, rule: str, mu: float | None = None, gamma: float | None = None,
                 before: tuple[str, ...] = ()) -> Arm:
    """The one arm factory of these experiments: ``before`` (e.g. block form, depth), then
    the momentum setting (``momentum_overrides``)."""
    return Arm(name, before + momentum_overrides(rule, mu, gamma))


RULES = {  # arm prefix -> (rule, mu, gamma) (official LM values: mu 0.7, gamma 1)
    "smoe": ("none", None, None),
    "mom": ("heavy_ball", 0.7, 1.0),
    "adam": ("adam", 0.7, 1.0),
    "robust": ("robust", None, None),
}
FORMS = ("pre", "post", "post_double")
_FORM_TAG = {"pre": "pre", "post": "post", "post_double": "post2"}  # in arm names
_FORM_TEXT = {"pre": "pre-norm", "post": "post-norm", "post_double": "official double post-norm"}
DEPTHS = (2, 4, 8)

# A run's shape at the quick profile: a smoke test of the whole pipeline, not evidence.
_QUICK = (kv(K.STEPS, 4), kv(K.EVAL_EVERY, 4), kv(K.CHECKPOINT_EVERY, 4), kv(K.LOG_EVERY, 2),
          kv(K.EVAL_BATCHES, 1), kv(K.FINAL_EVAL_BATCHES, 1))

# The LM of momentum-depth and momentum-sensitivity (on the `default` config: Shakespeare
# bytes, AdamW 3e-3, betas (0.9, 0.95), wd 0.1, 30 warm-up steps, cosine, clip 1.0).
_LM = (kv(K.D_MODEL, 64), kv(K.N_HEADS, 4), kv(K.N_EXPERTS, 8), kv(K.TOP_K, 2),
       kv(K.D_FF, 128), kv(K.BATCH_SIZE, 16), kv(K.SEQ_LEN, 128), kv(K.MAX_SEQ_LEN, 128))
_LM_FULL = (kv(K.STEPS, 300), kv(K.EVAL_EVERY, 100), kv(K.CHECKPOINT_EVERY, 100),
            kv(K.EVAL_BATCHES, 8), kv(K.FINAL_EVAL_BATCHES, 32))
_LM_QUICK = _QUICK + (kv(K.D_MODEL, 16), kv(K.N_HEADS, 2), kv(K.N_EXPERTS, 4),
                      kv(K.D_FF, 16), kv(K.BATCH_SIZE, 4), kv(K.SEQ_LEN, 32))


def _arm_name(rule: str, form: str, depth: int) -> str:
    return f"{rule}-{_FORM_TAG[form]}-d{depth}"


# ------------------------------------------------------- the gpu profile: the paper's LMs
#: layers -> d_model of the official small / medium / large LMs (16 experts top-2, expert
#: width = d_model, 8 heads; every block MoE)
GPU_DEPTHS = {3: 128, 6: 352, 12: 512}
GPU_RULES = ("smoe", "mom", "adam")
GPU_FORMS = ("pre", "post_double")
GPU_STEPS = 300
_GPU_OPTIM = (kv(K.OPTIMIZER, "adam"), kv(K.LR, 7e-4), kv(K.WEIGHT_DECAY, 0.0),
              kv(K.SCHEDULE, "constant"), kv(K.WARMUP_STEPS, 30), kv(K.GRAD_CLIP, 0.0))
_GPU_LM = DOCS_LM + _GPU_OPTIM + (
    kv(K.N_HEADS, 8), kv(K.N_EXPERTS, 16), kv(K.TOP_K, 2), kv(K.BATCH_SIZE, 32),
    kv(K.STEPS, GPU_STEPS), kv(K.EVAL_EVERY, 100), kv(K.CHECKPOINT_EVERY, 100),
    kv(K.EVAL_BATCHES, 8), kv(K.FINAL_EVAL_BATCHES, 8), kv(K.PRECISION, "bf16"),
    kv(K.COMPILE, False))
_GPU_ARMS = tuple(
    momentum_arm(_arm_name(rule, form, depth), *RULES[rule], before=(
        kv(K.NORM_POSITION, form), kv(K.N_LAYERS, depth), kv(K.D_MODEL, d_model),
        kv(K.D_FF, d_model)))
    for depth, d_model in GPU_DEPTHS.items() for form in GPU_FORMS for rule in GPU_RULES)
_GPU_CLAIMS = tuple(
    Claim(_arm_name(rule, form, depth), _arm_name("smoe", form, depth), "lower",
          text=f"{rule} beats SMoE ({_FORM_TEXT[form]}, {depth} layers, d_model "
               f"{GPU_DEPTHS[depth]})")
    for depth in GPU_DEPTHS for form in GPU_FORMS for rule in ("mom", "adam"))
_GPU_MINUTES = estimate_minutes(
    [(len(GPU_FORMS) * len(GPU_RULES) * 5, GPU_STEPS, 32 * SEQ,
      lm_flops_per_token(d, n, 16, 2, d)) for n, d in GPU_DEPTHS.items()],
    compiled=False, eager_factor=1.5)
_GPU_SMOKE = SMOKE_LM + (kv(K.PRECISION, "fp32"), kv(K.N_LAYERS, 2), kv(K.D_FF, 16),
                         kv(K.N_EXPERTS, 4))


def paper_lm(**kw) -> Profile:
    """A ``paper`` profile on the official MomentumSMoE LM (``paper.MOMENTUM_LM``: the medium
    size unless the arms set another) on WikiText-103 from --data-dir, 4 GPUs per run (the
    official scripts'); ``kw``: more Profile fields (arms, claims, lr_grid)."""
    return Profile(MOMENTUM_LM, seeds=PAPER_SEEDS, smoke=MOMENTUM_LM_SMOKE,
                   data_dir="wikitext", gpus_per_run=4, setting=MOMENTUM_LM_SETTING, **kw)


# ------------------------------------------------------- the paper profile: the official LMs
#: layers -> the official size of that depth
PAPER_DEPTHS = {3: "small", 6: "medium", 12: "large"}
_PAPER_ARMS = tuple(
    momentum_arm(_arm_name(rule, form, depth), *RULES[rule], before=(
        kv(K.NORM_POSITION, form), *momentum_lm_size(size)))
    for depth, size in PAPER_DEPTHS.items() for form in GPU_FORMS for rule in RULES)
_PAPER_CLAIMS = tuple(
    Claim(_arm_name(rule, form, depth), _arm_name("smoe", form, depth), "lower",
          text=f"{rule} beats SMoE ({_FORM_TEXT[form]}, the paper's {size} LM, {depth} "
               "layers)")
    for depth, size in PAPER_DEPTHS.items() for form in GPU_FORMS
    for rule in ("mom", "adam", "robust"))


# ------------------------------------------------------------------------ 1. depth

DEPTH = Experiment(
    name="momentum-depth",
    claim="MomentumSMoE, AdamSMoE and Robust MomentumSMoE reach lower test perplexity than "
          "SMoE, with a gain that grows with depth (little at 2 MoE layers, more at 4 and 8), "
          "in the pre-norm form, the single-LN post-norm form and the official code's "
          "double post-norm form.",
    paper=PAPER + ", WikiText-103 language modelling (Tables 1-2: 3/6/12 layers)",
    base="default",
    overrides=_LM,
    arms=tuple(momentum_arm(_arm_name(name, form, depth), *setting,
                            before=(kv(K.NORM_POSITION, form), kv(K.N_LAYERS, depth)))
               for depth in DEPTHS for form in FORMS for name, setting in RULES.items()),
    claims=tuple(Claim(_arm_name(rule, form, depth), _arm_name("smoe", form, depth), "lower",
                       text=f"{rule} beats SMoE ({_FORM_TEXT[form]}, {depth} MoE layers)")
                 for depth in DEPTHS for form in FORMS for rule in ("mom", "adam", "robust")),
    metrics=(TEST_PPL,),
    profiles={
        "quick": Profile(_LM_QUICK, seeds=1, cpu_minutes=1.0),
        "full": Profile(_LM_FULL, seeds=3, cpu_minutes=70.0),
        "gpu": Profile(_GPU_LM, seeds=5, arms=_GPU_ARMS, claims=_GPU_CLAIMS,
                       gpu_minutes=_GPU_MINUTES, smoke=_GPU_SMOKE),
        "paper": paper_lm(arms=_PAPER_ARMS, claims=_PAPER_CLAIMS),
    },
    image_datasets=(),
    notes="How the setting was chosen (before any result): the default LM shrunk so that 72 "
          "runs (4 rules x 2 block forms x depths 2/4/8 x 3 seeds) fit in 90 min on 2 cores: "
          "d_model 64, 4 heads, 8 experts of width 128, top-2, batch 16 x 128 bytes, 300 "
          "steps (~0.6M training bytes per run: short; differences between rules are measured "
          "early in training), every block MoE (depth = MoE layers). Measured 2026-12-01: a "
          "60-step run at depth 8 (post, heavy ball, 1 thread) trained in 34 s (0.57 s/step) "
          "on the shared machine (load ~4 on 2 cores, 71% of a core). Estimate: per run "
          "0.57 s/step x 300 x (mean depth 14/3 / 8) + ~15 s start-up and final eval (32 "
          "batches) = ~115 s, 72 runs on 2 workers = ~70 min under that load, less on a quiet "
          "machine. Optimiser: the default "
          "config's (AdamW 3e-3, 30 warm-up steps, cosine) for every arm, no lr grid: every "
          "arm gets the same (zero) tuning budget; post-norm at depth 8 with this lr is a "
          "known risk and is reported as it comes. Momentum values are the official scripts' "
          "(mu 0.7, gamma 1; Adam beta1 0.9, beta2 0.999, eps 1e-8 inside the root, first "
          "MoE layer only, no bias correction); robust kappa 1.25, rho 0.2 (moelab default). "
          "The 'gain grows with depth' part has no verdict of its own here: it is read from "
          "the per-depth paired differences (each arm vs SMoE at the same depth and form). "
          "WikiText-103: not wired into this definition (the runner picks image data only); "
          "run with --set data.dataset=... by hand. Changes after test results were seen: the "
          "'post2' arms (norm_position post_double, the official code's doubled residual "
          "norm2(x + LN_in(x + update)), see docs/METHODS.md) were added after the pre and "
          "post results had been read, because the experiment claimed to test the official "
          "block form and 'post' is only the issue's single-LN paraphrase of it. Their "
          "settings are the other arms' unchanged (fixed before their runs); the 72 pre/post "
          "runs are the ones first reported. 108 runs, ~70 min on a quiet 2-core machine. "
          "The gpu profile (defined 2026-12-04, before any GPU run; no GPU has run it yet): "
          "the paper's three LMs (3 layers d_model 128, 6 layers 352, 12 layers 512; 16 "
          "experts top-2 of width d_model; our experts are SwiGLU where the official ones are "
          "ReLU with bias), every block MoE, on the docs corpus (BPE 8192, 512 tokens, batch "
          "32), the official optimiser (Adam lr 7e-4, 30 warm-up steps then constant, no "
          "weight decay, no clipping), bf16, 300 steps, 5 seeds; rules SMoE, heavy ball and "
          "AdamSMoE in the pre-norm and the official double post-norm forms (18 arms). Its "
          "time is an estimate (moelab.experiments.gpu) until measured.",
)

# ------------------------------------------------------------- 2. robustness: text

ATTACK_RATE = 0.025


def _final_eval_batches(run_dir: Path) -> int | None:
    from moelab.runs.directory import read_config

    return read_config(run_dir).data.final_eval_batches


def _attack_eval(run_dir: Path, rate: float = ATTACK_RATE) -> dict[str, Any] | None:
    """``evaluate_attack`` of a run over its ``final_eval_batches`` windows (cached in
    ``RUN_DIR/robustness/``); None for a run without a usable checkpoint."""
    from moelab.robustness import evaluate_attack
    from moelab.train.guard import NonFiniteError

    try:
        return evaluate_attack(run_dir, rate, seed=0, batches=_final_eval_batches(run_dir))
    except (NonFiniteError, FileNotFoundError):
        return None


def attack_metrics(run_dir: Path, rate: float = ATTACK_RATE) -> dict[str, float] | None:
    """Clean / word-swap-attacked test perplexity of an LM run (same span of text; see
    ``evaluate_attack``) and the attacked validation perplexity."""
    res = _attack_eval(run_dir, rate)
    if res is None:
        return None
    row = next(r for r in res["rows"] if r["split"] == "test")
    val = next(r for r in res["rows"] if r["split"] == "val")
    return {"clean": row["clean_ppl"], "attacked": row["attacked_ppl"], "gap": row["gap_ppl"],
            "val_attacked": val["attacked_ppl"]}


def attack_sections(res: Mapping[str, Any]) -> list[str]:
    """results.md table: per split, the words in the evaluated span and the share the attack
    swapped (the same text, seed and span in every run; runs that disagree are listed)."""
    seen: dict[tuple, list[str]] = {}
    for a in res["arms"]:
        for seed, run_dir in sorted(a.get("run_dirs", {}).items()):
            ev = _attack_eval(Path(run_dir))
            if ev is not None:
                key = tuple((r["split"], r["words"], r["swapped"]) for r in ev["rows"])
                seen.setdefault(key, []).append(f"{a['key']} s{seed}")
    if not seen:
        return []
    L = ["## The attack's strength", "",
         "Words of the evaluated span (the runs' final_eval_batches windows, clean and attacked "
         "alike) and how many the attack replaced by 'AAA'.", "",
         "| split | words | swapped | share | runs |", "|---|---|---|---|---|"]
    for key, runs in seen.items():
        who = f"all {len(runs)}" if len(seen) == 1 else ", ".join(runs)
        for split, words, swapped in key:
            L.append(f"| {split} | {words} | {swapped} | {swapped / words:.2%} | {who} |")
    return L + [""]


def _field(compute: Callable[[Path], dict[str, float] | None], key: str, name: str):
    """A Metric extractor: ``compute(run_dir)[key]``, or None where ``compute`` gives None."""
    def extract(run_dir: Path) -> float | None:
        m = compute(run_dir)
        return None if m is None else m[key]

    extract.__name__ = name
    return extract


def _attack(key: str):
    return _field(attack_metrics, key, f"attack_{key}")


ATTACK_GAP = Metric("attack_gap", "attacked − clean test perplexity (word swap 2.5%)",
                    _attack("gap"), higher_is_better=False, from_run=True)
ATTACKED_PPL = Metric("attacked_ppl", "word-swap-attacked test perplexity",
                      _attack("attacked"), _attack("val_attacked"), higher_is_better=False,
                      from_run=True)
CLEAN_PPL = Metric("clean_ppl", "clean test perplexity (same windows)", _attack("clean"),
                   higher_is_better=False, from_run=True)

def _attack_claims(depths, forms) -> tuple[Claim, ...]:
    """The claims on momentum-depth's arms at ``depths`` x ``forms``: every rule's attack gap
    against SMoE's, and heavy ball's attacked perplexity."""
    return tuple(Claim(_arm_name(rule, form, depth), _arm_name("smoe", form, depth), "lower",
                       metric="attack_gap", source="momentum-depth",
                       text=f"{rule}: smaller perplexity rise than SMoE under attack "
                            f"({_FORM_TEXT[form]}, {depth} MoE layers)")
                 for depth in depths for form in forms for rule in ("mom", "adam", "robust")) \
        + tuple(Claim(_arm_name("mom", form, depth), _arm_name("smoe", form, depth), "lower",
                      metric="attacked_ppl", source="momentum-depth",
                      text=f"mom: lower attacked perplexity than SMoE ({_FORM_TEXT[form]}, "
                           f"{depth} MoE layers)")
                for depth in depths for form in forms)


ROBUSTNESS_TEXT = Experiment(
    name="momentum-robustness-text",
    claim="On word-swap-attacked text, perplexity rises less for MomentumSMoE (and its Adam "
          "and robust variants) than for SMoE.",
    paper=PAPER + ", WikiText-103 with the word-swap attack (TextAttack, 2.5% of words)",
    sources=("momentum-depth",),
    claims=_attack_claims(DEPTHS, FORMS),
    metrics=(ATTACK_GAP, ATTACKED_PPL, CLEAN_PPL),
    profiles={"quick": Profile(cpu_minutes=0.5), "full": Profile(cpu_minutes=17.0),
              "paper": Profile(seeds=PAPER_SEEDS, setting=MOMENTUM_LM_SETTING,
                               claims=_attack_claims(PAPER_DEPTHS, GPU_FORMS))},
    image_datasets=(),
    extra_sections=attack_sections,
    notes="Trains nothing: evaluates every momentum-depth run (each at the lr its source "
          "selected) on its own val/test text attacked by moelab.robustness.word_swap "
          "(rate 0.025, seed 0, stopword list moelab.robustness.STOPWORDS, the literal 'AAA'), "
          "clean and attacked over the same span of text: the one the run's "
          "final_eval_batches windows cover (32 x 16 x 128 bytes at the full profile). The "
          "paper's rule (TextAttack: max(floor(0.025 n), 1) non-stopwords per line of "
          "WikiText-103, whose lines are paragraphs) swaps ~2.5% of words there. Cost: 2 "
          "extra passes over val and test per run (estimate from momentum-depth's timing: "
          "~3.5 s per pass of 32 batches, 4 passes per run, 72 runs, one process = ~17 min). "
          "Changes after test results were seen (issue 30, 2026-12-04; the first results "
          "page had been read): (1) the rule was applied per line of Shakespeare, whose "
          "verse lines have ~6 words, so the floor of one swap per line replaced 16.3% of "
          "the test split's words (32.9% of its non-stopwords), about 6x the paper's rate; it "
          "now applies to units of >= 200 words (lines joined; per line only where the lines "
          "already are paragraphs), which swaps 2.46% of the test split's words. (2) "
          "Contractions whose pieces are stopwords (don't, it's) are stopwords. (3) The "
          "attacked evaluation scored the same number of windows as the clean one, which "
          "covered more text (AAA is shorter than the words it replaces); both now score the "
          "same span. The first page's numbers are kept in git history (commit 4d16e3c).",
)

# ----------------------------------------------------------- 3. robustness: images


def _corruption_eval(run_dir: Path) -> dict[str, Any] | None:
    """``evaluate_corruptions`` of a run over its ``final_eval_batches`` batches (cached in
    the run directory); None for a run without a usable checkpoint."""
    from moelab.robustness import evaluate_corruptions
    from moelab.train.guard import NonFiniteError

    try:
        return evaluate_corruptions(run_dir, batches=_final_eval_batches(run_dir))
    except (NonFiniteError, FileNotFoundError):
        return None


def corruption_metrics(run_dir: Path) -> dict[str, float] | None:
    """Mean test error over the corruptions x 5 severities and the mean accuracy drop from
    the clean test accuracy (over the run's ``final_eval_batches`` batches; cached)."""
    res = _corruption_eval(run_dir)
    if res is None:
        return None
    drop = sum(res["clean_acc"] - r["acc"] for r in res["rows"]) / len(res["rows"])
    return {"mean_err": res["mean_err"], "drop": drop}


def _corr(key: str):
    return _field(corruption_metrics, key, f"corruption_{key}")


def _corruption_runs(res: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """arm -> seed -> ``_corruption_eval`` result, for the runs that have one."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for a in res["arms"]:
        for seed, run_dir in sorted(a.get("run_dirs", {}).items()):
            ev = _corruption_eval(Path(run_dir))
            if ev is not None:
                out.setdefault(a["arm"], {})[seed] = ev
    return out


def corruption_sections(res: Mapping[str, Any], baseline: str = "smoe") -> list[str]:
    """results.md tables: test accuracy per corruption x severity per arm (mean ± std over
    seeds), and each arm's corruption error relative to ``baseline`` in the ImageNet-C
    convention (per corruption CE = summed error over severities / the baseline's, mCE = mean
    CE over corruptions), computed per seed against the baseline's same-seed run."""
    from moelab.experiments.stats import paired_difference, summarize

    runs = _corruption_runs(res)
    if not runs:
        return []
    arms = list(runs)
    first = next(iter(runs[arms[0]].values()))
    keys = [(r["corruption"], r["severity"]) for r in first["rows"]]
    names = list(dict.fromkeys(c for c, _ in keys))

    acc = {a: [{(x["corruption"], x["severity"]): x["acc"] for x in r["rows"]}
               | {"clean": r["clean_acc"]} for r in runs[a].values()] for a in arms}

    def cell(arm: str, key) -> str:
        s = summarize([run[key] for run in acc[arm]])
        return f"{100 * s.mean:.1f} ± {100 * s.std:.1f}" if s.n > 1 else f"{100 * s.mean:.1f}"

    L = ["## Accuracy per corruption and severity", "",
         "Test accuracy (%), mean ± std over seeds, on the runs' final_eval_batches.", "",
         "| corruption | severity | " + " | ".join(arms) + " |",
         "|---|---|" + "---|" * len(arms),
         "| clean | – | " + " | ".join(cell(a, "clean") for a in arms) + " |"]
    for c, sev in keys:
        L.append(f"| {c} | {sev} | " + " | ".join(cell(a, (c, sev)) for a in arms) + " |")
    L.append("")
    if baseline not in runs:
        return L
    base = runs[baseline]
    L += [f"## Corruption error relative to {baseline} (mCE convention)", "",
          f"Per seed: CE_c = Σ_severity err(arm) / Σ_severity err({baseline}, same seed), mCE = "
          "mean of CE_c over corruptions; 1 = as robust as the baseline, lower is better. "
          "Mean ± std over seeds; 95% Student-t CI of mCE − 1.", "",
          "| arm | " + " | ".join(f"CE {n}" for n in names) + " | mCE | 95% CI (mCE − 1) | n |",
          "|---|" + "---|" * (len(names) + 3)]
    for a in arms:
        ce = {n: {} for n in names}
        for seed, r in runs[a].items():
            if seed in base:
                for n in names:
                    b = base[seed]["summed_err"][n]
                    ce[n][seed] = r["summed_err"][n] / b if b > 0 else math.nan
        mce = {sd: sum(ce[n][sd] for n in names) / len(names) for sd in ce[names[0]]}
        d = paired_difference(mce, {sd: 1.0 for sd in mce})
        cells = [f"{summarize(list(ce[n].values())).mean:.3f}" for n in names]
        m = summarize(list(mce.values()))
        spread = f" ± {m.std:.3f}" if m.n > 1 else ""
        ci = f"[{d.ci_low:+.3f}, {d.ci_high:+.3f}]" if d.n > 1 else "–"
        L.append(f"| {a} | " + " | ".join(cells) + f" | {m.mean:.3f}{spread} | {ci} | {m.n} |")
    L.append("")
    return L


CORRUPTION_ERR = Metric("corruption_err", "mean test error over corruptions x severities",
                        _corr("mean_err"), higher_is_better=False, from_run=True)
CORRUPTION_DROP = Metric("corruption_drop", "mean accuracy drop under corruption",
                         _corr("drop"), higher_is_better=False, from_run=True)
_VIT_FULL = (kv(K.STEPS, 1000), kv(K.EVAL_EVERY, 100), kv(K.CHECKPOINT_EVERY, 200),
             kv(K.EVAL_BATCHES, 8), kv(K.FINAL_EVAL_BATCHES, 16))

ROBUSTNESS_IMAGES = Experiment(
    name="momentum-robustness-images",
    claim="MomentumSMoE and Robust MomentumSMoE ViTs lose less accuracy than the SMoE ViT under "
          "ImageNet-C-style corruptions (Gaussian noise, impulse noise, blurs, contrast).",
    paper=PAPER + ", V-MoE on ImageNet-C (Fig. 4: Gaussian and impulse noise)",
    base="mnist",
    overrides=(kv(K.MODEL_KIND, "vit"), kv(K.D_MODEL, 64), kv(K.N_HEADS, 4),
               kv(K.N_LAYERS, 6), kv(K.MOE_EVERY, 2), kv(K.PATCH_SIZE, 4),
               kv(K.N_EXPERTS, 8), kv(K.TOP_K, 2), kv(K.D_FF, 128), kv(K.BATCH_SIZE, 64)),
    arms=(momentum_arm("smoe", "none"), momentum_arm("mom", "heavy_ball", 0.8, 1.0),
          momentum_arm("robust", "robust")),
    claims=(
        Claim("mom", "smoe", "lower", metric="corruption_drop",
              text="MomentumSMoE degrades less under corruption"),
        Claim("robust", "smoe", "lower", metric="corruption_drop",
              text="Robust MomentumSMoE degrades less under corruption"),
        Claim("mom", "smoe", "lower", metric="corruption_err",
              text="MomentumSMoE: lower corruption error (mCE numerator)"),
        Claim("robust", "smoe", "lower", metric="corruption_err",
              text="Robust MomentumSMoE: lower corruption error (mCE numerator)"),
    ),
    metrics=(TEST_ACC, CORRUPTION_ERR, CORRUPTION_DROP),
    extra_sections=corruption_sections,
    profiles={
        "quick": Profile(_QUICK + (kv(K.D_MODEL, 16), kv(K.N_HEADS, 2), kv(K.N_LAYERS, 2),
                                   kv(K.PATCH_SIZE, 7), kv(K.N_EXPERTS, 4), kv(K.D_FF, 16),
                                   kv(K.BATCH_SIZE, 16)), seeds=1, cpu_minutes=0.5),
        "full": Profile(_VIT_FULL, seeds=5, cpu_minutes=55.0),
        "paper": Profile(VMOE_CIFAR, seeds=PAPER_SEEDS, smoke=SMOKE_IMAGES,
                         data_dir="cifar10", setting=VMOE_SETTING),
    },
    image_datasets=("cifar10", "fashion-mnist", "mnist5k"),
    notes="How the setting was chosen (before any result): V-MoE layout (MoE every other "
          "block: 3 MoE of 6 blocks), d_model 64, patch 4 (49 tokens on 28x28), 8 experts "
          "of width 128, top-2, batch 64, 1000 steps, 5 seeds (15 runs), the mnist config's "
          "optimiser (AdamW 2e-3, wd 0.05, 20 warm-up steps, cosine), pre-norm (the "
          "official vision code is not in "
          "the repository, so its block form is unknown). MomentumSMoE mu 0.8, gamma 1 "
          "(the paper's V-MoE range is 0.8-0.9; the lower end was taken, fixed before any "
          "result); robust kappa 1.25, rho 0.2. Corruptions: all five of "
          "moelab.robustness (CIFAR-10-C constants, implemented in torch: no offline "
          "library fits 28x28 grayscale), severities 1-5, seed 0, over the run's "
          "final_eval_batches (16 x 64 test images) each. mCE relative to SMoE per seed can "
          "be printed with `moelab eval RUN --corrupt all --baseline SMOE_RUN`; the claims "
          "use the mean error and the mean drop from clean accuracy (paired by seed). "
          "Estimate (not measured at this width; scaled from the LM timing by tokens per step, "
          "3136 vs 2048): ~0.4 s/step, ~7 min per run with the corruption evaluation, 15 "
          "runs on 2 workers = ~55 min. Dataset: Fashion-MNIST when installed (CIFAR-10 given "
          "--data-dir), else MNIST-5k. "
          "Changes after test results were seen: the tables of accuracy per corruption and "
          "severity and the mCE relative to SMoE (corruption_sections) were added to "
          "results.md after the claims had been read (the issue asks for them; they are "
          "descriptive, the claims are unchanged).",
)

# ------------------------------------------------------------------ 4. sensitivity

MUS = (0.3, 0.5, 0.7, 0.9)
GAMMAS = (0.5, 1.0, 1.5)
SENS_DEPTH = 4


def top_norm_share(records: Records) -> list[float] | None:
    """Per MoE layer at the final validation eval: the share of routing that goes to the
    quarter of the experts with the largest mean output norm (MomentumSMoE Fig. 5's view;
    experts without tokens have no norm and are left out)."""
    ev = next((r for r in reversed(records) if r.get("kind") == "eval" and r.get("final")),
              None)
    if ev is None or not ev.get("layers"):
        return None
    out = []
    for layer in ev["layers"]:
        share = [s for s in layer["norm_order_share"] if s > 0]  # ascending norm
        k = max(1, math.ceil(len(layer["norm_order_share"]) / 4))
        out.append(float(sum(share[-k:])))
    return out


TOP_NORM_SHARE = Metric("top_norm_share", "routing share of the largest-norm quarter of experts",
                        top_norm_share, higher_is_better=False, per_layer=True)


def _mg(mu: float, gamma: float) -> str:
    return f"mom-mu{mu:g}-g{gamma:g}"


SENSITIVITY = Experiment(
    name="momentum-sensitivity",
    claim="MomentumSMoE improves on SMoE over a range of mu and gamma, and spreads the routing "
          "load away from the experts with the largest output norms.",
    paper=PAPER + ", hyperparameter study and the norm-ordered load (Fig. 5)",
    base="default",
    overrides=_LM + (kv(K.N_LAYERS, SENS_DEPTH), kv(K.NORM_POSITION, "pre")),
    arms=(momentum_arm("smoe", "none"),)
    + tuple(momentum_arm(_mg(mu, g), "heavy_ball", mu, g) for mu in MUS for g in GAMMAS),
    claims=tuple(Claim(_mg(mu, g), "smoe", "lower", text=f"mu={mu}, gamma={g} beats SMoE")
                 for mu in MUS for g in GAMMAS)
    + (Claim(_mg(0.7, 1.0), "smoe", "lower", metric="top_norm_share",
             text="momentum (mu 0.7, gamma 1) routes less to the largest-norm experts"),),
    metrics=(TEST_PPL, TOP_NORM_SHARE),
    profiles={
        "quick": Profile(_LM_QUICK + (kv(K.N_LAYERS, 2),), seeds=1, cpu_minutes=1.0),
        "full": Profile(_LM_FULL, seeds=3, cpu_minutes=35.0),
        "paper": paper_lm(),
    },
    image_datasets=(),
    notes="How the setting was chosen (before any result): the momentum-depth LM at 4 MoE "
          "layers, pre-norm (moelab's default form), 300 steps, 3 seeds; the grid is the "
          "issue's (mu 0.3-0.9 x gamma 0.5-1.5), 13 arms x 3 seeds = 39 runs. Load view: "
          "at the final validation eval, per MoE layer, the share of routing to the "
          "ceil(E/4) = 2 experts with the largest mean output norm (uniform load: 0.25). "
          "Estimate (from momentum-depth's timing): ~105 s per run at depth 4, 39 runs on 2 "
          "workers = ~35 min. "
          "Changes after test results were seen: none.",
)
