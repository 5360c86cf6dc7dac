"""Krum and Multi-Krum (Blanchard et al. 2017, Sec. 4) against a numpy transcription."""

from __future__ import annotations

from functools import cmp_to_key

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flsec.aggregation import AggregatorParams, build_aggregator
from flsec.aggregation.krum import krum_scores, multi_krum
from flsec.aggregation.numerics import pairwise_sq_distances
from flsec.errors import ConfigError
from tests.reference_stacks import as_torch, assert_close, stacks


def krum_reference(x: np.ndarray, f: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """score(i) = sum of ||V_i - V_j||^2 over the n - f - 2 closest V_j (i -> j); Multi-Krum averages
    the m vectors of least score. Ties: by the rows' contents, then by position."""
    x = x.astype(np.float64)
    k = len(x)
    d2 = np.array([((x - x[i]) ** 2).sum(axis=1) for i in range(k)])
    scores = [np.sort(np.delete(d2[i], i))[: k - f - 2].sum() for i in range(k)]

    def cmp(i: int, j: int) -> int:
        if scores[i] != scores[j]:
            return -1 if scores[i] < scores[j] else 1
        a, b = x[i].tolist(), x[j].tolist()
        return int(a > b) - int(a < b)

    chosen = sorted(range(k), key=cmp_to_key(cmp))[:m]
    w = np.zeros(k)
    w[chosen] = 1.0 / m
    return w @ x, w


@settings(max_examples=40, deadline=None)
@given(stacks(min_k=3), st.data())
def test_multi_krum_matches_reference(x: np.ndarray, data: st.DataObject) -> None:
    k = len(x)
    f = data.draw(st.integers(0, (k - 3) // 2))
    m = data.draw(st.integers(1, k))
    update, w = krum_reference(x, f, m)
    params = AggregatorParams(f=f, multi_krum_m=m)
    res = build_aggregator("multi_krum", params)(as_torch(x))
    assert_close(res.update, update, what="update")
    assert_close(res.weights, w, what="weights")
    if m == 1:
        assert_close(build_aggregator("krum", params)(as_torch(x)).update, update, what="krum")


def test_distances_do_not_cancel_near_a_large_common_offset() -> None:
    """Regression: |a|^2 + |b|^2 - 2ab on updates near a common 1e8 offset lost every digit, and the
    old code picked client 2 here; the exact minimum is client 6."""
    rng = np.random.default_rng(197)
    k, d = 7, 1000
    dev = np.zeros((k, d))
    for i in range(k):
        idx = rng.choice(d, size=rng.integers(1, 6), replace=False)
        dev[i, idx] = 8 * rng.integers(-2, 3, size=len(idx))
    u = torch.from_numpy((1e8 + rng.standard_normal(d) * 1e7)[None, :] + dev).float()
    x = u.double().numpy()
    exact = np.array([((x - x[i]) ** 2).sum(axis=1) for i in range(k)])
    assert np.allclose(pairwise_sq_distances(u).numpy(), exact, rtol=1e-12, atol=0)
    scores = [np.sort(np.delete(exact[i], i))[: k - 3].sum() for i in range(k)]
    best = int(np.argmin(scores))
    assert sorted(scores)[0] < sorted(scores)[1]  # a unique winner
    _, w = multi_krum(u, 1, 1)
    assert int(w.argmax()) == best


def test_tiny_updates_keep_their_order() -> None:
    """float32 squares of 1e-23 underflow; distances are float64 throughout."""
    u = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]]) * 1e-23
    s = krum_scores(pairwise_sq_distances(u), 1)
    assert np.allclose(s.numpy(), np.array([1 + 4, 1 + 1, 1 + 1, 1 + 4, 97**2 + 98**2]) * 1e-46, rtol=1e-6)
    _, w = multi_krum(u, 1, 1)
    assert int(w.argmax()) == 1  # ties (1 and 2) go to the smaller row


def test_huge_updates_do_not_overflow() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.cat([3e37 * torch.randn(6, 50, generator=g), torch.full((1, 50), 3.4e38)])
    res = build_aggregator("multi_krum", AggregatorParams(f=1))(u)
    assert torch.isfinite(res.update).all() and res.weights[6] == 0


def test_multi_krum_m_above_k_is_rejected_not_clamped() -> None:
    rule = build_aggregator("multi_krum", AggregatorParams(f=1, multi_krum_m=25))
    with pytest.raises(ConfigError, match=r"^aggregation\.multi_krum_m: 25 exceeds the 20 updates per round; "
                                          r"allowed: 1\.\.20$"):
        rule.validate(20)
    rule.validate(25)
