"""What the curious server observed, and how to simulate it from candidate images.

* :class:`GradientCase` (FedSGD): the gradient of the mean cross-entropy of one batch.
* :class:`UpdateCase` (FedAvg): a local update made of several SGD steps; it is replayed
  differentiably with the known learning rate, momentum, epochs and batch size (Geiping et al.
  2020, Sec. 6 "Federated averaging": the multi-step setting).

Both return flat vectors laid out like ``model.parameters()``, so the observed and simulated
quantities are compared coordinate by coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}


@dataclass
class GradientCase:
    model: nn.Module
    observed: torch.Tensor
    batch_size: int

    def __post_init__(self) -> None:
        self.model.eval()
        self.params = _params(self.model)

    def simulate(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(functional_call(self.model, self.params, (x,)), labels)
        grads = torch.autograd.grad(loss, list(self.params.values()), create_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])

    @property
    def num_images(self) -> int:
        return self.batch_size

    def output_bias_gradient(self) -> torch.Tensor:
        last_bias = list(self.params.values())[-1]
        return self.observed[-last_bias.numel():]


@dataclass
class UpdateCase:
    model: nn.Module
    observed: torch.Tensor
    num_samples: int
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        self.model.eval()
        self.params = _params(self.model)

    @property
    def num_images(self) -> int:
        return self.num_samples

    def simulate(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """theta_T - theta_0 after replaying the client's SGD on (x, labels), in a fixed batch order."""
        names = list(self.params)
        start = [self.params[n] for n in names]
        current = list(start)
        buffers: list[torch.Tensor | None] = [None] * len(names)
        for _ in range(self.epochs):
            for idx in torch.arange(len(labels)).split(self.batch_size):
                out = functional_call(self.model, dict(zip(names, current, strict=True)), (x[idx],))
                grads = torch.autograd.grad(F.cross_entropy(out, labels[idx]), current, create_graph=True)
                nxt = []
                for i, (p, g) in enumerate(zip(current, grads, strict=True)):
                    if self.weight_decay:
                        g = g + self.weight_decay * p
                    if self.momentum:
                        buffers[i] = g if buffers[i] is None else self.momentum * buffers[i] + g
                        g = buffers[i]
                    nxt.append(p - self.lr * g)
                current = nxt
        return torch.cat([(c - s).reshape(-1) for c, s in zip(current, start, strict=True)])

    def output_bias_gradient(self) -> torch.Tensor:
        """Mean output-bias gradient implied by the update (first-order: -delta / (lr * steps))."""
        last_bias = list(self.params.values())[-1]
        steps = self.epochs * -(-self.num_samples // self.batch_size)
        return -self.observed[-last_bias.numel():] / (self.lr * steps)


Case = GradientCase | UpdateCase


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a, b): Geiping et al. 2020, eq. 4 (scale-invariant, so boosting does not matter)."""
    return 1.0 - (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12)
