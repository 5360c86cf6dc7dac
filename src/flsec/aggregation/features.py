"""Which part of each update similarity-based rules look at (FoolsGold, FL-Defender).

Both reference implementations compare the updates of the *output layer's weight matrix* only
(FoolsGold's deep-learning code and FL-Defender's code take ``list(model.parameters())[-2]``):
the output layer is where a targeted attack shows most clearly, and it is small.
"""

from __future__ import annotations

from typing import Literal

import torch

from flsec.aggregation.base import AggregatorParams

Features = Literal["output_weights", "output_layer", "all"]
FEATURES: tuple[str, ...] = ("output_weights", "output_layer", "all")


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
