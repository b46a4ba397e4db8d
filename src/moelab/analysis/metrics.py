"""Routing metrics for sparse MoE layers: utilization, load imbalance, Gini, entropy.

Every function here is pure and takes plain tensors (or anything ``torch.as_tensor``
accepts: lists, numpy arrays), never ``RoutingStats`` itself, so this module does not
depend on the MoE layer. Inputs are validated (shape, finiteness, sign) and bad input
raises a ``ValueError`` that names the argument and the offending shape or value.

Computation is done in float64 on the CPU; results are Python floats / ints or float64
CPU tensors. Metrics are for logging and plots, and the vectors involved are ``[E]``.

Shapes: ``E`` experts, ``T`` tokens.

Typical use, over an eval window of several forwards of one layer::

    counts_E = aggregate_counts([s.tokens_per_expert for s in stats_of_layer])
    row = layer_metrics(counts_E, entropy=mean_entropy, out_norm_E=last.expert_out_norm)
    json.dumps(row)

Which paper uses what:
- Excitation, Fig. 4: :func:`gini` of expert utilization by depth.
- Excitation, Fig. 5: :func:`router_entropy` (mean per-token entropy) over training.
- MomentumSMoE, Fig. 5: :func:`norm_ordered_share`, the share of selections per
  expert with experts ordered by the mean norm of their outputs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "LayerAccumulator",
    "aggregate_counts",
    "dead_experts",
    "expert_share",
    "gini",
    "layer_metrics",
    "load_imbalance",
    "norm_ordered_share",
    "router_entropy",
]

ArrayLike = torch.Tensor | Sequence[float]
Scalar = float | int | torch.Tensor

# Row sums of ``probs_TE`` may differ from 1 by this much (bf16 softmax is off by ~4e-3).
_PROB_SUM_ATOL = 1e-2


# --------------------------------------------------------------------------- validation


def _as_tensor(name: str, x: ArrayLike | None) -> torch.Tensor:
    if x is None:
        raise ValueError(f"{name} must be a tensor, got None")
    try:
        t = torch.as_tensor(x.detach() if isinstance(x, torch.Tensor) else x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a tensor of numbers, got {type(x).__name__}") from e
    if t.is_complex():
        raise ValueError(f"{name} must be real, got dtype {t.dtype}")
    return t.to(device="cpu", dtype=torch.float64)


def _first_bad(mask: torch.Tensor) -> tuple[int, ...]:
    """Index (as a tuple) of the first True entry of ``mask``."""
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


def _check_values(name: str, t: torch.Tensor, *, allow_nan: bool = False) -> None:
    """Finite (NaN allowed when ``allow_nan``) and non-negative, else ValueError."""
    bad = ~torch.isfinite(t)
    if allow_nan:
        bad &= ~torch.isnan(t)
    if bad.any():
        idx = _first_bad(bad)
        raise ValueError(f"{name} must be finite, got {t[idx].item()} at index {_fmt(idx)}")
    neg = t < 0  # NaN < 0 is False
    if neg.any():
        idx = _first_bad(neg)
        raise ValueError(f"{name} must be non-negative, got {t[idx].item()} at index {_fmt(idx)}")


def _fmt(idx: tuple[int, ...]) -> str:
    return str(idx[0]) if len(idx) == 1 else str(list(idx))


def _vector(name: str, x: ArrayLike, *, allow_nan: bool = False) -> torch.Tensor:
    """Validate a non-empty 1-D, finite, non-negative vector; return it as float64 CPU."""
    t = _as_tensor(name, x)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [E], got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must have at least one expert, got shape (0,)")
    _check_values(name, t, allow_nan=allow_nan)
    return t


def _counts(name: str, counts_E: ArrayLike) -> torch.Tensor:
    """Validated counts that also must not be all zero (share is undefined then)."""
    c = _vector(name, counts_E)
    if c.sum() <= 0:
        raise ValueError(
            f"{name} is all zero (no token was routed), so shares are undefined; "
            "accumulate counts over more forwards with aggregate_counts()"
        )
    return c


def _same_len(name: str, t: torch.Tensor, n_experts: int) -> None:
    if t.numel() != n_experts:
        raise ValueError(
            f"{name} must have shape ({n_experts},) like counts_E, got {tuple(t.shape)}"
        )


def _scalar(name: str, x: Scalar) -> float:
    """A finite Python float from a number or a one-element tensor."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        v = float(x.detach().reshape(()).item())
    elif isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(x).__name__}: {x!r}")
    else:
        v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


# ------------------------------------------------------------------------------ metrics


def expert_share(counts_E: ArrayLike) -> torch.Tensor:
    """Fraction of top-K assignments that went to each expert.

    Args:
        counts_E: ``[E]`` assignment counts per expert (int or float), non-negative,
            finite, not all zero.

    Returns:
        ``[E]`` float64 ``share_e = counts_e / sum_j counts_j``; sums to 1.

    Raises:
        ValueError: bad shape or values, or all counts zero.
    """
    c = _counts("counts_E", counts_E)
    return c / c.sum()


def load_imbalance(counts_E: ArrayLike) -> float:
    """Max over mean of the per-expert load.

    ``load_imbalance = max_e counts_e / mean_e counts_e = E * max_e counts_e / sum_e counts_e``.
    1.0 when perfectly balanced, E when one expert takes everything.

    Args:
        counts_E: ``[E]`` assignment counts, non-negative, finite, not all zero.
    """
    c = _counts("counts_E", counts_E)
    return float(c.max() / c.mean())


def gini(counts_E: ArrayLike) -> float:
    """Gini coefficient of expert utilization (Excitation, Fig. 4).

    Mean absolute difference over all ordered pairs divided by twice the mean::

        G = sum_i sum_j |x_i - x_j| / (2 * E**2 * mean(x))
          = sum_i sum_j |x_i - x_j| / (2 * E * sum(x))

    computed in O(E log E) via the equivalent sorted form (``x_(1) <= ... <= x_(E)``,
    ``i`` from 1)::

        G = sum_i (2*i - E - 1) * x_(i) / (E * sum(x))

    0 for uniform use; ``(E-1)/E`` (the maximum for E experts) when one expert takes
    everything. Not rescaled by ``E/(E-1)``, so values for layers with different E are
    on slightly different scales. Scale-invariant: counts and shares give the same value.

    Args:
        counts_E: ``[E]`` assignment counts (or shares), non-negative, finite, not all zero.
    """
    c = _counts("counts_E", counts_E)
    n = c.numel()
    x = torch.sort(c).values
    rank = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * rank - n - 1) * x).sum() / (n * x.sum()))


def router_entropy(probs_TE: ArrayLike, normalized: bool = False) -> float:
    """Mean over tokens of the entropy of the router distribution, in nats (Excitation, Fig. 5).

    ``H = (1/T) * sum_t ( -sum_e p_te * ln p_te )`` with ``0 * ln 0 = 0``.
    With ``normalized=True`` the result is divided by ``ln E``, so it lies in [0, 1]
    (1 for uniform routing); for ``E == 1`` the normalized entropy is defined as 0.

    Args:
        probs_TE: ``[T, E]`` router probabilities (softmax output, before top-K), T >= 1;
            non-negative, finite, each row summing to 1 within 1e-2 (loose enough for bf16).
            Logits are rejected by the sign / row-sum checks.
        normalized: divide by ``ln E``.
    """
    p = _as_tensor("probs_TE", probs_TE)
    if p.dim() != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"probs_TE must be 2-D [T, E] with T, E >= 1, got shape {tuple(p.shape)}")
    _check_values("probs_TE", p)
    row_sum_T = p.sum(dim=1)
    off = (row_sum_T - 1).abs() > _PROB_SUM_ATOL
    if off.any():
        t = int(off.nonzero()[0, 0])
        raise ValueError(
            f"probs_TE rows must sum to 1 (probabilities, not logits), row {t} sums to "
            f"{row_sum_T[t].item():.6g}"
        )
    h = float((-torch.special.xlogy(p, p).sum(dim=1)).mean())
    if normalized:
        n = p.shape[1]
        return 0.0 if n == 1 else h / math.log(n)
    return h


def dead_experts(counts_E: ArrayLike, threshold: float = 0) -> int:
    """Number of experts with ``counts_e <= threshold`` (default: received no token).

    All-zero counts are allowed (every expert is dead). A single small batch leaves many
    experts unused by chance: accumulate with :func:`aggregate_counts` first.

    Args:
        counts_E: ``[E]`` assignment counts, non-negative, finite.
        threshold: count at or below which an expert is dead; finite, non-negative.
    """
    c = _vector("counts_E", counts_E)
    thr = _scalar("threshold", threshold)
    if thr < 0:
        raise ValueError(f"threshold must be non-negative, got {thr}")
    return int((c <= thr).sum())


def norm_ordered_share(
    counts_E: ArrayLike, out_norm_E: ArrayLike
) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of selections per expert, experts ordered by ascending mean output norm.

    The load view of MomentumSMoE, Fig. 5: a flat curve means selection does not
    favour experts by the size of their outputs.

    Experts without a norm (``out_norm_e`` is NaN) or without tokens (``counts_e == 0``,
    whatever the norm says: the layer may record 0 or NaN there) are placed **last**, in
    expert-index order, and their norm is reported as NaN. All others are sorted by norm
    ascending, ties kept in expert-index order (stable sort). A NaN norm for an expert
    that has counts (e.g. counts aggregated over a window, norms from one forward) keeps
    that expert's share; the shares still sum to 1.

    Args:
        counts_E: ``[E]`` assignment counts, non-negative, finite, not all zero.
        out_norm_E: ``[E]`` mean L2 norm of each expert's output over its tokens;
            non-negative, finite or NaN (infinities are rejected).

    Returns:
        ``(share_sorted_E, norm_sorted_E)``, both ``[E]`` float64:
        ``share_sorted_E[i] = share[order[i]]``, ``norm_sorted_E[i] = out_norm[order[i]]``
        (NaN for the experts placed last).
    """
    share = expert_share(counts_E)
    norm = _vector("out_norm_E", out_norm_E, allow_nan=True)
    _same_len("out_norm_E", norm, share.numel())
    missing = torch.isnan(norm) | (share == 0)
    norm = torch.where(missing, torch.full_like(norm, math.nan), norm)
    # Sort by (missing, norm); the missing ones get key +inf, stable keeps index order.
    key = torch.where(missing, torch.full_like(norm, math.inf), norm)
    order = torch.sort(key, stable=True).indices
    return share[order], norm[order]


def aggregate_counts(counts_list: Sequence[ArrayLike]) -> torch.Tensor:
    """Sum per-expert counts over several forwards (e.g. an eval window).

    ``total_e = sum_n counts_list[n]_e``.

    Args:
        counts_list: non-empty sequence of ``[E]`` count vectors, all the same E,
            each non-negative and finite.

    Returns:
        ``[E]`` float64 CPU tensor of summed counts (exact for integers below 2**53).
    """
    if isinstance(counts_list, torch.Tensor):
        raise ValueError(
            "counts_list must be a sequence of [E] tensors, got a single tensor of shape "
            f"{tuple(counts_list.shape)}; use torch.stack(...).sum(0) or wrap it in a list"
        )
    counts_list = list(counts_list)
    if not counts_list:
        raise ValueError("counts_list must hold at least one [E] count vector, got none")
    total = None
    for i, c in enumerate(counts_list):
        v = _vector(f"counts_list[{i}]", c)
        if total is None:
            total = v.clone()
        else:
            _same_len(f"counts_list[{i}]", v, total.numel())
            total += v
    assert total is not None
    return total


def layer_metrics(
    counts_E: ArrayLike,
    *,
    mean_prob_E: ArrayLike | None = None,
    entropy: Scalar | None = None,
    dropped_frac: Scalar | None = None,
    unpicked_frac: Scalar | None = None,
    experts_per_token: Scalar | None = None,
    out_norm_E: ArrayLike | None = None,
    aux_loss: Scalar | None = None,
    z_loss: Scalar | None = None,
) -> dict[str, float | int | list[float]]:
    """All routing metrics of one layer as a flat, JSON-serialisable dict.

    Always present (from ``counts_E``): ``share`` (list[E]), ``load_imbalance``, ``gini``,
    ``dead`` (int, experts with zero count). Present only when the matching argument is
    given: ``mean_prob`` (list[E]), ``entropy`` and ``entropy_normalized``
    (``entropy / ln E``, 0 when E == 1), ``dropped_frac``, ``unpicked_frac``,
    ``experts_per_token``, ``norm_order_share``
    (list[E], see :func:`norm_ordered_share`), ``aux_loss``, ``z_loss``. Values are plain
    Python floats / ints / lists of floats, all finite, so ``json.dumps`` gives strict JSON.

    Args:
        counts_E: ``[E]`` top-K assignment counts, not all zero.
        mean_prob_E: ``[E]`` mean router probability per expert.
        entropy: mean per-token router entropy in nats (e.g. ``RoutingStats.entropy``).
        dropped_frac: fraction of assignments dropped by capacity, in [0, 1].
        unpicked_frac: fraction of tokens processed by no expert, in [0, 1] (under expert
            choice: picked by none; the meaningful drop measure there).
        experts_per_token: mean number of experts that processed a token, in [0, E].
        out_norm_E: ``[E]`` mean expert output norm (NaN or 0 for unused experts).
        aux_loss: load-balancing loss value.
        z_loss: router z-loss value.
    """
    c = _counts("counts_E", counts_E)
    n = c.numel()
    out: dict[str, float | int | list[float]] = {
        "share": (c / c.sum()).tolist(),
        "load_imbalance": load_imbalance(c),
        "gini": gini(c),
        "dead": dead_experts(c),
    }
    if mean_prob_E is not None:
        mp = _vector("mean_prob_E", mean_prob_E)
        _same_len("mean_prob_E", mp, n)
        out["mean_prob"] = mp.tolist()
    if entropy is not None:
        h = _scalar("entropy", entropy)
        out["entropy"] = h
        out["entropy_normalized"] = 0.0 if n == 1 else h / math.log(n)
    if dropped_frac is not None:
        d = _scalar("dropped_frac", dropped_frac)
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"dropped_frac must be in [0, 1], got {d}")
        out["dropped_frac"] = d
    if unpicked_frac is not None:
        u = _scalar("unpicked_frac", unpicked_frac)
        if not 0.0 <= u <= 1.0:
            raise ValueError(f"unpicked_frac must be in [0, 1], got {u}")
        out["unpicked_frac"] = u
    if experts_per_token is not None:
        k = _scalar("experts_per_token", experts_per_token)
        if not 0.0 <= k <= n:
            raise ValueError(f"experts_per_token must be in [0, {n}] (E experts), got {k}")
        out["experts_per_token"] = k
    if out_norm_E is not None:
        out["norm_order_share"] = norm_ordered_share(c, out_norm_E)[0].tolist()
    if aux_loss is not None:
        out["aux_loss"] = _scalar("aux_loss", aux_loss)
    if z_loss is not None:
        out["z_loss"] = _scalar("z_loss", z_loss)
    return out


class LayerAccumulator:
    """Routing statistics of one MoE layer summed over the forwards of one evaluation.

    ``add(layer.last_stats, losses)`` after each forward; ``metrics()`` gives the
    :func:`layer_metrics` dict of the whole evaluation (plus ``out_norm`` and ``tokens``).
    """

    def __init__(self) -> None:
        self.counts: list[torch.Tensor] = []
        self.tokens = 0
        self.entropy = 0.0
        self.dropped = 0.0
        self.unpicked: float | None = None
        self.experts_per_token: float | None = None
        self.mean_prob: torch.Tensor | None = None
        self.norm_sum: torch.Tensor | None = None
        self.norm_weight: torch.Tensor | None = None
        self.load_balance = 0.0
        self.z_loss = 0.0
        self.n_forwards = 0

    def add(self, stats: Any, losses: Any | None) -> None:
        n = int(stats.n_tokens)
        counts = stats.tokens_per_expert.detach().double().cpu()
        self.counts.append(counts)
        self.tokens += n
        self.entropy += float(stats.entropy) * n
        self.dropped += float(stats.dropped_frac) * n
        if getattr(stats, "unpicked_frac", None) is not None:
            self.unpicked = (self.unpicked or 0.0) + float(stats.unpicked_frac) * n
            self.experts_per_token = ((self.experts_per_token or 0.0)
                                      + float(stats.experts_per_token) * n)
        mp = stats.mean_prob.detach().double().cpu() * n
        self.mean_prob = mp if self.mean_prob is None else self.mean_prob + mp
        if stats.expert_out_norm is not None:
            norm = stats.expert_out_norm.detach().double().cpu()
            ok = ~torch.isnan(norm)
            w = torch.where(ok, counts, torch.zeros_like(counts))
            s = torch.where(ok, norm, torch.zeros_like(norm)) * w
            self.norm_sum = s if self.norm_sum is None else self.norm_sum + s
            self.norm_weight = w if self.norm_weight is None else self.norm_weight + w
        if losses is not None:
            self.load_balance += float(losses.load_balance)
            self.z_loss += float(losses.z_loss)
        self.n_forwards += 1

    def metrics(self) -> dict[str, Any]:
        counts = aggregate_counts(self.counts)
        out_norm = None
        if self.norm_sum is not None:
            out_norm = torch.where(self.norm_weight > 0,
                                   self.norm_sum / self.norm_weight.clamp_min(1e-300),
                                   torch.full_like(self.norm_sum, float("nan")))
        m = layer_metrics(
            counts,
            mean_prob_E=self.mean_prob / self.tokens,
            entropy=self.entropy / self.tokens,
            dropped_frac=min(1.0, max(0.0, self.dropped / self.tokens)),
            unpicked_frac=(None if self.unpicked is None
                           else min(1.0, max(0.0, self.unpicked / self.tokens))),
            experts_per_token=(None if self.experts_per_token is None
                               else self.experts_per_token / self.tokens),
            out_norm_E=out_norm,
            aux_loss=self.load_balance / self.n_forwards,
            z_loss=self.z_loss / self.n_forwards,
        )
        if out_norm is not None:
            m["out_norm"] = [None if math.isnan(v) else v for v in out_norm.tolist()]
        m["tokens"] = self.tokens
        return m
