"""Constrain-and-scale model replacement (Bagdasaryan et al. 2020, "How To Backdoor Federated Learning").

The attacker trains on backdoored batches with an anomaly-evasion objective (Sec. 4, "Constrain-and-
scale", and its Algorithm):

    L_model = alpha * L_class + (1 - alpha) * L_ano,      L_ano = ||X - G||_2,

so its model X stays close to the global model G, then scales its update by gamma (eq. 3: gamma =
n / eta replaces G by X after averaging; shared among the attackers of a round, see
:mod:`flsec.attacks.boosting`). Against a norm bound S the attacker may scale only up to
gamma = S / ||X - G|| ("bounded scaling", ``attack.constrain_scale.norm_bound``).

Single-shot (``attack.rounds = [r]``, late in training) and repeated attacks (several or all rounds)
are the same attack scheduled differently. The paper leaves alpha to the attacker, to be chosen
against the anomaly detector in use; the authors' code defaults to alpha = 1 (no anomaly term).
flsec's default alpha = 0.9 keeps the constraint active (the sent update is about 2.5 times closer to
the global model than at alpha = 1 on digits) while one round still replaces the model (ASR >= 90%,
tests/test_attacks_models.py); at alpha = 0.7 the replacement stops short (ASR ~50-65% there).
"""

from __future__ import annotations

import torch
from torch import nn

from flsec.attacks.base import AttackHooks, Knowledge
from flsec.attacks.data_poisoning import BackdoorAttack
from flsec.attacks.registry import ATTACKS
from flsec.fl.client import LocalSpec


def anomaly_evasion_objective(class_loss: torch.Tensor, distance: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * L_class + (1 - alpha) * L_ano (Bagdasaryan et al. 2020, Sec. 4)."""
    return alpha * class_loss + (1.0 - alpha) * distance


def model_distance(model: nn.Module, start: list[torch.Tensor]) -> torch.Tensor:
    """||X - G||_2 over all parameters, differentiable in X (its gradient at X = G is 0)."""
    diffs = [(p - s).reshape(-1) for p, s in zip(model.parameters(), start, strict=True)]
    return torch.linalg.vector_norm(torch.cat(diffs))


def bounded_scale(gamma: float, update_norm: float, bound: float | None) -> float:
    """The largest factor up to ``gamma`` whose scaled update has norm <= ``bound`` (gamma = S / ||X - G||)."""
    if bound is None or update_norm == 0.0:
        return gamma
    return min(gamma, bound / update_norm)


class AnomalyEvasionHooks(AttackHooks):
    """Adds the distance-to-the-global-model term to every step's objective."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.start: list[torch.Tensor] = []

    def begin(self, model: nn.Module) -> None:
        self.start = [p.detach().clone() for p in model.parameters()]

    def loss(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        if self.alpha == 1.0:
            return loss
        return anomaly_evasion_objective(loss, model_distance(model, self.start), self.alpha)

    def info(self) -> dict[str, float]:
        return {"alpha": self.alpha}


@ATTACKS.register("constrain_scale")
class ConstrainAndScale(BackdoorAttack):
    name = "constrain_scale"
    scales = True

    def hooks(self, client: int, round_: int, spec: LocalSpec, knowledge: Knowledge) -> AttackHooks | None:
        del client, round_, spec, knowledge
        return AnomalyEvasionHooks(self.config.attack.constrain_scale.alpha)

    def scale_factor(self, gamma: float, update: torch.Tensor) -> float:
        return bounded_scale(gamma, float(update.norm()), self.config.attack.constrain_scale.norm_bound)
