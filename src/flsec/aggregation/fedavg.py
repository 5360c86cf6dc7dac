"""FedAvg (McMahan et al. 2017, Algorithm 1): the sample-weighted mean of the updates."""

from __future__ import annotations

import torch

from flsec.aggregation.base import AggregationResult, Aggregator
from flsec.aggregation.registry import AGGREGATORS


def fedavg(updates: torch.Tensor, num_samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i n_i U_i / sum_i n_i; returns (update, weights)."""
    w = num_samples.to(updates.dtype) / num_samples.sum()
    return w @ updates, w


@AGGREGATORS.register("fedavg")
class FedAvg(Aggregator):
    name = "fedavg"

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int]) -> AggregationResult:
        return AggregationResult(*fedavg(updates, num_samples))
