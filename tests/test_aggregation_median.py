"""Coordinate-wise median (Yin et al. 2018, Definition 1) against a numpy transcription."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings

from flsec.aggregation import AggregatorParams, build_aggregator
from tests.reference_stacks import as_torch, assert_close, stacks


def median_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """med: per coordinate, the middle value (the mean of the two middle values for even k). Weights:
    each row's share of the middle values (ties in row order, a stable sort)."""
    k = len(x)
    lo, hi = (k - 1) // 2, k // 2 + 1
    order = np.argsort(x, axis=0, kind="stable")
    used = np.bincount(order[lo:hi].ravel(), minlength=k)
    return np.median(x.astype(np.float64), axis=0), used / used.sum()


@settings(max_examples=40, deadline=None)
@given(stacks())
def test_median_matches_reference(x: np.ndarray) -> None:
    res = build_aggregator("median", AggregatorParams())(as_torch(x))
    update, w = median_reference(x)
    assert_close(res.update, update, what="update")
    assert_close(res.weights, w, what="weights")


def test_known_answers_and_no_overflow() -> None:
    u = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])
    rule = build_aggregator("median", AggregatorParams())
    assert rule(u).update.item() == 2.0
    assert rule(u[:4]).update.item() == 1.5
    assert rule(torch.tensor([[3.3e38], [3.4e38]])).update.item() == np.float32(3.35e38)
