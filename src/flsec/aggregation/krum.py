"""Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries", Sec. 4).

score(i) = sum of squared distances from U_i to its k - f - 2 nearest other updates.
Krum returns the update of least score; Multi-Krum averages the m updates of least score.
Both assume k >= 2f + 3.
"""

from __future__ import annotations

import numpy as np
import torch

from flsec.aggregation.base import AggregationResult, Aggregator
from flsec.aggregation.registry import AGGREGATORS


def pairwise_sq_distances(updates: torch.Tensor) -> torch.Tensor:
    """k x k squared Euclidean distances, computed in float64 for stable ranking."""
    u = updates.double()
    sq = (u * u).sum(dim=1)
    d = sq[:, None] + sq[None, :] - 2.0 * (u @ u.T)
    d.fill_diagonal_(0.0)
    return d.clamp_min(0.0)


def krum_scores(updates: torch.Tensor, f: int) -> torch.Tensor:
    k = updates.shape[0]
    nearest = k - f - 2
    if nearest < 1:
        raise ValueError(f"Krum needs k >= 2f + 3 (k={k}, f={f})")
    d = pairwise_sq_distances(updates)
    d.fill_diagonal_(float("inf"))
    return torch.topk(d, nearest, dim=1, largest=False).values.sum(dim=1)


def krum_order(updates: torch.Tensor, f: int) -> torch.Tensor:
    """Indices by increasing Krum score. Ties are broken by the update's content (its projection
    on a fixed pseudo-random direction), never by its position, so the rule is permutation invariant."""
    scores = krum_scores(updates, f).float().numpy()
    direction = torch.randn(updates.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tiebreak = (updates.double() @ direction).float().numpy()
    return torch.from_numpy(np.lexsort((tiebreak, scores)).copy())


def multi_krum(updates: torch.Tensor, f: int, m: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Average of the ``m`` updates of least Krum score (m = 1 is Krum); returns (update, weights)."""
    m = max(1, min(m, updates.shape[0]))
    chosen = krum_order(updates, f)[:m]
    weights = torch.zeros(updates.shape[0])
    weights[chosen] = 1.0 / m
    return updates[chosen].mean(dim=0), weights


@AGGREGATORS.register("krum")
class Krum(Aggregator):
    name = "krum"

    def min_updates(self) -> int:
        return 2 * self.params.f + 3

    def _m(self, k: int) -> int:
        return 1

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int]) -> AggregationResult:
        return AggregationResult(*multi_krum(updates, self.params.f, self._m(updates.shape[0])))


@AGGREGATORS.register("multi_krum")
class MultiKrum(Krum):
    name = "multi_krum"

    def _m(self, k: int) -> int:
        return self.params.multi_krum_m or k - self.params.f
