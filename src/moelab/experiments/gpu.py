"""What the ``gpu`` profiles share: the language-model data, the CPU smoke shrink, and the
estimate of their time on one GPU.

The GPU LMs train on the ``docs`` corpus (51 MB of English; ``python -m moelab.data.docs
build``) with a byte-level BPE of 8,192 tokens, sequences of 512: Shakespeare's 4.6 M training
characters are too few for ~100 M-parameter models. Times are estimates, not measurements:
the training FLOPs of every run at an assumed :data:`ASSUMED_TFLOPS` achieved by the runs
packed on one H200 together, plus each run's time outside its steps (start-up, tokenizer,
evaluations: :data:`OVERHEAD_S`; compiling: :data:`COMPILE_S` more) spread over
:data:`ASSUMED_JOBS` workers. The first GPU session replaces them
with measured times (``docs/REPRODUCE.md``).
"""

from __future__ import annotations

from moelab.experiments import keys as K
from moelab.experiments.keys import kv

__all__ = ["ASSUMED_JOBS", "ASSUMED_TFLOPS", "COMPILE_S", "DOCS_LM", "OVERHEAD_S",
           "SMALL_STEP_S", "SMOKE_LM", "estimate_minutes", "lm_flops_per_token",
           "small_model_minutes"]

#: Training FLOP/s (in TFLOP/s) assumed for all packed runs together on one H200 in bf16:
#: about a quarter of its measured dense bf16 GEMM peak (an assumption until measured).
ASSUMED_TFLOPS = 150.0
#: Seconds of each run outside its training steps (start-up, BPE, evaluations), and what
#: compiling its blocks adds.
OVERHEAD_S = 20.0
COMPILE_S = 30.0
#: Runs packed at once (``moelab reproduce --device cuda`` picks it from memory).
ASSUMED_JOBS = 8

BPE_VOCAB = 8192
SEQ = 512
#: The GPU language models' data: the docs corpus, BPE, 512-token sequences.
DOCS_LM = (kv(K.DATASET, "docs"), kv(K.TOKENIZER, "bpe"), kv(K.BPE_VOCAB_SIZE, BPE_VOCAB),
           kv(K.SEQ_LEN, SEQ), kv(K.MAX_SEQ_LEN, SEQ), "data.path=none")
#: A GPU LM profile shrunk to a two-step CPU run on the packaged Shakespeare bytes (the
#: ``gpu-smoke`` profile: the tests run every GPU profile's pipeline this way).
SMOKE_LM = (kv(K.DATASET, "shakespeare"), kv(K.TOKENIZER, "byte"), kv(K.D_MODEL, 32),
            kv(K.N_HEADS, 2), kv(K.SEQ_LEN, 32), kv(K.MAX_SEQ_LEN, 32), kv(K.BATCH_SIZE, 4),
            kv(K.STEPS, 2), kv(K.EVAL_EVERY, 1), kv(K.CHECKPOINT_EVERY, 2),
            kv(K.EVAL_BATCHES, 1), kv(K.FINAL_EVAL_BATCHES, 1), kv(K.WARMUP_STEPS, 1))


def lm_flops_per_token(d_model: int, n_layers: int, n_experts: int, top_k: int, d_ff: int,
                       vocab: int = BPE_VOCAB, seq: int = SEQ) -> float:
    """Training FLOPs per token of a moelab LM with a MoE FFN in every block (SwiGLU experts,
    tied output head): ``6 * N_active + 12 * layers * d_model * seq`` (as in
    ``benchmarks.train_step``)."""
    per_layer = 4 * d_model ** 2 + d_model * n_experts + top_k * 3 * d_model * d_ff
    return 6.0 * (n_layers * per_layer + d_model * vocab) + 12.0 * n_layers * d_model * seq


def estimate_minutes(runs: list[tuple[int, int, int, float]], compiled: bool = True,
                     eager_factor: float = 1.0) -> float:
    """Estimated minutes on one H200 for ``(n_runs, steps, tokens_per_step,
    flops_per_token)`` groups of runs (module docstring); ``eager_factor``: how much slower
    than compiled the steps are assumed to run when not ``compiled``."""
    flops = sum(n * steps * tokens * fpt for n, steps, tokens, fpt in runs)
    n_runs = sum(n for n, *_ in runs)
    per_run = OVERHEAD_S + (COMPILE_S if compiled else 0.0)
    seconds = flops * eager_factor / (ASSUMED_TFLOPS * 1e12) + n_runs * per_run / ASSUMED_JOBS
    return round(seconds / 60.0, 1)


#: Seconds per training step of a small model that leaves the GPU mostly idle (launch-bound:
#: a few hundred kernel launches per step), per process, assumed until measured.
SMALL_STEP_S = 0.004


def small_model_minutes(n_runs: int, steps: int, step_s: float = SMALL_STEP_S) -> float:
    """Estimated minutes on one GPU for runs of a model too small to fill it (their time is
    kernel launches, not FLOPs), :data:`ASSUMED_JOBS` at a time."""
    return round(n_runs * (steps * step_s + OVERHEAD_S) / ASSUMED_JOBS / 60.0, 1)
