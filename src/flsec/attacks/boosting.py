"""Boosting / model replacement (Bagdasaryan et al. 2020, "How To Backdoor Federated Learning", eq. 3).

The attacker scales its update by gamma = n / eta so that, after averaging over n participants
with server learning rate eta, its model replaces the global one. When ``a`` attackers collude in
the same round, each uses gamma = n / (eta * a): their boosted updates then add up to one
replacement instead of a times one, which would overshoot and wreck the main task.
"""

from __future__ import annotations

import torch


def default_boost_factor(clients_per_round: int, server_lr: float, attackers_in_round: int = 1) -> float:
    return clients_per_round / (server_lr * max(1, attackers_in_round))


def boost(update: torch.Tensor, factor: float) -> torch.Tensor:
    return update * factor
