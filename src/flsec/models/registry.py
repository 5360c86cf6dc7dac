"""Model registry. Every model takes images in [0, 1] and normalises them itself, so attacks,
triggers and inversion all work in pixel space."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from flsec.errors import ConfigError
from flsec.registry import Registry


@dataclass(frozen=True)
class InputSpec:
    channels: int
    height: int
    width: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


ModelFactory = Callable[[InputSpec], nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


class Normalize(nn.Module):
    """Fixed per-channel standardisation (non-persistent buffers: not part of the weights)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def has_width(name: str) -> bool:
    """Whether model ``name`` takes a ``width`` (base channel count) argument."""
    return "width" in inspect.signature(MODELS.get(name)).parameters


def build_model(name: str, spec: InputSpec, seed: int, width: int | None = None) -> nn.Module:
    """Instantiate a registered model with deterministic initial weights; ``width`` (None: the
    model's standard) for the models that take one (:func:`has_width`)."""
    factory = MODELS.get(name)
    if width is not None and not has_width(name):
        raise ConfigError(f"model.width: model '{name}' has no width option; models with one: "
                          f"{', '.join(n for n in MODELS.names() if has_width(n)) or 'none'}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(spec) if width is None else factory(spec, width=width)  # type: ignore[call-arg]
    return model


def fits(name: str, spec: InputSpec) -> bool:
    """Whether model ``name`` accepts ``spec``'s images and gives one score per class."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # e.g. "Initializing zero-element tensors" for a misfit
            out = build_model(name, spec, 0).eval()(torch.zeros(2, spec.channels, spec.height, spec.width))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return False
    return tuple(out.shape) == (2, spec.num_classes)


def check_fits(name: str, spec: InputSpec, dataset: str) -> None:
    """A one-line error when model ``name`` cannot take ``dataset``'s images (e.g. a 28x28 network on 8x8 digits)."""
    from flsec.errors import ConfigError

    if not fits(name, spec):
        ok = [n for n in MODELS.names() if n != name and fits(n, spec)]
        raise ConfigError(f"model.name: '{name}' does not fit {dataset}'s {spec.channels}x{spec.height}x{spec.width} "
                          f"images with {spec.num_classes} classes; allowed for this data: {', '.join(ok) or 'none'}")


def output_layer_slices(model: nn.Module) -> tuple[slice, slice]:
    """(weight + bias, weight only) of the last ``nn.Linear`` in the flattened parameter vector."""
    last: nn.Linear | None = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ValueError("model has no nn.Linear output layer")
    offset, start, stop, weight_stop = 0, -1, -1, -1
    for p in model.parameters():
        if p is last.weight:
            start, weight_stop = offset, offset + p.numel()
        if p is last.weight or p is last.bias:
            stop = offset + p.numel()
        offset += p.numel()
    return slice(start, stop), slice(start, weight_stop)


def output_layer_slice(model: nn.Module) -> slice:
    """Position of the last ``nn.Linear`` (weight and bias) in the flattened parameter vector."""
    return output_layer_slices(model)[0]
