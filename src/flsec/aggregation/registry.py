"""The aggregator registry: name -> Aggregator subclass."""

from __future__ import annotations

from flsec.aggregation.base import Aggregator
from flsec.registry import Registry

AGGREGATORS: Registry[type[Aggregator]] = Registry("aggregator")
