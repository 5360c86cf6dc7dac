"""Data and model poisoning attacks: the maths as pure functions, each attack a registered plug-in.

``flsec.attacks.ATTACKS`` maps ``attack.kind`` to an :class:`~flsec.attacks.base.Attack` subclass; a user
registers their own in a module listed in the experiment's ``plugins``.
"""

from typing import Any

from flsec.attacks.backdoor import Trigger, make_trigger, poison_batch, stamp
from flsec.attacks.boosting import boost, default_boost_factor
from flsec.attacks.label_flip import flip_labels

_LAZY = {"ATTACKS": "registry", "build_attack": "registry", "Attack": "base", "AttackHooks": "base",
         "AttackSetting": "base"}


def __getattr__(name: str) -> Any:
    # The registry imports flsec.fl, which imports this package: load it on first use.
    if name in _LAZY:
        import importlib

        from flsec.attacks.registry import load_builtin

        load_builtin()
        return getattr(importlib.import_module(f"flsec.attacks.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'flsec.attacks' has no attribute '{name}'")


__all__ = ["ATTACKS", "Attack", "AttackHooks", "AttackSetting", "Trigger", "boost", "build_attack",
           "default_boost_factor", "flip_labels", "make_trigger", "poison_batch", "stamp"]
