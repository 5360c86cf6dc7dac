"""flsec on Flower, and flsec's science for Flower apps (needs ``pip install "flsec[flower]"``).

* ``runtime.engine = "flower"`` runs an flsec experiment as a Flower ServerApp + ClientApp on Flower's
  simulation engine (Ray): :func:`flsec.flower.engine.train_on_flower`. The ServerApp drives flsec's own
  :class:`~flsec.fl.server.Server` and the ClientApp calls :func:`~flsec.fl.rounds.run_client`, so the
  run (history, weights, captures) is the in-process run.
* :class:`RobustStrategy`: any registered flsec aggregator as a Flower (Message API) strategy.
* :func:`attacker`: wraps a Flower client so that it poisons its data and/or boosts its update the way
  flsec's attackers do.

``import flsec`` never imports this package; importing it without the extra fails with the install command.
"""

from __future__ import annotations

import os

from flsec.errors import FlsecError

# Flower reports usage events to its servers unless told not to; a research tool run on private or offline
# machines should not. Set FLWR_TELEMETRY_ENABLED=1 before importing flsec.flower to keep Flower's default.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

try:
    import flwr  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without the extra
    raise FlsecError('flsec.flower needs Flower: pip install "flsec[flower]" (Python >= 3.11)') from None

from flsec.flower.attacker import FlowerAttack, attacker, client_train
from flsec.flower.strategy import RobustStrategy

__all__ = ["FlowerAttack", "RobustStrategy", "attacker", "client_train"]
