"""Bulyan (El Mhamdi, Guerraoui & Rouault 2018, "The Hidden Vulnerability of Distributed Learning in
Byzantium", ICML, Sec. 4), over Krum.

1. Selection: theta = k - 2f times, run Krum (Blanchard et al. 2017) on the updates not yet selected
   and move its choice to the selection set S (Krum on r remaining updates sums the r - f - 2
   smallest squared distances; in the last steps, where r - f - 2 < 1, fewer).
2. Aggregation: for every coordinate, the mean of the beta = theta - 2f values of S closest to the
   coordinate's median over S (the mean of the two middle values when theta is even; equal
   distances are resolved by sorted position).

Requires k >= 4f + 3. Distances and means are computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch

from flsec.aggregation.base import AggregationResult, Aggregator, normalise
from flsec.aggregation.krum import krum_scores, rank_by_score
from flsec.aggregation.numerics import pairwise_sq_distances, sorted_blocks
from flsec.aggregation.registry import AGGREGATORS


def bulyan_selection(updates: torch.Tensor, f: int) -> list[int]:
    """Step 1: the theta = k - 2f indices chosen by repeated Krum, in the order they were chosen."""
    k = updates.shape[0]
    dist = pairwise_sq_distances(updates)
    remaining = list(range(k))
    chosen: list[int] = []
    while len(chosen) < k - 2 * f:
        sub = torch.tensor(remaining)
        scores = krum_scores(dist[sub][:, sub], f)
        best = remaining[rank_by_score(updates[sub], scores)[0]]
        chosen.append(best)
        remaining.remove(best)
    return chosen


def closest_to_median_mean(selected: torch.Tensor, beta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: per coordinate, the float64 mean of the ``beta`` values closest to the median, and each
    row's share of the values used."""
    theta, d = selected.shape
    out = torch.empty(d, dtype=torch.float64)
    counts = np.zeros(theta, dtype=np.int64)
    lo, hi = (theta - 1) // 2, theta // 2 + 1
    for s, values, order in sorted_blocks(selected):
        v = values.astype(np.float64)
        median = v[:, lo:hi].mean(axis=1, keepdims=True)
        near = np.argsort(np.abs(v - median), axis=1, kind="stable")[:, :beta]
        out[s] = torch.from_numpy(np.take_along_axis(v, near, axis=1).mean(axis=1))
        counts += np.bincount(np.take_along_axis(order, near, axis=1).ravel(), minlength=theta)
    return out, torch.from_numpy(counts).to(torch.float64)


def bulyan(updates: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bulyan over Krum; returns (update in float64, each row's share of the values used)."""
    k = updates.shape[0]
    if k < 4 * f + 3:
        raise ValueError(f"bulyan needs k >= 4f + 3 (k={k}, f={f})")
    chosen = bulyan_selection(updates, f)
    update, counts = closest_to_median_mean(updates[torch.tensor(chosen)], k - 4 * f)
    share = torch.zeros(k, dtype=torch.float64)
    share[torch.tensor(chosen)] = counts
    return update, normalise(share)


@AGGREGATORS.register("bulyan")
class Bulyan(Aggregator):
    name = "bulyan"
    summary = "k - 2f recursive Krum selections, then per coordinate the mean of the k - 4f values closest to the median"
    citation = "El Mhamdi, Guerraoui & Rouault 2018, \"The Hidden Vulnerability of Distributed Learning in Byzantium\", ICML"
    excludes = True  # its zero-weight updates are the ones it judged adversarial

    def min_updates(self) -> int:
        return 4 * self.params.f + 3

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int]) -> AggregationResult:
        return AggregationResult(*bulyan(updates, self.params.f))
