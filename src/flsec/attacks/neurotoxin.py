"""Neurotoxin (Zhang et al. 2022, "Neurotoxin: Durable Backdoors in Federated Learning", Algorithm 1).

Benign clients mostly move a small set of coordinates; a backdoor written into the coordinates they
move least is overwritten least after the attackers stop. The attacker estimates the benign update,
takes the top-k% of its coordinates by magnitude, S = top-k%(|g|), and projects every gradient of its
(backdoor) training onto the complement of S:

    X <- X - lr * (grad L(X) restricted to S^c),

so its update is exactly zero on S. The benign estimate is the last global update (the paper: the
attacker "downloads the gradient from the previous round", here ``ClientTask.knowledge``) or, with
``estimate = "own_gradient"`` and in the first round, the gradient of the attacker's own clean data at
the global model (the authors' code takes it on clean data of sampled clients). The authors' scripts
exclude the top 5% (``gradmask_ratio = 0.95``) of all coordinates ranked together, the default here.
Optionally the update is also norm-bounded (PGD, ``attack.neurotoxin.eps``), as the paper pairs
Neurotoxin with norm clipping.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flsec.attacks.base import PREVIOUS_GLOBAL_UPDATE, AttackHooks, ComposedHooks, Knowledge
from flsec.attacks.data_poisoning import BackdoorAttack
from flsec.attacks.pgd import ProjectionHooks
from flsec.attacks.registry import ATTACKS
from flsec.fl.client import LocalSpec
from flsec.fl.params import get_flat, set_flat


def neurotoxin_mask(estimate: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """The coordinates the attacker may change: all but the ``floor(top_fraction * d)`` with the
    largest |estimate| (Zhang et al. 2022, Alg. 1: S = top-k%(g), update projected onto S^c)."""
    flat = estimate.reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    k = int(top_fraction * flat.numel())
    if k > 0:
        keep[torch.topk(flat.abs(), k, sorted=False).indices] = False
    return keep


def clean_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Flat gradient of the mean cross-entropy over all of (x, y) at the model's weights (mode preserved)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    was_training = model.training
    model.eval()
    for xb, yb in zip(x.split(chunk), y.split(chunk), strict=True):
        loss = F.cross_entropy(model(xb), yb, reduction="sum") / len(y)
        for t, g in zip(total, torch.autograd.grad(loss, params), strict=True):
            t += g
    model.train(was_training)
    return torch.cat([t.reshape(-1) for t in total])


class MaskHooks(AttackHooks):
    """Zero the gradient outside the mask before each step and hold the masked-out coordinates at
    their starting values after it (weight decay would otherwise move them)."""

    def __init__(self, mask_of: Callable[[nn.Module], torch.Tensor], source: str) -> None:
        self.mask_of = mask_of
        self.source = source
        self.mask = torch.empty(0, dtype=torch.bool)
        self.start = torch.empty(0)
        self.per_param: list[torch.Tensor] = []

    def begin(self, model: nn.Module) -> None:
        self.start = get_flat(model)
        self.mask = self.mask_of(model)
        self.per_param, offset = [], 0
        for p in model.parameters():
            self.per_param.append(self.mask[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()

    def before_step(self, model: nn.Module) -> None:
        for p, m in zip(model.parameters(), self.per_param, strict=True):
            if p.grad is not None:
                p.grad.mul_(m)

    def after_step(self, model: nn.Module) -> None:
        flat = get_flat(model)
        frozen = ~self.mask
        if not torch.equal(flat[frozen], self.start[frozen]):
            flat[frozen] = self.start[frozen]
            set_flat(model, flat)

    def info(self) -> dict[str, float | str]:
        return {"masked_fraction": float((~self.mask).float().mean()), "mask_estimate": self.source}


@ATTACKS.register("neurotoxin")
class Neurotoxin(BackdoorAttack):
    name = "neurotoxin"
    needs = frozenset({PREVIOUS_GLOBAL_UPDATE})

    def hooks(self, client: int, round_: int, spec: LocalSpec, knowledge: Knowledge) -> AttackHooks | None:
        cfg = self.config.attack.neurotoxin
        previous = knowledge.get(PREVIOUS_GLOBAL_UPDATE)
        if cfg.estimate == "previous_update" and previous is not None:
            mask = MaskHooks(lambda _model: neurotoxin_mask(previous, cfg.top_fraction), "previous_update")
        else:
            x, y = self.shard(client)
            mask = MaskHooks(lambda model: neurotoxin_mask(clean_gradient(model, x, y), cfg.top_fraction),
                             "own_gradient")
        if cfg.eps is None:
            return mask
        steps = spec.steps(len(self.client_data(client, True)[1]))
        return ComposedHooks([mask, ProjectionHooks(cfg.eps, "l2", 1, steps)])
