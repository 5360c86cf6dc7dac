"""The Geiping et al. 2020 Table 1 setting: Zhu et al.'s LeNet and the authors' optimisation space."""

from __future__ import annotations

import torch

from flsec.fl.client import batch_gradient
from flsec.inversion.cases import GradientCase
from flsec.inversion.labels import idlg_label
from flsec.inversion.methods import Box, InversionSettings, geiping
from flsec.inversion.metrics import psnr
from flsec.models import InputSpec, build_model

CIFAR = InputSpec(3, 32, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def test_lenet_zhu_is_the_dlg_network() -> None:
    """Zhu et al.'s models/vision.py LeNet: 3 sigmoid 5x5 convs of 12 channels (strides 2, 2, 1), one
    linear layer of 768 inputs on 32x32 images, every weight in U(-0.5, 0.5)."""
    model = build_model("lenet_zhu", CIFAR, 0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (12, (5, 5), (2, 2), (2, 2)), (12, (5, 5), (2, 2), (2, 2)), (12, (5, 5), (1, 1), (2, 2))]
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in model.modules()) == 3
    assert model.fc.in_features == 768 and sum(p.numel() for p in model.parameters()) == 15826
    assert all(float(p.detach().abs().max()) <= 0.5 for p in model.parameters())
    assert build_model("lenet_zhu", InputSpec(1, 28, 28, 10, (0.1,), (0.3,)), 0).fc.in_features == 12 * 7 * 7


def test_normalised_box_is_the_data_range() -> None:
    box = Box.for_space("normalised", 3, (CIFAR.mean, CIFAR.std), torch.device("cpu"))
    z = torch.randn(2, 3, 4, 4) * 10
    box.project_(z)
    x = box.pixels(z)
    assert float(x.min()) >= -1e-6 and float(x.max()) <= 1 + 1e-6
    assert torch.allclose(box.pixels((torch.full((1, 3, 1, 1), 0.3) - box.mean) / box.std), torch.full((1, 3, 1, 1), 0.3))
    pix = Box.for_space("pixel", 3, (CIFAR.mean, CIFAR.std), torch.device("cpu"))
    assert torch.equal(pix.pixels(z), z)


def _shapes() -> torch.Tensor:
    """A small piecewise-smooth colour image: two ramps, a red rectangle and a blue disk."""
    i, j = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    x = torch.stack([i / 31, j / 31, 0.5 + 0 * i])
    x[:, 8:20, 6:16] = torch.tensor([0.9, 0.2, 0.1])[:, None, None]
    x[:, (i - 20) ** 2 + (j - 22) ** 2 < 36] = torch.tensor([0.1, 0.3, 0.9])[:, None]
    return x[None]


def test_table1_setting_optimises_in_the_normalised_space() -> None:
    """The authors' setting (normalised space, N(0, 1) start, TV 0.01 on z) on the untrained LeNet
    (Zhu): the gradient is matched (cosine distance < 0.05) and the image moves towards the truth."""
    x = _shapes()
    model = build_model("lenet_zhu", CIFAR, 0)
    case = GradientCase(model, batch_gradient(model, x, torch.tensor([4])), 1)
    label = torch.tensor([idlg_label(case.output_bias_gradient())])
    assert int(label) == 4
    s = InversionSettings(iterations=300, tv_weight=0.01, space="normalised", init="normal", progress=False)
    out = geiping(case, label, (1, 3, 32, 32), s, stats=(CIFAR.mean, CIFAR.std))
    box = Box.for_space("normalised", 3, (CIFAR.mean, CIFAR.std), torch.device("cpu"))
    start = box.pixels(torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    start_loss = float(1 - torch.nn.functional.cosine_similarity(
        case.simulate(start, label).detach(), case.observed, dim=0))
    assert out.loss < 0.05 < start_loss
    assert float(psnr(out.images, x)) > float(psnr(start, x)) + 0.5
    assert float(out.images.min()) >= 0.0 and float(out.images.max()) <= 1.0
