"""MomentumSMoE family (Teo & Nguyen, NeurIPS 2024, arXiv 2410.14574): momentum across depth.

A residual MoE block ``h <- h + f(h)`` is one gradient-descent step whose negative gradient is
the MoE output f; a stack of MoE blocks runs gradient descent across depth. A ``CombineRule``
decides how each MoE block turns its output f into the residual update, carrying a per-token
state (``p``, and ``v`` for Adam; each [B, S, D] like h) from MoE layer to MoE layer.

Pre-norm form (docs/METHODS.md §2), in every MoE block::

    h' = h + Attn(LN1(h))                          (models without attention: h' = h)
    f  = MoE(rule.moe_input(LN2(h'), state, i))    (i = index of this MoE layer, 0-based)
    h, state = rule.combine(h', f, state, i)

| rule (class)              | state update                             | block output         |
|---------------------------|------------------------------------------|----------------------|
| "none" (CombineRule)      | -                                        | h' + f               |
| "heavy_ball" (HeavyBall)  | p = f + mu*p                             | h' + gamma*p         |
| "adam" (AdamSMoE), i < A  | m = b1*m + (1-b1)*f, v = b2*v+(1-b2)*f^2 | h' + gamma*m /       |
|                           | and the heavy-ball buffer p = f + mu*p   |      sqrt(v + eps)   |
| "adam", i >= A            | p = f + mu*p                             | h' + gamma*p         |
| "robust" (RobustMomentum) | MoE input LN2(h') + eps_r*beta_r*p;      | h' + beta_r*p        |
|                           | p = f + alpha_r*p                        |                      |

(A = ``adam_layers``.) The state is created by ``rule.init_state(h)`` (zeros) at the start of
every forward, handed from block to block as a plain tuple of tensors (dense blocks pass it on
unchanged, activation-checkpointed blocks take it as an input and return it), and never stored
on a module. At the neutral settings (heavy ball mu=0, gamma=1; robust alpha=eps=0, beta=1)
every rule computes exactly the baseline ``h' + f``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moelab.validation import require

MOMENTUM_RULES = ("none", "heavy_ball", "adam", "robust")

#: The per-token state carried across MoE layers: a tuple of [B, S, D] (or [T, D]) tensors.
State = tuple[Tensor, ...]

__all__ = [
    "AdamSMoE", "CombineRule", "HeavyBall", "MomentumConfig", "RobustMomentum", "State",
    "build_combine_rule", "robust_coefficients",
]


@dataclass(frozen=True)
class MomentumConfig:
    """MomentumSMoE family: how each MoE block turns its MoE output into the residual update.

    rule: "none" (baseline), "heavy_ball" (MomentumSMoE), "adam" (AdamSMoE), "robust".
    mu, gamma: heavy-ball momentum and step size.  beta1, beta2, eps: AdamSMoE moments
    (eps inside the square root); adam_layers: how many leading MoE layers use Adam before the
    heavy-ball hand-off; adam_bias_correction: Adam bias correction (off in the official code).
    kappa, rho: robust momentum (Cyrus et al. 2018) condition number and rate.
    learnable: mu and gamma become per-layer scalar parameters initialised to the values above.
    """

    rule: str = "none"
    mu: float = 0.7
    gamma: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    adam_layers: int = 1
    adam_bias_correction: bool = False
    kappa: float = 1.25
    rho: float = 0.2
    learnable: bool = False

    def __post_init__(self) -> None:
        require(self.rule in MOMENTUM_RULES, "rule", self.rule,
                 f"choose one of {MOMENTUM_RULES}")
        require(0.0 <= self.mu < 1.0, "mu", self.mu, "need 0 <= mu < 1")
        require(self.gamma > 0.0, "gamma", self.gamma, "need gamma > 0")
        require(0.0 < self.beta1 < 1.0, "beta1", self.beta1, "need 0 < beta1 < 1")
        require(0.0 < self.beta2 < 1.0, "beta2", self.beta2, "need 0 < beta2 < 1")
        require(self.eps > 0.0, "eps", self.eps, "need eps > 0")
        require(self.adam_layers >= 1, "adam_layers", self.adam_layers, "need >= 1")
        require(self.kappa > 1.0, "kappa", self.kappa, "need kappa > 1")
        require(0.0 < self.rho <= 1.0 - 1.0 / self.kappa + 1e-12, "rho", self.rho,
                 f"need 0 < rho <= 1 - 1/kappa = {1.0 - 1.0 / self.kappa:.6g}")
        require(not self.learnable or self.rule in ("heavy_ball", "adam"),
                 "learnable", self.learnable,
                 f"only the heavy_ball and adam rules have mu/gamma to learn (rule={self.rule!r})")



def robust_coefficients(kappa: float, rho: float) -> tuple[float, float, float]:
    """Robust momentum (Cyrus et al. 2018) with L = 1: ``(alpha_r, beta_r, eps_r)``.

    ``alpha_r = kappa*rho^3/(kappa-1)``, ``beta_r = kappa*(1-rho)^2*(1+rho)``,
    ``eps_r = rho^3/((kappa-1)*(1-rho)^2*(1+rho))``; needs kappa > 1 and
    0 < rho <= 1 - 1/kappa. kappa=1.25, rho=0.2 gives (0.04, 0.96, 0.041666...).
    """
    require(kappa > 1.0, "kappa", kappa, "need kappa > 1")
    require(0.0 < rho <= 1.0 - 1.0 / kappa + 1e-12, "rho", rho,
           f"need 0 < rho <= 1 - 1/kappa = {1.0 - 1.0 / kappa:.6g}")
    alpha = kappa * rho**3 / (kappa - 1.0)
    beta = kappa * (1.0 - rho) ** 2 * (1.0 + rho)
    eps = rho**3 / ((kappa - 1.0) * (1.0 - rho) ** 2 * (1.0 + rho))
    return alpha, beta, eps


class CombineRule(nn.Module):
    """How an MoE block adds its output to the residual stream. This base class is the
    baseline SMoE rule ``h' + f`` with an empty state; subclasses override the three hooks.

    Args of the hooks: h, x_norm, f: [..., D] tensors of the same shape (f = MoE output);
    state: what ``init_state`` returned or the previous ``combine`` produced;
    layer_idx: 0-based index of this MoE layer among the model's MoE layers.
    """

    name = "none"

    @property
    def uses_layer_index(self) -> bool:
        """Whether the hooks depend on ``layer_idx``. Blocks give 0 to a rule that does not,
        so that one compiled graph serves every block. True for any subclass overriding a hook
        unless it says otherwise."""
        cls = type(self)
        return any(getattr(cls, hook) is not getattr(CombineRule, hook)
                   for hook in ("moe_input", "combine", "update"))

    def init_state(self, h: Tensor) -> State:
        """The state before the first MoE layer (zeros shaped like h)."""
        return ()

    def moe_input(self, x_norm: Tensor, state: State, layer_idx: int) -> Tensor:
        """The MoE layer's input, given ``x_norm = LN2(h')``."""
        return x_norm

    def combine(self, h: Tensor, f: Tensor, state: State,
                layer_idx: int) -> tuple[Tensor, State]:
        """``(block output, new state)`` from the block's residual h' and MoE output f:
        ``h' + update``, with ``update`` from :meth:`update`."""
        delta, state = self.update(f, state, layer_idx)
        return h + delta, state

    def update(self, f: Tensor, state: State, layer_idx: int) -> tuple[Tensor, State]:
        """``(residual update, new state)`` from the MoE output f: what the block adds to its
        residual h' (for blocks whose own code does the residual add, e.g. ``moelab.hf``)."""
        return f, state


class _MuGamma(CombineRule):
    """Holds mu and gamma: Python floats, or per-MoE-layer scalars ``mu[i]``, ``gamma[i]``
    (nn.Parameter of shape [n_layers], unconstrained) when ``learnable``."""

    def __init__(self, mu: float, gamma: float, n_layers: int | None, learnable: bool) -> None:
        super().__init__()
        self.learnable = learnable
        if learnable:
            require(n_layers is not None and n_layers >= 1, "n_layers", n_layers,
                   "a learnable rule needs the number of MoE layers (>= 1)")
            self.mu = nn.Parameter(torch.full((n_layers,), float(mu)))
            self.gamma = nn.Parameter(torch.full((n_layers,), float(gamma)))
        else:
            self.mu, self.gamma = float(mu), float(gamma)
        self.n_layers = n_layers

    @property
    def uses_layer_index(self) -> bool:
        return self.learnable  # learnable mu[i], gamma[i] are per MoE layer

    def _mu(self, i: int) -> Tensor | float:
        return self.mu[i] if self.learnable else self.mu

    def _gamma(self, i: int) -> Tensor | float:
        return self.gamma[i] if self.learnable else self.gamma

    def extra_repr(self) -> str:
        if self.learnable:
            return f"learnable=True, n_layers={self.n_layers}"
        return f"mu={self.mu}, gamma={self.gamma}"


class HeavyBall(_MuGamma):
    """MomentumSMoE: ``p = f + mu*p``; block output ``h' + gamma*p``. State: ``(p,)``.

    mu = 0, gamma = 1 is exactly the baseline. Official values: LM mu=0.7, gamma=1.0;
    V-MoE mu=0.8-0.9, gamma=1.0. Explicit values are not range-checked here (MomentumConfig
    validates 0 <= mu < 1, gamma > 0).
    """

    name = "heavy_ball"

    def __init__(self, mu: float = 0.7, gamma: float = 1.0, *, n_layers: int | None = None,
                 learnable: bool = False) -> None:
        super().__init__(mu, gamma, n_layers, learnable)

    def init_state(self, h: Tensor) -> State:
        return (torch.zeros_like(h),)

    def update(self, f: Tensor, state: State, layer_idx: int) -> tuple[Tensor, State]:
        (p,) = state
        mu, gamma = self._mu(layer_idx), self._gamma(layer_idx)
        if self.learnable:  # mu, gamma: tensors in the graph
            p = f + mu * p
            return gamma * p, (p,)
        p = torch.add(f, p, alpha=mu)  # one fused pass
        return (p if gamma == 1.0 else gamma * p), (p,)  # gamma 1 (the official LM value)


class AdamSMoE(_MuGamma):
    """AdamSMoE: Adam across the first ``adam_layers`` MoE layers, heavy ball after.

    State ``(m, v, p)``. In an Adam layer i (< adam_layers), with t = i + 1::

        m = beta1*m + (1-beta1)*f;  v = beta2*v + (1-beta2)*f^2
        out = h' + gamma * m_hat / sqrt(v_hat + eps)   (m_hat = m/(1-beta1^t),
                                                        v_hat = v/(1-beta2^t) if bias_correction,
                                                        else m, v)
        p = f + mu*p                                   (fills the heavy-ball buffer, so the
                                                        first layer leaves p = f)
    and in every later layer the heavy-ball step ``p = f + mu*p; out = h' + gamma*p``.
    Official code: adam_layers=1, beta1=0.9, beta2=0.999, eps=1e-8, no bias correction (the
    first output is then about 3.16*gamma*sign(f); bias correction makes it about
    gamma*sign(f)).
    """

    name = "adam"

    uses_layer_index = True  # Adam in the first adam_layers layers, heavy ball after

    def __init__(self, mu: float = 0.7, gamma: float = 1.0, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, adam_layers: int = 1,
                 bias_correction: bool = False, *, n_layers: int | None = None,
                 learnable: bool = False) -> None:
        super().__init__(mu, gamma, n_layers, learnable)
        require(adam_layers >= 1, "adam_layers", adam_layers, "need >= 1")
        if n_layers is not None:
            require(adam_layers <= n_layers, "adam_layers", adam_layers,
                   f"need <= number of MoE layers ({n_layers})")
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.adam_layers = adam_layers
        self.bias_correction = bias_correction

    def init_state(self, h: Tensor) -> State:
        return (torch.zeros_like(h), torch.zeros_like(h), torch.zeros_like(h))

    def update(self, f: Tensor, state: State, layer_idx: int) -> tuple[Tensor, State]:
        m, v, p = state
        p = f + self._mu(layer_idx) * p
        if layer_idx >= self.adam_layers:
            return self._gamma(layer_idx) * p, (m, v, p)
        b1, b2 = self.beta1, self.beta2
        m = b1 * m + (1.0 - b1) * f
        v = b2 * v + (1.0 - b2) * (f * f)
        m_hat, v_hat = m, v
        if self.bias_correction:
            t = layer_idx + 1
            m_hat, v_hat = m / (1.0 - b1**t), v / (1.0 - b2**t)
        step = m_hat / torch.sqrt(v_hat + self.eps)
        return self._gamma(layer_idx) * step, (m, v, p)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, beta1={self.beta1}, beta2={self.beta2}, "
                f"eps={self.eps}, adam_layers={self.adam_layers}, "
                f"bias_correction={self.bias_correction}")


class RobustMomentum(CombineRule):
    """Robust momentum: MoE input ``LN2(h') + eps_r*beta_r*p`` (look-ahead), then
    ``p = f + alpha_r*p``; block output ``h' + beta_r*p``. State: ``(p,)``.

    Takes the coefficients explicitly (alpha = eps = 0, beta = 1 is exactly the baseline);
    ``RobustMomentum.from_kappa_rho(kappa, rho)`` derives them (see ``robust_coefficients``).
    """

    name = "robust"
    uses_layer_index = False

    def __init__(self, alpha: float, beta: float, eps: float) -> None:
        super().__init__()
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)

    @classmethod
    def from_kappa_rho(cls, kappa: float = 1.25, rho: float = 0.2) -> RobustMomentum:
        return cls(*robust_coefficients(kappa, rho))

    def init_state(self, h: Tensor) -> State:
        return (torch.zeros_like(h),)

    def moe_input(self, x_norm: Tensor, state: State, layer_idx: int) -> Tensor:
        (p,) = state
        return x_norm + (self.eps * self.beta) * p

    def update(self, f: Tensor, state: State, layer_idx: int) -> tuple[Tensor, State]:
        (p,) = state
        p = f + self.alpha * p
        return self.beta * p, (p,)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, eps={self.eps}"


def build_combine_rule(cfg: MomentumConfig, n_moe_layers: int) -> CombineRule:
    """The CombineRule a ``MomentumConfig`` describes, for a model with ``n_moe_layers``."""
    require(isinstance(n_moe_layers, int) and n_moe_layers >= 1, "n_moe_layers", n_moe_layers,
           "need a positive int")
    if cfg.learnable:
        require(cfg.rule in ("heavy_ball", "adam"), "learnable", cfg.learnable,
               f"only the heavy_ball and adam rules have mu/gamma to learn (rule={cfg.rule!r})")
    if cfg.rule == "none":
        return CombineRule()
    if cfg.rule == "heavy_ball":
        return HeavyBall(cfg.mu, cfg.gamma, n_layers=n_moe_layers, learnable=cfg.learnable)
    if cfg.rule == "adam":
        return AdamSMoE(cfg.mu, cfg.gamma, cfg.beta1, cfg.beta2, cfg.eps, cfg.adam_layers,
                        cfg.adam_bias_correction, n_layers=n_moe_layers,
                        learnable=cfg.learnable)
    if cfg.rule == "robust":
        return RobustMomentum.from_kappa_rho(cfg.kappa, cfg.rho)
    raise ValueError(f"momentum.rule={cfg.rule!r} is invalid")
