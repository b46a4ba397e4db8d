"""Every config key the experiments machinery writes, in one place.

The experiment definitions build their overrides from these names and the runner sets the
per-run keys (seed, learning rate, threads, dataset) through them, so a rename of config keys
touches this file only. Values are dotted ``--set`` keys (``moelab train --set KEY=VALUE``).
"""

from __future__ import annotations

# set by the runner for every run
NAME = "name"
SEED = "train.seed"
LR = "optim.lr"
THREADS = "train.threads"
DEVICE = "train.device"
PRECISION = "train.precision"
COMPILE = "train.compile"
TRACKER_GROUP = "train.tracker_group"
DATASET = "data.dataset"
DATA_PATH = "data.path"
STEPS = "train.steps"
EVAL_EVERY = "train.eval_every"
CHECKPOINT_EVERY = "train.checkpoint_every"
LOG_EVERY = "train.log_every"

# used by the definitions
MODEL_KIND = "model.kind"
D_MODEL = "model.d_model"
N_LAYERS = "model.n_layers"
MOE_EVERY = "model.moe_every"
N_EXPERTS = "model.moe.n_experts"
TOP_K = "model.moe.top_k"
D_FF = "model.moe.d_ff"
ACTIVATION = "model.moe.activation"
AUX_LOSS_COEF = "model.moe.aux_loss_coef"
SKIP_CONNECTIONS = "model.skip_connections"
BATCH_SIZE = "data.batch_size"
EVAL_BATCHES = "data.eval_batches"
FINAL_EVAL_BATCHES = "data.final_eval_batches"
OPTIMIZER = "optim.name"
MOMENTUM = "optim.momentum"
WEIGHT_DECAY = "optim.weight_decay"
WARMUP_STEPS = "optim.warmup_steps"
SCHEDULE = "optim.schedule"
GRAD_CLIP = "optim.grad_clip"
EXCITATION_STRATEGY = "optim.excitation.strategy"
EXCITATION_GAMMA = "optim.excitation.gamma"
EXCITATION_ABLATION_BASE = "optim.excitation.ablation_base"

# used by the MomentumSMoE definitions (momentum.py)
N_HEADS = "model.n_heads"
MAX_SEQ_LEN = "model.max_seq_len"
NORM_POSITION = "model.norm_position"
MOMENTUM_RULE = "model.momentum.rule"
MOMENTUM_MU = "model.momentum.mu"
MOMENTUM_GAMMA = "model.momentum.gamma"
SEQ_LEN = "data.seq_len"
TOKENIZER = "data.tokenizer"
BPE_VOCAB_SIZE = "data.bpe_vocab_size"
PATCH_SIZE = "model.patch_size"

# used by the Default MoE definitions (default_moe.py); setting any model.default_moe key
# switches Default MoE on, model.default_moe=none switches it off
DEFAULT_MOE_BETA = "model.default_moe.beta"
DEFAULT_MOE_SCORED = "model.default_moe.scored"
DEFAULT_MOE_STRAIGHT_THROUGH = "model.default_moe.straight_through"


def merge_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """``KEY=VALUE`` overrides as they take effect: one entry per key, at the key's first
    position, with its last value (later overrides win)."""
    last: dict[str, str] = {}
    for ov in overrides:  # a dict keeps a key's first position when its value is replaced
        last[ov.split("=", 1)[0].strip()] = ov
    return list(last.values())


def kv(key: str, value: object) -> str:
    """``KEY=VALUE`` override text (strings quoted as TOML strings)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        text = repr(value)
    return f"{key}={text}"
