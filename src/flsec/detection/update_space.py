"""Detectors on the update stack itself, for rules that exclude nobody (FedAvg, Median, Trimmed mean,
norm clipping), and the rule's own exclusions for those that do.

* ``norm``: an update whose L2 norm is an outlier on the large side: modified z-score (Iglewicz &
  Hoaglin 1993) of ||U_i|| above the threshold. Model replacement scales an update by n / attackers
  (Bagdasaryan et al. 2020, eq. 3). The raw norms are scored, not their logs: honest non-IID clients'
  norms spread over a factor of several, which in log space inflates the median absolute deviation
  until a boost of 10 no longer stands out (MNIST, Dirichlet 0.5, 20 clients, round 1: z = 9.3 on
  the norms, 2.8 on their logs).
* ``cosine``: an update pointing away from the round's robust consensus: modified z-score of
  cos(U_i, coordinate-wise median of U) below minus the threshold (the median is Yin et al. 2018's
  robust estimate of the honest direction; cosine is what FoolsGold, FLAME and FL-Defender compare).
* ``norm_cosine``: either; the score is the larger of the two.
* ``rule``: what the aggregation rule itself excluded (Krum's f worst scores, Bulyan's and FLAME's
  unselected updates, FoolsGold's, FL-Defender's and FLTrust's zero weights), ranked by its suspicion.

Rows the rule rejected as non-finite are suspects under every detector (score ``inf``).
"""

from __future__ import annotations

import torch

from flsec.aggregation.base import AggregationResult
from flsec.aggregation.median import coordinate_median
from flsec.detection.base import DETECTORS, Suspicion, finite_mask, modified_z, verdict


def norm_scores(updates: torch.Tensor) -> torch.Tensor:
    """Modified z-scores of the L2 norms."""
    return modified_z(updates.to(torch.float64).norm(dim=1))


def cosine_scores(updates: torch.Tensor) -> torch.Tensor:
    """Minus the modified z-scores of cos(U_i, coordinate-wise median), so larger = more suspect."""
    u = updates.to(torch.float64)
    ref, _ = coordinate_median(updates)
    ref = ref.to(torch.float64)
    den = u.norm(dim=1) * ref.norm()
    cos = torch.where(den > 0, (u @ ref) / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    return -modified_z(cos)


SCORERS = {"norm_z": norm_scores, "cosine_z": cosine_scores}


def _over_finite(name: str, updates: torch.Tensor, clients: list[int], threshold: float,
                 parts: tuple[str, ...]) -> Suspicion:
    """Score the finite rows with each of ``parts`` (keys of :data:`SCORERS`); a row is flagged when
    any part exceeds ``threshold`` and scored by the largest part; non-finite rows are flagged with
    score ``inf``."""
    ok = finite_mask(updates)
    k = len(clients)
    scores = torch.full((k,), float("inf"), dtype=torch.float64)
    details: dict[str, torch.Tensor] = {}
    if int(ok.sum()):
        rows = updates[ok]
        per = {key: SCORERS[key](rows) for key in parts}
        best = torch.stack(list(per.values())).amax(dim=0)
        scores[ok] = best
        for key, v in per.items():
            full = torch.full((k,), float("nan"), dtype=torch.float64)
            full[ok] = v
            details[key] = full
    return verdict(name, clients, scores, scores > threshold, details)


@DETECTORS.register("norm")
def norm_detector(updates: torch.Tensor, clients: list[int], result: AggregationResult, threshold: float) -> Suspicion:
    return _over_finite("norm", updates, clients, threshold, ("norm_z",))


@DETECTORS.register("cosine")
def cosine_detector(updates: torch.Tensor, clients: list[int], result: AggregationResult,
                    threshold: float) -> Suspicion:
    return _over_finite("cosine", updates, clients, threshold, ("cosine_z",))


@DETECTORS.register("norm_cosine")
def norm_cosine_detector(updates: torch.Tensor, clients: list[int], result: AggregationResult,
                         threshold: float) -> Suspicion:
    return _over_finite("norm_cosine", updates, clients, threshold, ("norm_z", "cosine_z"))


@DETECTORS.register("rule")
def rule_detector(updates: torch.Tensor, clients: list[int], result: AggregationResult,
                  threshold: float) -> Suspicion:
    """The aggregation rule's own exclusions (``threshold`` is not used)."""
    if result.excluded is None or result.suspicion is None:
        raise ValueError("rule detector: the aggregation rule made no exclusions (Aggregator.excludes is False)")
    return verdict("rule", clients, result.suspicion, result.excluded)
