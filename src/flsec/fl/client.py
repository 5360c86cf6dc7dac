"""Local training of one client and the FedSGD gradient of one of its batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from flsec.data.augment import crop_flip
from flsec.fl.params import get_flat
from flsec.runtime import autocast

if TYPE_CHECKING:
    from flsec.config import TrainingConfig

BatchTransform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LocalSpec:
    """Local optimisation hyper-parameters (also what a server needs to replay an update)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    augment_crop: int = 0
    augment_flip: bool = False

    @classmethod
    def from_training(cls, t: TrainingConfig, round_: int = 1) -> LocalSpec:
        """The honest clients' local hyper-parameters in round ``round_`` (1-based) of an experiment's
        ``[training]`` section: the learning rate decays as ``lr * lr_decay^(round_ - 1)``."""
        return cls(t.local_epochs, t.batch_size, t.lr * t.lr_decay ** (round_ - 1), t.momentum, t.weight_decay,
                   t.augment_crop, t.augment_flip)

    def steps(self, num_samples: int) -> int:
        return self.epochs * -(-num_samples // self.batch_size)


@dataclass(frozen=True)
class LocalResult:
    update: torch.Tensor
    loss: float
    steps: int


class TrainingHooks:
    """How an attack changes a client's local optimisation; the defaults change nothing.

    A client trains with hooks only when its attack needs them (e.g. an anomaly-evasion loss term,
    gradient masking, projection onto a norm ball); engines that vectorise clients run only
    hook-free clients that way and fall back to :func:`local_train_on` for the others.
    """

    def begin(self, model: nn.Module) -> None:
        """Called once, with the model at the weights local training starts from."""

    def loss(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """The objective of one step, given the batch's cross-entropy."""
        return loss

    def before_step(self, model: nn.Module) -> None:
        """Called after backward, before the optimiser step (gradients are in ``p.grad``)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after the optimiser step."""


def client_batches(x: torch.Tensor, y: torch.Tensor, spec: LocalSpec, generator: torch.Generator,
                   transform: BatchTransform | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A client's mini-batches in training order: a fresh permutation per epoch, then per batch the
    augmentation of ``spec`` (:func:`flsec.data.augment.crop_flip`; nothing is drawn when it is off) and
    the batch transform (e.g. backdoor poisoning), all drawing from the same generator, batch after batch.

    A trigger is stamped after augmentation: the patch sits where the test-time trigger sits (a crop
    would move it by up to ``augment_crop`` pixels and a flip would mirror it to the other corner, and
    the ASR is measured on un-augmented test images), as in the usual backdoor code (poisoning the
    batch the data loader's augmenting transforms produced, e.g. Xie et al. 2020, DBA)."""
    for _ in range(spec.epochs):
        order = torch.randperm(len(y), generator=generator)
        for idx in order.split(spec.batch_size):
            xb, yb = x[idx], y[idx]
            if spec.augment_crop or spec.augment_flip:
                xb = crop_flip(xb, spec.augment_crop, spec.augment_flip, generator)
            if transform is not None:
                xb, yb = transform(xb, yb, generator)
            yield xb, yb


def local_train_on(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   spec: LocalSpec, hooks: TrainingHooks | None = None, precision: str = "fp32") -> LocalResult:
    """SGD (with the momentum and weight decay of ``spec``) from the model's current weights over
    ``batches``; returns the update (local - start) as a flat vector. The reported loss is the
    batches' mean cross-entropy, whatever ``hooks`` add to the objective.

    Batches may come from the CPU: each is moved to the model's device. ``precision`` autocasts the
    forward pass (:func:`flsec.runtime.autocast`); weights, gradients and the optimiser stay fp32."""
    device = next(model.parameters()).device
    start = get_flat(model)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    model.train()
    if hooks is not None:
        hooks.begin(model)
    total, steps = torch.zeros((), device=device), 0
    for xb, yb in batches:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        objective = loss if hooks is None else hooks.loss(model, loss)
        objective.backward()
        if hooks is not None:
            hooks.before_step(model)
        opt.step()
        if hooks is not None:
            hooks.after_step(model)
        total += loss.detach()
        steps += 1
    return LocalResult(get_flat(model) - start, float(total) / max(steps, 1), steps)


def local_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: LocalSpec,
    generator: torch.Generator,
    transform: BatchTransform | None = None,
) -> LocalResult:
    """:func:`local_train_on` over :func:`client_batches` of (x, y)."""
    return local_train_on(model, client_batches(x, y, spec, generator, transform), spec)


def batch_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Flat gradient of the mean cross-entropy of one batch: what a FedSGD client shares."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    loss = F.cross_entropy(model(x.to(device)), y.to(device))
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1) for g in grads]).detach()
