"""Flattened-parameter helpers and reproducible per-purpose seeds."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def get_flat(model: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def set_flat(model: nn.Module, flat: torch.Tensor) -> None:
    torch.nn.utils.vector_to_parameters(flat.detach().clone(), model.parameters())


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
