"""What the curious server observed, and how to simulate it from candidate images.

* :class:`GradientCase` (FedSGD): the gradient of the mean cross-entropy of one batch.
* :class:`UpdateCase` (FedAvg): a local update made of several SGD steps over the client's N
  images; it is replayed differentiably with the known learning rate, momentum, weight decay,
  epochs and batch size (Geiping et al. 2020, Sec. 6 "Federated averaging": the multi-step
  setting; breaching's ``UserMultiStep`` / ``_grad_fn_multi_step``).

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


def momentum_multiplier(steps: int, momentum: float) -> float:
    """S such that T SGD steps with heavy-ball momentum m on a constant gradient g move the weights
    by -lr * S * g (torch's SGD: buf_t = m buf_{t-1} + g_t, w -= lr buf_t):
    S = sum_{s=1..T} (1 - m^(T-s+1)) / (1 - m), which is T without momentum."""
    if momentum == 0.0:
        return float(steps)
    return float(sum((1.0 - momentum ** (steps - s + 1)) / (1.0 - momentum) for s in range(1, steps + 1)))


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

    @property
    def num_samples(self) -> int:
        return self.batch_size

    def output_bias_gradient(self) -> torch.Tensor:
        last_bias = list(self.params.values())[-1]
        return self.observed[-last_bias.numel():]


@dataclass
class UpdateCase:
    """A FedAvg update of a client with ``num_samples`` images, inverted into ``images`` candidates.

    With ``images == num_samples`` (the default) the replay is the client's own schedule: each
    epoch walks the candidates in a fixed order in batches of ``batch_size`` (the client's random
    order is unknown to the server, and a fixed order is what Geiping et al.'s ``loss_steps`` and
    breaching's multi-step user assume). With fewer candidates than images (an update over
    hundreds of images cannot be inverted image by image: it has fewer useful coordinates than the
    images have pixels), ``images`` candidates stand in for the client's data in a *surrogate*
    replay: the same number of steps, each on a batch of min(batch_size, images) candidates taken
    cyclically (breaching's ``seen_data_idx % num_candidates``). The candidates then converge to
    images whose joint update best explains the observed one: sharp where the client's data share
    structure (a backdoor trigger), averaged where they do not. ``surrogate_steps`` (0: as many as
    the client took) shortens the surrogate replay; 1 is the first-order view of the update as one
    gradient of the candidates (cheap: the cosine objective ignores the step size).
    """

    model: nn.Module
    observed: torch.Tensor
    num_samples: int
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    images: int | None = None
    surrogate_steps: int = 0

    def __post_init__(self) -> None:
        self.model.eval()
        self.params = _params(self.model)
        if self.surrogate_steps < 0:
            raise ValueError(f"surrogate_steps: must be >= 0, got {self.surrogate_steps}")
        if self.images is None:
            self.images = self.num_samples
        if not 1 <= self.images <= self.num_samples:
            raise ValueError(f"images: {self.images} is not in 1..{self.num_samples}")

    @property
    def num_images(self) -> int:
        return int(self.images or self.num_samples)

    @property
    def steps(self) -> int:
        return self.epochs * -(-self.num_samples // self.batch_size)

    @property
    def surrogate(self) -> bool:
        return self.num_images < self.num_samples

    def schedule(self) -> list[torch.Tensor]:
        """Candidate indices of each replayed local step."""
        k = self.num_images
        if not self.surrogate:
            return [idx for _ in range(self.epochs) for idx in torch.arange(k).split(self.batch_size)]
        b = min(self.batch_size, k)
        return [(torch.arange(b) + t * b) % k for t in range(self.surrogate_steps or self.steps)]

    def simulate(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """theta_T - theta_0 after replaying the client's SGD on (x, labels) (see the class docstring)."""
        names = list(self.params)
        start = [self.params[n] for n in names]
        current = list(start)
        buffers: list[torch.Tensor | None] = [None] * len(names)
        for idx in self.schedule():
            idx = idx.to(x.device)
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
        """Mean per-step output-bias gradient implied by the update, to first order:
        -delta_bias / (lr * S) with S the momentum multiplier of the client's T steps
        (:func:`momentum_multiplier`); weight decay on the bias is neglected."""
        last_bias = list(self.params.values())[-1]
        return -self.observed[-last_bias.numel():] / (self.lr * momentum_multiplier(self.steps, self.momentum))


Case = GradientCase | UpdateCase


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a, b): Geiping et al. 2020, eq. 4 (scale-invariant, so boosting does not matter)."""
    return 1.0 - (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12)
