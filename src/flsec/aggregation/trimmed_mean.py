"""Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML, Definition 2).

For each coordinate, drop the beta largest and beta smallest values and average the k - 2 beta
others (in float64, so the mean of float32 values near 3e38 does not overflow). Requires k > 2 beta.
"""

from __future__ import annotations

import numpy as np
import torch

from flsec.aggregation.base import AggregationError, AggregationResult, Aggregator, normalise
from flsec.aggregation.numerics import sorted_blocks
from flsec.aggregation.registry import AGGREGATORS


def sorted_window_mean(updates: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate, the float64 mean of the sorted values at positions [lo, hi), and each row's
    share of the kept (coordinate, value) pairs."""
    k, d = updates.shape
    out = torch.empty(d, dtype=torch.float64)
    counts = np.zeros(k, dtype=np.int64)
    for s, values, order in sorted_blocks(updates):
        out[s] = torch.from_numpy(values[:, lo:hi].astype(np.float64).mean(axis=1))
        counts += np.bincount(order[:, lo:hi].ravel(), minlength=k)
    return out, normalise(torch.from_numpy(counts).to(torch.float64))


def trimmed_mean(updates: torch.Tensor, beta: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = updates.shape[0]
    if k <= 2 * beta:
        raise ValueError(f"trimmed mean needs k > 2 beta (k={k}, beta={beta})")
    return sorted_window_mean(updates, beta, k - beta)


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean(Aggregator):
    name = "trimmed_mean"
    summary = "coordinate-wise mean after dropping the `trim_beta` largest and smallest values (default f)"
    citation = "Yin et al. 2018, \"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates\", ICML, Def. 2"

    @property
    def beta(self) -> int:
        return self.params.f if self.params.trim_beta is None else self.params.trim_beta

    def min_updates(self) -> int:
        return 2 * max(self.beta, self.params.f) + 1

    def check(self, k: int) -> None:
        """An explicit ``trim_beta`` larger than f is what needs the updates: the error names it."""
        beta = self.params.trim_beta
        if beta is not None and beta > self.params.f and k <= 2 * beta:
            raise AggregationError(
                f"aggregation.trim_beta: {beta} needs more than 2 x {beta} = {2 * beta} updates per round, got {k}; "
                f"allowed: 0..{max(0, (k - 1) // 2)}, or raise training.client_fraction")
        super().check(k)

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int]) -> AggregationResult:
        return AggregationResult(*trimmed_mean(updates, self.beta))
