"""``train.compile`` / ``moelab.distributed.wrap.compile_blocks``: every block compiles with
``fullgraph=True`` (no graph break), and a compiled model trains like the eager one, for every
method, in fp32 and bf16 autocast, with activation checkpointing and capacity dropping.

The method matrix traces with the "aot_eager" backend (dynamo + AOT autograd, the same graphs
without code generation: seconds instead of minutes on 2 CPU cores); one test runs inductor.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_train import losses, tiny

from moelab.distributed import wrap as parallel
from moelab.methods.default_moe import DefaultMoEConfig
from moelab.methods.excitation import Excitation
from moelab.methods.momentum import MomentumConfig
from moelab.models import ModelConfig, build_model
from moelab.moe import MoEConfig, MoELayer
from moelab.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 64


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """Each test's models get their own compiled graphs (dynamo caches per code object, and
    every test compiles Block.forward again)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def model_pair(*, rule: str = "none", default_moe: DefaultMoEConfig | None = None,
               ac: bool = False, capacity: float | None = None, learnable: bool = False,
               backend: str = "aot_eager", dispatch: str = "auto"):
    cfg = ModelConfig(kind="lm", d_model=32, n_layers=2, n_heads=2, activation_checkpointing=ac,
                      moe=MoEConfig(n_experts=4, top_k=2, d_ff=16, capacity_factor=capacity,
                                    dispatch=dispatch),
                      default_moe=default_moe,
                      momentum=MomentumConfig(rule=rule, learnable=learnable))
    torch.manual_seed(0)
    eager = build_model(cfg, vocab_size=VOCAB)
    compiled = copy.deepcopy(eager)
    old = parallel.COMPILE_BACKEND
    parallel.COMPILE_BACKEND = backend
    try:
        assert parallel.compile_blocks(compiled) == 2
    finally:
        parallel.COMPILE_BACKEND = old
    return eager, compiled


def train_both(eager, compiled, *, steps: int = 3, precision: str = "fp32",
               excitation: bool = False, lr: float = 0.05):
    """SGD steps (linear in the gradients, so bf16 rounding is not amplified as by Adam) on
    the same batches; returns the losses of both."""
    models = (eager, compiled)
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m in models]
    if excitation:
        for opt, m in zip(opts, models, strict=True):
            Excitation(opt, m, strategy="positive_sum", gamma=1.0)
    gen = torch.Generator().manual_seed(1)
    out = ([], [])
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (4, 16), generator=gen)
        for i, (m, opt) in enumerate(zip(models, opts, strict=True)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                o = m(x)
                loss = F.cross_entropy(o.logits[:, :-1].flatten(0, 1).float(),
                                       x[:, 1:].flatten()) + o.aux_loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out[i].append(loss.item())
    return out


def assert_same_training(eager, compiled, got, *, atol: float) -> None:
    torch.testing.assert_close(got[1], got[0], rtol=0, atol=atol)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(),
                            strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=0, atol=atol, msg=name)


ALL_DM = DefaultMoEConfig(beta=0.9, scored=True, bias_correction=True)


@pytest.mark.parametrize("ac", [False, True])
def test_all_three_methods_compiled_equal_eager(ac):
    """Default MoE (scored, bias-corrected: its EMA buffers update in the compiled graph) +
    heavy ball + Excitation (counts from the compiled forwards), with and without activation
    checkpointing (the EMA and the counts still update once per step)."""
    eager, compiled = model_pair(rule="heavy_ball", default_moe=ALL_DM, ac=ac)
    got = train_both(eager, compiled, excitation=True)
    assert_same_training(eager, compiled, got, atol=2e-5)
    for a, b in zip(eager.moe_layers(), compiled.moe_layers(), strict=True):
        assert torch.equal(a.method.n_updates, b.method.n_updates)
        assert int(b.method.n_updates.max()) == 3


@pytest.mark.parametrize("rule,kw,atol", [
    ("adam", {}, 2e-3),  # AdamSMoE amplifies rounding (its first output is ~ f / |f|)
    ("robust", {"capacity": 0.75}, 2e-5),
    ("heavy_ball", {"learnable": True,
                    "default_moe": DefaultMoEConfig(beta=0.5, straight_through=True)}, 2e-5),
])
def test_each_momentum_rule_compiled_equals_eager(rule, kw, atol):
    eager, compiled = model_pair(rule=rule, **kw)
    got = train_both(eager, compiled)
    assert_same_training(eager, compiled, got, atol=atol)


def test_bf16_autocast_compiled_follows_eager():
    eager, compiled = model_pair(rule="heavy_ball", default_moe=ALL_DM, ac=True)
    got = train_both(eager, compiled, precision="bf16", excitation=True)
    assert_same_training(eager, compiled, got, atol=2e-2)  # bf16: about 3 significant digits


def test_inductor_compiled_equals_eager():
    """The real compiler (inductor, C++ code on CPU) on all three methods."""
    eager, compiled = model_pair(rule="heavy_ball", default_moe=ALL_DM, backend="inductor")
    got = train_both(eager, compiled, steps=2, excitation=True)
    assert_same_training(eager, compiled, got, atol=2e-5)


@pytest.mark.parametrize("capacity", [None, 0.75])
def test_padded_dispatch_compiled_equals_eager(capacity):
    """dispatch='padded' traces fullgraph (static slots, batched matmuls) and trains like
    eager, dropless and with capacity drops, with Default MoE under activation checkpointing."""
    eager, compiled = model_pair(rule="heavy_ball", default_moe=ALL_DM, ac=True,
                                 capacity=capacity, dispatch="padded")
    got = train_both(eager, compiled, steps=2)
    assert_same_training(eager, compiled, got, atol=2e-5)


@pytest.mark.parametrize("capacity", [None, 1.0])
def test_compiled_fp32_with_a_capacity_on_cuda_traces_the_padded_path(monkeypatch, capacity):
    """Under CUDA's policy, "auto" compiles fp32 with a capacity to the padded path: batched
    matmuls, no grouped GEMM (whose fp32 fallback reads its offsets on the host per GEMM) in
    the graph; dropless stays on grouped GEMM."""
    from moelab.moe import dispatch

    monkeypatch.setattr(dispatch, "backend_policy", lambda device_type: "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    graphs = []

    def recording(gm, example_inputs):  # a backend that keeps the traced code
        graphs.append(gm.code)
        return gm.forward

    _, compiled = model_pair(capacity=capacity, backend=recording)
    compiled(torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2)))
    code = "\n".join(graphs)
    assert graphs and ("grouped_mm" in code) == (capacity is None)
    assert ("torch.bmm" in code) == (capacity is not None)


def test_the_grouped_mm_probe_never_runs_under_tracing(monkeypatch):
    from moelab.moe import dispatch

    probe = dispatch.grouped_mm_supported

    def guarded(*args):
        if torch.compiler.is_compiling():
            raise AssertionError("the grouped GEMM probe ran under tracing")
        return probe(*args)

    monkeypatch.setattr(dispatch, "grouped_mm_supported", guarded)
    eager, compiled = model_pair(default_moe=DefaultMoEConfig())
    train_both(eager, compiled, steps=1)


def test_compile_refuses_what_cannot_compile():
    cfg = MoEConfig(d_model=8, n_experts=2, top_k=1, d_ff=8, dispatch="loop")
    with pytest.raises(ValueError, match="dispatch='loop'"):
        parallel.compile_blocks(torch.nn.ModuleDict({"blocks": torch.nn.ModuleList(
            [MoELayer(cfg)])}))
    with pytest.raises(ValueError, match="has no blocks to compile"):
        parallel.compile_blocks(torch.nn.Linear(2, 2))


def test_trainer_compile_setting_trains_like_eager(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "COMPILE_BACKEND", "aot_eager")
    base = ("train.steps=6", "train.eval_every=3", "train.log_every=2",
            "model.default_moe.beta=0.9", "model.momentum.rule=heavy_ball")
    eager = Trainer(tiny(*base), tmp_path / "eager", quiet=True).fit()
    compiled = Trainer(tiny(*base, "train.compile=true"), tmp_path / "compiled",
                       quiet=True).fit()
    torch.testing.assert_close(losses(tmp_path / "compiled"), losses(tmp_path / "eager"),
                               rtol=0, atol=1e-4)
    for key in ("val_loss", "test_loss", "gini_mean"):
        assert compiled[key] == pytest.approx(eager[key], abs=1e-4), key


@pytest.mark.parametrize("momentum", [None, MomentumConfig(rule="heavy_ball")])
def test_a_patched_hf_model_compiles_and_trains_like_eager(momentum):
    """HF decoder layers compile (not fullgraph: transformers' attention breaks the graph),
    with Default MoE in the patched blocks and MomentumSMoE's state carried between layers."""
    pytest.importorskip("transformers")
    from hf_tiny import tiny_model

    from moelab.hf import patch
    from moelab.hf.model import HFCausalLM

    hf = tiny_model("mixtral").train()
    patch(hf, default_moe=DefaultMoEConfig(beta=0.9), momentum=momentum, dispatch="grouped_mm")
    eager, compiled = HFCausalLM(hf), HFCausalLM(copy.deepcopy(hf))
    monkey = parallel.COMPILE_BACKEND
    parallel.COMPILE_BACKEND = "aot_eager"
    try:
        assert parallel.compile_blocks(compiled) == 2
    finally:
        parallel.COMPILE_BACKEND = monkey
    got = train_both(eager, compiled, steps=2)
    assert_same_training(eager, compiled, got, atol=2e-5)


@pytest.mark.parametrize("rule", ["tokens", "warmup"])
def test_automatic_beta_compiled_equals_eager(rule):
    """The automatic beta rules are tensor ops on the step's counts: the compiled blocks
    update Ê, beta and the horizon as eager does."""
    eager, compiled = model_pair(default_moe=DefaultMoEConfig(beta=rule, horizon=32.0))
    got = train_both(eager, compiled)
    assert_same_training(eager, compiled, got, atol=2e-5)
    for a, b in zip(eager.moe_layers(), compiled.moe_layers(), strict=True):
        torch.testing.assert_close(b.method.beta_E, a.method.beta_E, rtol=0, atol=1e-6)
        torch.testing.assert_close(b.method.horizon_E, a.method.horizon_E, rtol=1e-5, atol=0)
        assert bool((a.method.beta_E < 1).any())  # the rule, not the unrouted value
