import sys
from pathlib import Path

# make tests/reference.py importable as `reference`
sys.path.insert(0, str(Path(__file__).parent))

from collections.abc import Callable

import pytest
import torch

TINY_LM_TOML = """\
# a tiny variation of the default LM for tests
base = "default"
name = "tiny"

[model]
d_model = 32
n_layers = 2
n_heads = 2
max_seq_len = 32

[model.moe]
n_experts = 4
d_ff = 32

[data]
seq_len = 32
batch_size = 8
eval_batches = 2
final_eval_batches = 2

[train]
steps = 6
eval_every = 3
log_every = 1
checkpoint_every = 3
threads = 1
"""


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_toml(tmp_path) -> Path:
    """TINY_LM_TOML written to ``tmp_path/tiny.toml``."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_LM_TOML)
    return path


@pytest.fixture
def train_tiny(tmp_path, capsys) -> Callable[..., Path]:
    """``train_tiny(name, *sets, toml=TINY_LM_TOML)``: a finished run in ``tmp_path/name``,
    trained through ``moelab train --quiet --no-report`` (``sets``: ``--set`` overrides);
    returns the run directory. Output is swallowed; a failing run fails the test."""
    from moelab.cli import main

    def train(name: str = "run", *sets: str, toml: str = TINY_LM_TOML) -> Path:
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(toml)
        out = tmp_path / name
        argv = ["train", "--config", str(cfg), "--out", str(out), "--quiet", "--no-report"]
        for s in sets:
            argv += ["--set", s]
        assert main(argv) == 0, capsys.readouterr().err
        capsys.readouterr()
        return out

    return train
