"""Label flipping (the targeted attack studied by FL-Defender, Jebreel et al. 2023):
every sample of the source class is relabelled to the target class."""

from __future__ import annotations

import torch


def flip_labels(y: torch.Tensor, source: int, target: int) -> torch.Tensor:
    return torch.where(y == source, torch.full_like(y, target), y)
