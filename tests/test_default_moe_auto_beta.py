"""Default MoE's automatic beta rules (issue 40): beta and horizon per expert pinned on
hand-computed routing counts (a never-routed expert included), config validation, equality
across dispatch paths, the logs."""

import math

import pytest
import torch

from moelab.config import ConfigError, load_config
from moelab.methods.default_moe import BETA_RULES, DefaultMoE, DefaultMoEConfig, default_moe_layer
from moelab.moe import MoEConfig
from moelab.train.loggers import method_summary, tracker_records

LAYER = MoEConfig(d_model=2, n_experts=3, top_k=1, d_ff=4)
# one step's per-expert output sums and token counts: expert 1 is never routed
SUMS = torch.tensor([[2.0, 4.0], [0.0, 0.0], [8.0, 8.0]])
COUNTS = torch.tensor([2.0, 0.0, 8.0])
MEAN = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 1.0]])


def method(beta, horizon=None):
    return DefaultMoE(LAYER, DefaultMoEConfig(beta=beta, horizon=horizon))


def test_tokens_rule_beta_horizon_and_ema_hand_computed():
    m = method("tokens", horizon=4.0)
    b0, b2 = math.exp(-2 / 4), math.exp(-8 / 4)  # beta_e = exp(-n_e / H)
    expected = torch.zeros(3, 2)
    for _ in range(3):
        m.update(SUMS, COUNTS)
        expected[0] = b0 * expected[0] + (1 - b0) * MEAN[0]
        expected[2] = b2 * expected[2] + (1 - b2) * MEAN[2]
        torch.testing.assert_close(m.ema, expected)
        torch.testing.assert_close(m.beta_E, torch.tensor([b0, 1.0, b2]))
        # horizon in tokens: n_e / (1 - beta_e) ~ H + n_e / 2; never routed: 0, Ê stays 0
        torch.testing.assert_close(m.horizon_E, torch.tensor([2 / (1 - b0), 0.0, 8 / (1 - b2)]))
    assert m.n_updates.tolist() == [3, 0, 3]
    assert torch.all(m.ema[1] == 0)


def test_tokens_rule_horizon_is_kept_while_unrouted_and_default_is_2_14():
    m = method("tokens")
    assert m.cfg.rule_horizon == BETA_RULES["tokens"] == 2.0 ** 14
    m.update(SUMS, COUNTS)
    m.update(torch.zeros(3, 2), torch.tensor([0.0, 0.0, 512.0]))  # expert 0 not routed now
    b = math.exp(-512 / 2 ** 14)
    torch.testing.assert_close(m.beta_E, torch.tensor([1.0, 1.0, b]))
    torch.testing.assert_close(m.horizon_E[0], torch.tensor(2 / -math.expm1(-2 / 2 ** 14)))
    torch.testing.assert_close(m.horizon_E[2], torch.tensor(512 / (1 - b)))


def test_warmup_rule_is_the_exact_mean_then_a_fixed_horizon():
    m = method("warmup", horizon=3.0)
    means = [torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]]),
             torch.tensor([[6.0, 6.0]]), torch.tensor([[9.0, 0.0]])]
    expected_betas = [0.0, 1 / 2, 2 / 3, 2 / 3]  # 1 - 1 / min(k, 3)
    for k, (mean, beta) in enumerate(zip(means, expected_betas, strict=True), start=1):
        counts = torch.tensor([4.0, 0.0, 0.0])
        sums = torch.cat([mean * 4.0, torch.zeros(2, 2)])
        m.update(sums, counts)
        torch.testing.assert_close(m.beta_E, torch.tensor([beta, 1.0, 1.0]))
        torch.testing.assert_close(m.horizon_E, torch.tensor([4.0 / (1 - beta), 0.0, 0.0]))
        if k <= 3:  # the plain mean of the first k batch means: no zero-start bias
            torch.testing.assert_close(m.ema[0], torch.cat(means[:k]).mean(0))
    # k = 4: one EMA step at beta 2/3 from the mean of the first three
    torch.testing.assert_close(m.ema[0], 2 / 3 * torch.tensor([3.0, 3.0])
                               + 1 / 3 * torch.tensor([9.0, 0.0]))
    assert torch.all(m.ema[1:] == 0) and m.n_updates.tolist() == [4, 0, 0]


def test_warmup_counts_each_experts_own_updates():
    m = method("warmup")  # default horizon 100 steps
    m.update(SUMS, COUNTS)
    m.update(SUMS, torch.tensor([0.0, 5.0, 8.0]))  # expert 0 skipped, expert 1 first seen
    torch.testing.assert_close(m.beta_E, torch.tensor([1.0, 0.0, 0.5]))
    assert m.n_updates.tolist() == [1, 1, 2]
    torch.testing.assert_close(m.ema[1], SUMS[1] / 5.0)  # the first update is the batch mean


def test_fixed_beta_reports_its_horizon_in_tokens():
    m = method(0.75)
    m.update(SUMS, COUNTS)
    torch.testing.assert_close(m.beta_E, torch.tensor([0.75, 1.0, 0.75]))
    torch.testing.assert_close(m.horizon_E, torch.tensor([8.0, 0.0, 32.0]))
    torch.testing.assert_close(m.ema, 0.25 * MEAN)


@pytest.mark.parametrize("kw,match", [
    ({"beta": "auto"}, "beta='auto' is invalid"),
    ({"beta": "tokens", "bias_correction": True}, "bias_correction"),
    ({"beta": 0.9, "horizon": 100.0}, "horizon"),
    ({"beta": "warmup", "horizon": 0.5}, "horizon"),
    ({"beta": True}, "beta"),
])
def test_bad_rule_settings_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        DefaultMoEConfig(**kw)


def test_rule_from_toml_and_set(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[model.default_moe]\nbeta = "tokens"\nhorizon = 4096\n')
    cfg = load_config(str(toml))
    assert cfg.model.default_moe.beta == "tokens" and cfg.model.default_moe.horizon == 4096.0
    cfg = load_config("default", ["model.default_moe.beta=warmup"])
    assert cfg.model.default_moe == DefaultMoEConfig(beta="warmup")
    with pytest.raises(ConfigError, match="model.default_moe.beta='fast' is invalid"):
        load_config("default", ["model.default_moe.beta=fast"])


@pytest.mark.parametrize("rule", list(BETA_RULES))
def test_rules_equal_across_dispatch_paths_and_match_the_routing_counts(rule):
    """The loop and the grouped-GEMM path give the same Ê, beta and horizon, and beta is the
    rule applied to the tokens each expert got (counted from the routing)."""
    layers = []
    for backend in ("loop", "grouped_mm"):
        torch.manual_seed(0)
        cfg = MoEConfig(d_model=8, n_experts=4, top_k=2, d_ff=8, dispatch=backend)
        layers.append(default_moe_layer(cfg, DefaultMoEConfig(beta=rule, horizon=16.0)))
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        x = torch.randn(10, 8, generator=gen) + step
        for layer in layers:
            layer(x)
    loop, gmm = layers
    for name in ("ema", "beta_E", "horizon_E"):
        torch.testing.assert_close(getattr(gmm.method, name), getattr(loop.method, name),
                                   rtol=1e-5, atol=1e-6)
    n = torch.bincount(loop.router(x).topk_ids.flatten(), minlength=4).float()
    if rule == "tokens":
        want = torch.where(n > 0, torch.exp(-n / 16.0), torch.ones(4))
    else:
        k = loop.method.n_updates.float()
        want = torch.where(n > 0, 1 - 1 / k.clamp(1, 16), torch.ones(4))
    torch.testing.assert_close(loop.method.beta_E, want)


def test_beta_and_horizon_logged_per_layer():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = default_moe_layer(MoEConfig(d_model=2, n_experts=3, top_k=1, d_ff=4),
                                           DefaultMoEConfig(beta="tokens", horizon=4.0))

        def moe_layers(self):
            return [self.layer]

    model = Model()
    model.layer.method.update(SUMS, COUNTS)
    row = method_summary(model)["default_moe"][0]
    b0, b2 = math.exp(-0.5), math.exp(-2.0)
    assert row["beta"] == pytest.approx([b0, 1.0, b2])
    assert row["horizon"] == pytest.approx([2 / (1 - b0), 0.0, 8 / (1 - b2)])
    scalars, hists = tracker_records({"kind": "eval", "step": 5, "default_moe": [row]})
    assert hists["layer0/default_moe_beta"].values == pytest.approx([b0, 1.0, b2])
    assert scalars["layer0/default_moe_beta_min"] == pytest.approx(b2)
    assert scalars["layer0/default_moe_horizon_mean"] == pytest.approx(
        (2 / (1 - b0) + 8 / (1 - b2)) / 3)


def test_report_lists_beta_range_and_mean_horizon_per_layer(tmp_path):
    from moelab.analysis.report import RunData, default_moe_table

    row = {"layer": 0, "ema_norm": [1.0, 0.0, 2.0], "beta": [0.5, 1.0, 0.25],
           "horizon": [10.0, 0.0, 20.0]}
    run = RunData(name="r", path=tmp_path, evals=[{"kind": "eval", "default_moe": [row]}])
    lines = default_moe_table([run])
    assert lines[-1] == "| r | 0 | 0.2500 – 1.0000 | 10 |"
    assert default_moe_table([RunData(name="plain", path=tmp_path)]) == []


def test_hf_patch_takes_the_rule_and_its_state_round_trips(tmp_path):
    """A patched HF model applies the rule to its blocks' counts; save_state / load_state
    keep the rule in the settings."""
    pytest.importorskip("transformers")
    from hf_tiny import tiny_model, token_batch

    from moelab.hf import load_state, patch, patched_blocks, save_state

    dm = DefaultMoEConfig(beta="tokens", horizon=16.0)
    model = tiny_model("mixtral").train()
    patch(model, default_moe=dm)
    ids = []
    for _, block in patched_blocks(model):
        router = block.moelab.router.__dict__["hf_router"]
        router.register_forward_hook(lambda m, a, out: ids.append(out[2]))
    model(token_batch())
    for (_, block), ids_TK in zip(patched_blocks(model), ids, strict=True):
        n = torch.bincount(ids_TK.flatten(), minlength=block.moelab.cfg.n_experts).float()
        want = torch.where(n > 0, torch.exp(-n / 16.0), torch.ones_like(n))
        torch.testing.assert_close(block.moelab.method.beta_E, want)
    save_state(model, tmp_path)
    fresh = load_state(tiny_model("mixtral"), tmp_path)
    assert fresh.__dict__["_moelab_settings"]["default_moe"] == dm
