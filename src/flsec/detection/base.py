"""Suspect detection: the interface, the registry and the robust outlier score every detector uses.

A detector sees exactly what the server saw in a round: the k x d stack of updates it received (in
client-id order), those clients' ids and what its aggregation rule made of them
(:class:`~flsec.aggregation.base.AggregationResult`). It returns a :class:`Suspicion`: a score per
client (larger = more suspect) and the clients it flags. Nothing it reads says who the attackers
are; a run scores the detector against them afterwards (precision and recall in ``history.jsonl``,
evaluation only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flsec.aggregation.base import AggregationResult, Aggregator, finite_rows
from flsec.errors import ConfigError
from flsec.registry import Registry

#: Modified z-score above which a value is an outlier (Iglewicz & Hoaglin 1993, Sec. 3.4: 3.5).
DEFAULT_THRESHOLD = 3.5


@dataclass(frozen=True)
class Suspicion:
    """One round's verdict: ``scores[i]`` for ``clients[i]`` (larger = more suspect; ``inf`` for an
    update the rule rejected as non-finite) and the flagged ``suspects`` (sorted client ids)."""

    detector: str
    clients: list[int]
    scores: list[float]
    suspects: list[int]
    details: dict[str, list[float]] = field(default_factory=dict)

    def score_of(self, client: int) -> float:
        return self.scores[self.clients.index(client)]


Detector = Callable[[torch.Tensor, list[int], AggregationResult, float], Suspicion]
DETECTORS: Registry[Detector] = Registry("suspect detector")


def modified_z(values: torch.Tensor) -> torch.Tensor:
    """Modified z-scores M_i = 0.6745 (x_i - median) / MAD, MAD = median |x_i - median| (Iglewicz &
    Hoaglin 1993, "How to Detect and Handle Outliers", eq. 3.3), in float64, medians interpolated.
    Where MAD = 0 (more than half the values equal) the mean absolute deviation x 1.253314 stands in
    for it (IBM SPSS's convention, so an isolated outlier is still seen); where that is 0 too, every
    score is 0."""
    x = values.to(torch.float64)
    if x.numel() == 0:
        return x
    med = torch.quantile(x, 0.5)
    dev = (x - med).abs()
    mad = float(torch.quantile(dev, 0.5))
    if mad > 0:
        return 0.6745 * (x - med) / mad
    mean_ad = float(dev.mean())
    if mean_ad > 0:
        return (x - med) / (1.253314 * mean_ad)
    return torch.zeros_like(x)


def resolve_detector(name: str, aggregator: Aggregator) -> str:
    """``auto``: the aggregation rule's own exclusions where it makes them (:attr:`Aggregator.excludes`),
    else ``norm_cosine``. ``rule`` with a rule that excludes nobody is a configuration error."""
    if name == "auto":
        return "rule" if aggregator.excludes else "norm_cosine"
    if name == "rule" and not aggregator.excludes:
        ruled = ", ".join(sorted(n for n in _excluding_rules()))
        raise ConfigError(f"detection.detector: '{aggregator.name}' excludes no client, so it has no 'rule' suspects; "
                          f"use auto, {', '.join(n for n in DETECTORS.names() if n != 'rule')} (rules that exclude: "
                          f"{ruled})")
    DETECTORS.get(name)
    return name


def _excluding_rules() -> list[str]:
    from flsec.aggregation import AGGREGATORS

    return [n for n in AGGREGATORS.names() if getattr(AGGREGATORS.get(n), "excludes", False)]


def detect(name: str, updates: torch.Tensor, clients: list[int], result: AggregationResult,
           threshold: float = DEFAULT_THRESHOLD) -> Suspicion:
    """Run the registered detector ``name`` (already resolved, see :func:`resolve_detector`)."""
    if updates.ndim != 2 or updates.shape[0] != len(clients):
        raise ValueError(f"detect: expected a {len(clients)} x d stack, got {tuple(updates.shape)}")
    return DETECTORS.get(name)(updates, clients, result, threshold)


def finite_mask(updates: torch.Tensor) -> torch.Tensor:
    return finite_rows(updates.to(torch.float32))


def verdict(name: str, clients: list[int], scores: torch.Tensor, flagged: torch.Tensor,
            details: dict[str, torch.Tensor] | None = None) -> Suspicion:
    """A :class:`Suspicion` from per-row scores and flags (rows in ``clients`` order)."""
    return Suspicion(name, list(clients), [float(s) for s in scores.tolist()],
                     sorted(c for c, f in zip(clients, flagged.tolist(), strict=True) if f),
                     {k: [float(x) if math.isfinite(float(x)) else float("nan") for x in v.tolist()]
                      for k, v in (details or {}).items()})
