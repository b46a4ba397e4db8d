"""Tests for moelab.analysis.metrics: hand-computed values on tiny tensors, plus error cases."""

import json
import math

import numpy as np
import pytest
import torch

from moelab.analysis.metrics import (
    aggregate_counts,
    dead_experts,
    expert_share,
    gini,
    layer_metrics,
    load_imbalance,
    norm_ordered_share,
    router_entropy,
)

LN2 = math.log(2.0)
NAN = float("nan")


def _gini_pairwise(x: list[float]) -> float:
    """Slow reference: mean absolute difference over all ordered pairs / (2 * mean)."""
    n = len(x)
    mad = sum(abs(a - b) for a in x for b in x) / n**2
    return mad / (2 * sum(x) / n)


# ---------------------------------------------------------------------------- share


def test_expert_share_values_and_sum():
    share = expert_share(torch.tensor([3, 1, 0, 4]))  # int counts, total 8
    assert share.tolist() == [3 / 8, 1 / 8, 0.0, 4 / 8]
    assert share.sum().item() == pytest.approx(1.0)


def test_expert_share_accepts_float_list_and_numpy():
    assert expert_share([1.0, 3.0]).tolist() == [0.25, 0.75]
    assert expert_share(np.array([2, 2])).tolist() == [0.5, 0.5]


def test_expert_share_all_zero_raises():
    with pytest.raises(ValueError, match=r"counts_E is all zero"):
        expert_share(torch.zeros(4))


# ----------------------------------------------------------------------- imbalance


def test_load_imbalance():
    # mean of [3, 1] is 2, max is 3 -> 1.5
    assert load_imbalance(torch.tensor([3, 1])) == pytest.approx(1.5)
    assert load_imbalance(torch.tensor([5.0, 5.0, 5.0])) == pytest.approx(1.0)
    # one expert takes all: max / mean = 4 / 1 = E
    assert load_imbalance(torch.tensor([4, 0, 0, 0])) == pytest.approx(4.0)


# ----------------------------------------------------------------------------- gini


def test_gini_uniform_is_zero():
    assert gini(torch.tensor([1, 1, 1, 1])) == pytest.approx(0.0, abs=1e-12)


def test_gini_one_expert_takes_all():
    # ordered pairs with |diff| = 4: 3 * 2 = 6 -> sum = 24;
    # G = 24 / (2 * E^2 * mean) = 24 / (2 * 16 * 1) = 0.75 = (E - 1) / E
    assert gini(torch.tensor([4, 0, 0, 0])) == pytest.approx(0.75)
    assert gini(torch.tensor([0, 0, 7, 0, 0])) == pytest.approx(4 / 5)


def test_gini_hand_worked_uneven():
    # x = [1, 2, 3, 4], mean 2.5.
    # unordered |diffs|: (1,2)=1 (1,3)=2 (1,4)=3 (2,3)=1 (2,4)=2 (3,4)=1 -> 10; ordered -> 20
    # MAD = 20 / 4^2 = 1.25;  G = MAD / (2 * mean) = 1.25 / 5 = 0.25
    assert gini(torch.tensor([4, 1, 3, 2])) == pytest.approx(0.25)
    # x = [3, 1], mean 2: ordered |diffs| = 2 + 2 = 4, MAD = 4 / 4 = 1, G = 1 / 4 = 0.25
    assert gini([3, 1]) == pytest.approx(0.25)
    # x = [0, 0, 1, 3], mean 1: unordered |diffs| 0,1,3,1,3,2 -> 10; ordered 20;
    # MAD = 20 / 16 = 1.25; G = 1.25 / 2 = 0.625
    assert gini([0, 0, 1, 3]) == pytest.approx(0.625)


def test_gini_matches_pairwise_reference_and_is_scale_invariant():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 7, 16):
        x = torch.randint(0, 50, (n,), generator=g).double()
        x[0] += 1  # never all zero
        assert gini(x) == pytest.approx(_gini_pairwise(x.tolist()), abs=1e-12)
        assert gini(x * 3.5) == pytest.approx(gini(x), abs=1e-12)


def test_gini_single_expert_is_zero():
    assert gini([5]) == 0.0


# -------------------------------------------------------------------------- entropy


def test_router_entropy_uniform_is_log_e():
    for e in (2, 4, 8):
        probs = torch.full((3, e), 1.0 / e)
        assert router_entropy(probs) == pytest.approx(math.log(e))
        assert router_entropy(probs, normalized=True) == pytest.approx(1.0)


def test_router_entropy_one_hot_is_zero():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert router_entropy(probs) == 0.0  # 0 * log 0 = 0, no NaN
    assert router_entropy(probs, normalized=True) == 0.0


def test_router_entropy_hand_computed_two_tokens():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # token 0: -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 0.5 ln 2 + 0.5 * 2 ln 2 = 1.5 ln 2
    # token 1: 0
    # mean = 0.75 ln 2 ~= 0.5199; normalized by ln 4 = 2 ln 2 -> 0.375
    assert router_entropy(probs) == pytest.approx(0.75 * LN2)
    assert router_entropy(probs, normalized=True) == pytest.approx(0.375)


def test_router_entropy_single_expert_normalized_is_zero():
    assert router_entropy(torch.ones(5, 1), normalized=True) == 0.0


def test_router_entropy_tolerates_bf16_softmax():
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    p16 = torch.softmax(logits.bfloat16(), dim=-1)
    p32 = torch.softmax(logits, dim=-1)
    assert router_entropy(p16) == pytest.approx(router_entropy(p32), abs=1e-2)


@pytest.mark.parametrize(
    ("probs", "match"),
    [
        (torch.tensor([0.5, 0.5]), r"probs_TE must be 2-D \[T, E\].*\(2,\)"),
        (torch.zeros(0, 4), r"probs_TE must be 2-D.*\(0, 4\)"),
        (torch.tensor([[0.5, 0.5], [0.9, 0.3]]), r"row 1 sums to 1\.2"),
        (
            torch.tensor([[1.5, -0.5]]),
            r"probs_TE must be non-negative, got -0\.5 at index \[0, 1\]",
        ),
        (torch.tensor([[NAN, 1.0]]), r"probs_TE must be finite, got nan"),
    ],
)
def test_router_entropy_errors(probs, match):
    with pytest.raises(ValueError, match=match):
        router_entropy(probs)


# ----------------------------------------------------------------------------- dead


def test_dead_experts():
    counts = torch.tensor([0, 3, 0, 1, 2])
    assert dead_experts(counts) == 2
    assert dead_experts(counts, threshold=1) == 3
    assert dead_experts(counts, threshold=2.5) == 4
    assert dead_experts(torch.zeros(3)) == 3  # all-zero allowed here
    assert dead_experts([1, 1]) == 0


def test_dead_experts_negative_threshold_raises():
    with pytest.raises(ValueError, match=r"threshold must be non-negative, got -1"):
        dead_experts([1, 2], threshold=-1)


# ---------------------------------------------------------------- norm-ordered share


def test_norm_ordered_share_orders_by_ascending_norm():
    counts = torch.tensor([1, 2, 3, 4])  # shares 0.1, 0.2, 0.3, 0.4
    norms = torch.tensor([5.0, 1.0, 3.0, 2.0])  # order by norm: e1, e3, e2, e0
    share, norm = norm_ordered_share(counts, norms)
    assert share.tolist() == pytest.approx([0.2, 0.4, 0.3, 0.1])
    assert norm.tolist() == [1.0, 2.0, 3.0, 5.0]


def test_norm_ordered_share_nan_and_zero_norm_unused_experts_go_last():
    # e1 unused with NaN norm, e3 unused with 0 norm: both last, in index order, norm NaN.
    counts = torch.tensor([2, 0, 6, 0])
    norms = torch.tensor([4.0, NAN, 1.0, 0.0])
    share, norm = norm_ordered_share(counts, norms)
    assert share.tolist() == pytest.approx([0.75, 0.25, 0.0, 0.0])
    assert norm[:2].tolist() == [1.0, 4.0]
    assert torch.isnan(norm[2:]).all()


def test_norm_ordered_share_nan_norm_with_counts_keeps_share_last():
    # counts aggregated over a window, norm from the last forward: e0 has NaN norm
    share, norm = norm_ordered_share([1, 1, 2], [NAN, 2.0, 0.0])
    # a genuine 0 norm with tokens sorts first
    assert share.tolist() == pytest.approx([0.5, 0.25, 0.25])
    assert share.sum().item() == pytest.approx(1.0)
    assert norm[:2].tolist() == [0.0, 2.0] and math.isnan(norm[2].item())


def test_norm_ordered_share_ties_are_stable():
    share, _ = norm_ordered_share([1, 2, 3], [1.0, 1.0, 1.0])
    assert share.tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6])


@pytest.mark.parametrize(
    ("norms", "match"),
    [
        ([1.0, 2.0], r"out_norm_E must have shape \(3,\) like counts_E, got \(2,\)"),
        ([1.0, float("inf"), 2.0], r"out_norm_E must be finite, got inf at index 1"),
        ([1.0, -2.0, 2.0], r"out_norm_E must be non-negative, got -2\.0 at index 1"),
    ],
)
def test_norm_ordered_share_errors(norms, match):
    with pytest.raises(ValueError, match=match):
        norm_ordered_share([1, 1, 1], norms)


# ------------------------------------------------------------------- input checking


@pytest.mark.parametrize("fn", [expert_share, load_imbalance, gini, dead_experts])
@pytest.mark.parametrize(
    ("counts", "match"),
    [
        (torch.ones(2, 2), r"counts_E must be 1-D \[E\], got shape \(2, 2\)"),
        (torch.tensor(3.0), r"counts_E must be 1-D \[E\], got shape \(\)"),
        (torch.zeros(0), r"counts_E must have at least one expert"),
        (torch.tensor([1.0, -1.0]), r"counts_E must be non-negative, got -1\.0 at index 1"),
        (torch.tensor([1.0, NAN]), r"counts_E must be finite, got nan at index 1"),
        (torch.tensor([float("inf"), 1.0]), r"counts_E must be finite, got inf at index 0"),
        ("abc", r"counts_E must be a tensor of numbers"),
    ],
)
def test_counts_validation(fn, counts, match):
    with pytest.raises(ValueError, match=match):
        fn(counts)


def test_inputs_are_not_modified_and_grad_is_ignored():
    counts = torch.tensor([1.0, 3.0], requires_grad=True)
    assert gini(counts) == pytest.approx(0.25)
    assert counts.tolist() == [1.0, 3.0]


# ------------------------------------------------------------------------ aggregate


def test_aggregate_counts():
    total = aggregate_counts([torch.tensor([1, 0, 2]), torch.tensor([0.0, 0.0, 3.0]), [1, 1, 1]])
    assert total.tolist() == [2.0, 1.0, 6.0]
    assert dead_experts(total) == 0


def test_aggregate_counts_does_not_alias_first_input():
    first = torch.tensor([1.0, 1.0], dtype=torch.float64)
    aggregate_counts([first, first])
    assert first.tolist() == [1.0, 1.0]


def test_aggregate_counts_errors():
    with pytest.raises(ValueError, match=r"at least one"):
        aggregate_counts([])
    with pytest.raises(ValueError, match=r"counts_list\[1\] must have shape \(2,\)"):
        aggregate_counts([torch.ones(2), torch.ones(3)])
    with pytest.raises(ValueError, match=r"counts_list\[0\] must be non-negative"):
        aggregate_counts([torch.tensor([-1.0, 1.0])])
    with pytest.raises(ValueError, match=r"single tensor of shape \(2, 3\)"):
        aggregate_counts(torch.ones(2, 3))


# --------------------------------------------------------------------- layer metrics


def test_layer_metrics_minimal():
    m = layer_metrics(torch.tensor([3, 1]))
    assert set(m) == {"share", "load_imbalance", "gini", "dead"}
    assert m["share"] == [0.75, 0.25]
    assert m["load_imbalance"] == pytest.approx(1.5)
    assert m["gini"] == pytest.approx(0.25)
    assert m["dead"] == 0


def test_layer_metrics_full_is_json_serialisable():
    m = layer_metrics(
        torch.tensor([4, 0, 2, 2]),
        mean_prob_E=torch.tensor([0.4, 0.1, 0.25, 0.25]),
        entropy=torch.tensor(LN2),
        dropped_frac=torch.tensor(0.125),
        out_norm_E=torch.tensor([3.0, NAN, 1.0, 2.0]),
        aux_loss=torch.tensor(1.25, requires_grad=True),
        z_loss=0.5,
    )
    text = json.dumps(m, allow_nan=False)  # strict JSON: no NaN / inf anywhere
    back = json.loads(text)
    assert back["share"] == [0.5, 0.0, 0.25, 0.25]
    assert back["load_imbalance"] == pytest.approx(2.0)  # 4 / mean 2
    # x = [0, 2, 2, 4], mean 2: ordered |diffs| 2*(2+2+4+0+2+2) = 24; G = 24 / (2*16*2) = 0.375
    assert back["gini"] == pytest.approx(0.375)
    assert back["dead"] == 1
    assert back["mean_prob"] == pytest.approx([0.4, 0.1, 0.25, 0.25])
    assert back["entropy"] == pytest.approx(LN2)
    assert back["entropy_normalized"] == pytest.approx(0.5)  # ln 2 / ln 4
    assert back["dropped_frac"] == 0.125
    assert back["norm_order_share"] == [0.25, 0.25, 0.5, 0.0]  # norms 1, 2, 3, then unused
    assert back["aux_loss"] == 1.25
    assert back["z_loss"] == 0.5
    for v in back.values():
        assert isinstance(v, int | float | list)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mean_prob_E": torch.ones(3)}, r"mean_prob_E must have shape \(2,\)"),
        ({"entropy": torch.ones(2)}, r"entropy must be a scalar, got a tensor of shape \(2,\)"),
        ({"entropy": "high"}, r"entropy must be a number, got str"),
        ({"dropped_frac": 1.5}, r"dropped_frac must be in \[0, 1\], got 1\.5"),
        ({"aux_loss": NAN}, r"aux_loss must be finite, got nan"),
        ({"z_loss": float("inf")}, r"z_loss must be finite, got inf"),
        ({"out_norm_E": torch.ones(2, 1)}, r"out_norm_E must be 1-D"),
    ],
)
def test_layer_metrics_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        layer_metrics(torch.tensor([1, 1]), **kwargs)


def test_layer_metrics_all_zero_counts_raises():
    with pytest.raises(ValueError, match=r"all zero"):
        layer_metrics(torch.zeros(3))
