"""FL-Defender (Jebreel & Domingo-Ferrer 2023, Algorithm 1; reference code najeebjebreel/FL-Defender)
against a numpy transcription, over several rounds with partial participation."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from flsec.aggregation import AggregatorParams, build_aggregator
from flsec.aggregation.fl_defender import fl_defender_round_scores, trust_from_history
from tests.reference_stacks import as_torch, assert_close, cosine, stacks, unit_rows


def standardise(x: np.ndarray) -> np.ndarray:
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def round_scores_reference(g: np.ndarray, components: int = 2) -> np.ndarray:
    """cs = cos(g) - I -> standardise -> PCA -> centroid = median -> cos(centroid, row)."""
    cs = standardise(cosine(g.astype(np.float64)) - np.eye(len(g)))
    centred = cs - cs.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    z = u[:, :components] * s[:components]
    centroid = np.median(z, axis=0)
    if np.linalg.norm(centroid) <= 1e-9 * np.abs(z).max():  # the origin up to rounding: no direction
        return np.zeros(len(g))
    return unit_rows(z) @ unit_rows(centroid[None])[0]


def spectrum_is_separated(g: np.ndarray, components: int) -> bool:
    """PCA coordinates are defined up to sign only when the top singular values are distinct."""
    cs = standardise(cosine(g.astype(np.float64)) - np.eye(len(g)))
    s = np.linalg.svd(cs - cs.mean(axis=0), compute_uv=False)
    s = np.append(s, 0.0)
    gaps = [s[i] - s[i + 1] for i in range(min(components, len(s) - 1))]
    return s[0] > 0 and min(gaps) > 1e-6 * s[0]


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 30), st.integers(1, 2000), st.data())
def test_fl_defender_matches_reference_over_rounds(peers: int, d: int, data: st.DataObject) -> None:
    components = data.draw(st.integers(1, 3))
    rule = build_aggregator("fl_defender", AggregatorParams(fl_defender_components=components, num_clients=peers))
    history = np.zeros(peers)
    for _ in range(data.draw(st.integers(1, 3))):
        k = data.draw(st.integers(3, peers))
        ids = sorted(data.draw(st.permutations(range(peers)))[:k])
        x = data.draw(stacks(min_k=k, max_k=k, max_d=d))
        assume(spectrum_is_separated(x, components))
        history[ids] += round_scores_reference(x, components)
        trust = history - np.quantile(history, 0.25)
        # All histories equal: the reference divides by zero; flsec trusts everyone equally.
        trust = trust / trust.max() if trust.max() > 0 else np.ones(peers)
        trust[trust < 0] = 0
        w = trust[ids] / trust[ids].sum() if trust[ids].sum() > 0 else np.zeros(k)
        res = rule(as_torch(x), torch.ones(k), ids)
        assert_close(res.weights, w, what="weights")
        assert_close(res.update, w @ x.astype(np.float64), what="update")


def test_cosine_matrix_minus_identity_and_standardisation_matter() -> None:
    """Regression (the old version kept the cosine diagonal, skipped standardisation and took the
    median in the k-dimensional projection with torch's lower median): flsec's round scores are the
    paper's on a fixed stack."""
    g = torch.Generator().manual_seed(3)
    direction = torch.randn(1, 40, generator=g)
    x = torch.cat([-direction + 0.3 * torch.randn(4, 40, generator=g), direction + torch.randn(16, 40, generator=g)])
    ours = fl_defender_round_scores(x)
    assert np.allclose(ours.numpy(), round_scores_reference(x.numpy()), atol=1e-9)
    assert ours[:4].max() < ours[4:].min()


def test_quartile_is_over_all_peers_histories() -> None:
    """Regression: q1 and the maximum were taken over this round's clients only. With 8 peers of
    which 4 are selected, the others' histories (here: never selected, zero) count too."""
    g = torch.Generator().manual_seed(5)
    u = torch.randn(4, 10, generator=g)
    rule = build_aggregator("fl_defender", AggregatorParams(num_clients=8))
    rule.scores = {0: 4.0, 1: 3.5, 2: 3.0, 3: 2.5}
    res = rule(u, torch.ones(4), [0, 1, 2, 3])
    history = np.array([4.0, 3.5, 3.0, 2.5, 0, 0, 0, 0])
    history[:4] += round_scores_reference(u.numpy())
    trust = np.clip((history - np.quantile(history, 0.25)) / (history - np.quantile(history, 0.25)).max(), 0, None)
    assert_close(res.weights, trust[:4] / trust[:4].sum(), what="weights")
    this_round_only = np.clip(history[:4] - np.quantile(history[:4], 0.25), 0, None)
    lowest = int(np.argmin(history[:4]))
    assert this_round_only[lowest] == 0 and float(res.weights[lowest]) > 0  # the old rule gave it no weight
    assert torch.allclose(trust_from_history(torch.from_numpy(history))[4:], torch.zeros(4, dtype=torch.float64))


def test_equal_histories_trust_everyone() -> None:
    t = trust_from_history(torch.zeros(5, dtype=torch.float64))
    assert torch.all(t == 1)


def test_output_layer_weights_only_by_default() -> None:
    """The paper scores the output layer's weights (not its bias): attackers that differ only in
    the bias columns are invisible by default and caught with similarity_features = output_layer."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 30, generator=g) + 0.1 * torch.randn(10, 30, generator=g)
    x[:2, 20:] = -5 * x[:2, 20:]
    slices = {"output_weights": slice(0, 20), "output_layer": slice(0, 30)}
    default = build_aggregator("fl_defender", AggregatorParams(**slices))(x).weights
    with_bias = build_aggregator("fl_defender", AggregatorParams(**slices, similarity_features="output_layer"))(x).weights
    assert torch.all(with_bias[:2] == 0) and torch.all(default[:2] > 0)


def test_non_finite_after_cast_is_rejected_before_pca() -> None:
    """Regression (hardening): a float64 update of 1e300 is finite before the float32 cast and Inf
    after it; FL-Defender's SVD then raised LinAlgError. It is now rejected with a reason."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 12, generator=g, dtype=torch.float64)
    x[2, 5] = 1e300
    res = build_aggregator("fl_defender", AggregatorParams())(x, torch.ones(6), [10, 11, 12, 13, 14, 15])
    assert res.weights[2] == 0 and torch.isfinite(res.update).all()
    assert "not finite in float32" in res.rejected[12] and "1e+300" in res.rejected[12]
