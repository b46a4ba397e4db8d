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
from moelab.experiments.spec import run_items

__all__ = ["ASSUMED_JOBS", "ASSUMED_TFLOPS", "COMPILE_S", "DOCS_LM", "OVERHEAD_S",
           "PAPER_ASSUMPTION", "PAPER_TFLOPS_PER_GPU", "SMALL_STEP_S", "SMOKE_LM",
           "active_parameters", "estimate_minutes", "flops_per_item", "lm_flops_per_token",
           "profile_gpu_hours", "run_gpu_hours", "small_model_minutes"]

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


# ------------------------------------------------------------------ the paper profiles

#: Training TFLOP/s assumed per GPU for a paper-scale run (bf16 on an H100: about 30% of its
#: dense bf16 peak of ~990 TFLOP/s, a usual MoE utilisation; an assumption until measured).
PAPER_TFLOPS_PER_GPU = 300.0
#: Image shape and classes of the image datasets a paper profile names, for the estimate.
_IMAGE_SHAPES = {"cifar10": ((3, 32, 32), 10)}
_DEFAULT_IMAGE = ((1, 28, 28), 10)
PAPER_ASSUMPTION = (
    f"training FLOPs = items x (6 x active parameters + attention 12 x layers x d_model x "
    f"seq per token) at {PAPER_TFLOPS_PER_GPU:.0f} TFLOP/s per GPU (bf16, ~30% of an H100's "
    f"peak), at least {SMALL_STEP_S * 1e3:.0f} ms per step (launch-bound small models)")


def active_parameters(cfg) -> tuple[int, int]:
    """``(total, active)`` parameters of the model a RunConfig builds (built on the meta
    device: no memory): active counts each MoE layer's experts at ``top_k / n_experts``."""
    import torch
    from torch.overrides import TorchFunctionMode

    from moelab.models import build_model

    class SkipInitOnMeta(TorchFunctionMode):
        """In-place ops (the initialisers) on a meta tensor have no data to change: skipped,
        and with them the meta device's slow reference path (~1 ms per initialiser)."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes tensor=
            if (name.endswith("_") and not name.endswith("__")
                    and isinstance(target, torch.Tensor) and target.is_meta):
                return target
            return func(*args, **kwargs)

    vocab = cfg.data.bpe_vocab_size if cfg.data.tokenizer == "bpe" else 256
    shape, classes = _IMAGE_SHAPES.get(cfg.data.dataset, _DEFAULT_IMAGE)
    with torch.device("meta"), SkipInitOnMeta():
        model = build_model(cfg.model, vocab_size=vocab, image_shape=shape, n_classes=classes)
    moe = cfg.model.moe
    total = active = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        is_expert = ".experts." in f".{name}"
        active += n * moe.top_k // moe.n_experts if is_expert else n
    return total, active


def flops_per_item(cfg) -> tuple[float, str]:
    """Training FLOPs per token (language model) or per image, from a RunConfig: ``6 x
    active parameters`` per token or patch, plus attention ``12 x layers x d_model x seq``
    per token; and the item's name."""
    _, active = active_parameters(cfg)
    m = cfg.model
    if m.kind in ("lm", "hf"):
        return 6.0 * active + 12.0 * m.n_layers * m.d_model * cfg.data.seq_len, "tokens"
    if m.kind == "vit":
        shape, _ = _IMAGE_SHAPES.get(cfg.data.dataset, _DEFAULT_IMAGE)
        seq = (shape[1] // m.patch_size) * (shape[2] // m.patch_size) + 1
        return seq * (6.0 * active + 12.0 * m.n_layers * m.d_model * seq), "images"
    return 6.0 * active, "images"


def run_gpu_hours(cfg, gpus: int = 1) -> float:
    """Estimated GPU-hours of one run of RunConfig ``cfg`` on ``gpus`` GPUs
    (:data:`PAPER_ASSUMPTION`)."""
    fpi, _ = flops_per_item(cfg)
    steps = cfg.train.steps
    items, _ = run_items(cfg)
    seconds = max(items * fpi / (PAPER_TFLOPS_PER_GPU * 1e12 * gpus), steps * SMALL_STEP_S)
    return (seconds + OVERHEAD_S) * gpus / 3600.0


def profile_gpu_hours(specs, gpus: int = 1) -> float:
    """Estimated GPU-hours of the planned runs ``specs`` (``runner.plan_runs``), each on
    ``gpus`` GPUs; configs are resolved once per arm (seeds and lrs cost the same)."""
    from moelab.experiments.runner import resolve_config

    per_arm: dict[str, float] = {}
    total = 0.0
    for s in specs:
        if s.arm not in per_arm:
            per_arm[s.arm] = run_gpu_hours(resolve_config(s), gpus)
        total += per_arm[s.arm]
    return total
