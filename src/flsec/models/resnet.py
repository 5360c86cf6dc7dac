"""ResNet-18 for 32x32 inputs (He et al. 2016, the CIFAR variant with a 3x3 stem).

Batch normalisation is replaced by group normalisation (32 groups): BN's running statistics
are not model parameters and break under non-IID federated averaging (Hsieh et al. 2020,
"The Non-IID Data Quagmire"), and GroupNorm keeps every update a plain parameter delta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flsec.models.registry import MODELS, InputSpec, Normalize


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


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
    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.normalize = Normalize(spec.mean, spec.std)
        self.stem = nn.Sequential(nn.Conv2d(spec.channels, 64, 3, 1, 1, bias=False), _norm(64), nn.ReLU())
        layers: list[nn.Module] = []
        cin = 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(self.normalize(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


MODELS.register("resnet18")(ResNet18)
