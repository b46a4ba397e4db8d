"""moelab.analysis.spectrum: the layer map's Jacobian and its spectrum against hand-computed
cases (a linear MoE block, heavy ball's companion matrix) and the full Jacobian."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from moelab.analysis.spectrum import heavy_ball_matrix, layer_spectra, per_token_jacobian, summary
from moelab.config import load_config
from moelab.methods.momentum import CombineRule, HeavyBall
from moelab.models import build_model
from moelab.models.blocks import Block
from moelab.moe import MoEConfig, MoELayer, MoELosses, MoEOutput

SIGMA = (0.5, 1.0, 2.5, 3.6)  # eigenvalues of S = -dMoE/dh, chosen by hand
D = len(SIGMA)


class LinearMoE(nn.Module):
    """A stand-in MoE layer that is linear: x -> x A^T."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        zero = x.new_zeros(())
        return MoEOutput(x @ self.A.T, MoELosses(zero, zero, zero))


class OneBlock(nn.Module):
    """A model of one pre-norm MoE block with LN2 taken out: h -> h + gamma*p, p = A h + mu*p."""

    def __init__(self, A: torch.Tensor, rule: CombineRule) -> None:
        super().__init__()
        block = Block(D, LinearMoE(A), attn=None, moe_idx=0)
        block.norm2 = nn.Identity()
        self.blocks = nn.ModuleList([block])
        self.combine_rule = rule

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        state = self.combine_rule.init_state(h)
        for b in self.blocks:
            h, state, _ = b(h, state, self.combine_rule)
        return h


def _A() -> torch.Tensor:
    """A = -Q diag(SIGMA) Q^T for a fixed rotation Q (so S = -A has eigenvalues SIGMA)."""
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    return -(q @ torch.diag(torch.tensor(SIGMA, dtype=torch.float64)) @ q.T)


def _sorted(z: torch.Tensor) -> list[complex]:
    return sorted((complex(round(v.real, 9), round(v.imag, 9)) for v in z.tolist()),
                  key=lambda c: (c.real, c.imag))


def test_linear_smoe_block_by_hand():
    A = _A()
    x = torch.randn(5, D, dtype=torch.float64)
    (sp,) = layer_spectra(OneBlock(A, CombineRule()), x, tokens=5)
    # h_out = h + A h: Jacobian I + A, eigenvalues 1 - sigma = 0.5, 0, -1.5, -2.6
    assert sp.eig.shape == (5, D)
    for t in range(5):
        assert _sorted(sp.eig[t]) == _sorted(torch.tensor([1 - s for s in SIGMA],
                                                          dtype=torch.complex128))
        assert _sorted(sp.sigma[t]) == _sorted(torch.tensor(SIGMA, dtype=torch.complex128))
    assert sp.radius == pytest.approx(2.6)
    assert sp.inside == pytest.approx(0.5)  # 0.5 and 0 inside, -1.5 and -2.6 outside
    assert sp.headroom == pytest.approx(2.0 - 3.6)  # Proposition 1: U = 2


def test_linear_heavy_ball_block_is_the_companion_system():
    mu, gamma = 0.7, 1.0
    A = _A()
    x = torch.randn(3, D, dtype=torch.float64)
    (sp,) = layer_spectra(OneBlock(A, HeavyBall(mu, gamma)), x, tokens=3)
    assert sp.eig.shape == (3, 2 * D)
    # per sigma: lambda^2 - (1 + mu - gamma*sigma) lambda + mu = 0. sigma 0.5, 1, 2.5 give
    # complex pairs of modulus sqrt(mu) (discriminant < 0); sigma 3.6 gives -0.5 and -1.4
    r = math.sqrt(mu)
    assert sorted(sp.eig[0].abs().tolist()) == pytest.approx([0.5] + [r] * 6 + [1.4])
    for s in SIGMA:
        b = 1 + mu - gamma * s
        disc = complex(b * b - 4 * mu) ** 0.5
        for lam in ((b + disc) / 2, (b - disc) / 2):
            assert (sp.eig[0] - lam).abs().min() < 1e-9, (s, lam)
    assert sp.radius == pytest.approx(1.4)
    assert sp.inside == pytest.approx(7 / 8)
    assert sp.headroom == pytest.approx(2 + 2 * mu - 3.6)  # Corollary 1: U = 2 + 2 mu
    # the 2d x 2d Jacobian itself equals [[I - gamma S, gamma mu I], [-S, mu I]]
    S = -A
    J = heavy_ball_matrix(S, mu, gamma)
    want = torch.linalg.eigvals(J)
    assert _sorted(want) == _sorted(sp.eig[0])


def test_heavy_ball_matrix_scalar_companion():
    # d = 1, sigma = 1, mu = 0.5, gamma = 1: [[0, 0.5], [-1, 0.5]], eigenvalues 0.25 +- i sqrt(7)/4
    J = heavy_ball_matrix(torch.tensor([[1.0]], dtype=torch.float64), 0.5, 1.0)
    assert J.tolist() == [[0.0, 0.5], [-1.0, 0.5]]
    ev = torch.linalg.eigvals(J)
    assert _sorted(ev) == _sorted(torch.tensor([0.25 - 1j * math.sqrt(7) / 4,
                                                0.25 + 1j * math.sqrt(7) / 4],
                                               dtype=torch.complex128))


def test_per_token_jacobian_matches_the_full_jacobian_of_a_moe_layer():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=6, n_experts=4, top_k=2, d_ff=8)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    full = torch.autograd.functional.jacobian(lambda z: layer(z).y, x)  # [T, D, T, D]
    per = per_token_jacobian(lambda z: layer(z).y, x)
    for t in range(5):
        torch.testing.assert_close(per[t], full[t, :, t, :])
        for s in range(5):
            if s != t:
                assert full[t, :, s, :].abs().max() == 0  # tokens do not interact
    assert per.abs().max() > 0


@pytest.mark.parametrize("form", ["pre", "post_double"])
def test_measured_heavy_ball_jacobian_has_the_papers_form(form):
    """In a real pre-norm heavy-ball model the (h, p) Jacobian is exactly
    [[I - gamma S, gamma mu I], [-S, mu I]] with the measured S (post-norm adds the norms)."""
    cfg = load_config("default", ["model.d_model=8", "model.n_heads=2", "model.n_layers=2",
                                  "model.moe.n_experts=4", "model.moe.d_ff=8",
                                  "model.momentum.rule=heavy_ball", "model.momentum.mu=0.6",
                                  "model.momentum.gamma=0.9", f"model.norm_position={form}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=256)
    x = torch.randint(0, 256, (2, 6))
    spectra = layer_spectra(model, x, tokens=12)
    assert [s.eig.shape for s in spectra] == [(12, 16), (12, 16)]
    assert all(0 <= s.inside <= 1 and s.radius > 0 and s.move > 0 for s in spectra)
    if form == "pre":
        for sp in spectra:
            for t in range(3):
                S = _S_of(sp, t)
                want = torch.linalg.eigvals(heavy_ball_matrix(S, 0.6, 0.9))
                got = sp.eig[t]
                for lam in want:
                    assert (got - lam).abs().min() < 1e-8
    s = summary(spectra)
    assert set(s) == {"radius", "inside", "headroom", "move"}


def _S_of(sp, t):
    """A matrix with the eigenvalues sp.sigma[t] (diagonal; eigenvalues are what is compared)."""
    return torch.diag_embed(sp.sigma[t])


def test_model_without_moe_blocks_is_refused():
    with pytest.raises(ValueError, match="not a moelab model"):
        layer_spectra(nn.Linear(2, 2), torch.zeros(1, 2))


TINY = ["model.d_model=16", "model.n_layers=2", "model.n_heads=2", "model.moe.n_experts=4",
        "model.moe.d_ff=16", "model.max_seq_len=16", "data.seq_len=16", "data.batch_size=4",
        "data.eval_batches=1", "data.final_eval_batches=1", "train.steps=3",
        "train.eval_every=3", "train.log_every=1", "train.threads=1"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from moelab.config import apply_overrides, config_from_dict, config_to_dict
    from moelab.train.trainer import Trainer

    root = tmp_path_factory.mktemp("spectrum_runs")
    for name, rule in (("smoe", "none"), ("mom", "heavy_ball")):
        data = config_to_dict(load_config("default"))
        cfg = config_from_dict(apply_overrides(data, [*TINY, f"model.momentum.rule={rule}"]))
        Trainer(cfg, root / name, quiet=True).fit()
    return root / "smoe", root / "mom"


def test_cli_spectrum_writes_the_plot(two_runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from moelab.cli import main

    out = tmp_path / "spec"
    assert main(["spectrum", str(two_runs[0]), str(two_runs[1]), "--out", str(out),
                 "--tokens", "8"]) == 0
    png = (out / "spectrum.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    doc = json.loads((out / "spectrum.json").read_text())
    assert set(doc) == {"smoe", "mom"}
    assert [len(doc[k]["layers"]) for k in ("smoe", "mom")] == [2, 2]
    printed = capsys.readouterr().out
    assert "layer  radius  inside  headroom  move" in printed and "spectrum.png" in printed
    assert main(["spectrum", str(tmp_path / "nope")]) == 2


def test_run_spectrum_at_init_is_the_seeded_model(two_runs):
    from moelab.analysis.spectrum import run_spectrum
    from moelab.runs.directory import read_config
    from moelab.train.evaluation import eval_batches
    from moelab.train.trainer import load_trained

    run = two_runs[1]
    cfg = read_config(run)
    torch.manual_seed(cfg.train.seed)
    fresh = build_model(cfg.model, vocab_size=256)
    data = load_trained(run).data
    x, _ = next(iter(eval_batches(data, "val", cfg.data.batch_size, cfg.data.seq_len, 1)))
    want = layer_spectra(fresh, x, tokens=8)
    got = run_spectrum(run, at="init", tokens=8)
    assert [g.radius for g in got] == pytest.approx([w.radius for w in want], rel=1e-12)
    trained = run_spectrum(run, at="end", tokens=8)
    assert [t.radius for t in trained] != pytest.approx([w.radius for w in want], rel=1e-6)
    with pytest.raises(ValueError, match="at='mid' is invalid"):
        run_spectrum(run, at="mid")


def test_capacity_drops_are_refused():
    cfg = load_config("default", ["model.d_model=8", "model.n_heads=2", "model.n_layers=1",
                                  "model.moe.n_experts=4", "model.moe.d_ff=8",
                                  "model.moe.capacity_factor=1.0"])
    model = build_model(cfg.model, vocab_size=256)
    with pytest.raises(ValueError, match="dropless"):
        layer_spectra(model, torch.randint(0, 256, (1, 4)))


def test_expert_choice_is_refused():
    """Expert choice makes tokens depend on each other (experts pick among them): refused with
    its own reason, not the capacity-factor one."""
    cfg = load_config("mnist_mlp", ["model.d_model=8", "model.n_layers=1",
                                    "model.moe.n_experts=4", "model.moe.d_ff=8",
                                    'model.moe.routing="expert_choice"',
                                    "model.moe.capacity_factor=1.0"])
    model = build_model(cfg.model, image_shape=(1, 4, 4), n_classes=3)
    with pytest.raises(ValueError, match="token-choice routing"):
        layer_spectra(model, torch.randn(2, 1, 4, 4))
