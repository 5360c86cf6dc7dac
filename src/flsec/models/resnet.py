"""ResNet-18 for 32x32 inputs (He et al., CVPR 2016, Sec. 4.2: the CIFAR variant with a 3x3 stem and
no max-pool), with a ``width`` option: the base channel count (64 = the standard net; stages of
width, 2, 4 and 8 x width channels), so CPU runs can use a narrower net of the same depth.

Batch normalisation is replaced by group normalisation (Wu & He, ECCV 2018, Eq. 1-3) because of
federated averaging: BatchNorm's running mean and variance are buffers, not parameters, so FedAvg
would have to average them separately (and with non-IID clients each client's statistics describe
its own skewed data: Hsieh et al., ICML 2020, "The Non-IID Data Quagmire", Sec. 5, measure the
accuracy loss and recommend GroupNorm). GroupNorm normalises each sample by itself, so

* every client update is a plain parameter delta that FedAvg and every robust rule average as is;
* the model computes the same function in train and eval mode, which gradient inversion needs
  (the gradient the attacker matches is the one the client computed);
* the vectorised client engine can train it (no per-client training state).

Groups: 32 at the standard width, as in Wu & He; a narrower layer keeps at least two channels per
group (``gcd(32, channels // 2)`` groups), since one channel per group is InstanceNorm, which their
ablation finds clearly worse. At width 64 every layer has >= 64 channels, so this is exactly 32 groups.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flsec.models.registry import MODELS, InputSpec, Normalize

STANDARD_WIDTH = 64


def norm_groups(channels: int) -> int:
    """GroupNorm groups of a ``channels``-wide layer: 32, or fewer so that each group has >= 2 channels."""
    return math.gcd(32, max(channels // 2, 1))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(channels), channels)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, spec: InputSpec, width: int = STANDARD_WIDTH) -> None:
        super().__init__()
        if width < 2 or width % 2:
            raise ValueError(f"model.width: {width} is not an even number >= 2")
        self.normalize = Normalize(spec.mean, spec.std)
        self.stem = nn.Sequential(nn.Conv2d(spec.channels, width, 3, 1, 1, bias=False), _norm(width), nn.ReLU())
        layers: list[nn.Module] = []
        cin = width
        for factor, stride in [(1, 1), (2, 2), (4, 2), (8, 2)]:
            cout = factor * width
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(self.normalize(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


MODELS.register("resnet18")(ResNet18)
