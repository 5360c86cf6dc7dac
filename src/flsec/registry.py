"""Name -> factory registries for every plug-in family (models, datasets, aggregators, ...).

A user adds a plug-in by decorating a factory in their own module and listing that module in
the experiment's ``plugins`` field (or importing it before calling flsec); the engine never changes.

Registries are filled from above: each family creates its registry and its built-in modules register
themselves when the family is imported; nothing here imports a family. The configuration, which sits
below every family, checks names with :func:`known_names`: the names flsec's own modules register
(:data:`BUILT_IN`, which a test keeps equal to the registries) and whatever a plug-in registered since.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from flsec.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories of one plug-in family."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        _ENROLLED[kind] = self

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a second registration of a name is an error."""

        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} '{name}'; allowed: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


_ENROLLED: dict[str, Registry[Any]] = {}

#: The names flsec's own modules register, per family (``kind``).
BUILT_IN: dict[str, tuple[str, ...]] = {
    "dataset": ("cifar10", "digits", "fashion_mnist", "mnist"),
    "model": ("cifar_convnet", "digits_cnn", "fl_defender_cnn", "lenet", "lenet_zhu", "mnist_cnn", "resnet18"),
    "aggregator": ("bulyan", "fedavg", "fl_defender", "flame", "fltrust", "foolsgold", "krum", "median", "multi_krum",
                   "norm_clip", "trimmed_mean"),
    "attack": ("backdoor", "constrain_scale", "dba", "edge_case", "label_flip", "neurotoxin", "none", "pgd",
               "sybil_label_flip"),
    "inversion method": ("dlg", "geiping"),
    "suspect detector": ("cosine", "norm", "norm_cosine", "rule"),
}

#: The built-in models that take a ``width`` (base channel count) argument.
BUILT_IN_WITH_WIDTH: tuple[str, ...] = ("resnet18",)


def known_names(kind: str) -> list[str]:
    """Every name of family ``kind`` a configuration may use: the built-ins and whatever plug-ins have
    registered in the family's registry so far (without importing the family)."""
    enrolled = _ENROLLED.get(kind)
    return sorted(set(BUILT_IN.get(kind, ())) | set(enrolled.names() if enrolled is not None else ()))


def import_plugins(modules: list[str]) -> None:
    """Import user modules that register plug-ins (the ``plugins`` config field)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"plugins: cannot import module '{module}': {exc}") from None
