import sys
from pathlib import Path

# make tests/reference.py importable as `reference`
sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
