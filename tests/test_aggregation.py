"""Properties of the aggregation maths (hypothesis) and known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flsec.aggregation import AggregationError, AggregatorParams, build_aggregator
from flsec.aggregation.fedavg import fedavg
from flsec.aggregation.fl_defender import fl_defender_round_scores, trust_from_history
from flsec.aggregation.foolsgold import foolsgold_weights
from flsec.aggregation.krum import krum_scores, multi_krum
from flsec.aggregation.median import coordinate_median
from flsec.aggregation.trimmed_mean import trimmed_mean

RULES = ["fedavg", "krum", "multi_krum", "trimmed_mean", "median", "foolsgold", "fl_defender"]
finite = st.floats(-100, 100, allow_nan=False, width=32)


def matrices(min_k: int = 5, max_k: int = 9, max_d: int = 6) -> st.SearchStrategy[torch.Tensor]:
    return st.integers(min_k, max_k).flatmap(
        lambda k: st.integers(1, max_d).flatmap(
            lambda d: st.lists(st.lists(finite, min_size=d, max_size=d), min_size=k, max_size=k)
        )
    ).map(lambda rows: torch.tensor(rows, dtype=torch.float32))


@settings(max_examples=40, deadline=None)
@given(matrices(), st.randoms(use_true_random=False))
def test_permutation_invariance(u: torch.Tensor, rnd) -> None:
    # A small jitter keeps the input in general position (Krum's ties are broken by content anyway).
    u = u + 1e-2 * torch.randn(u.shape, generator=torch.Generator().manual_seed(rnd.randint(0, 10**6)))
    n = torch.arange(1, u.shape[0] + 1, dtype=torch.float32)
    perm = list(range(u.shape[0]))
    rnd.shuffle(perm)
    p = torch.tensor(perm)
    for rule in [r for r in RULES if r != "fl_defender"]:
        a = build_aggregator(rule, AggregatorParams(f=1))(u, n).update
        b = build_aggregator(rule, AggregatorParams(f=1))(u[p], n[p], [int(i) for i in p]).update
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), rule


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.integers(6, 12), st.integers(1, 3))
def test_fl_defender_permutation_invariance(seed: int, k: int, attackers: int) -> None:
    """FL-Defender takes a coordinate-wise median in PCA space, which is only defined up to the PCA
    basis: it is permutation invariant whenever the top singular values are distinct, as they are
    for updates with structure (a majority direction plus attackers), checked here."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(1, 30, generator=g)
    u = torch.cat([-direction + 0.2 * torch.randn(attackers, 30, generator=g),
                   direction + 0.5 * torch.randn(k - attackers, 30, generator=g)])
    perm = torch.randperm(k, generator=g)
    rule = build_aggregator("fl_defender", AggregatorParams())
    a = rule(u, torch.ones(k)).update
    b = build_aggregator("fl_defender", AggregatorParams())(u[perm], torch.ones(k), perm.tolist()).update
    assert torch.allclose(a, b, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(matrices(min_k=1), st.lists(st.integers(1, 50), min_size=9, max_size=9))
def test_fedavg_is_weighted_mean(u: torch.Tensor, counts: list[int]) -> None:
    n = torch.tensor(counts[: u.shape[0]], dtype=torch.float64)
    expected = (n[:, None] * u.double()).sum(0) / n.sum()
    got, w = fedavg(u.double(), n)
    assert torch.allclose(got, expected, atol=1e-9)
    assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype))


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 8), st.integers(0, 2), st.integers(1, 5), st.integers(0, 10_000))
def test_krum_picks_honest_cluster(honest: int, f: int, d: int, seed: int) -> None:
    k = honest + f
    if f >= k / 2 - 1:
        f = max(0, (k - 3) // 2)
        honest = k - f
    g = torch.Generator().manual_seed(seed)
    good = torch.randn(honest, d, generator=g) * 0.1
    bad = 50.0 + torch.randn(f, d, generator=g) * 0.01  # a tight far-away attacker cluster
    u = torch.cat([bad, good])
    _, w = multi_krum(u, f, m=1)
    assert int(torch.argmax(w)) >= f
    _, wm = multi_krum(u, f, m=honest)
    assert float(wm[:f].sum()) == 0.0


@settings(max_examples=40, deadline=None)
@given(matrices(min_k=7, max_k=9), st.integers(1, 3), st.floats(-1e6, 1e6, allow_nan=False))
def test_trimmed_mean_and_median_ignore_f_arbitrary_rows(u: torch.Tensor, f: int, value: float) -> None:
    k = u.shape[0]
    f = min(f, (k - 1) // 2)
    honest = u[f:]
    lo, hi = honest.min(0).values, honest.max(0).values
    corrupted = u.clone()
    corrupted[:f] = value
    for agg in (trimmed_mean(corrupted, f)[0], coordinate_median(corrupted)[0]):
        # Robust: every coordinate stays inside the range of the honest values.
        assert torch.all(agg >= lo - 1e-4) and torch.all(agg <= hi + 1e-4)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_never_reach_result(rule: str, bad: float) -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(8, 5, generator=g)
    u[2, 3] = bad
    u[5] = bad
    res = build_aggregator(rule, AggregatorParams(f=1))(u, torch.ones(8))
    assert torch.isfinite(res.update).all()
    assert res.weights[2] == 0 and res.weights[5] == 0
    clean = build_aggregator(rule, AggregatorParams(f=1))(u[[0, 1, 3, 4, 6, 7]], torch.ones(6), [0, 1, 3, 4, 6, 7])
    assert torch.allclose(res.update, clean.update, atol=1e-6)


@pytest.mark.parametrize(("rule", "k", "f"), [("krum", 6, 2), ("multi_krum", 4, 1), ("trimmed_mean", 4, 2),
                                              ("median", 4, 2)])
def test_too_few_updates_is_a_clear_error(rule: str, k: int, f: int) -> None:
    agg = build_aggregator(rule, AggregatorParams(f=f))
    with pytest.raises(AggregationError, match=f"{rule} needs at least"):
        agg(torch.randn(k, 3), torch.ones(k))


def test_all_rows_non_finite_is_an_error() -> None:
    with pytest.raises(AggregationError):
        build_aggregator("fedavg", AggregatorParams())(torch.full((3, 2), float("nan")))


def test_known_answers() -> None:
    u = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])
    assert coordinate_median(u)[0].item() == 2.0
    assert coordinate_median(u[:4])[0].item() == 1.5
    assert trimmed_mean(u, 1)[0].item() == pytest.approx(2.0)
    # Krum scores with f=1: each point sums squared distances to its k-f-2 = 2 nearest others.
    s = krum_scores(u, 1)
    assert s.tolist() == pytest.approx([1 + 4, 1 + 1, 1 + 1, 1 + 4, 97**2 + 98**2])


def test_foolsgold_downweights_sybils() -> None:
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(6, 50, generator=g)
    sybil = torch.randn(1, 50, generator=g)
    hist = torch.cat([sybil + 0.01 * torch.randn(3, 50, generator=g), honest])
    w = foolsgold_weights(hist)
    assert torch.all(w[:3] < 0.05) and torch.all(w[3:] > 0.5)


def test_fl_defender_scores_and_trust() -> None:
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(1, 40, generator=g)
    honest = direction + 0.3 * torch.randn(8, 40, generator=g)
    attackers = -direction + 0.05 * torch.randn(2, 40, generator=g)
    s = fl_defender_round_scores(torch.cat([attackers, honest]))
    assert s[:2].max() < s[2:].min()
    t = trust_from_history(s)
    assert torch.all(t[:2] == 0) and t.max() == 1


def test_stateful_rules_round_trip_state() -> None:
    g = torch.Generator().manual_seed(0)
    for rule in ("foolsgold", "fl_defender"):
        a = build_aggregator(rule, AggregatorParams(output_layer=slice(0, 4)))
        a(torch.randn(6, 8, generator=g), torch.ones(6), [3, 4, 5, 6, 7, 8])
        b = build_aggregator(rule, AggregatorParams(output_layer=slice(0, 4)))
        b.load_state_dict(a.state_dict())
        u = torch.randn(6, 8, generator=g)
        assert torch.allclose(a(u, torch.ones(6), [3, 4, 5, 6, 7, 8]).update, b(u, torch.ones(6), [3, 4, 5, 6, 7, 8]).update)


def test_median_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 11)).astype(np.float32)
    assert np.allclose(coordinate_median(torch.from_numpy(x))[0].numpy(), np.median(x, axis=0), atol=1e-6)
