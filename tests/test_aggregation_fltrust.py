"""FLTrust (Cao et al. 2021, Algorithm 1, Eq. 2-5) against a numpy transcription."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flsec.aggregation import AggregationContext, AggregationError, AggregatorParams, build_aggregator
from tests.reference_stacks import as_torch, assert_close, stacks


def fltrust_reference(x: np.ndarray, g0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TS_i = ReLU(cos(g_i, g_0)); g_i <- ||g_0|| / ||g_i|| g_i; g = sum TS_i g_i / sum TS_j."""
    x, g0 = x.astype(np.float64), g0.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    cos = (x @ g0) / (norms * np.linalg.norm(g0))
    ts = np.maximum(np.clip(cos, -1, 1), 0.0)
    if ts.sum() == 0:
        return np.zeros(x.shape[1]), np.zeros(len(x))
    normalised = x * (np.linalg.norm(g0) / norms)[:, None]
    return (ts[:, None] * normalised).sum(axis=0) / ts.sum(), ts / ts.sum()


@settings(max_examples=40, deadline=None)
@given(stacks(), st.data())
def test_fltrust_matches_reference(x: np.ndarray, data: st.DataObject) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    mix = rng.standard_normal(len(x))  # the server update: some mix of the clients' directions
    g0 = (mix @ x.astype(np.float64) + rng.standard_normal(x.shape[1]) * np.abs(x).max()).astype(np.float32)
    g0 *= np.float32(10.0 ** data.draw(st.floats(-3, 3)))
    ctx = AggregationContext(server_update=as_torch(g0))
    res = build_aggregator("fltrust", AggregatorParams())(as_torch(x), context=ctx)
    update, w = fltrust_reference(x, g0)
    assert_close(res.weights, w, what="weights")
    assert_close(res.update, update, what="update")


def test_opposed_and_boosted_updates_get_no_say() -> None:
    g0 = torch.ones(10)
    noise = 0.1 * torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    x = torch.cat([-100 * torch.ones(2, 10), torch.ones(3, 10) + noise])
    res = build_aggregator("fltrust", AggregatorParams())(x, context=AggregationContext(server_update=g0))
    assert torch.all(res.weights[:2] == 0)
    assert float(res.update.norm()) <= float(g0.norm()) * (1 + 1e-6)


def test_no_trusted_client_means_no_update() -> None:
    ctx = AggregationContext(server_update=torch.ones(3))
    res = build_aggregator("fltrust", AggregatorParams())(-torch.ones(4, 3), context=ctx)
    assert torch.all(res.update == 0) and res.notes


def test_server_update_is_required() -> None:
    with pytest.raises(AggregationError, match="fltrust needs the server's server_update"):
        build_aggregator("fltrust", AggregatorParams())(torch.randn(4, 3))
