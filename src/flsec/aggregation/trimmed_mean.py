"""Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning", Def. 2).

For each coordinate, drop the beta largest and beta smallest values and average the rest.
Requires k > 2 beta.
"""

from __future__ import annotations

import torch

from flsec.aggregation.base import AggregationResult, Aggregator, normalise
from flsec.aggregation.registry import AGGREGATORS


def kept_share(order: torch.Tensor, lo: int, hi: int, k: int) -> torch.Tensor:
    """Share of coordinates in which each row lies in sorted positions [lo, hi)."""
    counts = torch.bincount(order[lo:hi].flatten(), minlength=k).double()
    return normalise(counts)


def trimmed_mean(updates: torch.Tensor, beta: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = updates.shape[0]
    if k <= 2 * beta:
        raise ValueError(f"trimmed mean needs k > 2 beta (k={k}, beta={beta})")
    values, order = torch.sort(updates, dim=0, stable=True)
    return values[beta : k - beta].mean(dim=0), kept_share(order, beta, k - beta, k)


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean(Aggregator):
    name = "trimmed_mean"

    @property
    def beta(self) -> int:
        return self.params.f if self.params.trim_beta is None else self.params.trim_beta

    def min_updates(self) -> int:
        return 2 * max(self.beta, self.params.f) + 1

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int]) -> AggregationResult:
        return AggregationResult(*trimmed_mean(updates, self.beta))
