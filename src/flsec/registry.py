"""Name -> factory registries for every plug-in family (models, datasets, aggregators, ...).

A user adds a plug-in by decorating a factory in their own module and listing that module in
the experiment's ``plugins`` field (or importing it before calling flsec); the engine never changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from flsec.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories of one plug-in family."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

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


def import_plugins(modules: list[str]) -> None:
    """Import user modules that register plug-ins (the ``plugins`` config field)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"plugins: cannot import module '{module}': {exc}") from None
