"""Carriers synthesised from the global model alone: model inversion with image priors.

DeepInversion (Yin et al., CVPR 2020, "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion", eq. 2-4): for each class c, a batch of images x is optimised so that the model
assigns them to c, under image priors that keep them image-like:

    min_x  CE(f(jitter(x)), c) + a_tv TV(x) + a_l2 ||x||^2 + a_bn sum_l ||mu_l(x) - mu_l||_2 + ||s2_l(x) - s2_l||_2

where TV is the anisotropic total variation (:func:`flsec.inversion.metrics.total_variation`), the
jitter a random translation at each step (their "random jitter"), and the last term matches the
batch statistics of every BatchNorm layer to its running statistics (the "feature distribution
regularisation", eq. 4). Models without BatchNorm running statistics (GroupNorm, no normalisation:
every model flsec ships) have no stored feature statistics to match, and the term is absent. The
images are parametrised as x = sigmoid(z), so they stay in [0, 1] without clipping; Adam on z.

The images are labelled by the model (its prediction on the final images), as a defender with no
data would label them. Deviations from the paper, for carriers rather than a distillation set: no
Adaptive-DeepInversion competition term (it needs a student); TV and L2 weights are per-image means
(``total_variation`` averages over pixels), so they do not depend on the image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flsec.inversion.metrics import total_variation


@dataclass(frozen=True)
class SynthesisSettings:
    per_class: int = 30
    steps: int = 300
    lr: float = 0.05
    tv_weight: float = 0.1
    l2_weight: float = 0.1
    jitter: int | None = None  # None: one pixel per 14 of the image side (2 on MNIST, 1 on 8x8 digits)
    bn_weight: float = 0.01
    seed: int = 0
    progress: bool = False


class _BatchNormStats:
    """Forward hooks on every BatchNorm layer: the distance of the batch's channel statistics to the
    layer's running statistics (DeepInversion eq. 4), summed over layers."""

    def __init__(self, model: nn.Module) -> None:
        self.losses: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        x = inputs[0]
        dims = [0, *range(2, x.ndim)]
        mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
        self.losses.append(torch.linalg.vector_norm(mean - module.running_mean, 2)
                           + torch.linalg.vector_norm(var - module.running_var, 2))

    def pop(self) -> torch.Tensor | None:
        total = torch.stack(self.losses).sum() if self.losses else None
        self.losses = []
        return total

    @property
    def active(self) -> bool:
        return bool(self.handles)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def synthesise(model: nn.Module, shape: tuple[int, int, int], num_classes: int, s: SynthesisSettings,
               device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``s.per_class`` images of every class (on the CPU, in [0, 1]) and the model's labels for them
    (see the module docstring). Seeded: the start and the jitter are drawn on the CPU."""
    device = device or next(model.parameters()).device
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(s.seed)
    classes = torch.arange(num_classes).repeat_interleave(s.per_class).to(device)
    z = (0.5 * torch.randn(len(classes), *shape, generator=g)).to(device).requires_grad_(True)
    jitter = default_jitter(shape) if s.jitter is None else s.jitter
    opt = torch.optim.Adam([z], lr=s.lr)
    stats = _BatchNormStats(model) if s.bn_weight > 0 else None
    try:
        for _ in tqdm(range(s.steps), desc="synthesise carriers", disable=not s.progress, dynamic_ncols=True):
            x = torch.sigmoid(z)
            if jitter:
                dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=g).tolist()
                x = torch.roll(x, (dy, dx), (2, 3))
            loss = (F.cross_entropy(model(x), classes) + s.tv_weight * total_variation(x)
                    + s.l2_weight * x.pow(2).mean())
            bn = stats.pop() if stats is not None else None
            if bn is not None:
                loss = loss + s.bn_weight * bn
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        if stats is not None:
            stats.close()
        for p in model.parameters():
            p.requires_grad_(True)
    with torch.no_grad():
        images = torch.sigmoid(z).detach()
        labels = model(images).argmax(dim=1)
    return images.cpu(), labels.cpu()


def default_jitter(shape: tuple[int, ...]) -> int:
    """Random translation in pixels: one per 14 pixels of the shorter side, at least 1 (DeepInversion
    jitters 30 of 224, ~1/7; a shift of 2 on an 8 x 8 image is a quarter of it, and a quarter of the
    synthesised digits then never reach their class)."""
    return max(1, round(min(shape[-2:]) / 14))


def has_feature_statistics(model: nn.Module) -> bool:
    """Whether the model has BatchNorm running statistics to match (DeepInversion's eq. 4 term)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None for m in model.modules())
