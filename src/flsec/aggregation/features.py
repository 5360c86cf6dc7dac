"""Which part of each update similarity-based rules look at (FoolsGold, FL-Defender).

Both reference implementations compare the updates of the *output layer's weight matrix* only
(FoolsGold's deep-learning code and FL-Defender's code take ``list(model.parameters())[-2]``):
the output layer is where a targeted attack shows most clearly, and it is small.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from flsec.aggregation.base import AggregatorParams

Features = Literal["output_weights", "output_layer", "all"]
FEATURES: tuple[str, ...] = ("output_weights", "output_layer", "all")


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


def select_features(updates: torch.Tensor, params: AggregatorParams) -> torch.Tensor:
    """The columns of ``updates`` named by ``params.similarity_features``."""
    kind = params.similarity_features
    if kind == "all":
        return updates
    if kind == "output_layer":
        return updates[:, params.output_layer]
    if kind == "output_weights":
        return updates[:, params.output_layer if params.output_weights is None else params.output_weights]
    raise ValueError(f"aggregation.similarity_features: unknown '{kind}'; allowed: {', '.join(FEATURES)}")
