"""Norm clipping and weak differential privacy (Sun, Kairouz, Suresh & McMahan 2019, "Can You Really
Backdoor Federated Learning?", NeurIPS FL workshop, Sec. 4; reference code: TensorFlow Federated's
``research/targeted_attack``).

Norm thresholding: every update is scaled to norm at most M, Delta_i / max(1, ||Delta_i|| / M),
and the clipped updates are averaged. Weak DP: Gaussian noise N(0, sigma^2 I) is added to the
averaged update (the model), sigma = ``aggregation.clip_noise`` (0 = norm clipping alone; Sun et al.
report sigma = 0.025 on EMNIST). M = ``aggregation.clip_norm`` has no universal default: it must sit
near the benign updates' norms of the task (Sun et al. sweep it).

The mean is uniform over clients, as in the reference's DP aggregation (a Gaussian average query
divides the clipped sum by the number of clients); ``aggregation.sample_weighted = true`` is ignored.
The noise is drawn from the round's generator (seeded by run seed and round).
"""

from __future__ import annotations

import torch

from flsec.aggregation.base import AggregationContext, AggregationResult, Aggregator, config_error
from flsec.aggregation.numerics import row_norms, weighted_sum
from flsec.aggregation.registry import AGGREGATORS


def clip_factors(norms: torch.Tensor, bound: float) -> torch.Tensor:
    """min(1, M / ||Delta_i||) per row (1 for a zero row)."""
    return torch.where(norms > bound, bound / torch.where(norms > 0, norms, torch.ones_like(norms)),
                       torch.ones_like(norms))


def gaussian_noise(d: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, sigma^2 I) in float64 (d)."""
    return torch.randn(d, generator=generator, dtype=torch.float64) * sigma


def round_generator(context: AggregationContext | None) -> torch.Generator:
    """The context's generator, or a fixed one when the rule is called outside a run."""
    if context is not None and context.generator is not None:
        return context.generator
    return torch.Generator().manual_seed(0)


def norm_clip(updates: torch.Tensor, bound: float, sigma: float = 0.0,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mean_i Delta_i min(1, M / ||Delta_i||) + N(0, sigma^2 I); returns (update in float64, weights 1/k)."""
    k = updates.shape[0]
    factors = clip_factors(row_norms(updates), bound)
    update = weighted_sum(factors / k, updates)
    if sigma > 0:
        update = update + gaussian_noise(updates.shape[1], sigma, generator or torch.Generator().manual_seed(0))
    return update, torch.full((k,), 1.0 / k, dtype=torch.float64)


@AGGREGATORS.register("norm_clip")
class NormClip(Aggregator):
    name = "norm_clip"
    summary = "every update clipped to norm `clip_norm`, averaged, Gaussian noise `clip_noise` (weak DP)"
    citation = "Sun, Kairouz, Suresh & McMahan 2019, \"Can You Really Backdoor Federated Learning?\", NeurIPS FL workshop"
    needs = frozenset({"generator"})

    def validate(self, per_round: int) -> None:
        if not self.params.clip_norm > 0:
            raise config_error("clip_norm", f"must be > 0, got {self.params.clip_norm}")
        super().validate(per_round)

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int],
                   context: AggregationContext | None = None) -> AggregationResult:
        return AggregationResult(*norm_clip(updates, self.params.clip_norm, self.params.clip_noise,
                                            round_generator(context)))
