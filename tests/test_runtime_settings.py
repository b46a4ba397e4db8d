"""train.deterministic (auto / true / false) and the process-wide settings a run holds while it
trains (moelab.distributed.wrap.runtime_settings): real determinism or none, everything
restored afterwards."""

from __future__ import annotations

import os

import pytest
import torch
import torch.utils.deterministic as det

from moelab.config import ConfigError, TrainConfig, load_config
from moelab.distributed.wrap import resolve_deterministic, runtime_settings


def test_deterministic_config_values():
    assert TrainConfig().deterministic == "auto"
    for ok in ("auto", True, False):
        assert TrainConfig(deterministic=ok).deterministic == ok
    for bad in ("on", "yes", 1, 0, None):
        with pytest.raises(ValueError, match="deterministic"):
            TrainConfig(deterministic=bad)
    cfg = load_config("default", ["train.deterministic=false"])
    assert cfg.train.deterministic is False
    assert load_config("default", ["train.deterministic=auto"]).train.deterministic == "auto"
    with pytest.raises(ConfigError, match="train.deterministic"):
        load_config("default", ["train.deterministic='sometimes'"])


def test_auto_is_on_for_cpu_and_off_for_cuda():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")
    assert resolve_deterministic("auto", cpu) is True
    assert resolve_deterministic("auto", cuda) is False
    assert resolve_deterministic("auto", mps) is False
    assert resolve_deterministic(True, cuda) is True
    assert resolve_deterministic(False, cpu) is False
    with pytest.raises(ValueError, match="train.deterministic"):
        resolve_deterministic("on", cpu)


def _state() -> tuple:
    return (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            det.fill_uninitialized_memory, torch.get_num_threads(),
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_on_is_real_and_everything_is_restored():
    cpu = torch.device("cpu")
    # a state unlike what the run sets: warn-only determinism, NaN-filled empty tensors
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        before = _state()
        with runtime_settings(TrainConfig(deterministic=True, threads=1), cpu):
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            assert det.fill_uninitialized_memory is False
            assert torch.get_num_threads() == 1
        assert _state() == before
        torch.use_deterministic_algorithms(False)
        before = _state()
        with runtime_settings(TrainConfig(deterministic=False), cpu):
            assert not torch.are_deterministic_algorithms_enabled()
        with runtime_settings(TrainConfig(), cpu):  # auto: on for CPU
            assert torch.are_deterministic_algorithms_enabled()
        with pytest.raises(RuntimeError, match="boom"), runtime_settings(TrainConfig(), cpu):
            raise RuntimeError("boom")
        assert _state() == before
    finally:
        torch.use_deterministic_algorithms(False)
        det.fill_uninitialized_memory = True


def test_cuda_determinism_uses_math_attention_and_the_cublas_workspace(monkeypatch):
    """The CUDA branch, simulated on any machine (the switches are process-wide flags)."""
    from moelab.distributed.wrap import _deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    backends = torch.backends.cuda
    flags = (backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled(),
             backends.math_sdp_enabled())
    with _deterministic(torch.device("cuda", 0)):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert backends.math_sdp_enabled()
        assert not (backends.flash_sdp_enabled() or backends.mem_efficient_sdp_enabled()
                    or backends.cudnn_sdp_enabled())
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert (backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled(),
            backends.math_sdp_enabled()) == flags
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's choice is kept
    with _deterministic(torch.device("cuda", 0)):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_runs_saved_with_deterministic_true_are_not_stale_under_auto():
    """`moelab reproduce` compares a run's saved config with its definition: a run saved
    before "auto" existed (deterministic = true) is the same run on CPU, not a stale one."""
    from moelab.experiments.runner import _comparable

    def cfg(*sets: str):
        return load_config("default", ["train.device=cpu", *sets])

    assert _comparable(cfg("train.deterministic=true")) == _comparable(cfg())
    assert _comparable(cfg("train.deterministic=false")) != _comparable(cfg())
    on_cuda = [_comparable(load_config("default", ["train.device=cuda",
                                                   f"train.deterministic={v}"]))
               for v in ("true", "false", "auto")]
    assert on_cuda[0] != on_cuda[2] and on_cuda[1] == on_cuda[2]
