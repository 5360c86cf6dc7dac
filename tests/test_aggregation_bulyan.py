"""Bulyan (El Mhamdi et al. 2018, Sec. 4) over Krum, against a numpy transcription."""

from __future__ import annotations

from functools import cmp_to_key

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flsec.aggregation import AggregationError, AggregatorParams, build_aggregator
from tests.reference_stacks import as_torch, assert_close, stacks


def krum_choice(x: np.ndarray, d2: np.ndarray, candidates: list[int], f: int) -> int:
    """Krum over the candidate set: least sum of squared distances (d2) to its r - f - 2 nearest
    others (ties by row content, then position)."""
    r = len(candidates)

    def score(i: int) -> float:
        return float(np.sum(sorted(d2[i, j] for j in candidates if j != i)[: max(r - f - 2, 0)]))

    scores = {i: score(i) for i in candidates}

    def cmp(i: int, j: int) -> int:
        if scores[i] != scores[j]:
            return -1 if scores[i] < scores[j] else 1
        a, b = x[i].tolist(), x[j].tolist()
        return int(a > b) - int(a < b)

    return sorted(candidates, key=cmp_to_key(cmp))[0]


def bulyan_reference(x: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray]:
    """theta = n - 2f recursive Krum selections, then per coordinate the mean of the beta = theta - 2f
    values closest to the median of the selection."""
    x64 = x.astype(np.float64)
    n = len(x)
    d2 = np.array([((x64 - x64[i]) ** 2).sum(axis=1) for i in range(n)])
    remaining, chosen = list(range(n)), []
    while len(chosen) < n - 2 * f:
        best = krum_choice(x64, d2, remaining, f)
        chosen.append(best)
        remaining.remove(best)
    beta = n - 4 * f
    order = np.argsort(x[chosen], axis=0, kind="stable")  # rows of the selection, sorted per coordinate
    values = np.take_along_axis(x64[chosen], order, axis=0)
    median = np.median(values, axis=0)
    near = np.argsort(np.abs(values - median), axis=0, kind="stable")[:beta]
    update = np.take_along_axis(values, near, axis=0).mean(axis=0)
    used = np.bincount(np.asarray(chosen)[np.take_along_axis(order, near, axis=0)].ravel(), minlength=n)
    return update, used / used.sum()


@settings(max_examples=30, deadline=None)
@given(stacks(), st.data())
def test_bulyan_matches_reference(x: np.ndarray, data: st.DataObject) -> None:
    f = data.draw(st.integers(0, (len(x) - 3) // 4))
    res = build_aggregator("bulyan", AggregatorParams(f=f))(as_torch(x))
    update, w = bulyan_reference(x, f)
    assert_close(res.update, update, what="update")
    assert_close(res.weights, w, what="weights")


def test_needs_4f_plus_3_updates() -> None:
    rule = build_aggregator("bulyan", AggregatorParams(f=2))
    with pytest.raises(AggregationError, match="bulyan needs at least 11 updates"):
        rule(torch.randn(10, 3))
    assert torch.isfinite(rule(torch.randn(11, 3)).update).all()


def test_f_far_attackers_are_never_selected() -> None:
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(9, 20, generator=g)
    x = torch.cat([honest[:4], 1e6 + torch.randn(2, 20, generator=g), honest[4:]])
    res = build_aggregator("bulyan", AggregatorParams(f=2))(x)
    assert torch.all(res.weights[4:6] == 0)
    assert torch.all(res.update >= honest.min(0).values) and torch.all(res.update <= honest.max(0).values)
