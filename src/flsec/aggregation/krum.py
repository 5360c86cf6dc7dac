"""Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent", NeurIPS, Sec. 4).

score(i) = sum of the squared distances from U_i to its k - f - 2 nearest other updates.
Krum returns the update of least score; Multi-Krum averages the m updates of least score
(default m = k - f). Both assume k >= 2f + 3.

Distances are computed in float64 without the cancellation of |a|^2 + |b|^2 - 2ab
(:func:`~flsec.aggregation.numerics.pairwise_sq_distances`), and scores are ranked in float64.
Equal scores are ordered by the rows' contents (lexicographically), then by position: the chosen
update never depends on the order in which clients are listed.
"""

from __future__ import annotations

from functools import cmp_to_key

import torch

from flsec.aggregation.base import AggregationResult, Aggregator, config_error
from flsec.aggregation.numerics import pairwise_sq_distances, weighted_sum
from flsec.aggregation.registry import AGGREGATORS


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of every row of a k x k squared-distance matrix: the sum of its k - f - 2 smallest
    distances to the others (fewer when k - f - 2 < 0 is clamped to 0, as in Bulyan's last steps)."""
    k = dist.shape[0]
    nearest = max(k - f - 2, 0)
    others = dist.clone()
    others.fill_diagonal_(float("inf"))
    return torch.sort(others, dim=1).values[:, :nearest].sum(dim=1)


def _compare_rows(a: torch.Tensor, b: torch.Tensor) -> int:
    diff = torch.nonzero(a != b)
    if len(diff) == 0:
        return 0
    i = int(diff[0])
    return -1 if a[i] < b[i] else 1


def rank_by_score(updates: torch.Tensor, scores: torch.Tensor) -> list[int]:
    """Row indices by increasing score; ties by row content, then position (a stable sort)."""
    s = scores.tolist()

    def cmp(i: int, j: int) -> int:
        if s[i] != s[j]:
            return -1 if s[i] < s[j] else 1
        return _compare_rows(updates[i], updates[j])

    return sorted(range(len(s)), key=cmp_to_key(cmp))


def krum_order(updates: torch.Tensor, f: int) -> list[int]:
    """Indices by increasing Krum score."""
    return rank_by_score(updates, krum_scores(pairwise_sq_distances(updates), f))


def multi_krum(updates: torch.Tensor, f: int, m: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the ``m`` updates of least Krum score (m = 1 is Krum); returns (update in float64, weights)."""
    update, weights, _ = multi_krum_scored(updates, f, m)
    return update, weights


def multi_krum_scored(updates: torch.Tensor, f: int, m: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """:func:`multi_krum` and the row indices by increasing Krum score."""
    k = updates.shape[0]
    if not 1 <= m <= k:
        raise ValueError(f"multi_krum: m = {m} is not in 1..{k}")
    order = krum_order(updates, f)
    chosen = torch.tensor(order[:m])
    weights = torch.zeros(k, dtype=torch.float64)
    weights[chosen] = 1.0 / m
    return weighted_sum(weights, updates), weights, order


@AGGREGATORS.register("krum")
class Krum(Aggregator):
    name = "krum"
    summary = "the update with the least sum of squared distances to its k - f - 2 nearest others"
    citation = "Blanchard et al. 2017, \"Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent\", NeurIPS"
    #: Krum's own judgement: the f updates of largest score are the adversarial ones it tolerates
    #: (whatever m is; Krum itself leaves out k - 1 honest updates too). Suspicion: the rank by score.
    excludes = True

    def min_updates(self) -> int:
        return 2 * self.params.f + 3

    def _m(self, k: int) -> int:
        return 1

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int]) -> AggregationResult:
        k = updates.shape[0]
        m = self._m(k)
        notes = []
        if m > k:
            notes.append(f"{self.name}: multi_krum_m = {m} but only {k} finite updates this round; averaged all {k}")
            m = k
        update, weights, order = multi_krum_scored(updates, self.params.f, m)
        suspicion = torch.empty(k, dtype=torch.float64)
        suspicion[torch.tensor(order)] = torch.arange(k, dtype=torch.float64) / max(k - 1, 1)
        excluded = torch.zeros(k, dtype=torch.bool)
        if self.params.f:
            excluded[torch.tensor(order[k - self.params.f:])] = True
        return AggregationResult(update, weights, notes=notes, excluded=excluded, suspicion=suspicion)


@AGGREGATORS.register("multi_krum")
class MultiKrum(Krum):
    name = "multi_krum"
    summary = "mean of the `multi_krum_m` updates with the best Krum scores (default k - f)"
    citation = "Blanchard et al. 2017, \"Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent\", NeurIPS"

    def _m(self, k: int) -> int:
        return self.params.multi_krum_m or k - self.params.f

    def validate(self, per_round: int) -> None:
        m = self.params.multi_krum_m
        if m is not None and m > per_round:
            raise config_error("multi_krum_m", f"{m} exceeds the {per_round} updates per round; allowed: 1..{per_round}")
        super().validate(per_round)
