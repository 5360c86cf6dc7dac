"""FLAME (Nguyen et al. 2022, Algorithm 1) against a numpy transcription (HDBSCAN from scikit-learn
in both: the clustering library is not what is under test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import HDBSCAN

from flsec.aggregation import AggregationContext, AggregationError, AggregatorParams, build_aggregator
from tests.reference_stacks import as_torch, assert_close, cosine, stacks


def flame_reference(x: np.ndarray, global_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free FLAME: cosine distances of the local models W_i = G + Delta_i -> HDBSCAN (min
    cluster size n/2 + 1) -> admitted = largest cluster -> S = median ||W_i - G|| over all clients ->
    mean of the admitted Delta_i * min(1, S / e_i)."""
    x = x.astype(np.float64)
    n = len(x)
    models = global_weights[None, :].astype(np.float64) + x
    dist = np.clip(1.0 - cosine(models), 0.0, None)
    np.fill_diagonal(dist, 0.0)
    labels = HDBSCAN(metric="precomputed", min_cluster_size=n // 2 + 1, min_samples=1,
                     allow_single_cluster=True, copy=True).fit_predict(dist)
    if (labels >= 0).any():
        biggest = np.bincount(labels[labels >= 0]).argmax()
        admitted = np.flatnonzero(labels == biggest)
    else:
        admitted = np.arange(n)
    e = np.linalg.norm(x, axis=1)
    s = np.median(e)
    gamma = np.minimum(1.0, np.divide(s, e, out=np.ones_like(e), where=e > 0))
    w = np.zeros(n)
    w[admitted] = 1.0 / len(admitted)
    return (w * gamma) @ x, w


@settings(max_examples=30, deadline=None)
@given(stacks(), st.data())
def test_flame_matches_reference(x: np.ndarray, data: st.DataObject) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    g = (rng.standard_normal(x.shape[1]) * np.abs(x).max() * data.draw(st.sampled_from([0.0, 1.0, 10.0])))
    g = g.astype(np.float32)
    rule = build_aggregator("flame", AggregatorParams(flame_noise=0.0))
    res = rule(as_torch(x), context=AggregationContext(global_weights=as_torch(g)))
    update, w = flame_reference(x, g)
    assert_close(res.weights, w, what="weights")
    assert_close(res.update, update, what="update")


def test_backdoor_cluster_is_filtered_and_norms_are_clipped() -> None:
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(200, generator=gen)
    honest = direction + 0.5 * torch.randn(14, 200, generator=gen)
    attackers = -direction + 0.05 * torch.randn(6, 200, generator=gen)
    x = torch.cat([attackers * 20, honest])
    res = build_aggregator("flame", AggregatorParams(flame_noise=0.0, flame_distance="updates"))(x)
    admitted = res.weights[6:] > 0
    assert torch.all(res.weights[:6] == 0) and int(admitted.sum()) >= 10  # HDBSCAN may leave a few honest outliers
    assert torch.allclose(res.weights[6:][admitted], torch.full((int(admitted.sum()),), 1 / float(admitted.sum())))
    median_norm = float(torch.quantile(x.double().norm(dim=1), 0.5))
    assert float(res.update.norm()) <= median_norm * (1 + 1e-6)


def test_adaptive_noise_is_lambda_times_median_norm() -> None:
    x = torch.zeros(7, 100_000)
    x[:, 0] = torch.arange(1.0, 8.0)  # norms 1..7, median 4
    rule = build_aggregator("flame", AggregatorParams(flame_noise=0.01, flame_distance="updates"))
    res = rule(x, context=AggregationContext(1, torch.Generator().manual_seed(0)))
    assert float(res.update[1:].std()) == pytest.approx(0.04, rel=0.02)


def test_needs_the_global_model_for_model_distances() -> None:
    with pytest.raises(AggregationError, match="flame needs the server's global_weights"):
        build_aggregator("flame", AggregatorParams())(torch.randn(5, 3))
