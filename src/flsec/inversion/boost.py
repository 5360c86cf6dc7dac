"""Estimating the boost (model-replacement scale) of a received update, as a server can.

A boosted attacker multiplies its update by gamma (Bagdasaryan et al. 2020, eq. 3). The cosine
objective of Inverting Gradients is blind to that scale, but everything that reads magnitudes is
not: label counts from the output bias (``llg``), and any reading of the update as "lr x steps x
mean gradient". Two estimates, both from what the server holds:

* ``norm``: the update's norm over the median norm of the other clients of the same round (the
  server receives all of them; flsec records them in ``history.jsonl``). Benign clients differ in
  data size, so values up to ~2-3 are ordinary; a model-replacement boost is n / attackers.
* ``replay``: after inversion, the least-squares scale between the observed update and the update
  the replay produces from the reconstructions, <u, u_sim> / <u_sim, u_sim>; exact when the
  reconstructions explain the update, meaningless when they do not.

The factor applied (``applied``) is the norm estimate when it exceeds ``threshold`` and 1
otherwise, so that an ordinary large client is not "un-boosted".
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

DEFAULT_THRESHOLD = 3.0


def norm_ratio(observed_norm: float, round_record: dict[str, Any] | None, client: int) -> float | None:
    """||u_client|| / median ||u_other|| over the round's other selected clients (None if unknown)."""
    if not round_record:
        return None
    selected, norms = round_record.get("selected", []), round_record.get("update_norms", [])
    if len(selected) != len(norms):
        return None
    others = [float(n) for c, n in zip(selected, norms, strict=True) if c != client]
    others = [n for n in others if n == n and n > 0.0]
    if not others:
        return None
    return observed_norm / statistics.median(others)


def replay_scale(observed: torch.Tensor, simulated: torch.Tensor) -> float | None:
    """Least-squares gamma with observed ~ gamma * simulated."""
    den = float((simulated.double() * simulated.double()).sum())
    if not den > 0.0:
        return None
    value = float((observed.double() * simulated.double()).sum()) / den
    return value if value == value else None


def applied_factor(estimate: float | None, threshold: float = DEFAULT_THRESHOLD) -> float:
    """The factor the update is divided by before magnitudes are read from it."""
    return float(estimate) if estimate is not None and estimate > threshold else 1.0
