"""FoolsGold (Fung et al. 2020, Algorithm 1; reference code deep-fg/fg/foolsgold.py) against a numpy
transcription, over several rounds of accumulated histories."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flsec.aggregation import AggregatorParams, build_aggregator
from flsec.aggregation.foolsgold import foolsgold_weights
from tests.reference_stacks import as_torch, assert_close, cosine, stacks


def foolsgold_reference(h: np.ndarray, kappa: float = 1.0) -> np.ndarray:
    """alpha per client from the histories h (k x d), line by line as the reference code."""
    n = len(h)
    cs = cosine(h) - np.eye(n)
    maxcs = np.max(cs, axis=1)
    for i in range(n):  # pardoning
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j]:
                cs[i][j] = cs[i][j] * maxcs[i] / maxcs[j]
    wv = 1 - np.max(cs, axis=1)
    wv[wv > 1] = 1
    wv[wv < 0] = 0
    if np.max(wv) == 0:  # the reference divides 0 by 0 here; flsec defines it as "nobody"
        return np.zeros(n)
    wv = wv / np.max(wv)
    wv[wv == 1] = 0.99
    with np.errstate(divide="ignore"):
        wv = kappa * (np.log(wv / (1 - wv)) + 0.5)
    wv[(np.isinf(wv) + wv > 1)] = 1
    wv[wv < 0] = 0
    return wv


@settings(max_examples=30, deadline=None)
@given(st.lists(stacks(), min_size=1, max_size=3), st.floats(0.25, 4.0))
def test_foolsgold_matches_reference_over_rounds(rounds: list[np.ndarray], kappa: float) -> None:
    d = rounds[0].shape[1]
    k = len(rounds[0])
    rounds = [np.resize(r, (k, d)).astype(np.float32) for r in rounds]  # same clients every round
    rule = build_aggregator("foolsgold", AggregatorParams(foolsgold_kappa=kappa, similarity_features="all",
                                                          num_clients=k))
    history = np.zeros((k, d))
    for x in rounds:
        history += x.astype(np.float64)
        alpha = foolsgold_reference(history, kappa)
        res = rule(as_torch(x))
        w = alpha / alpha.sum() if alpha.sum() > 0 else np.zeros(k)
        assert_close(res.weights, w, what="weights")
        assert_close(res.update, w @ x.astype(np.float64), what="update")


def test_exact_duplicate_sybils_get_zero_weight() -> None:
    """Regression: the logit mapped -inf (cosine exactly 1) to weight 1, so exact-duplicate sybils,
    the strongest sybil signal, were fully trusted."""
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(5, 30, generator=g)
    sybil = torch.randn(1, 30, generator=g).repeat(3, 1)
    w = foolsgold_weights(torch.cat([sybil, honest]).double())
    assert torch.all(w[:3] == 0) and torch.all(w[3:] > 0.5)


def test_identical_rows_or_one_coordinate_give_no_update() -> None:
    rule = build_aggregator("foolsgold", AggregatorParams(similarity_features="all"))
    res = rule(torch.ones(4, 6))
    assert torch.all(res.weights == 0) and torch.all(res.update == 0)
    assert res.notes and "all weights 0" in res.notes[0]
    res = build_aggregator("foolsgold", AggregatorParams(similarity_features="all"))(torch.tensor([[1.0], [2.0], [3.0]]))
    assert torch.all(res.update == 0)


def test_huge_updates_never_overflow_the_history() -> None:
    """Regression: float32 histories of updates near 1e38 became Inf after two rounds and every
    weight was 0 from then on."""
    g = torch.Generator().manual_seed(0)
    rule = build_aggregator("foolsgold", AggregatorParams(similarity_features="all"))
    for _ in range(5):
        u = torch.randn(6, 40, generator=g)
        u[0] = u[0] / u[0].abs().max() * 3e38
        res = rule(u)
    assert torch.isfinite(rule.histories[0]).all()
    assert res.weights.sum() == pytest.approx(1.0)


def test_compares_output_layer_weights_by_default() -> None:
    """Only the configured columns enter the similarity: clients identical there are sybils even
    when the rest of their updates differ."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(5, 20, generator=g)
    u[1, :8] = u[0, :8]
    rule = build_aggregator("foolsgold", AggregatorParams(output_weights=slice(0, 8)))
    res = rule(u)
    assert res.weights[0] == 0 and res.weights[1] == 0 and torch.all(res.weights[2:] > 0)
