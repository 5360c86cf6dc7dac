from __future__ import annotations

import pytest
import torch

from flsec.models import MODELS, InputSpec, build_model, output_layer_slice

SPECS = {
    "digits_cnn": InputSpec(1, 8, 8, 10, (0.3,), (0.4,)),
    "mnist_cnn": InputSpec(1, 28, 28, 10, (0.13,), (0.31,)),
    "lenet": InputSpec(1, 28, 28, 10, (0.13,), (0.31,)),
    "fl_defender_cnn": InputSpec(1, 28, 28, 10, (0.13,), (0.31,)),
    "cifar_convnet": InputSpec(3, 32, 32, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    "resnet18": InputSpec(3, 32, 32, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    "lenet_zhu": InputSpec(3, 32, 32, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


def test_every_registered_model_is_covered() -> None:
    assert set(MODELS.names()) == set(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_forward_shape_and_seeded_init(name: str) -> None:
    spec = SPECS[name]
    model = build_model(name, spec, seed=0)
    x = torch.rand(2, spec.channels, spec.height, spec.width)
    assert model(x).shape == (2, spec.num_classes)
    again = build_model(name, spec, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), build_model(name, spec, 1).parameters(),
                                                      strict=True))
    # No buffers in the weights: every update is a plain parameter delta.
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}


def test_output_layer_slice_is_last_linear() -> None:
    model = build_model("digits_cnn", SPECS["digits_cnn"], 0)
    s = output_layer_slice(model)
    n = sum(p.numel() for p in model.parameters())
    assert s.stop == n and s.stop - s.start == 64 * 10 + 10


def test_cifar_convnet_first_layer_learns_at_init() -> None:
    """GroupNorm after every convolution keeps the signal alive through the 8 layers: at PyTorch's default
    initialisation the first convolution's relative gradient ||g|| / ||w|| is about 0.14 here; without
    normalisation the same net gives about 0.001, the vanishing signal that kept it on CIFAR-10's plateau."""
    spec = SPECS["cifar_convnet"]
    model = build_model("cifar_convnet", spec, seed=0)
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == 6
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).weight
    assert first.grad is not None
    assert float(first.grad.norm() / first.detach().norm()) > 0.02
    # The same forward in train and eval mode: no running statistics (what FL updates and inversion need).
    with torch.no_grad():
        assert torch.equal(model.train()(x), model.eval()(x))


def resnet18_parameter_count(width: int, channels: int = 3, classes: int = 10) -> int:
    """ResNet-18 (CIFAR variant, bias-free convolutions, one weight + bias per normalised channel) counted
    layer by layer: the 3x3 stem, four stages of two basic blocks (1x1 projection shortcut where the shape
    changes), the classifier."""
    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k + 2 * cout  # + the norm's affine weight and bias

    total, cin = conv(channels, width, 3), width
    for factor in (1, 2, 4, 8):
        cout = factor * width
        total += conv(cin, cout, 3) + conv(cout, cout, 3) + (conv(cin, cout, 1) if cin != cout else 0)
        total += 2 * conv(cout, cout, 3)
        cin = cout
    return total + cin * classes + classes


def test_resnet18_width_sets_parameter_count() -> None:
    spec = SPECS["resnet18"]
    counts = {w: sum(p.numel() for p in build_model("resnet18", spec, 0, width=w).parameters()) for w in (8, 16, 32)}
    standard = sum(p.numel() for p in build_model("resnet18", spec, 0).parameters())
    assert standard == resnet18_parameter_count(64) == 11_173_962  # the CIFAR ResNet-18's well-known count
    assert standard == sum(p.numel() for p in build_model("resnet18", spec, 0, width=64).parameters())
    for w, n in counts.items():
        assert n == resnet18_parameter_count(w), w
    assert 3.9 < counts[32] / counts[16] < 4.0 and 3.9 < counts[16] / counts[8] < 4.0  # ~ width squared


def test_resnet18_groups_keep_two_channels_per_group() -> None:
    from flsec.models.resnet import norm_groups

    assert [norm_groups(c) for c in (64, 128, 256, 512)] == [32, 32, 32, 32]  # the standard net: 32 groups
    assert [norm_groups(c) for c in (8, 16, 24, 32, 48)] == [4, 8, 4, 16, 8]
    model = build_model("resnet18", SPECS["resnet18"], 0, width=16)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 1 + 4 * 2 * 2 + 3  # stem, two per block, three projection shortcuts
    assert all(m.num_channels % m.num_groups == 0 and m.num_channels // m.num_groups >= 2 for m in norms)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # no running statistics: train and eval mode compute the same function
        assert torch.equal(model.train()(x), model.eval()(x))


def test_width_is_refused_where_it_does_not_apply() -> None:
    from flsec.config import build_config
    from flsec.errors import ConfigError

    assert build_config({"model": {"name": "resnet18", "width": 16}}).model.width == 16
    with pytest.raises(ConfigError, match=r"^model.width: model 'cifar_convnet' has no width option; models with one: "
                                          r"resnet18$"):
        build_config({"model": {"name": "cifar_convnet", "width": 16}})
    for bad in (0, 15, 2048):
        with pytest.raises(ConfigError, match=rf"^model.width: {bad} is not allowed; allowed: an even number in 2..1024$"):
            build_config({"model": {"name": "resnet18", "width": bad}})
