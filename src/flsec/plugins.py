"""Access to every plug-in registry by family name (imports the built-in plug-ins once)."""

from __future__ import annotations

from typing import Any

from flsec.registry import Registry


def registry_for(kind: str) -> Registry[Any]:
    if kind == "dataset":
        from flsec.data.datasets import DATASETS

        return DATASETS
    if kind == "model":
        from flsec.models import MODELS

        return MODELS
    if kind == "aggregator":
        from flsec.aggregation import AGGREGATORS

        return AGGREGATORS
    if kind == "attack":
        from flsec.attacks.registry import load_builtin

        return load_builtin()
    if kind == "suspect detector":
        from flsec.detection import DETECTORS

        return DETECTORS
    if kind == "inversion method":
        from flsec.inversion import METHODS

        return METHODS
    raise KeyError(kind)
