"""Aggregation rules: pure functions on a k x d stack of updates, behind a registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flsec.aggregation.base import (
    AggregationContext,
    AggregationError,
    AggregationResult,
    Aggregator,
    AggregatorParams,
)
from flsec.aggregation.registry import AGGREGATORS

# Built-in rules register themselves on import.
from flsec.aggregation import fedavg as _fedavg  # noqa: F401  isort: skip
from flsec.aggregation import krum as _krum  # noqa: F401  isort: skip
from flsec.aggregation import trimmed_mean as _trimmed_mean  # noqa: F401  isort: skip
from flsec.aggregation import median as _median  # noqa: F401  isort: skip
from flsec.aggregation import foolsgold as _foolsgold  # noqa: F401  isort: skip
from flsec.aggregation import fl_defender as _fl_defender  # noqa: F401  isort: skip
from flsec.aggregation import bulyan as _bulyan  # noqa: F401  isort: skip
from flsec.aggregation import norm_clip as _norm_clip  # noqa: F401  isort: skip
from flsec.aggregation import flame as _flame  # noqa: F401  isort: skip
from flsec.aggregation import fltrust as _fltrust  # noqa: F401  isort: skip

if TYPE_CHECKING:
    from torch import nn

    from flsec.config import ExperimentConfig


def build_aggregator(name: str, params: AggregatorParams) -> Aggregator:
    return AGGREGATORS.get(name)(params)


def params_from_config(config: ExperimentConfig, model: nn.Module) -> AggregatorParams:
    """The rule settings of an experiment (``[aggregation]``, the assumed number of attackers, the
    federation size and where the model's output layer lies in the flat parameter vector)."""
    from flsec.models.registry import output_layer_slices

    a = config.aggregation
    layer, weights = output_layer_slices(model)
    return AggregatorParams(
        f=config.assumed_attackers, multi_krum_m=a.multi_krum_m, trim_beta=a.trim_beta,
        sample_weighted=a.sample_weighted, foolsgold_kappa=a.foolsgold_kappa,
        fl_defender_components=a.fl_defender_components, similarity_features=a.similarity_features,
        clip_norm=a.clip_norm, clip_noise=a.clip_noise, flame_noise=a.flame_noise, flame_distance=a.flame_distance,
        fltrust_server_steps=a.fltrust_server_steps, num_clients=config.training.num_clients,
        output_layer=layer, output_weights=weights,
    )


def describe(name: str) -> str:
    """One sentence on the registered rule ``name``: what it computes and the paper it follows."""
    rule = AGGREGATORS.get(name)
    summary = rule.summary.replace("`", "")
    return f"{name}: {summary}. Follows {rule.citation}." if rule.citation else f"{name}: {summary or 'no description'}."


def uses_root_data(name: str) -> bool:
    """Whether the registered rule ``name`` needs a server root dataset kept out of the training split."""
    return bool(getattr(AGGREGATORS.get(name), "uses_root_data", False))


__all__ = ["AGGREGATORS", "AggregationContext", "AggregationError", "AggregationResult", "Aggregator",
           "AggregatorParams", "build_aggregator", "describe", "params_from_config", "uses_root_data"]
