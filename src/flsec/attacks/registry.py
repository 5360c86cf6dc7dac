"""The attack registry: ``attack.kind`` -> :class:`~flsec.attacks.base.Attack` subclass."""

from __future__ import annotations

import importlib

from flsec.attacks.base import Attack, AttackSetting
from flsec.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack")
ATTACKS.register("none")(Attack)

BUILTIN = ("data_poisoning", "constrain_scale", "pgd", "neurotoxin", "dba", "sybil", "edge_case")


def load_builtin() -> Registry[type[Attack]]:
    """The registry with the built-in attacks registered (each module registers itself on import)."""
    for module in BUILTIN:
        importlib.import_module(f"flsec.attacks.{module}")
    return ATTACKS


def build_attack(setting: AttackSetting) -> Attack:
    return load_builtin().get(setting.config.attack.kind)(setting)
