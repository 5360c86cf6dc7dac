"""FedAvg (McMahan et al. 2017, Algorithm 1) against a numpy transcription; the zero-sample case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flsec.aggregation import AggregationError, AggregatorParams, build_aggregator
from tests.reference_stacks import as_torch, assert_close, stacks


def fedavg_reference(x: np.ndarray, n: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """w_{t+1} - w_t = sum_k (n_k / n) Delta_k (Algorithm 1, server update); plain mean if n is None."""
    x = x.astype(np.float64)
    w = np.full(len(x), 1.0 / len(x)) if n is None else n / n.sum()
    return (w[:, None] * x).sum(axis=0), w


@settings(max_examples=30, deadline=None)
@given(stacks(), st.data(), st.booleans())
def test_fedavg_matches_reference(x: np.ndarray, data: st.DataObject, weighted: bool) -> None:
    n = np.array(data.draw(st.lists(st.integers(0, 500), min_size=len(x), max_size=len(x))), dtype=np.float64)
    n[0] = max(n[0], 1.0)
    rule = build_aggregator("fedavg", AggregatorParams(sample_weighted=weighted))
    res = rule(as_torch(x), torch.from_numpy(n))
    update, w = fedavg_reference(x, n if weighted else None)
    assert_close(res.update, update, what="update")
    assert_close(res.weights, w, what="weights")


def test_all_zero_sample_counts_are_a_clear_error() -> None:
    """Regression: every count 0 used to give NaN weights and a NaN model."""
    rule = build_aggregator("fedavg", AggregatorParams())
    with pytest.raises(AggregationError, match="every one of the 3 updates reports 0 samples"):
        rule(torch.ones(3, 4), torch.zeros(3))
    plain = build_aggregator("fedavg", AggregatorParams(sample_weighted=False))(torch.eye(3), torch.zeros(3))
    assert torch.allclose(plain.update, torch.full((3,), 1 / 3))


def test_negative_or_non_finite_counts_are_rejected() -> None:
    rule = build_aggregator("fedavg", AggregatorParams())
    for bad in ([1.0, -1.0, 2.0], [1.0, float("nan"), 2.0]):
        with pytest.raises(AggregationError, match="sample counts"):
            rule(torch.ones(3, 2), torch.tensor(bad))


def test_huge_counts_and_values_do_not_overflow() -> None:
    x = torch.full((4, 3), 3e38)
    res = build_aggregator("fedavg", AggregatorParams())(x, torch.tensor([1e30, 1e30, 1e30, 1e30]))
    assert torch.isfinite(res.update).all() and torch.allclose(res.update, torch.full((3,), 3e38))
