"""Norm clipping and weak DP (Sun et al. 2019, Sec. 4) against a numpy transcription."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flsec.aggregation import AggregationContext, AggregatorParams, build_aggregator
from flsec.errors import ConfigError
from tests.reference_stacks import as_torch, assert_close, stacks


def norm_clip_reference(x: np.ndarray, bound: float) -> np.ndarray:
    """Delta = (1/k) sum_k Delta_k / max(1, ||Delta_k|| / M) (the noise-free part)."""
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    return (x / np.maximum(1.0, norms / bound)[:, None]).mean(axis=0)


@settings(max_examples=30, deadline=None)
@given(stacks(), st.floats(-1.0, 1.0))
def test_norm_clip_matches_reference(x: np.ndarray, log_ratio: float) -> None:
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    bound = float(np.median(norms) * 10**log_ratio) or 1.0
    res = build_aggregator("norm_clip", AggregatorParams(clip_norm=bound))(as_torch(x))
    assert_close(res.update, norm_clip_reference(x, bound), what="update")
    assert_close(res.weights, np.full(len(x), 1 / len(x)), what="weights")


def test_weak_dp_noise_has_the_configured_std_and_is_seeded() -> None:
    x = torch.zeros(5, 200_000)
    rule = build_aggregator("norm_clip", AggregatorParams(clip_norm=1.0, clip_noise=0.025))
    a = rule(x, context=AggregationContext(3, torch.Generator().manual_seed(7)))
    b = rule(x, context=AggregationContext(3, torch.Generator().manual_seed(7)))
    c = rule(x, context=AggregationContext(4, torch.Generator().manual_seed(8)))
    assert float(a.update.std()) == pytest.approx(0.025, rel=0.01)
    assert abs(float(a.update.mean())) < 0.001
    assert torch.equal(a.update, b.update) and not torch.equal(a.update, c.update)


def test_clipped_attacker_cannot_dominate() -> None:
    x = torch.cat([torch.ones(1, 4) * 1e30, torch.ones(4, 4) * 0.1])
    res = build_aggregator("norm_clip", AggregatorParams(clip_norm=1.0))(x)
    assert float(res.update.norm()) <= 1.0 + 1e-6


def test_non_positive_bound_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="aggregation.clip_norm"):
        build_aggregator("norm_clip", AggregatorParams(clip_norm=0.0)).validate(5)
