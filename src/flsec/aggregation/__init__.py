"""Aggregation rules: pure functions on a k x d stack of updates, behind a registry."""

from flsec.aggregation.base import AggregationError, AggregationResult, Aggregator, AggregatorParams
from flsec.aggregation.registry import AGGREGATORS

# Built-in rules register themselves on import.
from flsec.aggregation import fedavg as _fedavg  # noqa: F401  isort: skip
from flsec.aggregation import krum as _krum  # noqa: F401  isort: skip
from flsec.aggregation import trimmed_mean as _trimmed_mean  # noqa: F401  isort: skip
from flsec.aggregation import median as _median  # noqa: F401  isort: skip
from flsec.aggregation import foolsgold as _foolsgold  # noqa: F401  isort: skip
from flsec.aggregation import fl_defender as _fl_defender  # noqa: F401  isort: skip


def build_aggregator(name: str, params: AggregatorParams) -> Aggregator:
    return AGGREGATORS.get(name)(params)


__all__ = ["AGGREGATORS", "AggregationError", "AggregationResult", "Aggregator", "AggregatorParams",
           "build_aggregator"]
