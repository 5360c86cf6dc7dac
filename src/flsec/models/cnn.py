"""Small convolutional networks for 8x8 digits, MNIST-sized and CIFAR-sized images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flsec.models.registry import MODELS, InputSpec, Normalize


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and two dense layers, for 8x8 images."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.net = nn.Sequential(
            Normalize(spec.mean, spec.std),
            nn.Conv2d(spec.channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (spec.height // 2) * (spec.width // 2), 64), nn.ReLU(),
            nn.Linear(64, spec.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MnistCNN(nn.Module):
    """The 2-conv MNIST network of McMahan et al. (2017, "Communication-efficient learning"),
    with a 128-unit hidden layer: conv5x5(32)-pool-conv5x5(64)-pool-fc128-fc."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        h, w = ((spec.height - 4) // 2 - 4) // 2, ((spec.width - 4) // 2 - 4) // 2
        self.net = nn.Sequential(
            Normalize(spec.mean, spec.std),
            nn.Conv2d(spec.channels, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * h * w, 128), nn.ReLU(),
            nn.Linear(128, spec.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998): C1 6@5x5 (padded to keep 28x28), S2 average pooling,
    C3 16@5x5, S4, F5 120, F6 84, output; tanh activations as in the original."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        h, w = (spec.height // 2 - 4) // 2, (spec.width // 2 - 4) // 2
        self.net = nn.Sequential(
            Normalize(spec.mean, spec.std),
            nn.Conv2d(spec.channels, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * h * w, 120), nn.Tanh(),
            nn.Linear(120, 84), nn.Tanh(),
            nn.Linear(84, spec.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CifarConvNet(nn.Module):
    """A VGG-style ConvNet for 32x32 colour images (Simonyan & Zisserman, ICLR 2015: stacks of 3x3
    convolutions, each block closed by 2x2 max pooling): 3 blocks of two convolutions (32-64-128
    channels) and fc256, with Group Normalization (Wu & He, ECCV 2018, Eq. 1-3) after every
    convolution: 8 groups, so even the 32-channel layers keep 4 channels per group (32 groups, their
    default, would make those layers InstanceNorm, which their ablation finds clearly worse).

    Without normalisation this 8-layer net starts on a long plateau from PyTorch's default
    initialisation (weight variance 1/(3 fan_in), so the signal shrinks about 2.4x per ReLU layer):
    the first convolution's relative gradient ||g|| / ||w|| is about 1e-3, against about 0.1 with
    GroupNorm (tests/test_models.py). GroupNorm fixes that and, unlike BatchNorm,
    keeps no running statistics, so every FL update is a plain parameter delta and a captured model
    behaves the same in train and eval mode, which gradient inversion needs (Hsieh et al., ICML 2020,
    "The Non-IID Data Quagmire", recommend it for FL for the same reason)."""

    groups = 8

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(self.groups, cout), nn.ReLU()]

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [*conv(cin, cout), *conv(cout, cout), nn.MaxPool2d(2)]

        self.net = nn.Sequential(
            Normalize(spec.mean, spec.std),
            *block(spec.channels, 32), *block(32, 64), *block(64, 128),
            nn.Flatten(),
            nn.Linear(128 * (spec.height // 8) * (spec.width // 8), 256), nn.ReLU(),
            nn.Linear(256, spec.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FLDefenderCNN(nn.Module):
    """The MNIST CNN of FL-Defender's experiments (Jebreel & Domingo-Ferrer 2023; the authors'
    ``models.py``, CNNMNIST, the PyTorch MNIST example network): conv 10@5x5 - pool - conv 20@5x5 +
    Dropout2d - pool - fc 50 + dropout - fc. The original returns log-softmax and trains with
    cross-entropy on it, which equals cross-entropy on the logits (log-softmax is idempotent), so
    logits are returned. Dropout draws from torch's global generator."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.norm = Normalize(spec.mean, spec.std)
        self.conv1 = nn.Conv2d(spec.channels, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        flat = 20 * (((spec.height - 4) // 2 - 4) // 2) * (((spec.width - 4) // 2 - 4) // 2)
        self.fc1 = nn.Linear(flat, 50)
        self.fc2 = nn.Linear(50, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(self.norm(x)), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(F.dropout(x, training=self.training))


class LeNetZhu(nn.Module):
    """The small sigmoid CNN of Deep Leakage from Gradients (Zhu, Liu & Han, NeurIPS 2019; their
    ``models/vision.py`` ``LeNet``), called "LeNet (Zhu)" by Geiping et al. 2020 (Table 1): three
    5x5 convolutions of 12 channels (strides 2, 2, 1, padding 2) with sigmoid activations and one
    linear layer, every weight and bias drawn from U(-0.5, 0.5) as in their ``weights_init``. It is
    not LeNet-5 (``lenet``): it has no pooling and is smooth everywhere, which is what makes it easy
    to invert."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        h, w = -(-spec.height // 4), -(-spec.width // 4)
        self.normalize = Normalize(spec.mean, spec.std)
        self.body = nn.Sequential(
            nn.Conv2d(spec.channels, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1), nn.Sigmoid(),
        )
        self.fc = nn.Linear(12 * h * w, spec.num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.uniform_(module.weight, -0.5, 0.5)
                nn.init.uniform_(module.bias, -0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.body(self.normalize(x)), 1))


MODELS.register("digits_cnn")(DigitsCNN)
MODELS.register("mnist_cnn")(MnistCNN)
MODELS.register("lenet")(LeNet5)
MODELS.register("cifar_convnet")(CifarConvNet)
MODELS.register("fl_defender_cnn")(FLDefenderCNN)


MODELS.register("lenet_zhu")(LeNetZhu)
