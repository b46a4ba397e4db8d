"""The spectrum of the per-layer map: MomentumSMoE's stability argument, measured.

MomentumSMoE (Teo & Nguyen, NeurIPS 2024, arXiv 2410.14574, Sec. 3) reads a residual MoE
sub-layer ``h <- h + gamma * MoE(h)`` as a gradient-descent step ``x_{t+1} = x_t - gamma *
grad F(x_t)`` with ``-grad F = MoE``, one step per layer. Linearised at a point, the step's
Jacobian is ``I - gamma * S`` with ``S = -d MoE / d h``; it contracts iff every eigenvalue
sigma of S has ``|1 - gamma*sigma| < 1`` (real sigma: ``0 < gamma*sigma < 2``, the paper's
Proposition 1). Heavy ball (``p = MoE(h) + mu*p``, ``h <- h + gamma*p``) is a map of the state
(h, p) with Jacobian ``[[I - gamma*S, gamma*mu*I], [-S, mu*I]]`` (2d x 2d), whose eigenvalues
solve ``lambda^2 - (1 + mu - gamma*sigma) lambda + mu = 0`` per sigma; it contracts iff
``0 < gamma*sigma < 2 + 2*mu`` for real sigma (Corollary 1): the paper's wider margin.

For each MoE block of a model and each token of a batch of real inputs this module computes

* ``jac_h``: [T, d, d] the Jacobian of the block's MoE sub-layer output w.r.t. its input h'
  (the attention sub-layer's output; the block input when it has none), state held fixed;
* ``jac``: [T, n, n] the Jacobian of the layer map on the rule's full carried state,
  (h, p) for heavy ball and robust momentum (n = 2d), (h, m, v, p) in AdamSMoE's Adam layers
  and (h, p) after them; = ``jac_h`` for SMoE (n = d);
* ``S = -d MoE/d h'`` [T, d, d] and its eigenvalues sigma,

by reverse-mode autograd on the token batch: MoE sub-layers act on each token alone (routing
choices carry no gradient), so one reverse pass over n stacked copies of the batch gives
every token's own Jacobian (``per_token_jacobian``; checked against the full Jacobian in
tests/test_spectrum.py). Per layer (definitions: docs/METHODS.md, "The layer map's spectrum"):
``radius`` (mean over tokens of the spectral radius of ``jac``), ``inside`` (share of all
eigenvalues of ``jac`` with |lambda| < 1), ``headroom`` (the paper's margin: mean over tokens of
``U - gamma * max Re sigma`` with U = 2 for SMoE and 2 + 2*mu for heavy ball; None where the
rule has no such bound) and ``move`` (mean over tokens of ``||h_out - h_in|| / ||h_in||``
across the whole block: the fixed-point view).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LayerSpectrum", "heavy_ball_matrix", "layer_spectra", "make_spectrum_report",
           "per_token_jacobian", "plot_spectra", "run_spectrum", "shown_layers",
           "state_indices", "summary"]


@dataclass
class LayerSpectrum:
    """One MoE layer's spectrum over T tokens.

    layer: the MoE layer's index (0-based); eig: [T, n] complex eigenvalues of the layer map's
    Jacobian ``jac``; sigma: [T, d] complex eigenvalues of ``S = -d MoE / d h'``;
    radius, inside, headroom, move: see the module docstring.
    """

    layer: int
    eig: Tensor
    sigma: Tensor
    radius: float
    inside: float
    headroom: float | None
    move: float

    def row(self) -> dict[str, Any]:
        """The scalar measures as a dict (JSON-ready)."""
        return {"layer": self.layer, "radius": self.radius, "inside": self.inside,
                "headroom": self.headroom, "move": self.move}


def per_token_jacobian(fn: Callable[[Tensor], Tensor], z_TN: Tensor) -> Tensor:
    """``fn``: [T, n] -> [T, m] acting on each row alone; returns [T, m, n], row t's Jacobian.

    One reverse pass over m stacked copies of the batch: copy j's output gets the cotangent
    e_j, so copy j's input gradient is row j of every token's Jacobian (exact when rows do not
    interact: routing choices carry no gradient, and a dropless layer routes the copies as it
    routes the batch). Plain autograd, not ``torch.func.jacrev``: the MoE expert kernels are
    ``autograd.Function``s without ``setup_context``, which functorch transforms refuse."""
    T = z_TN.shape[0]
    with torch.no_grad():
        m = fn(z_TN).shape[-1]
    z = z_TN.detach().repeat(m, 1).requires_grad_(True)  # [m*T, n], copy j = rows jT..(j+1)T
    with torch.enable_grad():
        y = fn(z)
        if y.shape != (m * T, m):
            raise ValueError(f"fn returned shape {tuple(y.shape)} for input "
                             f"{tuple(z.shape)}: need one output row per input row")
        cot = torch.zeros_like(y).view(m, T, m)
        cot[torch.arange(m), :, torch.arange(m)] = 1.0
        (g,) = torch.autograd.grad(y, z, cot.view(m * T, m), allow_unused=True)
    if g is None:
        return z_TN.new_zeros(T, m, z_TN.shape[1])
    return g.view(m, T, -1).permute(1, 0, 2).contiguous()


def heavy_ball_matrix(S: Tensor, mu: float, gamma: float) -> Tensor:
    """The heavy-ball layer map's Jacobian on (h, p) for ``S = -d MoE/d h`` [..., d, d]:
    ``[[I - gamma*S, gamma*mu*I], [-S, mu*I]]`` [..., 2d, 2d] (the hand formula the
    measured ``jac`` of a pre-norm heavy-ball block equals)."""
    d = S.shape[-1]
    eye = torch.eye(d, dtype=S.dtype, device=S.device).expand_as(S)
    top = torch.cat((eye - gamma * S, gamma * mu * eye), dim=-1)
    bottom = torch.cat((-S, mu * eye), dim=-1)
    return torch.cat((top, bottom), dim=-2)


def state_indices(rule: nn.Module, layer_idx: int) -> tuple[int, ...]:
    """Which entries of the rule's state the layer map at MoE layer ``layer_idx`` changes (the
    rest pass through unchanged and are left out of ``jac``): () for SMoE, (0,) = p for heavy
    ball and robust momentum, (0, 1, 2) = m, v, p in AdamSMoE's Adam layers, (2,) = p after."""
    name = getattr(rule, "name", "none")
    if name == "none":
        return ()
    if name == "adam":
        return (0, 1, 2) if layer_idx < rule.adam_layers else (2,)
    if name in ("heavy_ball", "robust"):
        return (0,)
    raise ValueError(f"combine rule {name!r} is unknown to moelab.analysis.spectrum: add its "
                     "state to state_indices")


def _bound(rule: nn.Module, layer_idx: int) -> tuple[float, float] | None:
    """``(U, gamma)``: the paper's convergence interval 0 < gamma*sigma < U for this layer's
    rule (SMoE U = 2, gamma = 1; heavy ball U = 2 + 2*mu), None where the paper gives none
    (robust momentum; AdamSMoE's Adam layers)."""
    name = getattr(rule, "name", "none")
    if name == "none":
        return 2.0, 1.0
    if name == "heavy_ball" or (name == "adam" and layer_idx >= rule.adam_layers):
        mu, gamma = rule._mu(layer_idx), rule._gamma(layer_idx)
        return 2.0 + 2.0 * float(mu), float(gamma)
    return None


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "combine_rule"):
        raise ValueError(f"{type(model).__name__} is not a moelab model (no blocks / "
                         "combine_rule): the spectrum needs MoETransformerLM, MoEViT or MoEMLP")
    out = [b for b in blocks if b.is_moe]
    if not out or not all(b.residual for b in out):
        raise ValueError("the spectrum needs residual MoE blocks (model.residual=true)")
    cfgs = [getattr(b.ffn, "cfg", None) for b in out]
    if any(getattr(c, "routing", "top_k") == "expert_choice" for c in cfgs):
        raise ValueError("the spectrum needs token-choice routing: under model.moe.routing="
                         "'expert_choice' experts choose among the tokens, so each token's "
                         "output depends on the others")
    if any(getattr(c, "capacity_factor", None) is not None for c in cfgs):
        raise ValueError("the spectrum needs dropless MoE layers (capacity drops make tokens "
                         "depend on each other): leave model.moe.capacity_factor unset")
    return out


def _capture(model: nn.Module, x: Tensor) -> list[tuple[Tensor, tuple[Tensor, ...], Tensor]]:
    """Run ``model(x)`` and return, per MoE block, (block input h [.., D], state entering it,
    block output h [.., D]), detached."""
    seen: list[tuple[Tensor, tuple[Tensor, ...], Tensor]] = []
    handles = []

    def hook(_mod, args, out):
        h, state = args[0], args[1]
        seen.append((h.detach(), tuple(s.detach() for s in state), out[0].detach()))

    for b in _moe_blocks(model):
        handles.append(b.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hd in handles:
            hd.remove()
    return seen


def _tile(state: tuple[Tensor, ...], rows: int) -> tuple[Tensor, ...]:
    """The fixed state [T, D] each repeated to ``rows`` (a multiple of T) rows, as
    ``per_token_jacobian`` stacks copies of the batch."""
    return tuple(s.repeat(rows // s.shape[0], 1) for s in state)


def _pick(t: Tensor, idx: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])[idx]


def layer_spectra(model: nn.Module, x: Tensor, *, tokens: int = 64) -> list[LayerSpectrum]:
    """The spectrum of every MoE layer of ``model`` on the inputs ``x`` (what the model takes:
    token ids [B, S], images [B, C, H, W] or features [B, F]), over ``tokens`` positions spread
    evenly over the batch. Computed in float64 on a copy of the model, in eval mode."""
    import copy

    model = copy.deepcopy(model).eval().double()
    if torch.is_floating_point(x):
        x = x.double()
    blocks = _moe_blocks(model)
    rule = model.combine_rule
    seen = _capture(model, x)
    n_all = seen[0][0].reshape(-1, seen[0][0].shape[-1]).shape[0]
    idx = torch.linspace(0, n_all - 1, min(tokens, n_all)).round().long().unique()
    out = []
    for li, (block, (h_in, state, h_out)) in enumerate(zip(blocks, seen, strict=True)):
        i = block.moe_idx
        with torch.no_grad():
            h1 = block.attn_sublayer(h_in) if block.attn is not None else h_in
        h1, h_in_t, h_out_t = _pick(h1, idx), _pick(h_in, idx), _pick(h_out, idx)
        full = tuple(_pick(s, idx) for s in state)
        keep = state_indices(rule, i)
        d = h1.shape[-1]

        def state_map(z: Tensor, full=full, keep=keep, block=block, i=i, d=d) -> Tensor:
            st = list(_tile(full, z.shape[0]))
            for k, j in enumerate(keep):
                st[j] = z[:, (k + 1) * d:(k + 2) * d]
            h, new, _ = _sublayer(block, rule, z[:, :d], tuple(st), i)
            return torch.cat([h] + [new[j] for j in keep], dim=-1)

        def moe_out(h: Tensor, full=full, block=block, i=i) -> Tensor:
            return _moe_output(block, rule, h, _tile(full, h.shape[0]), i)

        z = torch.cat([h1] + [full[j] for j in keep], dim=-1)
        jac = per_token_jacobian(state_map, z)
        S = -per_token_jacobian(moe_out, h1)
        eig = torch.linalg.eigvals(jac)
        sigma = torch.linalg.eigvals(S)
        rad = eig.abs().amax(-1)
        bound = _bound(rule, i)
        head = (None if bound is None else
                float((bound[0] - bound[1] * sigma.real.amax(-1)).mean()))
        move = ((h_out_t - h_in_t).norm(dim=-1) / h_in_t.norm(dim=-1)).mean()
        out.append(LayerSpectrum(li, eig, sigma, float(rad.mean()),
                                 float((eig.abs() < 1).double().mean()), head, float(move)))
    return out


def _sublayer(block: nn.Module, rule: nn.Module, h: Tensor, state: tuple[Tensor, ...],
              i: int) -> tuple[Tensor, tuple[Tensor, ...], Any]:
    """The block's FFN sub-layer at MoE layer ``i`` (the rule always told the true index)."""
    shim = _IndexedRule(rule)
    return block.ffn_sublayer(h, state, shim)


def _moe_output(block: nn.Module, rule: nn.Module, h: Tensor, state: tuple[Tensor, ...],
                i: int) -> Tensor:
    """The MoE output f the block's rule combines (MoE of LN2(h') pre-norm, of h' post-norm)."""
    x = h if block.post else block.norm2(h)
    return block.ffn(rule.moe_input(x, state, i)).y


class _IndexedRule:
    """A view of a combine rule that reports ``uses_layer_index`` so blocks pass their true
    MoE index (a rule that ignores it computes the same either way)."""

    uses_layer_index = True

    def __init__(self, rule: nn.Module) -> None:
        self._rule = rule

    def moe_input(self, x: Tensor, state: tuple[Tensor, ...], i: int) -> Tensor:
        return self._rule.moe_input(x, state, i)

    def combine(self, h: Tensor, f: Tensor, state: tuple[Tensor, ...],
                i: int) -> tuple[Tensor, tuple[Tensor, ...]]:
        return self._rule.combine(h, f, state, i)


def summary(spectra: Sequence[LayerSpectrum]) -> dict[str, float | None]:
    """Means over layers of radius, inside, headroom (None if no layer has one) and move."""
    n = len(spectra)
    heads = [s.headroom for s in spectra if s.headroom is not None]
    return {"radius": sum(s.radius for s in spectra) / n,
            "inside": sum(s.inside for s in spectra) / n,
            "headroom": sum(heads) / len(heads) if heads else None,
            "move": sum(s.move for s in spectra) / n}


def run_spectrum(run_dir: str | Path, *, at: str = "end", tokens: int = 64,
                 split: str = "val") -> list[LayerSpectrum]:
    """``layer_spectra`` of a run's model on the first batch of its ``split``: the trained
    checkpoint (``at="end"``) or the same model at initialisation (``at="init"``: rebuilt
    from the run's seed, as the trainer builds it)."""
    from moelab.train.evaluation import eval_batches
    from moelab.train.trainer import load_trained

    if at not in ("end", "init"):
        raise ValueError(f"at={at!r} is invalid: choose 'end' (the checkpoint) or 'init'")
    trainer = load_trained(run_dir)
    cfg = trainer.cfg
    model = trainer.model
    if at == "init":
        from moelab.models import build_model

        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, **trainer.data.model_kwargs())
    seq = getattr(cfg.data, "seq_len", None)
    x, _ = next(iter(eval_batches(trainer.data, split, cfg.data.batch_size, seq, 1)))
    return layer_spectra(model, x, tokens=tokens)


# ------------------------------------------------------------------------------ the figure

def shown_layers(n: int, most: int = 6) -> list[int]:
    """Up to ``most`` MoE layer indices spread evenly over ``n``, first and last included."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def plot_spectra(runs: Sequence[tuple[str, Sequence[LayerSpectrum]]], out: str | Path,
                 most_layers: int = 6) -> Path:
    """``spectrum.png``-style figure: one row per run, one panel per shown MoE layer, every
    token's eigenvalues of the layer map in the complex plane with the unit circle."""
    from moelab.analysis.report import _plt, _save

    plt = _plt()
    n = max(len(s) for _, s in runs)
    cols = shown_layers(n, most_layers)
    fig, axes = plt.subplots(len(runs), len(cols), figsize=(2.6 * len(cols) + 0.6,
                             2.6 * len(runs) + 0.8), squeeze=False, layout="constrained")
    fig.suptitle("eigenvalues of each MoE layer's map (all tokens); unit circle dashed")
    circle = torch.linspace(0, 2 * math.pi, 200)
    for r, (name, spectra) in enumerate(runs):
        for c, li in enumerate(cols):
            ax = axes[r][c]
            ax.plot(circle.cos(), circle.sin(), "k--", lw=0.8)
            if li < len(spectra):
                sp = spectra[li]
                ev = sp.eig.reshape(-1)
                ax.scatter(ev.real, ev.imag, s=4, alpha=0.35, lw=0)
                ax.set_title(f"{name}\nlayer {li}: ρ {sp.radius:.2f}, in {sp.inside:.0%}",
                             fontsize=8)
            ax.set_aspect("equal", adjustable="datalim")
            ax.axhline(0, color="0.8", lw=0.5)
            ax.axvline(0, color="0.8", lw=0.5)
            ax.tick_params(labelsize=7)
    return _save(fig, Path(out))


def make_spectrum_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None,
                         *, at: str = "end", tokens: int = 64) -> tuple[Path, str]:
    """``moelab spectrum``: the spectrum of every run, ``spectrum.png`` (runs side by side,
    e.g. SMoE beside MomentumSMoE) and ``spectrum.json`` (per run and layer: radius, inside,
    headroom, move) in ``out_dir`` (default: the run itself for one run, else ``report/``).
    Returns the figure's path and a plain-text table."""
    from moelab.analysis.report import _safe

    if not run_dirs:
        raise ValueError("name at least one run directory")
    out = Path(out_dir) if out_dir is not None else (
        Path(run_dirs[0]) if len(run_dirs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    runs, doc, lines = [], {}, []
    for d in run_dirs:
        name = _safe(Path(d).resolve().name)
        spectra = run_spectrum(d, at=at, tokens=tokens)
        runs.append((name, spectra))
        doc[name] = {"run": str(d), "at": at, "tokens": tokens,
                     "layers": [s.row() for s in spectra], "summary": summary(spectra)}
        lines.append(f"{name} ({at}, {tokens} tokens)")
        lines.append("  layer  radius  inside  headroom  move")
        for s in spectra:
            head = "–" if s.headroom is None else f"{s.headroom:+.3f}"
            lines.append(f"  {s.layer:>5}  {s.radius:6.3f}  {s.inside:6.1%}  {head:>8}  "
                         f"{s.move:.3f}")
    (out / "spectrum.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    png = plot_spectra(runs, out / "spectrum.png")
    return png, "\n".join(lines)
