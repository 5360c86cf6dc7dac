"""FLAME (Nguyen et al. 2022, "FLAME: Taming Backdoors in Federated Learning", USENIX Security,
Algorithm 1).

1. Filtering: pairwise cosine distances c_ij = 1 - cos(W_i, W_j) of the local models
   W_i = G + U_i (``aggregation.flame_distance = "models"``, the paper; ``"updates"`` uses the
   updates U_i, as several re-implementations do), clustered by HDBSCAN (scikit-learn,
   metric = precomputed, min_cluster_size = k // 2 + 1, min_samples = 1, allow_single_cluster =
   True). The members of the largest cluster are admitted; with no cluster at all, every update is
   admitted and the round's notes say so.
2. Adaptive clipping: S = median of the Euclidean distances e_i = ||W_i - G|| = ||U_i|| of *all*
   k clients; each admitted update is scaled by min(1, S / e_i).
3. Aggregation: the mean of the clipped admitted updates.
4. Adaptive noise: N(0, sigma^2 I) with sigma = lambda * S is added (lambda =
   ``aggregation.flame_noise``, 0.001 as the paper uses for image classification and word
   prediction), from the round's seeded generator.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import HDBSCAN

from flsec.aggregation.base import AggregationContext, AggregationResult, Aggregator
from flsec.aggregation.norm_clip import clip_factors, gaussian_noise, round_generator
from flsec.aggregation.numerics import cosine_from_gram, gram, row_norms, weighted_sum
from flsec.aggregation.registry import AGGREGATORS


def admitted_clients(distances: np.ndarray) -> np.ndarray | None:
    """Indices of the largest HDBSCAN cluster of a precomputed distance matrix, or None (no cluster)."""
    k = distances.shape[0]
    labels = HDBSCAN(metric="precomputed", min_cluster_size=k // 2 + 1, min_samples=1,
                     allow_single_cluster=True, copy=True).fit_predict(distances)
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        return None
    values, counts = np.unique(clustered, return_counts=True)
    return np.flatnonzero(labels == values[np.argmax(counts)])


def flame(updates: torch.Tensor, global_weights: torch.Tensor | None, noise: float = 0.001,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Returns (update in float64, weights: 1/L for the L admitted clients, notes)."""
    k = updates.shape[0]
    notes: list[str] = []
    # Gram of the local models G + U_i (of the updates when no global weights are given).
    cos = cosine_from_gram(gram(updates, shift=None if global_weights is None else -global_weights))
    dist = (1.0 - cos).clamp_min(0.0).numpy()
    np.fill_diagonal(dist, 0.0)
    admitted = admitted_clients(dist) if k >= 2 else np.arange(k)
    if admitted is None:
        notes.append("flame: HDBSCAN found no cluster; every update admitted")
        admitted = np.arange(k)
    norms = row_norms(updates)
    bound = float(torch.quantile(norms, 0.5))
    mask = torch.zeros(k, dtype=torch.float64)
    mask[torch.from_numpy(admitted)] = 1.0
    weights = mask / mask.sum()
    update = weighted_sum(weights * clip_factors(norms, bound), updates)
    if noise > 0 and bound > 0:
        update = update + gaussian_noise(updates.shape[1], noise * bound, generator or torch.Generator().manual_seed(0))
    return update, weights, notes


@AGGREGATORS.register("flame")
class Flame(Aggregator):
    name = "flame"
    summary = "HDBSCAN on cosine distances of the local models, median-norm clipping, noise `flame_noise` x median norm"
    citation = "Nguyen et al. 2022, \"FLAME: Taming Backdoors in Federated Learning\", USENIX Security, Alg. 1"
    excludes = True  # its zero-weight updates are the ones it judged adversarial
    needs = frozenset({"generator", "global_weights"})

    def __init__(self, params=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params)
        if self.params.flame_distance not in ("models", "updates"):
            raise ValueError(f"aggregation.flame_distance: unknown '{self.params.flame_distance}'; allowed: models, updates")
        if self.params.flame_distance == "updates":
            self.needs = frozenset({"generator"})  # type: ignore[misc]

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int],
                   context: AggregationContext | None = None) -> AggregationResult:
        g = context.global_weights if context is not None and self.params.flame_distance == "models" else None
        update, weights, notes = flame(updates, g, self.params.flame_noise, round_generator(context))
        return AggregationResult(update, weights, notes=notes)
