"""The attack registry: ``attack.kind`` -> :class:`~flsec.attacks.base.Attack` subclass."""

from __future__ import annotations

from flsec.attacks.base import Attack, AttackSetting
from flsec.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack")
ATTACKS.register("none")(Attack)


def build_attack(setting: AttackSetting) -> Attack:
    return ATTACKS.get(setting.config.attack.kind)(setting)


# Built-in attacks register themselves on import.
from flsec.attacks import data_poisoning as _data_poisoning  # noqa: E402, F401  isort: skip
from flsec.attacks import constrain_scale as _constrain_scale  # noqa: E402, F401  isort: skip
from flsec.attacks import pgd as _pgd  # noqa: E402, F401  isort: skip
from flsec.attacks import neurotoxin as _neurotoxin  # noqa: E402, F401  isort: skip
from flsec.attacks import dba as _dba  # noqa: E402, F401  isort: skip
from flsec.attacks import sybil as _sybil  # noqa: E402, F401  isort: skip
from flsec.attacks import edge_case as _edge_case  # noqa: E402, F401  isort: skip
