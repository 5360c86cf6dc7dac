"""Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning", ICML,
Definition 1); the mean of the two middle values when k is even (computed in float64)."""

from __future__ import annotations

import torch

from flsec.aggregation.base import AggregationResult, Aggregator
from flsec.aggregation.registry import AGGREGATORS
from flsec.aggregation.trimmed_mean import sorted_window_mean


def coordinate_median(updates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = updates.shape[0]
    return sorted_window_mean(updates, (k - 1) // 2, k // 2 + 1)


@AGGREGATORS.register("median")
class Median(Aggregator):
    name = "median"
    summary = "coordinate-wise median"
    citation = "Yin et al. 2018, \"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates\", ICML, Def. 1"

    def min_updates(self) -> int:
        return 2 * self.params.f + 1

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int]) -> AggregationResult:
        return AggregationResult(*coordinate_median(updates))
