"""Coordinate-wise trimmed mean (Yin et al. 2018, Definition 2) against a numpy transcription."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flsec.aggregation import AggregatorParams, build_aggregator
from tests.reference_stacks import as_torch, assert_close, stacks


def trimmed_mean_reference(x: np.ndarray, beta: int) -> tuple[np.ndarray, np.ndarray]:
    """trmean_beta: per coordinate, remove the beta largest and beta smallest values, average the rest.
    Weights: each row's share of the kept values (equal values kept in row order, a stable sort)."""
    k = len(x)
    order = np.argsort(x, axis=0, kind="stable")
    values = np.take_along_axis(x, order, axis=0).astype(np.float64)
    kept = np.bincount(order[beta : k - beta].ravel(), minlength=k)
    return values[beta : k - beta].mean(axis=0), kept / kept.sum()


@settings(max_examples=40, deadline=None)
@given(stacks(), st.data())
def test_trimmed_mean_matches_reference(x: np.ndarray, data: st.DataObject) -> None:
    beta = data.draw(st.integers(0, (len(x) - 1) // 2))
    res = build_aggregator("trimmed_mean", AggregatorParams(f=0, trim_beta=beta))(as_torch(x))
    update, w = trimmed_mean_reference(x, beta)
    assert_close(res.update, update, what="update")
    assert_close(res.weights, w, what="weights")


def test_mean_of_values_near_float32_max_does_not_overflow() -> None:
    """Regression: the float32 mean of three values of 3e38 was Inf."""
    x = torch.tensor([[3.0e38], [3.1e38], [3.2e38], [-3.3e38], [3.4e38]])
    res = build_aggregator("trimmed_mean", AggregatorParams(f=1))(x)
    assert torch.isfinite(res.update).all()
    assert abs(float(res.update) - 3.1e38) / 3.1e38 < 1e-6


def test_f_arbitrary_rows_stay_inside_the_honest_range() -> None:
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(8, 20, generator=g)
    x = torch.cat([torch.full((2, 20), 1e30), honest])
    res = build_aggregator("trimmed_mean", AggregatorParams(f=2))(x)
    assert torch.all(res.update >= honest.min(0).values) and torch.all(res.update <= honest.max(0).values)
