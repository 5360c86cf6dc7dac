"""Flattened-parameter helpers and reproducible per-purpose seeds."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def get_flat(model: nn.Module) -> torch.Tensor:
    """All parameters as one new vector, each in its logical (row-major) element order whatever its
    memory format, on the parameters' device."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@torch.no_grad()
def set_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a vector of :func:`get_flat`'s layout into the parameters, in place: each parameter keeps
    its device and memory format (e.g. channels-last convolution weights)."""
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.copy_(flat[offset : offset + n].view_as(p))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"vector has {flat.numel()} values, the model {offset}")


def unflatten(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a flat vector into tensors named and shaped like ``model.named_parameters()``."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, p in model.named_parameters():
        out[name] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    if offset != flat.numel():
        raise ValueError(f"vector has {flat.numel()} values, the model {offset}")
    return out


def derive_seed(*keys: int) -> int:
    """A 63-bit seed determined by the keys (run seed, round, client, purpose...)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))
