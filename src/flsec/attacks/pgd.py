"""Norm-bounded backdoor: projected local SGD (Sun et al. 2019, "Can You Really Backdoor Federated
Learning?", Sec. 3, norm-bounded attacker; Wang et al. 2020, "Attack of the Tails", Sec. 4, PGD).

The attacker trains on backdoored batches and, after its optimiser steps, projects its model back
onto the ball ||X - G|| <= eps around the global model G it received:

    X <- G + Pi_eps(X - G),   Pi_eps(d) = d * min(1, eps / ||d||_2)   (l2)   or  clip(d, -eps, eps)  (linf),

so the update it sends never exceeds the norm a norm-clipping server accepts (Sun et al. assume the
attacker knows the bound) and stays close to the honest updates that distance-based filters compare
it with. The projection runs after every ``project_every``-th step and always after the last, so the
sent update satisfies the bound exactly (Wang et al.'s code projects every 10 steps and at the end;
``project_every = 1`` is plain projected SGD).

Without ``attack.pgd.eps`` the attacker chooses the radius itself: ``eps_factor`` times the norm of
the honest update it computes first from the same global weights on its own clean data (factor 1: it
sends an update of the size an honest client would; Wang et al. shrink the radius against Krum,
where a small update looks central).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from flsec.attacks.base import ATTACK_STREAM, AttackHooks, Knowledge
from flsec.attacks.data_poisoning import BackdoorAttack
from flsec.attacks.registry import ATTACKS
from flsec.fl.client import LocalSpec, client_batches, local_train_on
from flsec.fl.params import generator, get_flat, set_flat


def project_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of ``delta`` onto {d : ||d||_2 <= eps}."""
    norm = float(torch.linalg.vector_norm(delta))
    return delta if norm <= eps else delta * (eps / norm)


def project_linf(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Projection onto {d : ||d||_inf <= eps} (coordinate-wise clipping)."""
    return delta.clamp(-eps, eps)


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    return project_l2(delta, eps) if norm == "l2" else project_linf(delta, eps)


def update_norm(delta: torch.Tensor, norm: str) -> float:
    return float(torch.linalg.vector_norm(delta, ord=2 if norm == "l2" else float("inf")))


class ProjectionHooks(AttackHooks):
    """Keep the local model inside the ball of radius ``eps`` around the weights training started from.

    ``eps = None`` asks ``reference(model)`` for it in :meth:`begin` (with the model at the global weights).
    """

    def __init__(self, eps: float | None, norm: str, every: int, total_steps: int,
                 reference: Callable[[nn.Module], float] | None = None) -> None:
        if eps is None and reference is None:
            raise ValueError("ProjectionHooks needs eps or a reference")
        self.eps, self.norm, self.every, self.total = eps, norm, every, total_steps
        self.reference = reference
        self.step = 0
        self.start = torch.empty(0)

    def begin(self, model: nn.Module) -> None:
        self.start = get_flat(model)
        self.step = 0
        if self.reference is not None and self.eps is None:
            self.eps = self.reference(model)

    def after_step(self, model: nn.Module) -> None:
        self.step += 1
        if self.step % self.every and self.step != self.total:
            return
        assert self.eps is not None
        delta = get_flat(model) - self.start
        if update_norm(delta, self.norm) > self.eps:
            set_flat(model, self.start + project(delta, self.eps, self.norm))

    def info(self) -> dict[str, float | str]:
        return {"eps": float(self.eps) if self.eps is not None else float("nan"), "norm": self.norm}


@ATTACKS.register("pgd")
class NormBoundedBackdoor(BackdoorAttack):
    name = "pgd"

    def honest_spec(self, round_: int) -> LocalSpec:
        return LocalSpec.from_training(self.config.training, round_)

    def honest_norm(self, client: int, round_: int, norm: str) -> Callable[[nn.Module], float]:
        """The norm of the update the client would send if it were honest, from the model's weights."""

        def reference(model: nn.Module) -> float:
            x, y = self.shard(client)
            spec = self.honest_spec(round_)
            honest = copy.deepcopy(model)
            batches = client_batches(x, y, spec, generator(self.config.seed, round_, client, ATTACK_STREAM))
            return self.config.attack.pgd.eps_factor * update_norm(local_train_on(honest, batches, spec).update, norm)

        return reference

    def hooks(self, client: int, round_: int, spec: LocalSpec, knowledge: Knowledge) -> AttackHooks | None:
        del knowledge
        p = self.config.attack.pgd
        steps = spec.steps(len(self.client_data(client, True)[1]))
        reference = None if p.eps is not None else self.honest_norm(client, round_, p.norm)
        return ProjectionHooks(p.eps, p.norm, p.project_every, steps, reference)
