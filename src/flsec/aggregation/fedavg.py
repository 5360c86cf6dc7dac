"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", Algorithm 1): the sample-weighted mean of the updates, sum_i n_i U_i / sum_i n_i.

``aggregation.sample_weighted = false`` gives the plain mean 1/k sum_i U_i instead, which is what
FL-Defender's reference code averages with (``average_weights(..., marks=1)``).
"""

from __future__ import annotations

import torch

from flsec.aggregation.base import AggregationError, AggregationResult, Aggregator
from flsec.aggregation.numerics import weighted_sum
from flsec.aggregation.registry import AGGREGATORS


def fedavg(updates: torch.Tensor, num_samples: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i n_i U_i / sum_i n_i (the plain mean when ``num_samples`` is None); returns
    (update in float64, weights). Every count zero is an error: the weighted mean is undefined."""
    k = updates.shape[0]
    if num_samples is None:
        w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    else:
        n = num_samples.to(torch.float64)
        if not n.sum() > 0:
            raise AggregationError(
                f"fedavg: every one of the {k} updates reports 0 samples, so the sample-weighted mean is "
                "undefined; set aggregation.sample_weighted = false to average them uniformly"
            )
        w = n / n.sum()
    return weighted_sum(w, updates), w


@AGGREGATORS.register("fedavg")
class FedAvg(Aggregator):
    name = "fedavg"
    summary = "sample-weighted mean of the updates (`sample_weighted = false`: plain mean)"
    citation = (
        "McMahan et al. 2017, \"Communication-Efficient Learning of Deep Networks from Decentralized Data\", "
        "AISTATS, Alg. 1"
    )

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int]) -> AggregationResult:
        return AggregationResult(*fedavg(updates, num_samples if self.params.sample_weighted else None))
