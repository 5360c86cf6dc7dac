"""The aggregator interface: a stack of flattened client updates in, one update out.

Every aggregator receives ``U`` (k x d), the clients' sample counts ``n`` (k) and their ids.
Rows holding NaN or Inf are rejected before any maths sees them, and a rule whose robustness
needs more updates than it was given (k <= 2f) refuses with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flsec.errors import FlsecError


class AggregationError(FlsecError):
    """Too few (finite) updates for the rule's assumptions."""


@dataclass(frozen=True)
class AggregatorParams:
    f: int = 0
    multi_krum_m: int | None = None
    trim_beta: int | None = None
    foolsgold_kappa: float = 1.0
    fl_defender_components: int = 2
    output_layer: slice = field(default_factory=lambda: slice(0, None))


@dataclass(frozen=True)
class AggregationResult:
    """``update`` (d) and each client's share in it (k, zeros for rejected rows, summing to 1)."""

    update: torch.Tensor
    weights: torch.Tensor


def finite_rows(updates: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the rows without NaN or Inf."""
    return torch.isfinite(updates).all(dim=1)


def normalise(weights: torch.Tensor) -> torch.Tensor:
    total = weights.sum()
    return weights / total if total > 0 else torch.zeros_like(weights)


class Aggregator:
    """Base class: subclasses implement :meth:`_aggregate` on finite rows only."""

    name = "base"

    def __init__(self, params: AggregatorParams | None = None) -> None:
        self.params = params or AggregatorParams()

    def min_updates(self) -> int:
        """Fewest updates the rule accepts (its robustness assumption)."""
        return 1

    def check(self, k: int) -> None:
        need = self.min_updates()
        if k < need:
            raise AggregationError(
                f"aggregation.name: {self.name} needs at least {need} updates per round with f = {self.params.f}, "
                f"got {k}; raise training.client_fraction or lower aggregation.f"
            )

    def __call__(
        self, updates: torch.Tensor, num_samples: torch.Tensor | None = None, client_ids: list[int] | None = None
    ) -> AggregationResult:
        if updates.ndim != 2 or updates.shape[0] == 0:
            raise AggregationError(f"expected a non-empty k x d stack of updates, got shape {tuple(updates.shape)}")
        k = updates.shape[0]
        n = torch.ones(k) if num_samples is None else num_samples.to(torch.float64)
        ids = list(range(k)) if client_ids is None else list(client_ids)
        keep = finite_rows(updates)
        kept = torch.nonzero(keep).flatten()
        self.check(len(kept))
        result = self._aggregate(
            updates[kept].to(torch.float32), n[kept].float(), [ids[i] for i in kept.tolist()]
        )
        weights = torch.zeros(k)
        weights[kept] = result.weights.float()
        return AggregationResult(result.update, weights)

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int]) -> AggregationResult:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that must survive a resume (history-based rules)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        del state
